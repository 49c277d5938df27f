"""The warp-specialised pipeline of the Gluon W8A8 GEMMs for sm_90 (kernels/int8_gemm_ws.py and
kernels/int8_gemm_silu_ws.py hold the two kernels and their host sides; this file the device code they share):

    ring(a_desc, b_desc, NUM_STAGES) -> (a_bufs, b_bufs, ready, empty): the shared-memory stages and mbarriers
    load_partition: 1 warp, TMA loads of A [BLOCK_M, BLOCK_K] and B [BLOCK_N, BLOCK_K] boxes into the ring
    mma_partition:  the default partition (1 or 2 warpgroups): async wgmma s8 x s8 -> s32 over the ring, one in
                    flight, stages released once their wgmma retired; then per tile `_epilogue` (scaled,
                    rounded, stored) or with SILU `_silu_epilogue` (int8_gemm_silu's, through a scratch tile)

Both partitions walk the same tiles (pid, pid + CTAs, ...) in int8_gemm's `grouped_tile` order and the same K steps,
so the ring's phases carry across tiles. The design and the measurements are in int8_gemm_ws.py's docstring.
Gluon is imported under a guard: without it (older or CPU-only Triton installs) `gl` is None and `jit` leaves
the functions as they are, never launched (`int8_gemm_ws.ws_available` is False).
"""

from __future__ import annotations

from deepserve.kernels.int8_gemm import grouped_tile, scaled
from deepserve.kernels.silu_and_mul import silu_mul

__all__ = ["TensorDescriptor", "gl", "jit", "load_partition", "mma_partition", "ring"]

try:  # Gluon (Triton >= 3.5); CPU-only and older installs import this module without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    jit = gluon.jit
except ImportError:  # pragma: no cover - depends on the Triton install
    gl = None

    def jit(fn):
        return fn


@jit
def load_partition(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M: gl.constexpr,
                   NUM_STAGES: gl.constexpr):
    """Producer (1 warp): for every K step of every tile of this CTA, wait for the stage to be empty, then
    TMA-load A [BLOCK_M, BLOCK_K] and B [BLOCK_N, BLOCK_K] into it, completing on `ready`."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    k_steps = gl.cdiv(K, BLOCK_K)
    num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    it = 0  # K steps issued by this CTA: stage it % NUM_STAGES, its (it // NUM_STAGES)-th use
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        for kk in range(k_steps):
            s = it % NUM_STAGES
            # a fresh mbarrier counts as having completed the phase before phase 0: the first round passes
            mbarrier.wait(empty.index(s), ((it // NUM_STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)  # the full boxes' bytes, zero-filled parts included
            tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, kk * BLOCK_K], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [pid_n * BLOCK_N, kk * BLOCK_K], ready.index(s), b_bufs.index(s))
            it += 1


@jit
def release(empty, it, pred, NUM_STAGES: gl.constexpr, TWO_GROUPS: gl.constexpr):
    """Hand stage `it % NUM_STAGES` back to the producer (its wgmma has retired in this thread's warpgroup).
    The arrive is one thread's: with two warpgroups, all the partition's warps meet first so that the
    other warpgroup's wgmma on the stage has retired too."""
    if TWO_GROUPS:
        gl.thread_barrier()
    mbarrier.arrive(empty.index(it % NUM_STAGES), pred=pred)


@jit
def mma_partition(a_bufs, b_bufs, ready, empty, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, part_ptr, scratch, M, N, K,
                  inter, stride_cm, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr,
                  ACC_LAYOUT: gl.constexpr, STORE_LAYOUT: gl.constexpr, SILU: gl.constexpr):
    """Consumer (the default partition, one or two warpgroups): async wgmma over the ring, one in flight,
    stages released as their wgmma retires; then the epilogue of each tile: `_epilogue`, or with SILU
    `_silu_epilogue` (c is h, w the gated layout; part_ptr, scratch and inter are its own)."""
    BLOCK_M: gl.constexpr = a_bufs.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.shape[2]
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    TWO_GROUPS: gl.constexpr = gl.num_warps() > 4
    k_steps = gl.cdiv(K, BLOCK_K)
    num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    it = 0  # K steps consumed by this CTA, in the producer's order
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, ACC_LAYOUT)
        for kk in range(k_steps):
            s = it % NUM_STAGES
            mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # step it - 1's wgmma has retired
            release(empty, it + NUM_STAGES - 1, kk > 0, NUM_STAGES, TWO_GROUPS)
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        release(empty, it + NUM_STAGES - 1, True, NUM_STAGES, TWO_GROUPS)
        if SILU:
            _silu_epilogue(acc, c_ptr, part_ptr, a_scale_ptr, b_scale_ptr, scratch, pid_m * BLOCK_M, pid_n, M, inter,
                           stride_cm, ACC_LAYOUT, STORE_LAYOUT)
        else:
            _epilogue(acc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N,
                      stride_cm, HAS_BIAS, ACC_LAYOUT, STORE_LAYOUT)


