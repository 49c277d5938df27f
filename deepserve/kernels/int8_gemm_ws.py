"""W8A8 GEMM, warp-specialised for Hopper (Gluon): int8 x int8 -> int32 on wgmma, the dequantising
epilogue fused. Same semantics and the same output bits as `int8_gemm` / `int8_gemm_ref`.

    int8_gemm_ws(x_q [M, K] int8, x_scale [M] f32, w_q [N, K] int8, w_scale [N] f32, bias [N] | None,
                 out_dtype, config) -> y [M, N] out_dtype
    y = (float(acc) * x_scale[m]) * w_scale[n] (+ bias[n]),   acc = x_q @ w_q^T exact in int32

Each float32 operation of the epilogue is rounded on its own (the launch passes enable_fp_fusion=False:
no FMA), then one rounding to out_dtype, as in `int8_gemm_ref`.

Design (one CTA = one output tile [BLOCK_M, BLOCK_N] at a time, tiles in `grouped_tile`'s order):
  * a ring of NUM_STAGES shared-memory stages, each an A box x_q[BLOCK_M, BLOCK_K] and a B box
    w_q[BLOCK_N, BLOCK_K] (both K-major, NVMMA-swizzled), with a `ready` and an `empty` mbarrier;
  * the load partition (1 warp, LOAD_REGS registers after setmaxnreg) waits on `empty[s]`, arms
    `ready[s]` with the two boxes' bytes and issues both TMA loads; boxes past M, N and K are
    zero-filled by the copy engine, so the K loop has no masks;
  * the default partition (num_warps = 4 or 8: one or two warpgroups, `acc_layout`) waits on `ready[s]`,
    issues the async wgmma s8 x s8 -> s32 on A and B^T (a permuted view of the K-major B stage: Hopper's
    int8 wgmma takes K-major operands only), keeps one wgmma in flight (`warpgroup_mma_wait(1)`), and
    hands the previous stage back on `empty` once its wgmma has retired (after a barrier of the
    partition's warps: the arrive is one thread's, and with two warpgroups the other's wgmma must have
    retired too); then the epilogue from the wgmma registers: scale and bias vectors loaded in the
    accumulator's slice layouts, stores masked past M and N (`store_layout`).
  * persistent (config): at most one CTA per SM, walking tiles pid, pid + CTAs, ...; the loads of the
    next tile then overlap this tile's epilogue. Otherwise one CTA per tile.
No split-K, no host synchronisation (CUDA-graph safe). No programmatic dependent launch: launched with it
(kernels/pdl.py's pdl_wait first) the W-offline qwen-7b int8 run was 2.6% slower (run s12h: 17,159 / 17,154
vs 17,642 / 17,599 tok/s), for a reason not established. Shared memory: the ring, NUM_STAGES *
((BLOCK_M + BLOCK_N) * BLOCK_K + 16) bytes (`ws_smem_bytes`; sm_90 allows 227 KB per CTA), plus the
store conversion's scratch with coalesced_store.

The partitions and both epilogues are kernels/ws_pipeline.py (shared with the SiLU-and-mul variant,
kernels/int8_gemm_silu_ws.py); this file holds the kernel, the configs and the launch.

sm_90 only (Gluon's warp_specialize, wgmma, TMA), and Triton 3.6 only (TESTED_TRITON: the Gluon API it is
written against; 3.9 renamed thread_barrier and the TMA load): `ws_available` says where it runs; elsewhere
`int8_gemm` (kernels/int8_gemm.py) is the path.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from deepserve.kernels.int8_gemm import check_operands, check_x_scale, empty_gemm, num_sms, tma_rows_ok
from deepserve.kernels.sizes import bucket, cdiv
from deepserve.kernels.ws_pipeline import TensorDescriptor, gl, jit, load_partition, mma_partition, ring


class WsConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int  # the consumer (default) partition: 4 or 8; the TMA producer is 1 more warp
    group_m: int = 8
    persistent: bool = False  # at most one CTA per SM walking the tiles
    coalesced_store: bool = False  # epilogue through a layout conversion (shared-memory scratch): 16-byte stores


# max M -> config, for calls without one (tests, benchmarks; the engine passes WS_SHAPE_CONFIGS' entries).
# Timed in run s12b at qwen-7b's four linears: slower than int8_gemm's table in 9 of 12 (linear, M) pairs, faster
# for down at 2048 / 8192. M <= 256: stages of (128 + 128) x 128 B = 32 KB, 4 of them 128 KB (131,252 B of
# shared memory in the Triton 3.6 sm_90 compile); above: (128 + 256) x 128 B = 48 KB, 4 of them 192 KB
# (196,788 B compiled), two warpgroups side by side along N.
WS_CONFIGS: dict[int, WsConfig] = {
    256: WsConfig(128, 128, 128, num_stages=4, num_warps=4),
    1 << 62: WsConfig(128, 256, 128, num_stages=4, num_warps=8),
}

# (N, K) -> {max M: WsConfig or None}: the linears `quant/int8_cuda.w8a8_gemm` sends here rather than to
# int8_gemm (None: int8_gemm for that bucket). Measured on an H200 (runs s12b / s12c, benchmarks/
# kernels_int8_ws.py, CUDA-graph replays over cold weights, int8_gemm's table config beside it in the same
# process), qwen-7b's shapes, only where the warp-specialised kernel won, only at the M measured:
#   down (N 3584, K 18944), M = 256: persistent 64 x 128 x 128, 6 stages, 36.7 vs 43.4 us (int8_gemm split-K 2;
#     s12c); M = 2048 / 8192: 128 x 256 x 128, 4 stages, 8 warps, 193.5 vs 205.0 us (s12b) / 713.2 vs 783.6 us
#     (s12c; 763.2 vs 820.4 in s12b);
#   o (N 3584, K 3584), M = 256: persistent 128 x 64 x 128, 6 stages, 10.6 vs 12.1 us (at 2048 / 8192
#     int8_gemm is as fast or faster).
# qkv and gate_up stay on int8_gemm (qkv 14.9 vs 12.8 us at M = 256; gate_up runs int8_gemm_silu). The M
# buckets around the measured ones are narrow on purpose: fewer tiles than the SMs (M <= 192 at 64-row
# tiles of down) were not measured.
WS_SHAPE_CONFIGS: dict[tuple[int, int], dict[int, WsConfig | None]] = {
    (3584, 18944): {192: None, 256: WsConfig(64, 128, 128, num_stages=6, num_warps=4, persistent=True),
                    1024: None, 1 << 62: WsConfig(128, 256, 128, num_stages=4, num_warps=8)},
    (3584, 3584): {192: None, 256: WsConfig(128, 64, 128, num_stages=6, num_warps=4, persistent=True),
                   1 << 62: None},
}

LOAD_REGS = 40  # registers per thread of the TMA warp (setmaxnreg); the consumers get the rest
SMEM_LIMIT = 232448  # bytes of shared memory one CTA may use on sm_90 (227 KB)
SMEM_SLACK = 128  # Triton's own shared memory beside the kernel's (116-124 B in the 3.6 / 3.9 compiles)
TESTED_TRITON = (3, 6)  # the Triton (major, minor) whose Gluon these kernels are written against and were run on
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def ws_config(m: int) -> WsConfig:
    """WS_CONFIGS' entry for M: the one with the smallest max-M >= m."""
    return bucket(WS_CONFIGS, m)


