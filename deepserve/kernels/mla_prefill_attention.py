"""Varlen causal flash attention for MLA prefill over expanded (non-paged) K/V, one launch per batch.

The naive MLA form (layers/mla.py): the context latents of every sequence are gathered from the
paged cache and expanded by kv_b_proj into per-head k_nope and v; the rope key is one [Dr] vector
per context token, shared by all heads (it is never expanded per head here):

    scores[t, h, s] = (q_nope[t, h] . k_nope[s, h] + q_pe[t, h] . k_pe[s]) * scale
    out[t, h]       = softmax_s(scores[t, h] masked causally) @ v[:, h]

Shapes: q_nope [T, h, Dn], q_pe [T, h, Dr] (rotated) — the new tokens of B sequences, sequence i
owning rows cu_q[i]:cu_q[i+1]; k_nope [S, h, Dn], k_pe [S, Dr] (rotated), v [S, h, Dv] — the
contexts, sequence i owning rows cu_k[i]:cu_k[i+1], its new tokens being the last q_len_i of them;
cu_q, cu_k [B + 1] int32 -> out [T, h, Dv] in q's dtype. Any token/head strides (views into a
kv_b_proj output [S, h, Dn + Dv] and a gathered latent [S, R + Dr]), unit last stride.

One program per (query tile, head): BLOCK_M consecutive new tokens of one sequence. Tiles are
numbered `cu_q[i] // BLOCK_M + i + local_tile`, an upper bound known on the host without reading the
device (grid = T // BLOCK_M + B); a program finds its sequence by binary search over cu_q and exits
when its tile is past the sequence's end (`paged_prefill_attention` does the same). Key tiles below
the tile's first position are visible to every row and skip the mask; only the tiles up to its last
position are masked. Online softmax in fp32, exp2 domain. Head dims are padded to powers of two
(at least 16, tl.dot's minimum) with masks, so any Dn, Dr, Dv work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.paged_prefill_attention import LOG2E
from deepserve.kernels.sizes import next_power_of_2
from deepserve.kernels.varlen_tiles import find_sequence

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def mla_prefill_attention_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                              v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference in fp32; same arguments as `mla_prefill_attention`."""
    out = torch.empty(*q_nope.shape[:2], v.shape[2], dtype=q_nope.dtype, device=q_nope.device)  # [T, h, Dv]
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(starts_q) - 1):
        lo, hi, k_lo, k_hi = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        scores = (torch.einsum("thd,shd->hts", q_nope[lo:hi].float(), k_nope[k_lo:k_hi].float())
                  + torch.einsum("thd,sd->hts", q_pe[lo:hi].float(), k_pe[k_lo:k_hi].float())) * scale  # [h, L, S]
        seq_len = k_hi - k_lo
        q_pos = torch.arange(seq_len - (hi - lo), seq_len, device=q_nope.device)
        visible = torch.arange(seq_len, device=q_nope.device)[None, :] <= q_pos[:, None]  # [L, S]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[lo:hi] = torch.einsum("hts,shd->thd", probs, v[k_lo:k_hi].float()).to(out.dtype)
    return out


