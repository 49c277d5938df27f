"""The gate_up GEMM with SiLU-and-mul in its epilogue (`kernels/int8_gemm_silu.int8_gemm_silu`) on the
warp-specialised Gluon GEMM of kernels/int8_gemm_ws.py, for sm_90:

    int8_gemm_silu_ws(x_q [M, K] int8, x_scale [M] f32, w_g [2 I_pad, K] int8, w_scale_g [2 I_pad] f32, I,
                      out_dtype, config) -> (h [M, I] out_dtype, part_max [M, I_pad / GATED_BLOCK] f32)
        the bits of int8_gemm_silu (same arguments, the gated weight layout of `to_gated_layout`)

One tile per gated block: BLOCK_N = 2 * GATED_BLOCK rows of w_g (a block's gate rows, then its up rows).
The kernel (`int8_gemm_ws._int8_gemm_silu_ws_kernel`, beside the plain one: they share the partitions) scales
the int32 tile as int8_gemm_silu does, rounds it to out_dtype and stores it to a shared-memory scratch
[BLOCK_M, 2 * GATED_BLOCK], from which each thread reads a gate element and its up element in one register
layout (`int8_gemm_ws.row_vectors`); then silu(gate) * up as kernels/silu_and_mul.py stores it, h stored
masked past M and I, each row's max |h| to part_max[row, block]. Two barriers of the consumer warps around
the reads keep the scratch of one tile from being overwritten by the next (persistent launches).
Shared memory: the ring (`int8_gemm_ws.ws_smem_bytes`) plus the scratch, BLOCK_M * 2 * GATED_BLOCK * the
element size of out_dtype (`silu_smem_bytes`): 6 stages of 128-row tiles fit with a 16-bit h only.
`quant/int8_cuda.w8a8_gate_up_silu_quant` takes it where SILU_WS_SHAPE_CONFIGS has an entry for the weight
and M, on a device where `int8_gemm_ws.ws_available`; int8_gemm_silu elsewhere.

An e4m3 variant for --quantization fp8 was built and not kept (run s13c, H200, qwen-7b's gate_up, with an fp8
quant_amax after it, against cuBLAS's _scaled_mm then silu_and_mul_fp8_quant): each 128-product K step summed
by a wgmma of its own and added to a float32 accumulator (the promotion that float32 accumulation needs; two
partial sums taken in turns so that ptxas keeps the wgmma pipeline), bit for bit on integer-valued operands.
Its best configs took 94.3 vs 81.6 us at M = 256, 630.6 vs 503.4 at 2048 and 2741 vs 1997 at 8192: each K
step now waits for its wgmma (the int8 kernel keeps one in flight), about 35% over this kernel, while cuBLAS's
fp8 gate_up alone (1,811 us at 8192, run s13e) is faster than this kernel with its SiLU (2,002 us, s12e).
Without the promotion (the tensor core's running sum over all of K, as cuBLAS's use_fast_accum) the down
projection's error grows 3-4x (run s13e, benchmarks/kernels_fp8_accumulation.py).
"""

from __future__ import annotations

import torch

from deepserve.kernels import int8_gemm_ws as ws
from deepserve.kernels.int8_gemm_silu import GATED_BLOCK, check_silu_operands, silu_outputs
from deepserve.kernels.int8_gemm_ws import WsConfig
from deepserve.kernels.sizes import bucket, cdiv
from deepserve.kernels.ws_pipeline import gl, jit, load_partition, mma_partition, ring

# int8_gemm_silu_ws's default: one gated block (2 x 64 rows of w_g) per tile; 5 stages leave room for the
# epilogue's scratch with a float32 h (229,580 B in the Triton 3.6 sm_90 compile; 6 stages need a 16-bit h).
SILU_WS_CONFIG = WsConfig(128, 128, 128, num_stages=5, num_warps=4, persistent=True)
# (2 I_pad, K) of a gated-layout gate_up -> {max M: WsConfig or None}: where
# `quant/int8_cuda.w8a8_gate_up_silu_quant` runs int8_gemm_silu_ws rather than int8_gemm_silu. Measured on an
# H200 (run s12e, benchmarks/kernels_gate_up_silu.py --ws, qwen-7b K = 3584, I = 18944, each time with
# int8_quant_amax after it, bf16 h): persistent 128 x 128 x 128, 6 stages, 8 warps: 76.2 vs 86.0 us at
# M = 256, 483.6 vs 507.4 at 2048, 2002.3 vs 2032.8 at 8192. Buckets as int8_gemm_ws.WS_SHAPE_CONFIGS'
# (M <= 192 and 257-1024 not measured).
_GATE_UP_WS = WsConfig(128, 128, 128, num_stages=6, num_warps=8, persistent=True)
SILU_WS_SHAPE_CONFIGS: dict[tuple[int, int], dict[int, WsConfig | None]] = {
    (37888, 3584): {192: None, 256: _GATE_UP_WS, 1024: None, 1 << 62: _GATE_UP_WS},
}