def ws_shape_config(m: int, n: int, k: int) -> WsConfig | None:
    """WS_SHAPE_CONFIGS' config for an [M, K] x [N, K]^T product, or None where int8_gemm runs it."""
    table = WS_SHAPE_CONFIGS.get((n, k))
    return None if table is None else bucket(table, m)


def ws_smem_bytes(cfg: WsConfig) -> int:
    """Shared memory of the stage ring and its two mbarriers per stage (the kernel's, without Triton's own
    SMEM_SLACK and without coalesced_store's conversion scratch: `store_scratch_bytes`)."""
    return cfg.num_stages * ((cfg.block_m + cfg.block_n) * cfg.block_k + 16)


def store_scratch_bytes(cfg: WsConfig, out_dtype: torch.dtype) -> int:
    """The coalesced store's layout-conversion scratch (`store_layout`), as the Triton 3.6 / 3.9 sm_90
    compiles allocate it: a quarter of the 16-bit tile's bytes, twice the float32 tile's element count."""
    if not cfg.coalesced_store:
        return 0
    tile = cfg.block_m * cfg.block_n
    return tile // 2 if out_dtype.itemsize == 2 else 2 * tile


def ws_available(device: torch.device | str) -> bool:
    """Whether `int8_gemm_ws` runs on `device`: Gluon importable from the Triton these kernels were written
    against and run on (TESTED_TRITON: Gluon's API changes between releases; 3.9 renamed two of the calls used
    here), a CUDA device of compute capability exactly 9.0 (H100 / H200), not ROCm. Elsewhere int8_gemm."""
    device = torch.device(device)
    if gl is None or device.type != "cuda" or not triton_tested(triton.__version__):
        return False
    return _sm90(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4)  # asked on every dispatch decision
