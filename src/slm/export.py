"""Exporting a checkpoint for use outside slm.

    export("runs/tiny/best.pt", "exports/tiny")                         # a Hugging Face GPT-2 model folder
    export("runs/tiny/best.pt", "exports/tiny-st", format="safetensors")  # slm's own weights, as safetensors

format "hf" writes a folder that ``transformers`` loads as ``GPT2LMHeadModel`` with no network:

    config.json, generation_config.json    GPT2Config with slm's sizes; <|endoftext|> is bos, eos and pad
    model.safetensors                      the weights renamed to GPT-2's names (see ``hf_state_dict``)
    vocab.json + merges.txt                the gpt2 tokenizer (GPT2Tokenizer), or
    tokenizer.json                         a Hugging Face BPE (PreTrainedTokenizerFast)
    tokenizer_config.json, special_tokens_map.json, README.md (a short model card)

slm's GPT *is* GPT-2 (pre-norm blocks, learned positions, tanh GELU, LayerNorm eps 1e-5, tied lm_head),
so the export is a renaming plus two details: GPT-2 stores its Linear layers as ``Conv1D`` with the
weight transposed (in, out), and it always has biases, so a ``bias=False`` model gets zero biases.

format "safetensors" writes slm's state dict as it is (without the tied lm_head copy) to
``model.safetensors`` and the run config to ``config.json``; ``load_safetensors`` reads it back.
Either way the folder is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from slm.config import config_from_dict
from slm.data.tokenizer import EOT, HFTokenizer, TiktokenTokenizer, _asset
from slm.errors import CheckpointError, SlmError
from slm.model import GPT

FORMATS = ("hf", "safetensors")
SAFETENSORS_FORMAT = "slm-safetensors/1"  # marker in the metadata of slm-format model.safetensors files


class ExportError(SlmError):
    """An export that cannot be written: unknown format, occupied output folder, unsupported tokenizer."""


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, format: str = "hf") -> Path:
    """Write ``checkpoint`` (e.g. ``runs/tiny/best.pt``) to the new folder ``out_dir``; returns its path."""
    from slm.generate import load_model  # LoRA fine-tunes come back with their adapters merged in

    if format not in FORMATS:
        raise ExportError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder; choose a new --out folder")
    loaded = load_model(checkpoint, device="cpu")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if format == "hf":
            _write_hf(loaded, tmp)
        else:
            _write_slm_safetensors(loaded, tmp)
        if out.exists():
            out.rmdir()  # empty (checked above); a folder cannot be renamed over a folder on every OS
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- Hugging Face (GPT-2) format


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """slm's weights under GPT2LMHeadModel's names. lm_head.weight is tied to wte, so it is not stored."""
    c = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def bias(name: str, size: int) -> torch.Tensor:  # GPT-2 always has biases: zeros for a bias=False model
        return sd.get(name, torch.zeros(size))

    out = {
        "transformer.wte.weight": sd["tok_emb.weight"][: model.config.vocab_size],  # without vocab padding
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "transformer.ln_f.bias": bias("ln_f.bias", c.d_model),
    }
    for i in range(c.n_layers):
        s, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[h + theirs + ".weight"] = sd[s + ours + ".weight"]
            out[h + theirs + ".bias"] = bias(s + ours + ".bias", c.d_model)
        # nn.Linear stores weight as (out, in); GPT-2's Conv1D as (in, out)
        for ours, theirs, size in (("attn.qkv", "attn.c_attn", 3 * c.d_model), ("attn.proj", "attn.c_proj", c.d_model),
                                   ("mlp.fc", "mlp.c_fc", c.d_ff), ("mlp.proj", "mlp.c_proj", c.d_model)):
            out[h + theirs + ".weight"] = sd[s + ours + ".weight"].t()
            out[h + theirs + ".bias"] = bias(s + ours + ".bias", size)
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(loaded) -> dict:
    """config.json of a GPT2LMHeadModel with the sizes of this model."""
    c, eot = loaded.model.config, loaded.tokenizer.eot_id
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.context_length,
        "n_embd": c.d_model,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": c.d_ff,
        "activation_function": "gelu_new",  # the tanh approximation of GELU, as slm uses
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def _write_hf(loaded, out: Path) -> None:
    from safetensors.torch import save_file

    save_file(hf_state_dict(loaded.model), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", hf_config(loaded))
    eot = loaded.tokenizer.eot_id
    _write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
    _write_hf_tokenizer(loaded.tokenizer, loaded.model.config.context_length, out)
    (out / "README.md").write_text(_model_card(loaded))


def _write_hf_tokenizer(tok, context_length: int, out: Path) -> None:
    """Files for ``AutoTokenizer.from_pretrained(out)`` that encode exactly as ``tok`` does."""
    specials = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    common = {**specials, "model_max_length": context_length, "add_bos_token": False, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False}  # no cleanup: decode returns the bytes the ids stand for
    if isinstance(tok, TiktokenTokenizer) and tok.name == "gpt2":
        # the bundled tiktoken files are GPT-2's own vocab.json and merges.txt under their original names
        shutil.copyfile(_asset("gpt2", "encoder.json"), out / "vocab.json")
        shutil.copyfile(_asset("gpt2", "vocab.bpe"), out / "merges.txt")
        _write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", **common})
    elif isinstance(tok, HFTokenizer):
        (out / "tokenizer.json").write_text(tok.json)
        _write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **common})
    else:
        raise ExportError(f"tokenizer {tok.name!r} cannot be exported to Hugging Face format")
    _write_json(out / "special_tokens_map.json", specials)


def _model_card(loaded) -> str:
    c, tok = loaded.model.config, loaded.tokenizer
    n_params = loaded.model.count_parameters()
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---

# slm GPT-2 model ({n_params / 1e6:.1f}M parameters)

A GPT-2 architecture language model trained from scratch with slm and exported with `slm export` after
{loaded.step:,} training steps.

| | |
|---|---|
| parameters | {n_params:,} |
| layers / heads / d_model / d_ff | {c.n_layers} / {c.n_heads} / {c.d_model} / {c.d_ff} |
| context length | {c.context_length} |
| vocabulary | {c.vocab_size:,} ids, tokenizer `{tok.name}`; `{EOT}` (id {tok.eot_id}) ends documents |
| training data | `{loaded.config.data.source}` |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = tokenizer("once upon a time", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=50, do_sample=True, top_k=200)[0]))
```

A small model trained for experiments: it has not been evaluated for any use beyond that.
"""


