"""Fused MoE: routed experts as two grouped GEMMs over expert-sorted token assignments.

    fused_moe(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] f32, topk_ids [T, k],
              addend [T, H] | None, w13_scale [E, 2I] f32 | None, w2_scale [E, H] f32 | None,
              int8_activations=False, x_quant=(q [T, H] int8, scale [T] f32) | None)
        -> [T, H] in x's dtype

Steps (one host call, no host synchronisation, so it can be captured in a CUDA graph):
  1. `moe_align_block_size_triton` groups the T*k assignments by expert, each expert's segment
     padded to BLOCK_M (sentinel rows are masked out): one launch at decode sizes, two beyond.
  2. Launch 1 (gate/up + SiLU-and-mul, fused): each program takes one M-block (one expert) and a
     BLOCK_N slice of I, gathers the block's token rows of x, and accumulates in float32 two tiles:
     x @ gate[n]^T and x @ up[n]^T (w13 rows n and I + n). The epilogue writes
     silu(gate) * up -> act [T*k, I], row = assignment. Fusing saves the [T*k, 2I] round trip and
     one launch, at the cost of two accumulators per program.
  3. Launch 2 (down): act rows of the block @ w2[e]^T, multiplied in the epilogue by the
     assignment's routing weight -> per-assignment outputs [T*k, H] in x's dtype.
  4. The k outputs of each token are summed by `moe_sum` ([T, k, H] -> [T, H]: float32 sum, one
     rounding, the value torch's bf16 `.sum(dim=1)` gives, in one small launch instead of torch's
     slow reduction kernel), plus `addend` when given (rounded as torch's `sum + addend` would be:
     the MoE layer passes its unfused shared-expert output here). Deterministic, no atomics. Folding
     this sum into launch 2's epilogue would need atomics (a token's k rows sit in the M-blocks of
     k different experts, i.e. in different programs), so it stays a separate launch.

Shared experts folded into the stack (`DeepseekMoE`) are ordinary experts here: ids E..E+n-1 in
every token's row of topk_ids, weight 1.0.

W8A16 (`w13_scale`, `w2_scale` given): the stacks are int8 [E, N, K] with one float32 scale per
expert and output row ([E, N], symmetric, `quantize_rows_int8_ref`), activations stay float. Both
launches load each B tile as int8 (half the bytes of bf16: decode streams the expert weights) and
convert it to the activation dtype before tl.dot (|q| <= 127 is exact in f16/bf16/f32); after the K
loop each accumulator column n is multiplied by scale[e, n] in float32, then rounded as above. The
constexpr W_INT8 selects this; the float specialisation is the same code as without it.

Rounding mirrors `fused_experts_ref` on the eager path: GEMM results are rounded to the dtype,
silu is computed in float32 and rounded, then multiplied by up and rounded (the
`silu_and_mul` kernel's rule); the down result is rounded before the routing weight multiplies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.fused_moe_configs import MoeConfig, get_config
from deepserve.kernels.int8_gemm import int8_gemm_ref
from deepserve.kernels.int8_quant import int8_quant
from deepserve.kernels.moe_align import moe_align_block_size_triton
from deepserve.kernels.moe_sum import moe_sum
from deepserve.kernels.pdl import pdl_launch, pdl_wait
from deepserve.kernels.sizes import cdiv

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# num_m_blocks and num_valid follow the batch's token count T (the padded alignment length / BLOCK_M and
# T * k) with residues mod 16 that the warm-up's token counts do not all reach: specialised, a prefill of a
# new T compiled two variants inside a timed v2-lite int8 run (run s7a, Triton's JIT cache hook)
@triton.jit(do_not_specialize=["num_m_blocks", "num_valid"])
def _fused_moe_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, used_ptr,
                      scale_ptr, a_scale_ptr, num_m_blocks, N, K, num_valid, row_div,
                      stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                      GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
                      W_INT8: tl.constexpr, A_INT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr = False):
    """C[ids] = A[ids // row_div] @ B[expert]^T (N columns) for one M-block x one N-block.

    GATED: B has 2N rows; C = silu(A @ B[:N]^T) * (A @ B[N:]^T). MUL_WEIGHT: C *= weights[ids].
    W_INT8: B is int8 with per-row scales at scale_ptr ([E, 2N or N] f32, contiguous): each B tile is
    converted to A's dtype before the dot (exact: |q| <= 127), and each accumulator column is
    multiplied by its row's scale after the K loop. Otherwise scale_ptr is None (unused).
    A_INT8 (W8A8, with W_INT8): A is int8 with one f32 scale per A row at a_scale_ptr (row = ids // row_div,
    the gathered row); int8 x int8 dots into int32 accumulators, then (float(acc) * a_scale[row]) * scale[n].
    """
    pdl_wait(PDL)  # first: wait for the previous kernel; no early launch of the next (kernels/pdl.py)
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_blocks  # grouped order: neighbouring programs share B tiles
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    if pid_m * BLOCK_M >= tl.load(used_ptr):
        return
    ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM] assignments
    valid = ids < num_valid
    rows = (ids // row_div).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if A_INT8 else tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if A_INT8 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0 if A_INT8 else 0.0)
        b_mask = k_mask[:, None] & n_mask[None, :]
        acc = _dot(a, _load_b(b_ptrs, b_mask, a.dtype, W_INT8), acc, IEEE, A_INT8)
        if GATED:
            acc_up = _dot(a, _load_b(b_ptrs + N * stride_bn, b_mask, a.dtype, W_INT8), acc_up, IEEE, A_INT8)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if A_INT8:  # the row scale first: int8_epilogue's order, (float(acc) * a_scale) * w_scale
        a_scale = tl.load(a_scale_ptr + rows, mask=valid, other=0.0)[:, None]  # [BM, 1]
        acc = acc.to(tl.float32) * a_scale
        acc_up = acc_up.to(tl.float32) * a_scale
    if W_INT8:
        acc, acc_up = _scale_columns(acc, acc_up, scale_ptr, expert, offs_n, n_mask, N, GATED)
    out_ty = c_ptr.dtype.element_ty
    res = acc.to(out_ty).to(tl.float32)
    if GATED:
        res = (res / (1.0 + tl.exp(-res))).to(out_ty).to(tl.float32) * acc_up.to(out_ty).to(tl.float32)
    if MUL_WEIGHT:
        res = res * tl.load(weights_ptr + ids, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, res.to(out_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _load_b(ptrs, mask, a_dtype: tl.constexpr, W_INT8: tl.constexpr):
    """A [BK, BN] tile of B, in A's dtype when B is int8 (every int8 value is exact in f16/bf16/f32)."""
    b = tl.load(ptrs, mask=mask, other=0.0)
    if W_INT8:
        b = b.to(a_dtype)
    return b


@triton.jit
def _scale_columns(acc, acc_up, scale_ptr, expert, offs_n, n_mask, N, GATED: tl.constexpr):
    """acc[:, n] *= scale[expert, n] and (GATED) acc_up[:, n] *= scale[expert, N + n], in float32;
    scale is [E, 2N] (GATED: gate rows | up rows) or [E, N], contiguous."""
    rows_per_expert = N
    if GATED:
        rows_per_expert = 2 * N
    s_ptrs = scale_ptr + expert * rows_per_expert + offs_n  # [BN]
    acc = acc * tl.load(s_ptrs, mask=n_mask, other=0.0)[None, :]
    if GATED:
        acc_up = acc_up * tl.load(s_ptrs + N, mask=n_mask, other=0.0)[None, :]
    return acc, acc_up


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, INT32: tl.constexpr):
    """acc + a @ b in float32; IEEE (float32 inputs): exact products instead of TF32. INT32: int8
    operands into an int32 accumulator (exact; out_dtype named: Triton <= 3.6 defaults it to float32)."""
    if INT32:
        acc = tl.dot(a, b, acc=acc, out_dtype=tl.int32)
    elif IEEE:
        acc = tl.dot(a, b, acc=acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc=acc)
    return acc