def triton_tested(version: str) -> bool:
    """Whether a Triton version string ("3.6.0", "3.6.0+git...") is of the TESTED_TRITON release."""
    return tuple(int(part) for part in version.split(".")[:2]) == TESTED_TRITON


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    """Asked once per device index (it sits on every launch)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) == (9, 0)


@jit
def _int8_gemm_ws_kernel(a_desc, b_desc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_cm,
                         HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr,
                         ACC_LAYOUT: gl.constexpr, STORE_LAYOUT: gl.constexpr, LOAD_WARP_REGS: gl.constexpr):
    """a_desc over x_q [M, K] in [BLOCK_M, BLOCK_K] boxes, b_desc over w_q [N, K] in [BLOCK_N, BLOCK_K]
    boxes; c [M, N] (row stride stride_cm). Allocates the ring and its barriers, then forks the partitions."""
    a_bufs, b_bufs, ready, empty = ring(a_desc, b_desc, NUM_STAGES)
    gl.warp_specialize([
        (mma_partition, (a_bufs, b_bufs, ready, empty, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, a_bufs,
                         M, N, K, N, stride_cm, HAS_BIAS, GROUP_M, NUM_STAGES, ACC_LAYOUT, STORE_LAYOUT, False)),
        (load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M, NUM_STAGES)),
    ], [1], [LOAD_WARP_REGS])


@functools.lru_cache(maxsize=64)
def acc_layout(block_m: int, block_n: int, num_warps: int):
    """The wgmma accumulator layout of a [block_m, block_n] int32 tile (num_warps 4 or 8). Two warpgroups
    split N when the tile is 256 wide or has fewer than 128 rows, else M: side by side along N each thread
    holds half the columns, so the epilogue's w_scale and bias vectors (one register per column a thread
    holds) stay in registers (128 x 256 stacked along M spilled 72-184 B in ptxas, side by side none).
    The instruction N is the widest Triton 3.6 lowers for int8 (224 down to 16 by 16, then 8; 256 fails
    in ConvertNVGPUToLLVM) dividing a warpgroup's columns."""
    warps = [4, 1] if num_warps == 4 else [4, 2] if block_n >= 256 or block_m < 128 else [8, 1]
    cols = block_n // warps[1]
    instr_n = next(n for n in [224 - 16 * i for i in range(14)] + [8] if n <= cols and cols % n == 0)
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, instr_n, 32])


@functools.lru_cache(maxsize=64)
def store_layout(cfg: WsConfig, out_bytes: int):
    """Layout of the rounded tile at the store: with coalesced_store, rows of 16-byte vectors, a warp's
    threads along N first (the conversion's scratch, offline Triton 3.6 compiles: 8 KB for a 128 x 128
    bf16 tile, 16 KB for 128 x 256 bf16, 64 KB for 128 x 256 f32, which then no longer fits with 4 stages;
    ptxas spilled 32-104 B in that epilogue); else the accumulator's own (no conversion, no scratch, no
    spills; 2-element stores: 4 B per thread and row for bf16)."""
    if not cfg.coalesced_store:
        return acc_layout(cfg.block_m, cfg.block_n, cfg.num_warps)
    return row_vectors(cfg.num_warps, out_bytes, cfg.block_n)