@triton.jit
def _attend(q_nope, q_pe, m, l, acc, k_nope_ptr, k_pe_ptr, v_ptr, row_pos, key_lo, key_hi, scale_log2,
            stride_kt, stride_pt, stride_vt,
            DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr,
            BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of the [BLOCK_M] rows over context keys key_lo .. key_hi - 1 (BLOCK_N at a time).

    k_nope_ptr / v_ptr point at key 0 of the sequence and this head, k_pe_ptr at key 0's rope key."""
    dn = tl.arange(0, BLOCK_DN)
    dr = tl.arange(0, BLOCK_DR)
    dv = tl.arange(0, BLOCK_DV)
    for n0 in range(key_lo, key_hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < key_hi  # all true in an unmasked pass (whole tiles); it masks rows, not vectors
        rows = pos.to(tl.int64)
        k_n = tl.load(k_nope_ptr + rows[:, None] * stride_kt + dn[None, :],
                      mask=p_mask[:, None] & (dn[None, :] < DN), other=0.0)  # [BLOCK_N, BLOCK_DN]
        k_p = tl.load(k_pe_ptr + rows[:, None] * stride_pt + dr[None, :],
                      mask=p_mask[:, None] & (dr[None, :] < DR), other=0.0)  # [BLOCK_N, BLOCK_DR]
        s = tl.dot(q_nope, tl.trans(k_n), input_precision=DOT_PRECISION)
        s = tl.dot(q_pe, tl.trans(k_p), acc=s, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        if MASKED:
            s = tl.where(p_mask[None, :] & (pos[None, :] <= row_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        vt = tl.load(v_ptr + rows[:, None] * stride_vt + dv[None, :],
                     mask=p_mask[:, None] & (dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit(do_not_specialize=["num_seqs"])  # the batch size changes every step: one compile
def _mla_prefill_kernel(
    q_nope_ptr, q_pe_ptr, k_nope_ptr, k_pe_ptr, v_ptr, cu_q_ptr, cu_k_ptr, out_ptr, scale_log2, num_seqs,
    stride_qt, stride_qh, stride_rt, stride_rh, stride_kt, stride_kh, stride_pt, stride_vt, stride_vh,
    stride_ot, stride_oh,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = find_sequence(cu_q_ptr, num_seqs, tile, BLOCK_M)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    tok0 = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M
    if tok0 >= q_len:
        return
    k_start = tl.load(cu_k_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_k_ptr + seq + 1) - k_start).to(tl.int32)
    prefix = seq_len - q_len  # context tokens before the new ones

    tok = tok0 + tl.arange(0, BLOCK_M)
    row_mask = tok < q_len
    q_rows = (q_start + tok).to(tl.int64)
    dn = tl.arange(0, BLOCK_DN)
    dr = tl.arange(0, BLOCK_DR)
    dv = tl.arange(0, BLOCK_DV)
    q_nope = tl.load(q_nope_ptr + q_rows[:, None] * stride_qt + head * stride_qh + dn[None, :],
                     mask=row_mask[:, None] & (dn[None, :] < DN), other=0.0)  # [BLOCK_M, BLOCK_DN]
    q_pe = tl.load(q_pe_ptr + q_rows[:, None] * stride_rt + head * stride_rh + dr[None, :],
                   mask=row_mask[:, None] & (dr[None, :] < DR), other=0.0)  # [BLOCK_M, BLOCK_DR]
    row_pos = prefix + tok

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_nope_seq = k_nope_ptr + k_start * stride_kt + head * stride_kh
    k_pe_seq = k_pe_ptr + k_start * stride_pt
    v_seq = v_ptr + k_start * stride_vt + head * stride_vh
    full_end = (prefix + tok0 + 1) // BLOCK_N * BLOCK_N  # keys every row sees, in whole tiles
    key_end = tl.minimum(prefix + tok0 + BLOCK_M, seq_len)  # one past the tile's last position
    m, l, acc = _attend(q_nope, q_pe, m, l, acc, k_nope_seq, k_pe_seq, v_seq, row_pos, 0, full_end, scale_log2,
                        stride_kt, stride_pt, stride_vt, DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV, BLOCK_N,
                        False, DOT_PRECISION)
    m, l, acc = _attend(q_nope, q_pe, m, l, acc, k_nope_seq, k_pe_seq, v_seq, row_pos, full_end, key_end,
                        scale_log2, stride_kt, stride_pt, stride_vt, DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV,
                        BLOCK_N, True, DOT_PRECISION)
    l = tl.where(l > 0.0, l, 1.0)
    o = acc / l[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + dv[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (dv[None, :] < DV))


def _check(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k) -> None:
    if q_nope.dim() != 3 or q_pe.dim() != 3 or k_nope.dim() != 3 or k_pe.dim() != 2 or v.dim() != 3:
        raise ValueError(f"want q_nope [T, h, Dn], q_pe [T, h, Dr], k_nope [S, h, Dn], k_pe [S, Dr], v [S, h, Dv]; "
                         f"got {tuple(q_nope.shape)}, {tuple(q_pe.shape)}, {tuple(k_nope.shape)}, "
                         f"{tuple(k_pe.shape)}, {tuple(v.shape)}")
    num_tokens, heads, nope = q_nope.shape
    ctx, rope = k_pe.shape
    if (q_pe.shape[:2] != (num_tokens, heads) or q_pe.shape[2] != rope or k_nope.shape != (ctx, heads, nope)
            or v.shape[:2] != (ctx, heads)):
        raise ValueError(f"shapes disagree: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"k_nope {tuple(k_nope.shape)}, k_pe {tuple(k_pe.shape)}, v {tuple(v.shape)}")
    tensors = (q_nope, q_pe, k_nope, k_pe, v)
    if len({t.dtype for t in tensors}) != 1 or q_nope.dtype not in _DTYPES:
        raise ValueError(f"q_nope, q_pe, k_nope, k_pe and v must share a float dtype (bf16/f16/f32), got "
                         f"{[t.dtype for t in tensors]}")
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("q_nope, q_pe, k_nope, k_pe and v must be contiguous in their last dim")
    if cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.shape[0] < 1:
        raise ValueError(f"cu_q {tuple(cu_q.shape)} and cu_k {tuple(cu_k.shape)} must both be [B + 1]")
    if cu_q.dtype != torch.int32 or cu_k.dtype != torch.int32 or cu_q.stride(0) != 1 or cu_k.stride(0) != 1:
        raise ValueError(f"cu_q and cu_k must be contiguous int32, got {cu_q.dtype}, {cu_k.dtype}")
    if len({t.device for t in (*tensors, cu_q, cu_k)}) != 1:
        raise ValueError("all inputs must be on one device")


def mla_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                          v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float,
                          block_m: int | None = None, block_n: int = 64, num_warps: int | None = None,
                          num_stages: int = 2) -> torch.Tensor:
    """q_nope [T, h, Dn], q_pe [T, h, Dr], k_nope [S, h, Dn], k_pe [S, Dr], v [S, h, Dv], all one of
    bf16/f16/f32 (any token/head strides, unit last stride); cu_q, cu_k [B + 1] int32 (cu_q[B] == T,
    cu_k[B] == S, cu_k[i+1] - cu_k[i] >= cu_q[i+1] - cu_q[i]: not checked, that would sync)
    -> out [T, h, Dv] contiguous, in q's dtype (fp32 accumulation).

    block_m: new tokens per program (power of two >= 16); None picks 128 (8 warps) when sequences
    average >= 64 new tokens, else 64 (4 warps): host shapes only, no sync. block_n: keys per step.
    """
    _check(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k)
    num_tokens, heads, nope = q_nope.shape
    out = torch.empty(num_tokens, heads, v.shape[2], dtype=q_nope.dtype, device=q_nope.device)  # [T, h, Dv]
    batch = cu_q.shape[0] - 1
    if num_tokens == 0 or batch == 0:
        return out
    if block_m is None:
        block_m = 128 if num_tokens >= 64 * batch else 64
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    if block_m < 16 or block_n < 16 or block_m & (block_m - 1) or block_n & (block_n - 1):
        raise ValueError(f"block_m {block_m} and block_n {block_n} must be powers of two >= 16")
    pad = lambda d: max(16, next_power_of_2(d))
    _mla_prefill_kernel[(num_tokens // block_m + batch, heads)](
        q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, out, scale * LOG2E, batch,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_pe.stride(0), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        DN=nope, DR=k_pe.shape[1], DV=v.shape[2], BLOCK_DN=pad(nope), BLOCK_DR=pad(k_pe.shape[1]),
        BLOCK_DV=pad(v.shape[2]), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q_nope.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
