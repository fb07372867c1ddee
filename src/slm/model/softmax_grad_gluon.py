"""The FP8 loss's two passes over the logits for Hopper GPUs (H100, H200), written in Gluon.

``linear_softmax_grad_fp8`` (softmax_grad.py) computes each tile of logits ``x @ W.T`` twice on the FP8
tensor cores, never storing them: once for each row's log-sum-exp, once for the gradient G = softmax -
one-hot. Written in Triton, a tile's loads, its matmul and its exp epilogue run one after the other, so
the matmul reaches ~480 TFLOP/s where cuBLAS does the same product at ~860. Gluon (Triton's lower-level
language) lets these kernels say what runs when:

- each program keeps its block of x's rows (BM x K) in shared memory and streams W's tiles through a ring
  of STAGES buffers filled by the TMA copy engine ahead of use;
- the matmul of tile i is issued asynchronously (``warpgroup_mma(is_async=True)``) and the exp epilogue
  of tile i - 1 runs while the tensor cores work on it, from a second accumulator. No branch may sit
  between the two: ptxas then waits for the matmul before the branch (the epilogue ran after it, not
  beside it, until the padding mask moved to each run's last tile).

On an H200, per 8,192 x 50,304 chunk at d_model 384 (``triton.testing.do_bench``): the log-sum-exp pass
336 us (943 TFLOP/s) against 656 us for the Triton kernel, the gradient pass 528 against 607 us; the
whole op 0.87 against 1.26 ms. Above d_model 384 the tiles are 64 vocabulary columns wide (``tile_n``) so
that shared memory still holds x's block and two W tiles; at 768 (GPT-2 small) the whole op takes 1.47 ms
against 1.84 for the Triton kernels and 1.66 for storing the logits and reading them back twice, the
path loss.py took there before.

Both kernels take x8 (M, K) and w8 (V, K) in float8_e4m3fn; program (i, j) takes rows i*BM.. and the j-th
of ``splits`` equal runs of W's tiles. ``lse_parts`` writes each row's max and sum of exp per run (combined
by softmax_grad's ``_lse_from_parts_kernel``); ``grad`` writes G and G.T as float8_e5m2 through the TMA
engine, from a double-buffered staging area in shared memory.
"""

from __future__ import annotations

import math

import torch

enabled = True  # False: softmax_grad uses its Triton kernels (for A/B timing)
BM, BK = 128, 128  # rows per tile; K is loaded in BK-wide boxes
MAX_K = 768  # x's block and the ring of W's tiles must fit in shared memory (227 KiB on an H100)
NUM_WARPS = 8  # two warpgroups, 64 rows each


def tile_n(k: int) -> int:
    """Vocabulary columns per tile: 128 up to d_model 384; above, 64, so that x's (128 x K) block, two W
    tiles and G's staging buffers still fit in shared memory (at 768: 96 + 2 x 48 + 32 KiB)."""
    return 128 if k <= 384 else 64

try:  # Triton 3.6+ with Gluon
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _BM, _BK = gl.constexpr(BM), gl.constexpr(BK)
    _LOG2E = gl.constexpr(1.4426950408889634)
except Exception:  # no Triton, or one whose (experimental) Gluon differs: the Triton kernels run
    gluon = None


def available(x8: torch.Tensor, w8: torch.Tensor, vocab_size: int) -> bool:
    """Whether these kernels can run: Gluon, a Hopper GPU (compute capability 9.x), d_model a multiple of
    BK up to MAX_K (shared memory holds x's block and the ring), 16-byte aligned rows for the TMA engine,
    and padding columns (vocab_size..V) within the last tile."""
    (m, k), v = x8.shape, w8.size(0)
    return (takes(k, x8.device) and m % 16 == 0 and v % 16 == 0 and v - vocab_size < tile_n(k)
            and x8.data_ptr() % 16 == 0 and w8.data_ptr() % 16 == 0)


@torch.compiler.assume_constant_result  # a constant where torch.compile traces the loss: no graph break
def takes(k: int, device: torch.device) -> bool:
    """Whether these kernels take d_model ``k`` on ``device`` (``available`` checks the rest per call)."""
    return (enabled and gluon is not None and device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] == 9 and k % BK == 0 and k <= MAX_K)


