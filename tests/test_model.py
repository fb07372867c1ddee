import pytest
import torch

from slm.errors import ConfigError
from slm.generate import generate_ids
from slm.model import GPT, GPTConfig


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, context_length=32, n_layers=2, n_heads=4, d_model=32, d_ff=64, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, context_length=1024, n_layers=12, n_heads=12, d_model=768, d_ff=3072))
    assert model.count_parameters() == 124_439_808
    assert model.count_parameters(non_embedding=True) == 124_439_808 - 1024 * 768


def test_weights_are_tied():
    model = tiny_model()
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny_model()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 97
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_matches_full_recompute():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 24))
    full, _ = model(ids)
    cache = model.new_cache(1)
    logits, _ = model(ids[:, :10], cache=cache)  # prefill
    torch.testing.assert_close(logits[:, -1], full[:, 9], atol=1e-5, rtol=1e-4)
    for t in range(10, 20):  # one token at a time
        logits, _ = model(ids[:, t : t + 1], cache=cache)
        torch.testing.assert_close(logits[:, -1], full[:, t], atol=1e-5, rtol=1e-4)
    logits, _ = model(ids[:, 20:24], cache=cache)  # a chunk of several tokens on top of a cache
    torch.testing.assert_close(logits[:, -1], full[:, 23], atol=1e-5, rtol=1e-4)


def test_greedy_generation_with_cache_equals_recompute_without():
    model = tiny_model()
    prompt = [5, 17, 42]
    cached = list(generate_ids(model, prompt, max_new_tokens=20, temperature=0))
    ids = list(prompt)
    for _ in range(20):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_generation_runs_past_the_context_window():
    model = tiny_model(context_length=16)
    out = list(generate_ids(model, [1, 2, 3], max_new_tokens=40, temperature=1.0, seed=0))
    assert len(out) == 40


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    a = list(generate_ids(model, [1], 15, temperature=1.0, top_k=20, top_p=0.9, seed=3))
    b = list(generate_ids(model, [1], 15, temperature=1.0, top_k=20, top_p=0.9, seed=3))
    assert a == b


@pytest.mark.parametrize("kw, key", [
    (dict(n_heads=5), "n_heads"),
    (dict(d_model=0), "d_model"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_model_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        GPTConfig(**kw)


def test_vocab_padding_keeps_logits_at_the_true_vocabulary():
    model = tiny_model(vocab_multiple=64)
    assert model.tok_emb.weight.shape[0] == 128 and model.config.vocab_size == 97
    x = torch.randint(0, 97, (2, 10))
    logits, loss = model(x, x)
    assert logits.shape == (2, 10, 97) and torch.isfinite(loss)
    loss.backward()
    out = list(generate_ids(model, [1, 2], max_new_tokens=30, temperature=1.0, seed=0))
    assert max(out) < 97


def test_padding_rows_are_not_counted_and_flops_follow_the_formula():
    plain, padded = tiny_model(), tiny_model(vocab_multiple=64)
    assert padded.count_parameters() == plain.count_parameters()
    c = plain.config
    n = plain.count_parameters(non_embedding=True)
    assert plain.flops_per_token() == 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * c.context_length


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_linear_cross_entropy_equals_the_plain_loss_and_gradients(chunk):
    from slm.model.loss import linear_cross_entropy

    torch.manual_seed(1)
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 97, (50,))
    y[[3, 17, 40]] = -1  # ignored positions
    ref = torch.nn.functional.cross_entropy(x @ w.t(), y, ignore_index=-1)
    gx_ref, gw_ref = torch.autograd.grad(ref * 3.0, (x, w))
    loss = linear_cross_entropy(x, w, y, chunk)
    gx, gw = torch.autograd.grad(loss * 3.0, (x, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    # padding rows (vocab_multiple): masked out of the softmax, zero gradient
    padded = torch.cat([w.detach(), torch.randn(31, 16, dtype=torch.float64)]).requires_grad_()
    loss = linear_cross_entropy(x, padded, y, chunk, vocab_size=97)
    gx, gw = torch.autograd.grad(loss * 3.0, (x, padded))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw[:97], gw_ref)
    assert not gw[97:].any()


def test_gpt_with_loss_chunk_matches_the_plain_forward_and_backward():
    plain, fused = tiny_model(vocab_multiple=64).train(), tiny_model(vocab_multiple=64).train()
    fused.loss_chunk = 24
    x = torch.randint(0, 97, (3, 32))
    y = torch.randint(0, 97, (3, 32))
    _, ref = plain(x, y)
    logits, loss = fused(x, y)
    assert logits is None  # the point: no (tokens x vocab) tensor
    torch.testing.assert_close(loss, ref)
    ref.backward()
    loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():  # evaluation keeps the plain path (logits are wanted there)
        logits, loss = fused(x, y)
    assert logits.shape == (3, 32, 97)
    torch.testing.assert_close(loss, ref.detach())


def test_linear_cross_entropy_under_bf16_autocast_is_close_to_the_plain_loss():
    from slm.model.loss import linear_cross_entropy

    torch.manual_seed(2)
    x = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(300, 32) * 0.2).requires_grad_()
    y = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.cross_entropy(x @ w.t(), y)
        loss = linear_cross_entropy(x, w, y, 16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=1e-2)
    loss.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("kernel", ["auto", "sdpa", "flash", "efficient", "math", "cudnn"])
def test_attention_kernel_choice_gives_the_same_output(kernel):
    from slm.device import attention_kernel

    model = tiny_model()
    x = torch.randint(0, 97, (2, 20))
    ref, _ = model(x)
    with attention_kernel(kernel):  # cudnn is not on CPUs: it falls back to the next kernel
        out, _ = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks the compiled bf16 path on a GPU")
def test_compiled_fused_loss_on_cuda_matches_the_plain_loss():
    plain = tiny_model(vocab_size=50257, vocab_multiple=64, d_model=64).cuda().train()
    fused = tiny_model(vocab_size=50257, vocab_multiple=64, d_model=64).cuda().train()
    fused.loss_chunk = 40
    step = torch.compile(fused)
    x, y = torch.randint(0, 50257, (2, 2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, ref = plain(x, y)
        _, loss = step(x, y)
    torch.testing.assert_close(loss, ref, rtol=2e-3, atol=2e-3)
    ref.backward()
    loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=5e-2, atol=2e-4, msg=name)