# --------------------------------------------------------------------------- slm's own format, as safetensors


def _write_slm_safetensors(loaded, out: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items() if k != "lm_head.weight"}
    metadata = {"format": "pt", "slm_format": SAFETENSORS_FORMAT, "step": str(loaded.step),
                "tokenizer": loaded.tokenizer.name}
    save_file(sd, str(out / "model.safetensors"), metadata=metadata)
    _write_json(out / "config.json", loaded.config.to_dict())  # the run config, loadable with config_from_dict
    if isinstance(loaded.tokenizer, HFTokenizer):  # so get_tokenizer(out) works wherever the folder goes
        (out / "tokenizer.json").write_text(loaded.tokenizer.json)


def load_safetensors(out_dir: str | os.PathLike, device: str = "cpu") -> GPT:
    """The GPT (in eval mode) saved by ``export(..., format="safetensors")``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(out_dir)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(f"{folder} is not an slm safetensors export (needs model.safetensors and config.json)")
    with safe_open(str(weights), framework="pt") as f:
        if (f.metadata() or {}).get("slm_format") != SAFETENSORS_FORMAT:
            raise CheckpointError(f"{weights} is not in slm's format (no '{SAFETENSORS_FORMAT}' marker); "
                                  "Hugging Face exports load with transformers")
    cfg = config_from_dict(json.loads(config.read_text()))
    model = GPT(cfg.model)
    sd = load_file(str(weights), device="cpu")
    sd["lm_head.weight"] = sd["tok_emb.weight"]  # tied: stored once
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not match config.json ({str(e).splitlines()[0][:200]})") from None
    return model.to(device).eval()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
