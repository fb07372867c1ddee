"""``slm finetune``: LoRA adapters on a trained model, trained with the same loop as pre-training.

    base checkpoint -> GPT -> apply_lora (base frozen) -> Trainer on the new data
                    -> best.pt / last.pt hold only the adapters (+ the path of the base checkpoint)
                    -> with merge: merged.pt, a plain checkpoint with the adapters folded in
"""

from __future__ import annotations

from pathlib import Path

import torch

from slm.checkpoint import load_checkpoint, save_checkpoint
from slm.config import apply_overrides, config_from_dict
from slm.data.loader import BatchLoader, read_meta
from slm.data.shards import prepare
from slm.data.tokenizer import get_tokenizer, tokenizer_from_info
from slm.device import resolve_device
from slm.errors import ConfigError, DataError
from slm.model import GPT
from slm.model.lora import DEFAULT_TARGETS, apply_lora, lora_state_dict, merge_lora
from slm.train.distributed import DistributedContext
from slm.train.trainer import Trainer, apply_auto_batch_size

FINETUNE_DEFAULTS = {"max_steps": 200, "warmup_steps": 10, "lr": 1e-3, "min_lr": 1e-4, "eval_every": 50,
                     "checkpoint_every": 50}


def run_finetune(checkpoint: str | Path, data: str, out_dir: str | Path, lora_rank: int = 8,
                 lora_alpha: float = 16.0, lora_dropout: float = 0.0, overrides: list[str] | tuple = (),
                 merge: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune ``checkpoint`` on ``data`` (a prepared folder, or any source, prepared with the model's tokenizer)."""
    base = load_checkpoint(checkpoint)
    if "lora" in base:
        raise ConfigError(f"{checkpoint} is itself a LoRA adapter; fine-tune its base or a merged.pt")
    values = base["config"]
    values["training"].update(FINETUNE_DEFAULTS, out_dir=str(out_dir))
    tokenizer = tokenizer_from_info(base["tokenizer"])
    out = Path(out_dir)

    # data: a prepared folder, or a source prepared now with the base model's tokenizer
    data_dir = Path(data)
    if not (data_dir / "meta.json").exists():
        data_dir = out / "data"
        if not (data_dir / "meta.json").exists():
            if base["tokenizer"].get("json"):  # a custom tokenizer travels inside the checkpoint
                (out / "tokenizer").mkdir(parents=True, exist_ok=True)
                (out / "tokenizer" / "tokenizer.json").write_text(base["tokenizer"]["json"])
                tokenizer_name = str(out / "tokenizer")
            else:
                tokenizer_name = tokenizer.name
            prepare(data, data_dir, tokenizer_name, progress=progress)
    meta = read_meta(data_dir)
    probe = "Once upon a time, a small robot found 3 shiny stones."
    data_tokenizer = get_tokenizer(meta["tokenizer"])
    if data_tokenizer.vocab_size != tokenizer.vocab_size or data_tokenizer.encode(probe) != tokenizer.encode(probe):
        raise DataError(f"{data_dir} was prepared with tokenizer {meta['tokenizer']!r}, but the model uses "
                        f"{tokenizer.name!r}; prepare the data with the model's tokenizer")
    values["data"].update(dir=str(data_dir), tokenizer=meta["tokenizer"])
    apply_overrides(values, overrides)
    cfg = config_from_dict(values)
    tc = cfg.training

    device = resolve_device(tc.device)
    if tc.auto_batch_size:
        apply_auto_batch_size(cfg, DistributedContext(device=device), None, progress)
    model = GPT(cfg.model)
    try:
        model.load_state_dict(base["model"])
    except RuntimeError:
        raise ConfigError(f"model: a fine-tune keeps the base model's shape ({config_from_dict(base['config']).model}); "
                          "drop the model.* overrides") from None
    apply_lora(model, lora_rank, lora_alpha, lora_dropout)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx = cfg.model.context_length
    trainer = Trainer(model, BatchLoader(data_dir, "train", tc.batch_size, ctx, device, tc.seed),
                      BatchLoader(data_dir, "val", tc.batch_size, ctx, device, tc.seed), cfg, device,
                      base["tokenizer"], progress)
    trainer.model_state = lambda: lora_state_dict(model)
    trainer.extra = {"lora": {"base": str(Path(checkpoint).resolve()), "rank": lora_rank, "alpha": lora_alpha,
                              "targets": list(DEFAULT_TARGETS)}}
    if (out / "last.pt").exists() and not resume:
        raise ConfigError(f"{out} already holds a fine-tune; pass --resume to continue it or choose another --out")
    if resume:
        trainer.resume(out / "last.pt")
    trainer._say(f"LoRA rank {lora_rank}: training {n_train:,} of {model.count_parameters():,} parameters")
    result = trainer.train()
    result["trainable_parameters"] = n_train
    if merge:
        adapters = load_checkpoint(out / "best.pt", map_location=device)
        model.load_state_dict(adapters["model"], strict=False)
        merge_lora(model)
        state = trainer.checkpoint(full=False)
        state.pop("lora")
        state["model"] = model.state_dict()
        save_checkpoint(state, out / "merged.pt")
        result["merged"] = str(out / "merged.pt")
    return result


def load_lora_model(state: dict, map_location="cpu") -> GPT:
    """A plain GPT from a LoRA checkpoint: its base with the adapters merged in."""
    base = load_checkpoint(state["lora"]["base"], map_location=map_location)
    cfg = config_from_dict(state["config"])
    model = GPT(cfg.model)
    model.load_state_dict(base["model"])
    lora = state["lora"]
    apply_lora(model, lora["rank"], lora["alpha"], targets=tuple(lora["targets"]))
    model.load_state_dict(state["model"], strict=False)
    with torch.no_grad():
        merge_lora(model)
    return model
