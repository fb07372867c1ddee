"""The cross-entropy's gradient with respect to the logits, softmax minus one-hot, for the fused loss (loss.py).

``softmax_grad`` is the PyTorch form, which torch.compile turns into one fused kernel per chunk of tokens
(the bf16 output layer). ``softmax_grad_fp8`` is the same for the FP8 output layer (``training.fp8``),
written in the two layouts its two matmuls need, by Triton kernels.

With the output layer in FP8 (see fp8.py and loss.py), the gradient G feeds two FP8 matmuls:
``grad_x = G @ W`` wants G row-major (tokens x vocabulary) and ``grad_w = G.T @ x`` wants G.T row-major
(vocabulary x tokens), because FP8 tensor cores only take operands whose reduced dimension is contiguous.
Writing G and then copying it transposed costs a full extra read and write of a (tokens x vocabulary)
tensor; left to torch.compile, the transposed copy is fused into the softmax kernel as strided stores,
which made it 1.6x slower (measured on an H100: 1.89 ms instead of 1.2 ms per 8,192 x 50,304 chunk).

``softmax_grad_fp8`` does the loss and G in two reads of the logits, with two Triton kernels: the first
computes each row's log-sum-exp (running max and sum in one pass) and loss; the second walks over tiles of
(rows x vocabulary columns), reads each tile of logits once and stores its G as it is and transposed (the
transpose happens in on-chip memory, so both stores are contiguous). On an H100: 0.35 + 0.87 ms per chunk,
and the FP8 output layer went from 4% slower than bf16 to 11% faster at 30M. Without a GPU (or without
Triton) ``softmax_grad`` computes them.

``linear_softmax_grad_fp8`` goes one step further for small models: it takes the FP8 hidden states and
weight instead of the logits and computes each tile of logits itself on the tensor cores, twice (once for
the log-sum-exp, once for G), so the logits are never written to memory nor read back. With d_model 384
that is cheaper than storing them (per 8,192 x 50,304 chunk on an H100: 1.35 ms against 1.56 ms for
cuBLAS's logits + the two kernels above); with d_model 768 the matmuls cost more than the memory they save
(1.97 against 1.78 ms, measured with an earlier form of the gradient kernel), so loss.py uses it only up to
``RECOMPUTE_MAX_D`` (and, on Hopper, up to the Gluon kernels' 768, below). Its gradient kernel writes the
row-major tile of G, then reads it back and stores it transposed: a transposed pointer store of values
taken straight from the matmul's accumulator came out wrong with Triton 3.6 (benchmarks/RESULTS.md). On
Hopper GPUs (H100, H200) a second form of that kernel is used instead where shapes allow: persistent (one
program per SM) and moving its tiles with the TMA copy engine, which stores G's tile and its transpose
straight from registers (9% faster per chunk). Faster
still, where d_model is a multiple of 128 up to 768 on Hopper, both passes run as Gluon kernels that
overlap each tile's matmul with the previous tile's exp (softmax_grad_gluon.py; per chunk on an H200 at
d_model 384 0.87 ms against 1.26 ms for the Triton kernels, at 768 1.47 ms against 1.66 ms for stored
logits; should they fail to compile, the op warns and uses the Triton ones).
Whichever runs, the op checks G.T against G once per shape and, should they differ, warns and falls back
to ``softmax_grad_fp8``.
"""

from __future__ import annotations

import warnings

import torch

from slm.model import softmax_grad_gluon
from slm.model.fp8 import E5M2, scaled_mm

try:  # Triton ships with the CUDA builds of PyTorch
    import triton
    import triton.language as tl
except ImportError:  # CPU-only builds
    triton = None
try:  # Triton 3.4+: tensor descriptors for Hopper's TMA copy engine
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