def _check(x, w13, w2, topk_weights, topk_ids) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"want x [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    num_experts, two_inter, hidden = w13.shape
    if x.shape[1] != hidden or two_inter % 2 or w2.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if x.dtype not in _DTYPES or {w13.dtype, w2.dtype} not in ({x.dtype}, {torch.int8}):
        raise ValueError(f"x must be one of {_DTYPES} and w13, w2 x's dtype or both int8; got {x.dtype}, "
                         f"{w13.dtype}, {w2.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids/topk_weights must be [T={x.shape[0]}, k]; got "
                         f"{tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}")
    if topk_weights.dtype != torch.float32 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_weights must be float32 and topk_ids int32/int64; got "
                         f"{topk_weights.dtype}, {topk_ids.dtype}")
    if len({t.device for t in (x, w13, w2, topk_weights, topk_ids)}) != 1:
        raise ValueError("all tensors must be on one device")


def _check_scales(w13, w2, w13_scale, w2_scale) -> None:
    """int8 stacks need both per-row scales (float32 [E, 2I] and [E, H], on their device); float stacks none."""
    if w13.dtype != torch.int8:
        if w13_scale is not None or w2_scale is not None:
            raise ValueError(f"weight scales are for int8 stacks; w13 is {w13.dtype}")
        return
    for name, scale, weight in (("w13_scale", w13_scale, w13), ("w2_scale", w2_scale, w2)):
        if scale is None or scale.dtype != torch.float32 or scale.shape != weight.shape[:2] \
                or scale.device != weight.device:
            raise ValueError(f"int8 {name[:-6]} {tuple(weight.shape)} needs {name} float32 "
                             f"{tuple(weight.shape[:2])} on {weight.device}; got "
                             f"{None if scale is None else (scale.dtype, tuple(scale.shape), str(scale.device))}")


