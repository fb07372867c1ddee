"""A GPT-2 style decoder-only transformer, written out in full.

    tokens -> token embedding + learned position embedding -> dropout
           -> n_layers x TransformerBlock (pre-norm: x + attn(ln(x)), x + mlp(ln(x)))
           -> final LayerNorm -> lm_head (weights tied to the token embedding) -> logits

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` so PyTorch picks
flash / memory-efficient kernels where it can; on a GPU, contexts of up to 128 tokens go through
slm's own kernel instead (short_attention.py: one Triton program per sequence and head).
Generation uses a ``KVCache`` passed in by the caller, so one model can serve many requests at once
without them touching each other's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slm.errors import ConfigError
from slm.model import short_attention
from slm.model.fp8 import compute_dtype, fp8_linear
from slm.model.fp8_mlp import fp8_mlp
from slm.model.fp8_qkv import fp8_qkv
from slm.model.loss import linear_cross_entropy
from slm.model.softmax_grad import mask_padding


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2 BPE; 0 ("auto" in YAML) = the vocabulary size of the training data
    context_length: int = 1024  # longest sequence the position table covers
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072  # hidden size of the MLP, usually 4 * d_model
    dropout: float = 0.1
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    vocab_multiple: int = 1  # pad the token table to a multiple of this (64: faster GPU matmuls); logits are cut back

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_layers", "n_heads", "d_model", "d_ff", "vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "vocab_size" else 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"n_heads: {self.n_heads} heads do not divide d_model={self.d_model}; "
                f"pick n_heads from {[h for h in range(1, 33) if self.d_model % h == 0]}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, so each new token costs O(T) not O(T^2)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        if max_len > config.context_length:
            raise ValueError(f"KV cache of {max_len} tokens exceeds context_length={config.context_length}")
        shape = (batch_size, config.n_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.pos = 0  # number of tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's keys/values of one layer; return all keys/values up to and including them."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)  # q, k, v in one matmul
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.residual_scale = True  # tells GPT._init_weights to shrink its init
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.fp8 = False  # qkv's training matmuls in FP8 (fp8_qkv.py; training.fp8: all)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        fp8 = self.fp8 and cache is None and torch.is_grad_enabled()
        if fp8 and not (x.is_cuda and T <= short_attention.MAX_T):  # short_attention wants qkv packed
            q, k, v = fp8_qkv(x, self.qkv.weight, self.qkv.bias)  # three tensors: no gradient to assemble
        else:
            qkv = fp8_linear(x, self.qkv.weight, self.qkv.bias) if fp8 else self.qkv(x)
            if cache is None and short_attention.supported(qkv, self.n_heads):  # short contexts on a GPU
                y = short_attention.short_attention(qkv, self.n_heads, self.dropout if self.training else 0.0)
                return self.resid_dropout(self.proj(y))
            q, k, v = qkv.split(C, dim=2)
        # (B, T, C) -> (B, n_heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))

        mask, is_causal = None, T > 1
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
            if start > 0:  # new queries see every cached key and the new keys up to their own position
                is_causal = False
                if T > 1:
                    q_pos = torch.arange(start, start + T, device=x.device)[:, None]
                    mask = torch.arange(k.size(2), device=x.device)[None, :] <= q_pos
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> d_ff -> GELU -> d_model."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.proj.residual_scale = True
        self.dropout = nn.Dropout(config.dropout)
        self.fp8 = False  # training matmuls in FP8, the GELU's casts fused (fp8_mlp.py; training.fp8: mlp/all)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 and torch.is_grad_enabled():
            return self.dropout(fp8_mlp(x, self.fc.weight, self.fc.bias, self.proj.weight, self.proj.bias))
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LayerNorm(x)), then x + mlp(LayerNorm(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = MultiHeadAttention(config, layer)
        self.ln2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size == 0:
            raise ValueError("GPTConfig.vocab_size is 0 (auto): set it from the tokenizer before building the model")
        self.config = config
        self.tok_emb = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: one matrix reads and writes tokens
        self.gradient_checkpointing = False  # recompute block activations in backward: less memory, ~30% more compute
        self.loss_chunk = 0  # > 0: output layer + cross-entropy fused, this many tokens at a time (see loss.py)
        self.fp8_head = False  # output layer's training matmuls in FP8 (see fp8.py)
        self.bf16_residual = False  # under bf16 autocast: carry the residual stream in bf16, not float32
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers), zero biases."""
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layers) if getattr(module, "residual_scale", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def count_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters (tied weights counted once); ``non_embedding`` leaves out the position table.

        Rows added by ``vocab_multiple`` padding are not counted: no token reads them and no logit uses them.
        """
        c = self.config
        n = sum(p.numel() for p in self.parameters()) - (c.padded_vocab_size - c.vocab_size) * c.d_model
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token: 6 N for the weights + 12 L H Q T for attention.

        N leaves out the position table (a lookup, no matmul); the PaLM paper's appendix B, as nanoGPT counts.
        """
        c = self.config
        return 6 * self.count_parameters(non_embedding=True) + 12 * c.n_layers * c.n_heads * c.head_dim * c.context_length

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx: (B, T) token ids. Returns (logits, loss).

        With ``targets`` the loss is the mean cross-entropy over all positions (ids < 0 are ignored); when
        training with ``loss_chunk`` set, the logits are not materialized and come back as None.
        With a ``cache`` only the last position's logits are computed: that is all sampling needs.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length={self.config.context_length}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        if self.bf16_residual and compute_dtype(x) == torch.bfloat16:
            x = x.to(torch.bfloat16)  # each block then reads and writes half the bytes; LayerNorm still sums in fp32
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
        x = self.ln_f(x)

        if cache is not None:
            cache.pos += T
            x = x[:, -1:, :]
        V = self.config.vocab_size
        if targets is not None and self.loss_chunk and torch.is_grad_enabled():  # training: no full logits
            loss = linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), self.loss_chunk, V,
                                        fp8=self.fp8_head)
            return None, loss
        # (B, T, padded_vocab_size): the padded width keeps the matmul aligned
        logits = fp8_linear(x, self.lm_head.weight) if self.fp8_head and torch.is_grad_enabled() else self.lm_head(x)
        loss = None
        if targets is not None:
            scores = mask_padding(logits.view(B * T, -1), V)  # padding ids are never predicted
            # autocast runs cross_entropy in float32; outside it the logits already are float32
            loss = F.cross_entropy(scores, targets.reshape(-1), ignore_index=-1)
        return logits[..., :V], loss

    def new_cache(self, batch_size: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache; ``dtype`` should match the compute dtype (e.g. bfloat16 under autocast)."""
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len or self.config.context_length, p.device, dtype or p.dtype)

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, fused=None):
        """AdamW with weight decay on matrices (Linear and Embedding weights) only, not on biases or norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if fused is None:
            fused = params[0].is_cuda
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
