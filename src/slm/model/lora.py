"""LoRA: low-rank adapters (Hu et al. 2021), hand-written.

A frozen Linear ``W`` gets a trainable low-rank update:  y = W x + (alpha / r) * B (A x),
with A (r x in) random and B (out x r) zero, so training starts from the base model exactly.
Only A and B train, so an adapter is a few hundred KB; ``merge_lora`` folds B A into W for inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slm.model.gpt import GPT

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self) -> nn.Linear:
        """The base Linear with the adapter folded into its weight."""
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A).to(self.base.weight.dtype) * self.scale
        return self.base


def apply_lora(model: GPT, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Wrap the target Linears of every block in LoRALinear and freeze everything else. Returns wrapped names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for i, block in enumerate(model.blocks):
        for target in targets:
            parent_name, attr = target.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, attr)
            if isinstance(linear, nn.Linear):
                setattr(parent, attr, LoRALinear(linear, rank, alpha, dropout))
                wrapped.append(f"blocks.{i}.{target}")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (what a fine-tune saves)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged Linear, in place: a plain GPT again."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