@jit
def _silu_epilogue(acc, h_ptr, part_ptr, a_scale_ptr, b_scale_ptr, scratch, off_m, pid_n, M, inter, stride_hm,
                   ACC_LAYOUT: gl.constexpr, HALF_LAYOUT: gl.constexpr):
    """`int8_gemm_silu`'s epilogue through the same Triton functions (int8_gemm's `scaled`, silu_and_mul's
    `silu_mul`, called from Gluon): acc [BLOCK_M, 2 * GATED_BLOCK] int32 holds gated block pid_n (its gate
    columns, then its up columns); y = (float(acc) * x_scale) * w_scale rounded to h's dtype goes through
    the shared-memory scratch [BLOCK_M, 2 * GATED_BLOCK] so that each thread reads a gate element and its up
    element in HALF_LAYOUT; h = silu(gate) * up as kernels/silu_and_mul.py stores it; h stored masked past M
    and I, each row's max |h| to part_max[row, pid_n]."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    HALF: gl.constexpr = acc.shape[1] // 2
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
    offs_b = gl.arange(0, 2 * HALF, layout=gl.SliceLayout(0, ACC_LAYOUT))  # the block's scale rows all exist
    y = scaled(acc, a_scale_ptr, b_scale_ptr + pid_n * 2 * HALF, b_scale_ptr, offs_m, offs_b, M, 2 * HALF, 0, False)
    scratch.store(y.to(h_ptr.dtype.element_ty))
    gl.thread_barrier()  # the whole tile in shared memory before any thread reads another's columns
    gate = scratch.slice(0, HALF, dim=1).load(HALF_LAYOUT)
    up = scratch.slice(HALF, HALF, dim=1).load(HALF_LAYOUT).to(gl.float32)
    gl.thread_barrier()  # every thread has read the tile before a next tile's epilogue overwrites it
    h = silu_mul(gate, up).to(h_ptr.dtype.element_ty)  # kernels/silu_and_mul.py's own (Triton) function
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, HALF_LAYOUT))
    cols = pid_n * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, HALF_LAYOUT))
    mask = (rows < M)[:, None] & (cols < inter)[None, :]
    gl.store(h_ptr + rows.to(gl.int64)[:, None] * stride_hm + cols[None, :], h, mask=mask)
    row_max = gl.max(gl.where(mask, gl.abs(h.to(gl.float32)), 0.0), axis=1)
    gl.store(part_ptr + rows.to(gl.int64) * gl.cdiv(inter, HALF) + pid_n, row_max, mask=rows < M)


@jit
def _epilogue(acc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, off_m, off_n, M, N, stride_cm,
              HAS_BIAS: gl.constexpr, ACC_LAYOUT: gl.constexpr, STORE_LAYOUT: gl.constexpr):
    """c[off_m:, off_n:] = (float(acc) * a_scale[m]) * b_scale[n] (+ bias[n]) (int8_gemm's `scaled`), rounded
    once to c's dtype; acc [BLOCK_M, BLOCK_N] int32 in the wgmma layout. The rounded tile moves to
    STORE_LAYOUT (no-op when it is ACC_LAYOUT) and is stored masked past M and N."""
    BLOCK_M: gl.constexpr = acc.shape[0]
    BLOCK_N: gl.constexpr = acc.shape[1]
    offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
    offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC_LAYOUT))
    y = scaled(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, 0, HAS_BIAS)  # int8_gemm's own
    y = gl.convert_layout(y.to(c_ptr.dtype.element_ty), STORE_LAYOUT)
    rows = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, STORE_LAYOUT))
    cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, STORE_LAYOUT))
    ptrs = c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :]
    gl.store(ptrs, y, mask=(rows < M)[:, None] & (cols < N)[None, :])


@jit
def ring(a_desc, b_desc, NUM_STAGES: gl.constexpr):
    """The stage ring (A and B boxes, NVMMA-swizzled as the descriptors say) and its ready / empty mbarriers."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES] + b_desc.block_type.shape, b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    fence_async_shared()  # the initialised barriers before the copy engine signals them
    return a_bufs, b_bufs, ready, empty