def mask_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``logits`` with the padding columns (ids >= vocab_size, from ``vocab_multiple``) at -inf, so no
    probability goes to them; masked, not sliced off, which would copy the logits and unalign the width."""
    if vocab_size >= logits.size(-1):
        return logits
    return logits.masked_fill(torch.arange(logits.size(-1), device=logits.device) >= vocab_size, float("-inf"))


def softmax_grad(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(logits) - one_hot(targets), each row's cross-entropy), in float32 (or float64 for float64).

    logits: (M, V), columns from ``vocab_size`` on are padding (their gradient is 0); targets: (M,) ids,
    < 0 = ignored row (its gradient and loss are 0).
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(mask_padding(logits.to(acc), vocab_size), dim=1)
    valid = targets >= 0
    loss = -torch.where(valid, logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    one_hot = torch.arange(logits.size(1), device=logits.device)[None, :] == targets[:, None]
    return (logp.exp() - one_hot.to(acc)) * valid.to(acc)[:, None], loss


@torch.library.custom_op("slm::softmax_grad_fp8", mutates_args=())
def softmax_grad_fp8(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of each row of ``logits`` and its gradient, in the two layouts the FP8 matmuls need.

    logits: (M, V); targets: (M,) ids, < 0 = ignored row; columns from ``vocab_size`` on are padding.
    Returns (G, G.T, loss): G = (softmax - one-hot) * scale as float8_e5m2, (M, V), 0 on ignored rows and
    padding columns; G.T the same values, (V, M), contiguous; loss (M,) float32 (0 on ignored rows).
    A custom operator, so torch.compile calls it as it is (its kernels are tuned once, on the first call).
    """
    if triton is None or not logits.is_cuda:
        g, loss = softmax_grad(logits, targets, vocab_size)
        g = g * scale
        return g.to(E5M2), g.t().contiguous().to(E5M2), loss
    logits, targets = logits.contiguous(), targets.contiguous()
    m, v = logits.shape
    g, g_t, loss = _outputs(logits)
    lse = torch.empty(m, dtype=torch.float32, device=logits.device)
    _lse_kernel[(m,)](logits, targets, lse, loss, v, vocab_size)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(v, meta["BN"]))  # noqa: E731
    _grad_kernel[grid](logits, lse, targets, g, g_t, m, v, vocab_size, scale)
    return g, g_t, loss


@softmax_grad_fp8.register_fake
def _outputs(logits, *args):
    return _empty_outputs(logits, *logits.shape)


def _empty_outputs(like: torch.Tensor, m: int, v: int):
    """(G, G.T, loss) for m rows and v vocabulary columns, uninitialised."""
    return (like.new_empty((m, v), dtype=E5M2), like.new_empty((v, m), dtype=E5M2),
            like.new_empty(m, dtype=torch.float32))


_PART_BN = 128  # vocabulary columns per tile of linear_softmax_grad_fp8's first kernel
_CHECKED: dict[tuple[int, int, int, str], bool] = {}  # (M, V, K, kernel) -> its G.T came out as G.T