@functools.lru_cache(maxsize=64)
def row_vectors(num_warps: int, out_bytes: int, cols: int):
    """A [rows, cols] register layout of 16-byte vectors along the row, a warp's threads along the columns
    first, the warps down the rows (the coalesced store's, and the SiLU epilogue's reads of its scratch)."""
    vec = 16 // out_bytes
    lanes_n = min(32, cols // vec)
    return gl.BlockedLayout([1, vec], [32 // lanes_n, lanes_n], [num_warps, 1], [1, 0])


@functools.lru_cache(maxsize=1)
def scratch_layout():
    """The SiLU epilogue's [BLOCK_M, 2 * GATED_BLOCK] scratch: unswizzled rows."""
    return gl.SwizzledSharedLayout(1, 1, 1, [1, 0])


def kernel_constexprs(cfg: WsConfig, out_dtype: torch.dtype, has_bias: bool) -> dict:
    """The kernel's constexpr arguments and launch options for a config (also used by offline compiles)."""
    return dict(HAS_BIAS=has_bias, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages,
                ACC_LAYOUT=acc_layout(cfg.block_m, cfg.block_n, cfg.num_warps),
                STORE_LAYOUT=store_layout(cfg, out_dtype.itemsize), LOAD_WARP_REGS=LOAD_REGS)


def max_regs(num_warps: int) -> int:
    """Registers per thread at launch: the register file (64 K) over the consumer warps plus the producer's
    warpgroup (registers go per warpgroup), rounded down to a multiple of 8, capped at 255 (Triton's
    setmaxnreg then moves the producer's share to the consumers: 4 warps 248-256, 8 warps 232-240, the
    producer 40)."""
    return min(255, 65536 // (32 * (num_warps + 4)) // 8 * 8)


def check_ws_operands(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: WsConfig | None) -> None:
    """int8_gemm's checks, plus what TMA and the kernel need: 16-byte aligned bases and row strides
    (K a multiple of 16 for a contiguous weight), a known out_dtype, a config the kernel takes."""
    what = "int8_gemm_ws"
    check_operands(x_q, w_q, w_scale, bias, (torch.int8,), what)
    check_x_scale(x_q, x_scale, what)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{what}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    check_tma_rows(what, x_q=x_q, w_q=w_q)
    if cfg is not None:
        check_config(cfg, out_dtype)


def check_tma_rows(what: str, **tensors: torch.Tensor) -> None:
    """TMA needs each operand's base address and row stride 16-byte aligned (K % 16 == 0 for contiguous
    int8 rows: `int8_gemm.tma_rows_ok`)."""
    for name, t in tensors.items():
        if t.numel() and not tma_rows_ok(t):
            raise ValueError(f"{what}: TMA needs {name}'s base address and row stride 16-byte aligned "
                             f"(K % 16 == 0 for contiguous rows), got K = {t.shape[1]}, stride {t.stride(0)}")


def check_config(cfg: WsConfig, out_dtype: torch.dtype = torch.bfloat16) -> None:
    """Blocks the wgmma layout and the TMA boxes take, an accumulator of at most 128 registers per thread,
    a ring of at least 2 stages that fits in shared memory beside the store's scratch for out_dtype."""
    smem = ws_smem_bytes(cfg) + store_scratch_bytes(cfg, out_dtype) + SMEM_SLACK
    bad = None
    if cfg.num_warps not in (4, 8) or cfg.block_m not in (64, 128, 256):
        bad = "block_m 64, 128 or 256 and num_warps 4 or 8"
    elif cfg.block_n % 16 or not 16 * cfg.num_warps // 4 <= cfg.block_n <= 256 or cfg.block_k not in (32, 64, 128):
        bad = "block_n a multiple of 16 up to 256 (16 per warpgroup) and block_k 32, 64 or 128"
    elif cfg.block_m * cfg.block_n > 128 * 32 * cfg.num_warps:
        bad = "an int32 accumulator of at most 128 registers per thread (block_m * block_n <= 4096 * num_warps)"
    elif cfg.num_stages < 2 or smem > SMEM_LIMIT:
        bad = f"2 or more stages in {SMEM_LIMIT} B of shared memory (these take {smem} B with {out_dtype})"
    if bad:
        raise ValueError(f"int8_gemm_ws: config needs {bad}, got {cfg}")


def int8_gemm_ws(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 config: WsConfig | None = None) -> torch.Tensor:
    """x_q [M, K] int8, x_scale [M] f32, w_q [N, K] int8 (unit stride in K, 16-byte aligned rows),
    w_scale [N] f32, bias [N] float or None -> [M, N] out_dtype, the bits of `int8_gemm_ref`.
    `config` overrides the table (`ws_config`). Raises ValueError on bad operands (before any launch),
    RuntimeError where `ws_available` is False."""
    check_ws_operands(x_q, x_scale, w_q, w_scale, bias, out_dtype, config)
    (m, k), n = x_q.shape, w_q.shape[0]
    if m == 0 or n == 0 or k == 0:
        return empty_gemm(m, n, bias, out_dtype, x_q.device)
    if not ws_available(x_q.device):
        raise RuntimeError(f"int8_gemm_ws: needs Gluon and an sm_90 CUDA device, got {x_q.device}; use int8_gemm")
    cfg = config or ws_config(m)
    c = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    grid = (min(tiles, num_sms(x_q.device)) if cfg.persistent else tiles,)
    _int8_gemm_ws_kernel[grid](descriptor(x_q, cfg.block_m, cfg.block_k), descriptor(w_q, cfg.block_n, cfg.block_k),
                               c, x_scale, w_scale, bias if bias is not None else w_scale, m, n, k, c.stride(0),
                               **kernel_constexprs(cfg, out_dtype, bias is not None), num_warps=cfg.num_warps,
                               maxnreg=max_regs(cfg.num_warps),
                               enable_fp_fusion=False)  # no FMA: the reference rounds the product first
    return c


def descriptor(t: torch.Tensor, rows: int, cols: int):
    """Host TMA descriptor over t [R, K] int8 in [rows, cols] boxes, NVMMA-swizzled (128 B for 128-column
    boxes), zero fill past the edges."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, cols], box_layout(rows, cols))


@functools.lru_cache(maxsize=16)
def box_layout(rows: int, cols: int):
    """The shared-memory layout of an int8 [rows, cols] box: asked once per box shape (two descriptors per
    launch; a descriptor took 2.29 us with it cached, 8.83 us asking Gluon each time: run s13host, cpu-2,
    benchmarks/host_launch.py)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.int8)
