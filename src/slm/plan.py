"""What will a training run cost? Parameters, FLOPs, GPU memory, wall time and price, before spending any.

    parameters       exact: the GPT is built on the "meta" device (shapes only, no memory)
    FLOPs per token  6 N + 12 L H Q T   (PaLM appendix B / nanoGPT's estimate_mfu)
                     N = parameters without the position table (the tied token embedding does matmul work
                     as the output layer, so it stays in), L layers, H heads, Q head dim, T context
    training FLOPs   FLOPs per token x tokens  (tokens = max_steps x batch_size x grad_accum x context_length)
    wall time        training FLOPs / (GPU peak x MFU)
    cost             hours x hourly price
    memory           model state + activations of one micro-batch (see ``memory_estimate``)

MFU (model FLOPs utilisation) is the share of the GPU's peak that training really gets. It is 0.35 unless
a measurement of the same model on the same GPU is known (MEASURED below, from benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from slm.config import Config, load_config
from slm.errors import ConfigError
from slm.model import GPT, GPTConfig

GIB = 1024**3

# Dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOP/s (fp16 on the T4, which has no bf16) and memory
# (the datasheets' nominal GB, compared as GiB), from NVIDIA's datasheets. The A10G is AWS's variant of the
# A10 and has no public datasheet; 70 TFLOP/s is the figure usually quoted for it (the A10 itself is 125).
GPUS = {
    "T4": {"tflops": 65.0, "memory_gb": 16, "dtype": "float16"},
    "L4": {"tflops": 121.0, "memory_gb": 24, "dtype": "bfloat16"},
    "A10G": {"tflops": 70.0, "memory_gb": 24, "dtype": "bfloat16"},
    "A100-40GB": {"tflops": 312.0, "memory_gb": 40, "dtype": "bfloat16"},
    "A100-80GB": {"tflops": 312.0, "memory_gb": 80, "dtype": "bfloat16"},
    "H100": {"tflops": 989.4, "memory_gb": 80, "dtype": "bfloat16"},  # SXM; the datasheet's 1,979 is with sparsity
    "H100-PCIe": {"tflops": 756.0, "memory_gb": 80, "dtype": "bfloat16"},
    "H200": {"tflops": 989.4, "memory_gb": 141, "dtype": "bfloat16"},
}
ALIASES = {"A100": "A100-80GB", "A100-40": "A100-40GB", "A100-80": "A100-80GB", "H100-SXM": "H100"}

# US$ per GPU-hour: typical on-demand prices of one GPU in 2025 (AWS g4dn/g5 and GCP g2 list prices for the
# T4, A10G and L4; GPU clouds such as Lambda and RunPod for the A100, H100 and H200). They change often and
# differ a lot between providers and regions: edit them to your own, or pass ``price=`` to ``plan``.
PRICES = {
    "T4": 0.35,
    "L4": 0.70,
    "A10G": 1.01,
    "A100-40GB": 1.29,
    "A100-80GB": 1.79,
    "H100": 2.99,
    "H100-PCIe": 2.49,
    "H200": 3.79,
}

DEFAULT_MFU = 0.35
# Measured training throughput (tokens/s) of a model on a GPU, from benchmarks/RESULTS.md; a plan for the
# same model shape on the same GPU uses the MFU these imply instead of DEFAULT_MFU. Add rows as benchmarks
# land. seed30m on an H100 (`slm train --config seed30m`, micro-batch 512, dropout 0.1, real data): 1.5M
# tokens/s, an MFU of 0.28 against the datasheet's 989 TFLOP/s. gpt_124m on an H100 (micro-batch 32,
# fp8 head, benchmarks/train_throughput.py, dropout 0): 490k tokens/s, an MFU of 0.42 against the datasheet.
MEASURED = [
    {"gpu": "H100", "tokens_per_sec": 1.5e6, "source": "seed30m, slm train, benchmarks/RESULTS.md",
     "model": {"vocab_size": 50257, "context_length": 128, "n_layers": 6, "n_heads": 6, "d_model": 384,
               "d_ff": 1536}},
    {"gpu": "H100", "tokens_per_sec": 4.9e5, "source": "gpt_124m, micro-batch 32, benchmarks/RESULTS.md",
     "model": {"vocab_size": 50257, "context_length": 1024, "n_layers": 12, "n_heads": 12, "d_model": 768,
               "d_ff": 3072}},
]


def gpu_peak_flops(device_name: str) -> float | None:
    """Datasheet bf16 (fp16 for the T4) dense peak in FLOP/s of a CUDA device name, or None when unknown."""
    name = device_name.upper()
    if "H100" in name:
        key = "H100-PCIe" if "PCIE" in name else "H100"
    elif "A100" in name:
        key = "A100-80GB"
    elif "L40" in name:  # not in the table (and not an L4)
        key = None
    else:
        key = next((k for k in ("H200", "L4", "A10G", "T4") if k in name), None)
    return GPUS[key]["tflops"] * 1e12 if key else None


def find_gpu(name: str) -> str:
    """The GPU table's key for ``name`` (case-insensitive; ``A100`` means the 80 GB one)."""
    wanted = name.strip().upper().replace(" ", "-")
    for key in GPUS:
        if key.upper() == wanted:
            return key
    for alias, key in ALIASES.items():
        if alias.upper() == wanted:
            return key
    raise ConfigError(f"gpu: unknown GPU {name!r}; known: {', '.join(GPUS)}")