def _check_x_quant(x: torch.Tensor, x_quant: tuple[torch.Tensor, torch.Tensor], int8: bool) -> None:
    """x_quant = (q [T, H] int8, scale [T] f32) on x's device, given only with int8_activations."""
    if not int8:
        raise ValueError("x_quant (x quantised per token) is for W8A8 (int8_activations) only")
    q, scale = x_quant
    if q.dtype != torch.int8 or q.shape != x.shape or scale.dtype != torch.float32 \
            or scale.shape != x.shape[:1] or q.device != x.device or scale.device != x.device:
        raise ValueError(f"x_quant must be (int8 {tuple(x.shape)}, float32 {tuple(x.shape[:1])}) on {x.device}; "
                         f"got ({q.dtype} {tuple(q.shape)}, {scale.dtype} {tuple(scale.shape)})")


def _a_operand(a: torch.Tensor, int8: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, None), or W8A8: (q [rows, K] int8, scale [rows] f32), a quantised per row (`int8_quant`)."""
    if not int8:
        return a, None
    q, scale, _ = int8_quant(a if a.stride(1) == 1 else a.contiguous())
    return q, scale


def _launch(a, b, c, weights, align, num_valid, row_div, gated, cfg: MoeConfig,
            scale: torch.Tensor | None = None, a_scale: torch.Tensor | None = None) -> None:
    """c [T*k, N] <- grouped GEMM of a's gathered rows with b [E, N or 2N, K] (see the kernel);
    b int8 with `scale` [E, N or 2N] f32 contiguous (W8A16; W8A8 when a is int8 with a_scale [rows of a]
    f32), or b in a's dtype and no scales."""
    n_cols, k_dim = c.shape[1], a.shape[1]
    num_m_blocks = align.expert_ids.shape[0]
    grid = (num_m_blocks * cdiv(n_cols, cfg.block_n),)
    _fused_moe_kernel[grid](
        a, b, c, weights, align.sorted_ids, align.expert_ids, align.num_tokens_post_padded, scale, a_scale,
        num_m_blocks, n_cols, k_dim, num_valid, row_div,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        GATED=gated, MUL_WEIGHT=not gated, IEEE=a.dtype == torch.float32, W_INT8=scale is not None,
        A_INT8=a_scale is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(a.device))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: MoeConfig | None = None,
              addend: torch.Tensor | None = None, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, int8_activations: bool = False,
              x_quant: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H] (gate rows | up rows), w2 [E, H, I], all f16/bf16/f32 alike;
    topk_weights [T, k] f32, topk_ids [T, k] int32/int64; addend [T, H] x's dtype or None
    -> [T, H] in x's dtype: round(sum of the k weighted expert outputs) (+ addend, rounded).

    W8A16: w13, w2 int8 with w13_scale [E, 2I] and w2_scale [E, H] f32, one scale per expert and
    output row (w = q * scale, `quantize_rows_int8_ref`); x stays float. The result is that of the
    float kernel on the weights q * scale, up to float32 rounding (see the kernel).

    W8A8 (`int8_activations`, int8 stacks only): x is quantised per token (`int8_quant`) and the
    activation act [T*k, I] per assignment row before launch 2; both launches dot int8 x int8 into
    int32 (see the kernel). The result is `fused_moe_w8a8_ref`'s up to float32 rounding.
    x_quant (W8A8 only): (q [T, H] int8, scale [T] f32), x already quantised per token by `int8_quant`
    (another consumer of x made it: DeepseekMoE's shared MLP); launch 1 takes it instead of quantising x again.

    Any strides are accepted (the small scale tensors are made contiguous). `config` overrides the
    table in `fused_moe_configs` (keyed by x's dtype: int8 stacks use the float entries).
    """
    _check(x, w13, w2, topk_weights, topk_ids)
    _check_scales(w13, w2, w13_scale, w2_scale)
    if int8_activations and w13.dtype != torch.int8:
        raise ValueError(f"int8_activations (W8A8) needs int8 stacks with scales; w13 is {w13.dtype}")
    if x_quant is not None:
        _check_x_quant(x, x_quant, int8_activations)
    num_tokens, hidden = x.shape
    num_experts, inter, top_k = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    if num_tokens == 0 or top_k == 0:
        return moe_sum(x.new_empty(num_tokens, 0, hidden), addend)  # zeros (+ addend)
    cfg = config or get_config(num_experts, inter, x.dtype, num_tokens, top_k)
    align = moe_align_block_size_triton(topk_ids, num_experts, cfg.block_m)
    num_valid, weights = num_tokens * top_k, topk_weights.contiguous()
    act = torch.empty(num_valid, inter, dtype=x.dtype, device=x.device)  # [T*k, I]
    scales = (None, None) if w13_scale is None else (w13_scale.contiguous(), w2_scale.contiguous())
    # x, or W8A8: x per token in int8 [T, H] + [T] f32 (as given, or quantised here)
    a, a_scale = (x_quant[0], x_quant[1].contiguous()) if x_quant is not None else _a_operand(x, int8_activations)
    _launch(a, w13, act, weights, align, num_valid, top_k, True, cfg, scales[0], a_scale)
    per_assignment = torch.empty(num_valid, hidden, dtype=x.dtype, device=x.device)  # [T*k, H]
    a, a_scale = _a_operand(act, int8_activations)  # W8A8: act per assignment row [T*k, I] + [T*k]
    _launch(a, w2, per_assignment, weights, align, num_valid, 1, False, cfg, scales[1], a_scale)
    return moe_sum(per_assignment.view(num_tokens, top_k, hidden), addend)  # [T, H]


def _silu_and_mul_eager(x: torch.Tensor) -> torch.Tensor:
    """[n, 2I] -> [n, I]: the eager SiluAndMul math, independent of the device."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, addend: torch.Tensor | None = None,
                  w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference: `deepserve.layers.moe.fused_experts_ref` with SiLU (+ addend).

    int8 stacks (with their scales): the float reference on the dequantised weights q * scale,
    computed in x's dtype promoted to at least float32 (f16/bf16 x: float32 math, rounded to x's
    dtype at the end; float64 x: float64 GEMMs, the k-sum in float32 as `fused_experts_ref` does)."""
    from deepserve.layers.moe import Routing, fused_experts_ref

    if w13_scale is not None:
        math = torch.promote_types(x.dtype, torch.float32)
        w13, w2 = (w13.to(math) * w13_scale.to(math)[..., None]), (w2.to(math) * w2_scale.to(math)[..., None])
        out = fused_moe_ref(x.to(math), w13, w2, topk_weights, topk_ids, addend)
        return out.to(x.dtype)
    out = fused_experts_ref(x, w13, w2, Routing(topk_weights, topk_ids.long()), _silu_and_mul_eager)
    return out if addend is None else out + addend


def fused_moe_w8a8_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                       addend: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference of `fused_moe(..., int8_activations=True)`, the kernel's arithmetic op for
    op: x and then act [T*k, I] quantised per row (`quantize_per_token_ref`), exact integer dots (float64),
    (float32(acc) * a_scale) * w_scale in float32, rounded to x's dtype; silu(g) = g / (1 + exp(-g)) in
    float32, rounded, times up, rounded; the down result rounded, times the routing weight, rounded;
    then `moe_sum_ref` (+ addend)."""
    from deepserve.kernels.moe_sum import moe_sum_ref
    from deepserve.quant.int8 import quantize_per_token_ref

    (num_tokens, top_k), dt = topk_ids.shape, x.dtype
    ids = topk_ids.flatten().long()  # [T*k] assignment -> expert
    xq, xs = quantize_per_token_ref(x)  # [T, H] int8, [T] f32
    rows = torch.arange(num_tokens * top_k, device=x.device) // top_k  # assignment -> token
    gate, up = _w8a8_rows(xq[rows], xs[rows], w13, w13_scale, ids).to(dt).float().chunk(2, dim=1)
    act = ((gate / (1.0 + torch.exp(-gate))).to(dt).float() * up).to(dt)  # [T*k, I]
    down = _w8a8_rows(*quantize_per_token_ref(act), w2, w2_scale, ids).to(dt).float()  # [T*k, H]
    out = (down * topk_weights.flatten().float()[:, None]).to(dt)
    return moe_sum_ref(out.view(num_tokens, top_k, -1), addend)  # [T, H]


def _w8a8_rows(aq: torch.Tensor, a_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
    """aq [n, K] int8, a_scale [n] f32, wq [E, N, K] int8, w_scale [E, N] f32, ids [n] -> [n, N] f32:
    row r = (float32(aq[r] @ wq[ids[r]]^T) * a_scale[r]) * w_scale[ids[r]], the dot exact in float64."""
    out = torch.empty(aq.shape[0], wq.shape[1], dtype=torch.float32, device=aq.device)
    for e in ids.unique().tolist():
        sel = (ids == e).nonzero().squeeze(1)
        out[sel] = int8_gemm_ref(aq[sel], a_scale[sel], wq[e], w_scale[e], None, torch.float32)
    return out
