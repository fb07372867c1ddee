"""Picking the device and the precision to compute in."""

from __future__ import annotations

import contextlib

import torch

from slm.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"training.device: {name!r} requested but CUDA is not available "
            f"(torch {torch.__version__}); use device=cpu or install a CUDA build of PyTorch"
        )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("training.device: 'mps' requested but not available here; use device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU/MPS."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"training.dtype: expected one of auto, {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision context: autocast to ``dtype`` unless it is float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def attention_kernel(name: str = "auto"):
    """Context in which attention runs kernel ``name`` first.

    auto: slm's short-context kernel where it applies (model/short_attention.py: a GPU, up to 128 tokens),
    else PyTorch's choice of ``scaled_dot_product_attention`` kernel; sdpa: always PyTorch's choice;
    flash, cudnn, efficient, math: that SDPA kernel first, the others staying as fallbacks, so a choice the
    inputs or the device do not support (cudnn on a CPU, say) still runs.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from slm.model import short_attention

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if name not in ("auto", "sdpa", *kernels):
        raise ConfigError(f"training.attention: expected auto, sdpa or one of {', '.join(kernels)}, got {name!r}")
    before, short_attention.enabled = short_attention.enabled, name == "auto"
    try:
        if name in kernels:
            order = [kernels[name]] + [k for k in kernels.values() if k != kernels[name]]
            with sdpa_kernel(order, set_priority=True):
                yield
        else:
            yield
    finally:
        short_attention.enabled = before