def activation_bytes(model: GPTConfig, micro_batch: int, loss_chunk: int = 0) -> int:
    """Bytes of activations kept for the backward pass of one micro-batch, under bf16 autocast with a flash
    attention kernel (no T x T score matrix is stored).

    Per token and layer (h = d_model, f = d_ff, a = n_heads), what autograd keeps:
        8h  the fp32 residual stream going into the two LayerNorms (autocast runs LayerNorm in fp32)
        2h  bf16 input of the q/k/v matmul
        6h  bf16 q, k, v kept by flash attention, plus 4a bytes of its fp32 log-sum-exp
        4h  bf16 attention output and its copy with the heads side by side (input of the projection)
        2h  bf16 input of the MLP's first matmul
        4f  bf16 GELU input and GELU output (input of the second matmul)
        2h  two 1-byte dropout masks, when dropout > 0
    = 22h + 4f + 4a (+ 2h) bytes; with f = 4h about 40h, near the 34h of Korthikanti et al. 2022 ("Reducing
    activation recomputation in large transformer models") for all-16-bit activations, minus its 5as/h
    attention-matrix term that flash attention removes.
    Outside the layers, per token: 6h (final LayerNorm input, fp32, and the output layer's bf16 input), 1h
    embedding dropout mask, and 12 bytes per vocabulary entry for the logits (bf16 logits and their gradient,
    2 + 2; the fp32 log-softmax that cross-entropy keeps and its gradient, 4 + 4), often the largest term.
    With the fused loss (``training.loss_chunk``) the logits exist for one chunk of tokens at a time (the
    same 12 bytes per entry, for ``loss_chunk`` tokens only), plus the hidden-state gradient kept from
    forward (2h per token) and the output layer's gradient (6 bytes per weight: fp32 sum and bf16 copy).
    """
    h, f, a, V = model.d_model, model.d_ff, model.n_heads, model.vocab_size
    dropout = model.dropout > 0
    per_layer = 22 * h + 4 * f + 4 * a + (2 * h if dropout else 0)
    outside = 6 * h + (h if dropout else 0)
    tokens = micro_batch * model.context_length
    if not loss_chunk:
        return tokens * (model.n_layers * per_layer + outside + 12 * V)
    head = min(tokens, loss_chunk) * 12 * V + 6 * V * h
    return tokens * (model.n_layers * per_layer + outside + 2 * h) + head


def memory_estimate(model: GPTConfig, n_params: int, micro_batch: int, loss_chunk: int = 0) -> dict:
    """GPU memory of training with AdamW under bf16 autocast, in bytes.

    16 bytes per parameter for the model state: fp32 weights (4), fp32 gradients (4) and AdamW's two fp32
    moments (8); 2 more for the bf16 copies of the weights that autocast makes for the matmuls; then the
    activations of one micro-batch (``activation_bytes``). Not counted: the CUDA context (~0.5 GiB) and
    allocator fragmentation, so leave some headroom.

    Checked on an H100 (gpt_124m, bf16 autocast, fused AdamW, peak of torch.cuda.max_memory_allocated):
    micro-batch 4 / 8 / 16 used 5.7 / 9.8 / 17.9 GiB running eagerly against 5.8 / 9.6 / 17.0 estimated;
    with torch.compile (fused kernels keep fewer activations) 8 / 16 used 7.5 / 13.3 GiB; compiled with the
    fused loss (loss_chunk 8192), 16 / 32 used 9.2 / 16.1 GiB against 12.6 / 18.4 estimated; seed30m
    (context 128) at 512 / 1024 used 12.9 / 24.6 GiB against 11.1 / 16.9 (benchmarks/RESULTS.md).
    """
    state = 16 * n_params
    bf16_weights = 2 * n_params
    activations = activation_bytes(model, micro_batch, loss_chunk)
    return {"state": state, "bf16_weights": bf16_weights, "activations": activations,
            "total": state + bf16_weights + activations}


