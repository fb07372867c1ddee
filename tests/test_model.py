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