@jit
def _int8_gemm_silu_ws_kernel(a_desc, b_desc, h_ptr, part_ptr, a_scale_ptr, b_scale_ptr, M, N, K, inter, stride_hm,
                              GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr, ACC_LAYOUT: gl.constexpr,
                              HALF_LAYOUT: gl.constexpr, SCRATCH_LAYOUT: gl.constexpr,
                              LOAD_WARP_REGS: gl.constexpr):
    """`_int8_gemm_ws_kernel` over the gated-layout weight w_g [N = 2 I_pad, K] in [2 * GATED_BLOCK, BLOCK_K]
    boxes with `_silu_epilogue`: h [M, inter] (row stride stride_hm), part_max [M, I_pad / GATED_BLOCK]."""
    a_bufs, b_bufs, ready, empty = ring(a_desc, b_desc, NUM_STAGES)
    tile: gl.constexpr = [a_desc.block_type.shape[0], b_desc.block_type.shape[0]]  # [BLOCK_M, 2 * GATED_BLOCK]
    scratch = gl.allocate_shared_memory(h_ptr.dtype.element_ty, tile, SCRATCH_LAYOUT)
    gl.warp_specialize([
        (mma_partition, (a_bufs, b_bufs, ready, empty, h_ptr, a_scale_ptr, b_scale_ptr, b_scale_ptr, part_ptr, scratch,
                         M, N, K, inter, stride_hm, False, GROUP_M, NUM_STAGES, ACC_LAYOUT, HALF_LAYOUT, True)),
        (load_partition, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M, NUM_STAGES)),
    ], [1], [LOAD_WARP_REGS])


def silu_ws_shape_config(m: int, rows: int, k: int) -> WsConfig | None:
    """SILU_WS_SHAPE_CONFIGS' config for a gated weight of `rows` rows and K columns at M, or None."""
    table = SILU_WS_SHAPE_CONFIGS.get((rows, k))
    return None if table is None else bucket(table, m)


def silu_smem_bytes(cfg: WsConfig, out_dtype: torch.dtype) -> int:
    """Shared memory of a launch: the ring, the epilogue's [BLOCK_M, 2 * GATED_BLOCK] scratch, Triton's own."""
    return ws.ws_smem_bytes(cfg) + cfg.block_m * cfg.block_n * out_dtype.itemsize + ws.SMEM_SLACK


def silu_config_fits(cfg: WsConfig, out_dtype: torch.dtype) -> bool:
    return silu_smem_bytes(cfg, out_dtype) <= ws.SMEM_LIMIT


def check_silu_config(cfg: WsConfig, out_dtype: torch.dtype) -> None:
    """`int8_gemm_ws.check_config`, a tile of one gated block (block_n = 2 * GATED_BLOCK), the scratch beside
    the ring in shared memory."""
    ws.check_config(cfg)
    if cfg.block_n != 2 * GATED_BLOCK or cfg.coalesced_store:
        raise ValueError(f"int8_gemm_silu_ws: config needs block_n = {2 * GATED_BLOCK} (one gated block) and no "
                         f"coalesced_store, got {cfg}")
    if not silu_config_fits(cfg, out_dtype):
        raise ValueError(f"int8_gemm_silu_ws: the ring and the epilogue's scratch take "
                         f"{silu_smem_bytes(cfg, out_dtype)} B of shared memory, more than {ws.SMEM_LIMIT}: {cfg} "
                         f"with {out_dtype}")


def int8_gemm_silu_ws(x_q: torch.Tensor, x_scale: torch.Tensor, w_g: torch.Tensor, w_scale_g: torch.Tensor,
                      inter: int, out_dtype: torch.dtype = torch.bfloat16,
                      config: WsConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_q [M, K] int8, x_scale [M] f32, w_g [2 I_pad, K] int8 and w_scale_g [2 I_pad] f32 in the gated layout
    -> (h [M, I] out_dtype, part_max [M, max(1, I_pad / GATED_BLOCK)] f32), int8_gemm_silu's bits. `config`
    (block_n = 2 * GATED_BLOCK) overrides SILU_WS_CONFIG. ValueError on bad operands before any launch,
    RuntimeError where `int8_gemm_ws.ws_available` is False."""
    what = "int8_gemm_silu_ws"
    check_silu_operands(x_q, x_scale, w_g, w_scale_g, inter, out_dtype, what)
    ws.check_tma_rows(what, x_q=x_q, w_g=w_g)
    cfg = config or SILU_WS_CONFIG
    check_silu_config(cfg, out_dtype)
    m, k = x_q.shape
    h, part_max, done = silu_outputs(m, inter, k, out_dtype, x_q.device)
    if done:
        return h, part_max
    if not ws.ws_available(x_q.device):
        raise RuntimeError(f"{what}: needs Gluon and an sm_90 CUDA device, got {x_q.device}; use int8_gemm_silu")
    tiles = cdiv(m, cfg.block_m) * cdiv(inter, GATED_BLOCK)
    grid = (min(tiles, ws.num_sms(x_q.device)) if cfg.persistent else tiles,)
    _int8_gemm_silu_ws_kernel[grid](
        ws.descriptor(x_q, cfg.block_m, cfg.block_k), ws.descriptor(w_g, cfg.block_n, cfg.block_k), h, part_max,
        x_scale, w_scale_g, m, w_g.shape[0], k, inter, h.stride(0), **silu_kernel_constexprs(cfg, out_dtype),
        num_warps=cfg.num_warps, maxnreg=ws.max_regs(cfg.num_warps),
        enable_fp_fusion=False)  # no FMA: the reference rounds the product first
    return h, part_max


def silu_kernel_constexprs(cfg: WsConfig, out_dtype: torch.dtype) -> dict:
    """The SiLU kernel's constexpr arguments for a config and h's dtype (also used by offline compiles)."""
    return dict(GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages,
                ACC_LAYOUT=ws.acc_layout(cfg.block_m, cfg.block_n, cfg.num_warps),
                HALF_LAYOUT=ws.row_vectors(cfg.num_warps, out_dtype.itemsize, GATED_BLOCK),
                SCRATCH_LAYOUT=ws.scratch_layout(), LOAD_WARP_REGS=ws.LOAD_REGS)