def meta_model(model: GPTConfig) -> GPT:
    """The GPT built on the "meta" device: shapes only, so counting a 1B model costs no memory."""
    with torch.device("meta"):
        return GPT(model)


def fit_micro_batch(model: GPTConfig, n_params: int, effective: int, loss_chunk: int, memory: float) -> int:
    """The largest micro-batch that divides ``effective`` (sequences per step) and whose ``memory_estimate``
    fits in ``memory`` bytes; 0 when not even one sequence fits."""
    for m in range(effective, 0, -1):
        if effective % m == 0 and memory_estimate(model, n_params, m, loss_chunk)["total"] <= memory:
            return m
    return 0


def auto_micro_batch(cfg: Config, device: torch.device) -> tuple[int, int] | None:
    """``training.auto_batch_size``: (micro-batch, accumulation steps) for ``cfg`` on CUDA ``device``.

    Keeps the effective batch (``batch_size x gradient_accumulation_steps``) and picks the largest micro-batch
    dividing it whose estimated memory, plus 50% (compiled peaks measured on an H100 were 0.75x to 1.46x the
    estimate: see ``memory_estimate``), fits in 90% of the GPU's free memory. Larger micro-batches
    run fewer, larger kernels: faster, same training math.
    None when ``device`` is not a GPU or not even one sequence fits.
    """
    if device.type != "cuda":
        return None
    n_params = meta_model(cfg.model).count_parameters()
    free, _ = torch.cuda.mem_get_info(device)
    effective = cfg.training.batch_size * cfg.training.gradient_accumulation_steps
    m = fit_micro_batch(cfg.model, n_params, effective, cfg.training.loss_chunk, 0.9 * free / 1.5)
    return (m, effective // m) if m else None


def _model_config(cfg: Config) -> GPTConfig:
    """The config's model, with ``vocab_size: auto`` resolved from its tokenizer."""
    if cfg.model.vocab_size:
        return cfg.model
    from slm.data.tokenizer import get_tokenizer

    return dataclasses.replace(cfg.model, vocab_size=get_tokenizer(cfg.data.tokenizer).vocab_size)


def _measured(model: GPTConfig, gpu: str) -> dict | None:
    for row in MEASURED:
        if row["gpu"] == gpu and all(getattr(model, k) == v for k, v in row["model"].items()):
            return row
    return None


def plan(config: str | Path | Config, gpu: str = "H100", tokens: int | None = None, micro_batch: int | None = None,
         mfu: float | None = None, price: float | None = None) -> dict:
    """``slm plan``: size, compute, memory, time and cost of training ``config`` on one ``gpu``.

    ``tokens`` overrides the config's training tokens, ``micro_batch`` its ``training.batch_size`` (for the
    memory estimate), ``mfu`` the assumed utilisation and ``price`` the table's US$ per GPU-hour.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    gpu = find_gpu(gpu)
    if tokens is not None and tokens < 1:
        raise ConfigError(f"tokens: expected a positive integer, got {tokens!r}")
    if micro_batch is not None and micro_batch < 1:
        raise ConfigError(f"micro_batch: expected a positive integer, got {micro_batch!r}")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"mfu: expected a number in (0, 1], e.g. 0.35, got {mfu!r}")
    if price is not None and price < 0:
        raise ConfigError(f"price: expected a number >= 0 (US$ per GPU-hour), got {price!r}")

    model_cfg = _model_config(cfg)
    model = meta_model(model_cfg)
    n_params = model.count_parameters()
    n_flops_params = model.count_parameters(non_embedding=True)  # without the position table
    per_token = model.flops_per_token()  # 6 N + 12 L H Q T

    tc = cfg.training
    tokens_per_step = tc.batch_size * tc.gradient_accumulation_steps * model_cfg.context_length
    train_tokens = tokens if tokens is not None else tc.max_steps * tokens_per_step
    total_flops = per_token * train_tokens

    spec = GPUS[gpu]
    peak = spec["tflops"] * 1e12
    measured = _measured(model_cfg, gpu)
    if mfu is not None:
        mfu_source = "given"
    elif measured is not None:
        mfu, mfu_source = measured["tokens_per_sec"] * per_token / peak, f"measured: {measured['source']}"
    else:
        mfu, mfu_source = DEFAULT_MFU, "assumed"
    seconds = total_flops / (peak * mfu)
    hours = seconds / 3600
    price = PRICES[gpu] if price is None else price

    micro_batch = micro_batch or tc.batch_size
    memory = memory_estimate(model_cfg, n_params, micro_batch, tc.loss_chunk)
    memory_gb = memory["total"] / GIB
    warning = None
    if memory_gb > spec["memory_gb"]:
        effective = micro_batch * tc.gradient_accumulation_steps
        fits = fit_micro_batch(model_cfg, n_params, effective, tc.loss_chunk, spec["memory_gb"] * GIB)
        if fits:
            warning = (f"~{memory_gb:.1f} GiB needed but the {gpu} has {spec['memory_gb']} GiB: use micro-batch "
                       f"{fits} (--set training.batch_size={fits} --set training.gradient_accumulation_steps="
                       f"{effective // fits}, the same {effective} sequences per step), or training.auto_batch_size")
        else:
            warning = (f"~{memory_gb:.1f} GiB needed but the {gpu} has {spec['memory_gb']} GiB, and the model "
                       "state alone does not fit: use a GPU with more memory or a smaller model")

    return {
        "gpu": gpu,
        "gpu_tflops": spec["tflops"],
        "gpu_memory_gb": spec["memory_gb"],
        "parameters": n_params,
        "non_embedding_parameters": n_flops_params,
        "flops_per_token": per_token,
        "tokens": train_tokens,
        "tokens_per_step": tokens_per_step,
        "steps": train_tokens / tokens_per_step,
        "tokens_per_parameter": train_tokens / n_params,
        "total_flops": total_flops,
        "mfu": mfu,
        "mfu_source": mfu_source,
        "tokens_per_sec": peak * mfu / per_token,
        "hours": hours,
        "price_per_hour": price,
        "cost": hours * price,
        "micro_batch": micro_batch,
        "context_length": model_cfg.context_length,
        "memory_gb": memory_gb,
        "memory_state_gb": memory["state"] / GIB,
        "memory_bf16_weights_gb": memory["bf16_weights"] / GIB,
        "memory_activations_gb": memory["activations"] / GIB,
        "fits": warning is None,
        "warning": warning,
    }


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def format_plan(result: dict) -> str:
    """The result of ``plan`` as a few lines for the terminal."""
    r = result
    lines = [
        f"model        {r['parameters']:,} parameters ({r['non_embedding_parameters']:,} without the position table)",
        f"compute      {r['flops_per_token'] / 1e6:,.1f} MFLOPs/token x {r['tokens']:,} tokens "
        f"({r['steps']:,.0f} steps of {r['tokens_per_step']:,}; {r['tokens_per_parameter']:.1f} tokens/parameter) "
        f"= {r['total_flops']:.3g} FLOPs",
        f"gpu          {r['gpu']}: {r['gpu_tflops']:g} TFLOP/s peak, {r['gpu_memory_gb']} GiB; "
        f"MFU {r['mfu']:.2f} ({r['mfu_source']}) -> {r['tokens_per_sec']:,.0f} tokens/s",
        f"time         {_duration(r['hours'])}",
        f"cost         ${r['cost']:,.2f} at ${r['price_per_hour']:.2f}/h",
        f"memory       ~{r['memory_gb']:.1f} GiB at micro-batch {r['micro_batch']} x {r['context_length']} tokens "
        f"(weights + grads + AdamW {r['memory_state_gb']:.1f}, bf16 weight copies {r['memory_bf16_weights_gb']:.1f}, "
        f"activations {r['memory_activations_gb']:.1f})",
    ]
    if r["warning"]:
        lines.append(f"warning      {r['warning']}")
    return "\n".join(lines)