def _splits(m: int, v: int, bn: int, device) -> int:
    """Runs of W's tiles per block of rows: enough programs to fill the GPU's SMs once, none of them empty."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = math.ceil(v / bn)
    per = math.ceil(tiles / max(1, sms // math.ceil(m / BM)))  # tiles per run
    return math.ceil(tiles / per)


def _desc(t: torch.Tensor, box: list[int]):
    """TMA descriptor of an FP8 tensor, moved in boxes of ``box`` elements (swizzled in shared memory)."""
    dtype = {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5}[t.dtype]
    return TensorDescriptor.from_tensor(t, box, gl.NVMMASharedLayout.get_default_for(box, dtype))


def _descriptors(x8, w8, bn: int):
    """TMA descriptors of x8's (BM x BK) and w8's (bn x BK) boxes."""
    return _desc(x8, [BM, BK]), _desc(w8, [bn, BK])


def lse_parts(x8, x_inv, w8, w_inv, vocab_size: int, stages: int = 2):
    """(part_max, part_sum), each (M, splits) float32: per row and run of W's tiles, the max logit and the
    sum of exp(logit - max), over the columns below ``vocab_size``; the logits are x8 @ w8.T * x_inv * w_inv."""
    (m, k), v, bn = x8.shape, w8.size(0), tile_n(x8.size(1))
    splits = _splits(m, v, bn, x8.device)
    part_max = torch.empty((m, splits), dtype=torch.float32, device=x8.device)
    part_sum = torch.empty_like(part_max)
    x_desc, w_desc = _descriptors(x8, w8, bn)
    _lse_parts_kernel[(math.ceil(m / BM), splits)](x_desc, w_desc, x_inv, w_inv, part_max, part_sum, m, v,
                                                   vocab_size, splits, K=k, BN=bn, STAGES=stages,
                                                   num_warps=NUM_WARPS)
    return part_max, part_sum


def grad(x8, x_inv, w8, w_inv, lse, targets, g, g_t, vocab_size: int, scale: float, stages: int = 2):
    """Writes G = (softmax - one-hot) * scale (M, V) and G.T (V, M), float8_e5m2, given each row's lse."""
    (m, k), v, bn = x8.shape, w8.size(0), tile_n(x8.size(1))
    splits = _splits(m, v, bn, x8.device)
    x_desc, w_desc = _descriptors(x8, w8, bn)
    _grad_kernel[(math.ceil(m / BM), splits)](x_desc, w_desc, _desc(g, [BM, bn]), _desc(g_t, [bn, BM]), x_inv,
                                              w_inv, lse, targets, m, v, vocab_size, splits, scale, K=k, BN=bn,
                                              STAGES=stages, num_warps=NUM_WARPS)


