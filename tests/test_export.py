"""slm export: Hugging Face GPT-2 folders that transformers loads offline, and slm's own safetensors format."""

import json

import pytest
import torch

from slm.checkpoint import save_checkpoint
from slm.config import Config, config_from_dict
from slm.data.tokenizer import get_tokenizer, tokenizer_info
from slm.errors import CheckpointError, SlmError
from slm.export import ExportError, export, load_safetensors
from slm.generate import generate_ids, load_model
from slm.model import GPT, GPTConfig

# slm and transformers compute in float32 with differently ordered (but equivalent) operations:
# logits agree to ~1e-6, so 1e-4 absolute catches any real mapping error (a wrong transpose is off by ~1).
ATOL = 1e-4
TEXTS = ["once upon a time, there was a little girl named Lily.", "Hello  world!\n\nThe end.<|endoftext|>Tom ran",
         "  leading spaces, numbers 12345 and ünïcödé 🙂 ", "it's we'll they're I'm"]


@pytest.fixture(scope="module")
def hf():
    """transformers, imported with the Hugging Face Hub switched offline: every load below is local."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        import transformers

        transformers.logging.set_verbosity_error()
        yield transformers


def load_hf(hf, folder):
    model = hf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return model, hf.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def assert_same_logits(slm_model, hf_model, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (3, slm_model.config.context_length), generator=generator)
    with torch.no_grad():
        ours, _ = slm_model(ids)
        theirs = hf_model(ids).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def save_random_model(path, tokenizer="gpt2", **model):
    """A checkpoint as Trainer.checkpoint(full=False) writes it, with random (not GPT-2-init) weights."""
    cfg = Config(model=GPTConfig(**{"n_layers": 2, "n_heads": 2, "d_model": 32, "d_ff": 64, "context_length": 32,
                                    "dropout": 0.0, **model}))
    cfg.data.tokenizer = tokenizer
    torch.manual_seed(0)
    gpt = GPT(cfg.model)
    with torch.no_grad():  # spread every weight (LayerNorms and biases too) so a mix-up would show in the logits
        for name, p in gpt.named_parameters():
            is_norm_scale = "ln" in name and name.endswith("weight")
            p.copy_(float(is_norm_scale) + 0.2 * torch.randn_like(p))
    state = {"model": gpt.state_dict(), "config": cfg.to_dict(), "tokenizer": tokenizer_info(get_tokenizer(tokenizer)),
             "step": 0, "tokens_seen": 0, "best_val_loss": float("inf")}
    save_checkpoint(state, path)
    return path


@pytest.fixture(scope="module")
def trained_export(trained_run, tmp_path_factory):
    run_dir, _, _ = trained_run
    out = export(run_dir / "best.pt", tmp_path_factory.mktemp("export") / "hf")
    return load_model(run_dir / "best.pt", device="cpu"), out


def test_hf_export_files(trained_export):
    from safetensors import safe_open

    loaded, out = trained_export
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                                "README.md"}
    config = json.loads((out / "config.json").read_text())
    c = loaded.model.config
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu_new"
    assert (config["n_layer"], config["n_embd"], config["n_inner"], config["n_positions"]) == (
        c.n_layers, c.d_model, c.d_ff, c.context_length)
    assert config["eos_token_id"] == config["bos_token_id"] == loaded.tokenizer.eot_id
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (c.d_model, 3 * c.d_model)  # Conv1D
    assert "lm_head.weight" not in keys  # tied to transformer.wte.weight
    assert "from_pretrained" in (out / "README.md").read_text()


def test_hf_logits_match(hf, trained_export):
    loaded, out = trained_export
    model, _ = load_hf(hf, out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert_same_logits(loaded.model, model, loaded.model.config.vocab_size)


def test_hf_tokenizer_matches(hf, trained_export):
    loaded, out = trained_export
    _, tok = load_hf(hf, out)
    for text in TEXTS:
        ids = loaded.tokenizer.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == loaded.tokenizer.decode(ids)
    assert tok.eos_token_id == tok.bos_token_id == loaded.tokenizer.eot_id


def test_hf_greedy_generation_matches(hf, trained_export):
    loaded, out = trained_export
    model, tok = load_hf(hf, out)
    prompt = loaded.tokenizer.encode("once upon a time")
    ours = list(generate_ids(loaded.model, prompt, max_new_tokens=20, temperature=0, eos_id=loaded.tokenizer.eot_id))
    ids = torch.tensor([prompt])
    assert len(ours) >= 10  # a story, not an immediate <|endoftext|>
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert theirs[0, len(prompt):].tolist() == ours


def test_hf_export_gpt2_tokenizer(hf, tmp_path):
    ckpt = save_random_model(tmp_path / "gpt2.pt", vocab_size=50257)
    out = export(ckpt, tmp_path / "hf")
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file() and not (out / "tokenizer.json").exists()
    model, tok = load_hf(hf, out)
    loaded = load_model(ckpt, device="cpu")
    for text in TEXTS:
        assert tok.encode(text) == loaded.tokenizer.encode(text), text
    assert tok.eos_token_id == 50256
    assert_same_logits(loaded.model, model, 50257)


def test_hf_export_without_biases(hf, tmp_path):
    ckpt = save_random_model(tmp_path / "nobias.pt", tokenizer="tinystories-4k", vocab_size=4096, bias=False)
    out = export(ckpt, tmp_path / "hf")
    model, _ = load_hf(hf, out)
    loaded = load_model(ckpt, device="cpu")
    assert loaded.model.blocks[0].attn.qkv.bias is None
    assert_same_logits(loaded.model, model, 4096, seed=1)


def test_safetensors_round_trip(trained_run, tmp_path):
    run_dir, cfg, _ = trained_run
    out = export(run_dir / "best.pt", tmp_path / "st", format="safetensors")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}
    assert config_from_dict(json.loads((out / "config.json").read_text())).model == cfg.model
    assert get_tokenizer(str(out)).encode(TEXTS[0]) == get_tokenizer("tinystories-4k").encode(TEXTS[0])
    model = load_safetensors(out)
    original = load_model(run_dir / "best.pt", device="cpu").model
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()  # still tied
    assert not model.training


def test_export_errors(trained_run, tmp_path):
    best = trained_run[0] / "best.pt"

    def one_line(exc_info):
        assert isinstance(exc_info.value, SlmError) and "\n" not in str(exc_info.value)
        return str(exc_info.value)

    with pytest.raises(ExportError) as e:
        export(best, tmp_path / "a", format="onnx")
    assert "hf, safetensors" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        export(tmp_path / "missing.pt", tmp_path / "b")
    assert "not found" in one_line(e)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(ExportError) as e:
        export(best, tmp_path / "full")
    assert "already exists" in one_line(e)
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError):
        export(best, tmp_path / "file")
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert (export(best, tmp_path / "empty", format="safetensors") / "model.safetensors").is_file()
    with pytest.raises(CheckpointError) as e:  # a Hugging Face export is not slm's safetensors format
        load_safetensors(export(best, tmp_path / "hf"))
    assert "slm-safetensors" in one_line(e)
    with pytest.raises(CheckpointError):
        load_safetensors(tmp_path / "nowhere")
    assert not list(tmp_path.glob(".*tmp-*"))  # no temporary folders left behind
