"""Loading a trained model from a checkpoint, with its config and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slm.checkpoint import load_checkpoint
from slm.config import Config, config_from_dict
from slm.data.tokenizer import Tokenizer, tokenizer_from_info
from slm.device import resolve_device, resolve_dtype
from slm.errors import CheckpointError
from slm.model import GPT


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    config: Config
    device: torch.device
    dtype: torch.dtype
    step: int


def load_model(checkpoint: str | Path, device: str = "auto") -> LoadedModel:
    """Model (in eval mode, on ``device``), tokenizer and config of a checkpoint such as ``runs/tiny/best.pt``."""
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    if "lora" in state:  # a fine-tune's adapters: load its base and merge them in
        from slm.train.finetune import load_lora_model

        model = load_lora_model(state)
    else:
        model = GPT(cfg.model)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(
                f"{checkpoint}: weights do not match its config ({str(e).splitlines()[0][:200]})") from None
    dev = resolve_device(device)
    info = state.get("tokenizer") or {"name": cfg.data.tokenizer}
    tokenizer = tokenizer_from_info(info)
    return LoadedModel(model.to(dev).eval(), tokenizer, cfg, dev, resolve_dtype("auto", dev), state.get("step", 0))