if gluon is not None:
    @gluon.jit
    def _run_of_tiles(V, splits, BN: gl.constexpr):
        """[first, last) of W's tiles this program walks."""
        n_tiles = gl.cdiv(V, BN)
        per = gl.cdiv(n_tiles, splits)
        first = gl.program_id(1) * per
        return first, gl.minimum(first + per, n_tiles)

    @gluon.jit
    def _load_x(x_desc, x_smem, bar, KT: gl.constexpr):
        """x's (BM x K) block, as KT boxes of BK columns, on one barrier."""
        mbarrier.expect(bar, KT * x_desc.block_type.nbytes)
        for kt in gl.static_range(KT):
            tma.async_copy_global_to_shared(x_desc, [gl.program_id(0) * _BM, kt * _BK], bar, x_smem.index(kt))

    @gluon.constexpr_function
    def _acc_layout(BN, num_warps):
        """Registers of a (BM x BN) float32 accumulator: warpgroups stacked along the rows, wgmma steps of
        16 x BN x 32 (FP8)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 32])

    @gluon.jit
    def _load_w(w_desc, w_smem, bars, tile, slot, KT: gl.constexpr, BN: gl.constexpr):
        """W's tile ``tile`` (BN x K) into ring slot ``slot``."""
        bar = bars.index(slot)
        mbarrier.expect(bar, KT * w_desc.block_type.nbytes)
        for kt in gl.static_range(KT):
            tma.async_copy_global_to_shared(w_desc, [tile * BN, kt * _BK], bar, w_smem.index(slot * KT + kt))

    @gluon.jit
    def _start_loads(x_desc, w_desc, V, splits, KT: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
        """This program's run of W's tiles [first, last); shared memory for x's block and the ring of W's
        tiles, their barriers, and the first loads."""
        first, last = _run_of_tiles(V, splits, BN)
        n = last - first
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [KT, _BM, _BK], x_desc.layout)
        w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES * KT, BN, _BK], w_desc.layout)
        x_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        w_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(x_bar, count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(w_bars.index(s), count=1)
        _load_x(x_desc, x_smem, x_bar, KT)
        for s in gl.static_range(STAGES):
            if s < n:
                _load_w(w_desc, w_smem, w_bars, first + s, s, KT, BN)
        return first, last, n, x_smem, w_smem, x_bar, w_bars

    @gluon.jit
    def _end_loads(x_bar, w_bars, STAGES: gl.constexpr):
        mbarrier.invalidate(x_bar)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(w_bars.index(s))

    @gluon.jit
    def _issue_mma(x_smem, w_smem, slot, acc, KT: gl.constexpr):
        """acc = x_block @ W_tile.T, asynchronously (K in KT steps)."""
        for kt in gl.static_range(KT):
            acc = warpgroup_mma(x_smem.index(kt), w_smem.index(slot * KT + kt).permute((1, 0)), acc,
                                use_acc=kt > 0, is_async=True)
        return acc

    @gluon.jit
    def _tile_start(x_smem, w_smem, w_bars, i, zero, KT: gl.constexpr, STAGES: gl.constexpr):
        """The matmul of the run's i-th tile, issued once its W tile has landed (not waited for)."""
        slot = i % STAGES
        mbarrier.wait(w_bars.index(slot), (i // STAGES) & 1)
        return _issue_mma(x_smem, w_smem, slot, zero, KT)

    @gluon.jit
    def _tile_wait(acc, w_desc, w_smem, w_bars, first, i, n, KT: gl.constexpr, BN: gl.constexpr,
                   STAGES: gl.constexpr):
        """Waits for tile i's matmul, then refills its slot of the ring with the tile STAGES ahead."""
        acc = warpgroup_mma_wait(0, deps=(acc,))
        if i + STAGES < n:
            _load_w(w_desc, w_smem, w_bars, first + i + STAGES, i % STAGES, KT, BN)
        return acc

    @gluon.jit
    def _lse_update(acc, tile, row_max, row_sum, c, vocab_size, BN: gl.constexpr, layout: gl.constexpr,
                    LAST: gl.constexpr):
        """Online max and sum of exp over one more tile (acc: raw products; c = inv * log2(e) > 0, so the
        max of the raw products is the max of the logits). Only the LAST tile of a run may hold padding
        columns (available() asks for fewer than BN of them): a branch between the asynchronous matmul and
        its wait makes ptxas wait for the matmul before the branch."""
        if LAST and tile * BN + BN > vocab_size:  # padding columns: out of the max and the sum
            cols = tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
            acc = gl.where(cols[None, :] < vocab_size, acc, -1e30)
        new_max = gl.maximum(row_max, gl.max(acc, axis=1))
        p = gl.exp2(acc * c - (new_max * c)[:, None])
        row_sum = row_sum * gl.exp2((row_max - new_max) * c) + gl.sum(p, axis=1)
        return new_max, row_sum

    @gluon.jit
    def _lse_parts_kernel(x_desc, w_desc, x_inv_ptr, w_inv_ptr, part_max_ptr, part_sum_ptr, M, V, vocab_size,
                          splits, K: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                          num_warps: gl.constexpr):
        KT: gl.constexpr = K // _BK
        layout: gl.constexpr = _acc_layout(BN, num_warps)
        first, last, n, x_smem, w_smem, x_bar, w_bars = _start_loads(x_desc, w_desc, V, splits, KT, BN, STAGES)

        inv = gl.load(x_inv_ptr) * gl.load(w_inv_ptr)
        c = inv * _LOG2E
        row_max = gl.full([_BM], -1e30, gl.float32, layout=gl.SliceLayout(1, layout))
        row_sum = gl.zeros([_BM], gl.float32, layout=gl.SliceLayout(1, layout))
        zero = gl.zeros([_BM, BN], gl.float32, layout=layout)
        mbarrier.wait(x_bar, 0)
        prev = _tile_wait(_tile_start(x_smem, w_smem, w_bars, 0, zero, KT, STAGES), w_desc, w_smem, w_bars, first, 0,
                          n, KT, BN, STAGES)  # tile 0 on its own: the loop always has a finished tile to reduce
        for i in range(1, n):
            cur = _tile_start(x_smem, w_smem, w_bars, i, zero, KT, STAGES)
            row_max, row_sum = _lse_update(prev, first + i - 1, row_max, row_sum, c, vocab_size, BN, layout, False)
            prev = _tile_wait(cur, w_desc, w_smem, w_bars, first, i, n, KT, BN, STAGES)
        row_max, row_sum = _lse_update(prev, last - 1, row_max, row_sum, c, vocab_size, BN, layout, True)

        _end_loads(x_bar, w_bars, STAGES)
        rows = gl.program_id(0) * _BM + gl.arange(0, _BM, layout=gl.SliceLayout(1, layout))
        out = rows.to(gl.int64) * splits + gl.program_id(1)
        gl.store(part_max_ptr + out, row_max * inv, mask=rows < M)
        gl.store(part_sum_ptr + out, row_sum, mask=rows < M)

    @gluon.jit
    def _grad_epilogue(acc, tile, lse2, target, c, vocab_size, scale, g_desc, g_t_desc, g_smem, g_t_smem, buf,
                       BN: gl.constexpr, layout: gl.constexpr, LAST: gl.constexpr):
        """G's tile from its raw products, stored (and its transpose) through staging buffer ``buf``."""
        cols = tile * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        p = gl.exp2(acc * c - lse2[:, None])  # softmax * scale (lse2 holds log2(scale); +inf: ignored row)
        g = gl.where(cols[None, :] == target[:, None], p - scale, p)
        if LAST and tile * BN + BN > vocab_size:  # only a run's last tile (see _lse_update)
            g = gl.where(cols[None, :] < vocab_size, g, 0.0)
        g8 = g.to(gl.float8e5)
        tma.store_wait(2)  # this buffer's stores of two tiles ago are done
        g_smem.index(buf).store(g8)
        g_t_smem.index(buf).store(gl.permute(g8, (1, 0)))  # the transpose is a change of register layout
        fence_async_shared()
        tma.async_copy_shared_to_global(g_desc, [gl.program_id(0) * _BM, tile * BN], g_smem.index(buf))
        tma.async_copy_shared_to_global(g_t_desc, [tile * BN, gl.program_id(0) * _BM], g_t_smem.index(buf))

    @gluon.jit
    def _grad_kernel(x_desc, w_desc, g_desc, g_t_desc, x_inv_ptr, w_inv_ptr, lse_ptr, targets_ptr, M, V,
                     vocab_size, splits, scale, K: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                     num_warps: gl.constexpr):
        KT: gl.constexpr = K // _BK
        layout: gl.constexpr = _acc_layout(BN, num_warps)
        first, last, n, x_smem, w_smem, x_bar, w_bars = _start_loads(x_desc, w_desc, V, splits, KT, BN, STAGES)
        g_smem = gl.allocate_shared_memory(g_desc.dtype, [2, _BM, BN], g_desc.layout)  # staging, double-buffered
        g_t_smem = gl.allocate_shared_memory(g_t_desc.dtype, [2, BN, _BM], g_t_desc.layout)

        inv = gl.load(x_inv_ptr) * gl.load(w_inv_ptr)
        c = inv * _LOG2E
        rows = gl.program_id(0) * _BM + gl.arange(0, _BM, layout=gl.SliceLayout(1, layout))
        target = gl.load(targets_ptr + rows, mask=rows < M, other=-1)
        lse2 = gl.load(lse_ptr + rows, mask=rows < M, other=0.0) * _LOG2E - gl.log2(scale)
        lse2 = gl.where(target >= 0, lse2, float("inf"))
        zero = gl.zeros([_BM, BN], gl.float32, layout=layout)
        mbarrier.wait(x_bar, 0)
        prev = _tile_wait(_tile_start(x_smem, w_smem, w_bars, 0, zero, KT, STAGES), w_desc, w_smem, w_bars, first, 0,
                          n, KT, BN, STAGES)
        for i in range(1, n):
            cur = _tile_start(x_smem, w_smem, w_bars, i, zero, KT, STAGES)
            _grad_epilogue(prev, first + i - 1, lse2, target, c, vocab_size, scale, g_desc, g_t_desc, g_smem,
                           g_t_smem, (i - 1) % 2, BN, layout, False)
            prev = _tile_wait(cur, w_desc, w_smem, w_bars, first, i, n, KT, BN, STAGES)
        _grad_epilogue(prev, last - 1, lse2, target, c, vocab_size, scale, g_desc, g_t_desc, g_smem, g_t_smem,
                       (n - 1) % 2, BN, layout, True)
        tma.store_wait(0)
        _end_loads(x_bar, w_bars, STAGES)