@torch.library.custom_op("slm::linear_softmax_grad_fp8", mutates_args=())
def linear_softmax_grad_fp8(x8: torch.Tensor, x_inv: torch.Tensor, w8: torch.Tensor, w_inv: torch.Tensor,
                            targets: torch.Tensor, vocab_size: int,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``softmax_grad_fp8`` of the logits ``(x8 * x_inv) @ (w8 * w_inv).T``, computed here and never stored.

    x8: (M, K) and w8: (V, K), float8_e4m3fn, with their inverse scales (0-d float32 tensors); K must be a
    multiple of 32 (the FP8 tensor cores' smallest step). Returns (G, G.T, loss) as ``softmax_grad_fp8``.
    """
    (m, k), v = x8.shape, w8.size(0)
    if triton is None or not x8.is_cuda:
        return _from_stored_logits(x8, x_inv, w8, w_inv, targets, vocab_size, scale)
    x8, w8, targets = x8.contiguous(), w8.contiguous(), targets.contiguous()
    kind = "gluon" if softmax_grad_gluon.available(x8, w8, vocab_size) else "tma" if _tma_ok(x8, w8) else "pointer"
    key = (m, v, k, kind)  # each gradient kernel's G.T is checked on its own
    if _CHECKED.get(key) is False:
        return _from_stored_logits(x8, x_inv, w8, w_inv, targets, vocab_size, scale)
    if kind == "gluon" and key not in _CHECKED:
        try:  # Gluon is Triton's experimental layer: a Triton other than the one tested may not compile it
            g, g_t, loss = _from_x(kind, x8, x_inv, w8, w_inv, targets, vocab_size, scale)
        except Exception as e:  # any compile error: the Triton kernels do the same work
            warnings.warn(f"slm: the Gluon FP8 loss kernels failed ({type(e).__name__}: {str(e)[:200]}); "
                          "using the Triton ones instead", RuntimeWarning)
            softmax_grad_gluon.enabled = False
            return linear_softmax_grad_fp8(x8, x_inv, w8, w_inv, targets, vocab_size, scale)
    else:
        g, g_t, loss = _from_x(kind, x8, x_inv, w8, w_inv, targets, vocab_size, scale)
    if key not in _CHECKED:  # once per shape: a compiler bug must not go on training with a wrong G.T
        _CHECKED[key] = torch.equal(g_t.view(torch.uint8), g.view(torch.uint8).t())
        if not _CHECKED[key]:
            warnings.warn(f"slm: the FP8 loss kernel wrote a wrong transposed gradient for shape {(m, v, k)} "
                          "(Triton compiler bug?); using the stored-logits kernels instead", RuntimeWarning)
            return _from_stored_logits(x8, x_inv, w8, w_inv, targets, vocab_size, scale)
    return g, g_t, loss


def _from_x(kind, x8, x_inv, w8, w_inv, targets, vocab_size, scale):
    """(G, G.T, loss) by one set of kernels: "gluon" (Hopper, softmax_grad_gluon.py), "tma" (Hopper, the
    Triton gradient kernel with TMA) or "pointer" (any GPU Triton supports)."""
    (m, k), v = x8.shape, w8.size(0)
    bk = next(b for b in (128, 64, 32) if k % b == 0)
    g, g_t, loss = _empty_outputs(x8, m, v)
    target_logit, lse = torch.empty_like(loss), torch.empty_like(loss)
    if kind == "gluon":  # per row, a partial max and sum for each of a few runs of W's tiles
        part_max, part_sum = softmax_grad_gluon.lse_parts(x8, x_inv, w8, w_inv, vocab_size)
        _target_logit_kernel[(triton.cdiv(m, 32),)](x8, w8, x_inv, w_inv, targets, target_logit, m, K=k, BM=32)
    else:  # per row, a partial max and sum for each tile of _PART_BN columns
        part_max = torch.empty((m, triton.cdiv(v, _PART_BN)), dtype=torch.float32, device=x8.device)
        part_sum = torch.empty_like(part_max)
        _lse_parts_kernel[lambda meta: (triton.cdiv(m, meta["BM"]), part_max.size(1))](
            x8, w8, x_inv, w_inv, targets, part_max, part_sum, target_logit, m, v, vocab_size, part_max.size(1),
            K=k, BK=bk, BN=_PART_BN)
    parts = part_max.size(1)
    _lse_from_parts_kernel[(triton.cdiv(m, 16),)](part_max, part_sum, target_logit, targets, lse, loss, m, parts,
                                                  BM=16, BP=triton.next_power_of_2(parts))
    if kind == "gluon":
        softmax_grad_gluon.grad(x8, x_inv, w8, w_inv, lse, targets, g, g_t, vocab_size, scale)
    elif kind == "tma":
        _grad_from_x_tma(x8, w8, x_inv, w_inv, lse, targets, g, g_t, vocab_size, scale, bk)
    else:
        _grad_from_x_kernel[lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(v, meta["BN"]))](
            x8, w8, x_inv, w_inv, lse, targets, g, g_t, m, v, vocab_size, scale, K=k, BK=bk)
    return g, g_t, loss


_TMA_TILE = dict(BM=128, BN=256, num_warps=8, num_stages=3)  # the fastest of 5 tried on an H200 (RESULTS.md)


def _tma_ok(x8: torch.Tensor, w8: torch.Tensor) -> bool:
    """Whether the Hopper gradient kernel can run, and gains: TMA copy engine (compute capability 9.0+),
    inputs starting on 16-byte boundaries, G's and G.T's rows a multiple of 16 bytes apart, and d_model up
    to 384 (at 512 it was 6% slower)."""
    (m, k), v = x8.shape, w8.size(0)
    return (TensorDescriptor is not None and torch.cuda.get_device_capability(x8.device) >= (9, 0)
            and m % 16 == 0 and v % 16 == 0 and k <= 384 and x8.data_ptr() % 16 == 0 and w8.data_ptr() % 16 == 0)


def _grad_from_x_tma(x8, w8, x_inv, w_inv, lse, targets, g, g_t, vocab_size, scale, bk):
    """G and G.T with ``_grad_from_x_tma_kernel``: one program per SM, tiles moved by the TMA engine."""
    (m, k), v = x8.shape, w8.size(0)
    bm, bn = _TMA_TILE["BM"], _TMA_TILE["BN"]
    programs = torch.cuda.get_device_properties(x8.device).multi_processor_count
    _grad_from_x_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(x8, [bm, bk]), TensorDescriptor.from_tensor(w8, [bn, bk]),
        TensorDescriptor.from_tensor(g, [bm, bn]), TensorDescriptor.from_tensor(g_t, [bn, bm]),
        x_inv, w_inv, lse, targets, m, v, vocab_size, scale, K=k, BK=bk, PROGRAMS=programs, **_TMA_TILE)


def _from_stored_logits(x8, x_inv, w8, w_inv, targets, vocab_size, scale):
    """The same from the logits, stored: in bf16 on GPUs (softmax_grad_fp8's kernels are verified with those),
    float32 on CPUs (PyTorch)."""
    dtype = torch.bfloat16 if x8.is_cuda else torch.float32
    logits = scaled_mm(x8, x_inv, w8.t(), w_inv, dtype)
    return softmax_grad_fp8(logits, targets, vocab_size, scale)


@linear_softmax_grad_fp8.register_fake
def _linear_outputs(x8, x_inv, w8, *args):
    return _empty_outputs(x8, x8.size(0), w8.size(0))


if triton is not None:
    @triton.autotune(configs=[triton.Config({"BN": bn}, num_warps=w) for bn in (1024, 2048, 4096) for w in (4, 8)],
                     key=["V"])
    @triton.jit
    def _lse_kernel(logits_ptr, targets_ptr, lse_ptr, loss_ptr, V, vocab_size, BN: tl.constexpr):
        """One row per program, one pass: the running max and the sum of exp relative to it, per lane."""
        row = tl.program_id(0).to(tl.int64)
        x_ptr = logits_ptr + row * V
        big_max = tl.full([BN], -1e30, tl.float32)  # finite, so untouched lanes give exp(0) * 0 below
        total = tl.zeros([BN], tl.float32)
        for start in range(0, vocab_size, BN):
            cols = start + tl.arange(0, BN)
            x = tl.load(x_ptr + cols, mask=cols < vocab_size, other=-1e30).to(tl.float32)
            new_max = tl.maximum(big_max, x)
            total = total * tl.exp(big_max - new_max) + tl.where(cols < vocab_size, tl.exp(x - new_max), 0.0)
            big_max = new_max
        row_max = tl.max(big_max, 0)
        lse = row_max + tl.log(tl.sum(total * tl.exp(big_max - row_max), 0))
        target = tl.load(targets_ptr + row)
        target_logit = tl.load(x_ptr + tl.maximum(target, 0)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(target >= 0, lse - target_logit, 0.0))

    @triton.jit
    def _g_tile(logits, lse, target, cols, vocab_size, scale):
        """(softmax - one-hot) * scale of a tile of logits (float32), given its rows' log-sum-exp and targets:
        0 in padding columns (>= vocab_size) and on ignored rows (target < 0)."""
        p = tl.where(cols[None, :] < vocab_size, tl.exp(logits - lse[:, None]), 0.0)
        g = p - (cols[None, :] == target[:, None]).to(tl.float32)
        return tl.where(target[:, None] >= 0, g * scale, 0.0)

    @triton.autotune(configs=[triton.Config({"BM": bm, "BN": bn}, num_warps=w) for bm, bn, w in
                              ((128, 128, 8), (64, 256, 8), (128, 64, 4), (64, 128, 4), (256, 64, 8), (256, 128, 8),
                               (32, 512, 8), (128, 128, 4))],
                     key=["M", "V"])
    @triton.jit
    def _grad_kernel(logits_ptr, lse_ptr, targets_ptr, g_ptr, g_t_ptr, M, V, vocab_size, scale,
                     BM: tl.constexpr, BN: tl.constexpr):
        """A (BM x BN) tile of G per program, stored as it is and transposed (through on-chip memory)."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
        inside = (rows[:, None] < M) & (cols[None, :] < V)
        target = tl.load(targets_ptr + rows, mask=rows < M, other=-1)
        lse = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
        x = tl.load(logits_ptr + rows[:, None] * V + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        g = _g_tile(x, lse, target, cols, vocab_size, scale).to(g_ptr.dtype.element_ty)
        tl.store(g_ptr + rows[:, None] * V + cols[None, :], g, mask=inside)
        tl.store(g_t_ptr + cols[:, None] * M + rows[None, :], tl.trans(g), mask=tl.trans(inside))

    @triton.jit
    def _logits(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, rows, cols, M, V, K: tl.constexpr, BK: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr):
        """A (BM x BN) tile of the logits x @ W.T, in float32, from the FP8 tensor cores."""
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k in range(0, K, BK):
            ks = k + tl.arange(0, BK)
            a = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=rows[:, None] < M, other=0.0)
            b = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=cols[:, None] < V, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
        return acc * (tl.load(x_inv_ptr) * tl.load(w_inv_ptr))

    @triton.autotune(configs=[triton.Config({"BM": bm}, num_warps=w, num_stages=s)
                              for bm in (64, 128) for w in (4, 8) for s in (2, 3)], key=["M", "V", "K"])
    @triton.jit
    def _lse_parts_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, targets_ptr, part_max_ptr, part_sum_ptr,
                          target_logit_ptr, M, V, vocab_size, n_parts, K: tl.constexpr, BK: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr):
        """Per tile of logits: each row's max and sum of exp relative to it over the tile's columns, and
        the target's logit where the tile holds it."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
        real = cols[None, :] < vocab_size
        logits = tl.where(real, _logits(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, rows, cols, M, V, K, BK, BM, BN),
                          -1e30)  # finite, so a tile of padding only gives exp(0) * 0 below
        top = tl.max(logits, 1)
        total = tl.sum(tl.where(real, tl.exp(logits - top[:, None]), 0.0), 1)
        tl.store(part_max_ptr + rows * n_parts + tl.program_id(1), top, mask=rows < M)
        tl.store(part_sum_ptr + rows * n_parts + tl.program_id(1), total, mask=rows < M)
        target = tl.load(targets_ptr + rows, mask=rows < M, other=-1)
        hit = cols[None, :] == target[:, None]
        mine = (rows < M) & (target >= tl.program_id(1) * BN) & (target < tl.program_id(1) * BN + BN)
        tl.store(target_logit_ptr + rows, tl.sum(tl.where(hit, logits, 0.0), 1), mask=mine)

    @triton.jit
    def _target_logit_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, targets_ptr, out_ptr, M, K: tl.constexpr,
                             BM: tl.constexpr):
        """Each row's logit of its target, one row of x times one row of W (ignored rows: any value)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        target = tl.load(targets_ptr + rows, mask=rows < M, other=-1)
        x_row = x_ptr + rows.to(tl.int64)[:, None] * K
        w_row = w_ptr + tl.maximum(target, 0).to(tl.int64)[:, None] * K
        total = tl.zeros([BM], dtype=tl.float32)
        for k in tl.static_range(0, K, 32):
            ks = k + tl.arange(0, 32)[None, :]
            a = tl.load(x_row + ks, mask=rows[:, None] < M, other=0.0).to(tl.float32)
            b = tl.load(w_row + ks, mask=rows[:, None] < M, other=0.0).to(tl.float32)
            total += tl.sum(a * b, 1)
        tl.store(out_ptr + rows, total * (tl.load(x_inv_ptr) * tl.load(w_inv_ptr)), mask=rows < M)

    @triton.jit
    def _lse_from_parts_kernel(part_max_ptr, part_sum_ptr, target_logit_ptr, targets_ptr, lse_ptr, loss_ptr, M,
                               n_parts, BM: tl.constexpr, BP: tl.constexpr):
        """Each row's log-sum-exp from its tiles' partial results, and its loss."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        parts = tl.arange(0, BP)
        inside = (rows[:, None] < M) & (parts[None, :] < n_parts)
        offsets = rows[:, None].to(tl.int64) * n_parts + parts[None, :]
        tops = tl.load(part_max_ptr + offsets, mask=inside, other=-1e30)
        sums = tl.load(part_sum_ptr + offsets, mask=inside, other=0.0)
        top = tl.max(tops, 1)
        lse = top + tl.log(tl.sum(sums * tl.exp(tops - top[:, None]), 1))
        target = tl.load(targets_ptr + rows, mask=rows < M, other=-1)
        target_logit = tl.load(target_logit_ptr + rows, mask=(rows < M) & (target >= 0), other=0.0)
        tl.store(lse_ptr + rows, lse, mask=rows < M)
        tl.store(loss_ptr + rows, tl.where(target >= 0, lse - target_logit, 0.0), mask=rows < M)

    @triton.autotune(configs=[triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in
                              ((64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (256, 128, 8, 3),
                               (64, 256, 8, 3))],
                     key=["M", "V", "K"])
    @triton.jit
    def _grad_from_x_kernel(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, lse_ptr, targets_ptr, g_ptr, g_t_ptr, M, V,
                            vocab_size, scale, K: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr):
        """A (BM x BN) tile of G per program, from its logits computed again; stored as it is, then read
        back (from the L2 cache) and stored transposed."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
        inside = (rows[:, None] < M) & (cols[None, :] < V)
        target = tl.load(targets_ptr + rows, mask=rows < M, other=-1)
        lse = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
        logits = _logits(x_ptr, w_ptr, x_inv_ptr, w_inv_ptr, rows, cols, M, V, K, BK, BM, BN)
        g = _g_tile(logits, lse, target, cols, vocab_size, scale).to(g_ptr.dtype.element_ty)
        tile = g_ptr + rows[:, None] * V + cols[None, :]
        tl.store(tile, g, mask=inside)
        tl.debug_barrier()  # the whole tile is written before any thread reads it back
        back = tl.load(tile, mask=inside, other=0.0)
        tl.store(g_t_ptr + cols[:, None] * M + rows[None, :], tl.trans(back), mask=tl.trans(inside))

    @triton.jit
    def _grad_from_x_tma_kernel(x_desc, w_desc, g_desc, g_t_desc, x_inv_ptr, w_inv_ptr, lse_ptr, targets_ptr, M, V,
                                vocab_size, scale, K: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
                                BN: tl.constexpr, PROGRAMS: tl.constexpr):
        """``_grad_from_x_kernel`` for Hopper: PROGRAMS programs (one per SM) walk the tiles, consecutive
        programs taking consecutive row blocks of one block of W (which stays in the L2 cache); the TMA engine
        loads x's and W's tiles and stores G's tile and its transpose straight from registers (clipped at
        the edges). At d_model 384 on an H200: 0.608 ms per 8,192 x 50,304 chunk against the other kernel's
        0.670 (the whole op 1.277 against 1.366 ms); at 512 it was slower (0.795 against 0.748)."""
        n_m = tl.cdiv(M, BM)
        inv = tl.load(x_inv_ptr) * tl.load(w_inv_ptr)
        for tile in tl.range(tl.program_id(0), n_m * tl.cdiv(V, BN), PROGRAMS, flatten=True):
            pid_m = tile % n_m
            pid_n = tile // n_m
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k in range(0, K, BK):
                acc = tl.dot(x_desc.load([pid_m * BM, k]), w_desc.load([pid_n * BN, k]).T, acc)
            rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
            cols = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
            target = tl.load(targets_ptr + rows, mask=rows < M, other=-1)
            lse = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
            g = _g_tile(acc * inv, lse, target, cols, vocab_size, scale).to(tl.float8e5)
            g_desc.store([pid_m * BM, pid_n * BN], g)
            g_t_desc.store([pid_n * BN, pid_m * BM], tl.trans(g))
