"""GPU sampling helpers: top-k / top-p thresholds without a vocabulary sort, and a seeded
exponential-race sampler that never materialises probabilities.

Top-k and top-p both keep every token whose (temperature-scaled) logit is >= a per-row threshold,
so one kernel finds that threshold by a radix search over the float32 bit patterns: 8 passes over
the row, each testing 16 candidate 4-bit digits at once, for "count of logits >= t >= k" (top-k)
and then "exp-mass of logits >= t >= p * Z" (top-p, over the top-k survivors). The semantics are
those of `deepserve.layers.sampler.apply_top_k` / `apply_top_p`: ties at the k-th value are kept,
the top token is always kept, and (top-p) a token is dropped when the mass ranked strictly above it
reaches p; tokens tied with the last kept one are kept too.

The sampler draws `argmax(probs / q)`, q ~ Exp(1), as `argmax(x - log(-log(u)))` over the scaled
logits x (no softmax needed). u comes from a counter-based hash of (seed of the row, token id), so
a row's token depends only on its logits and its seed, never on the rest of the batch. Callers
derive a fresh seed per step (e.g. one int64 drawn from the request's torch.Generator).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.sizes import cdiv

_BLOCK = 1024
_TARGET_PROGRAMS = 512  # the sampler splits rows over the vocabulary until about this many programs


@triton.jit
def _load_scaled(base, cols, vocab, temp, HAS_TEMP: tl.constexpr):
    """[BLOCK] f32 logits / temperature; -inf past the vocabulary."""
    x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
    if HAS_TEMP:
        x = x / temp
    return x


@triton.jit
def _key(x):
    """f32 -> int32 ordered like the floats (-0 and +0 equal)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_to_float(t):
    """Unsigned-space key (int64 in [0, 2^32)) -> the float32 it encodes."""
    s = (t - 2147483648).to(tl.int32)
    return tl.where(s < 0, s ^ 0x7FFFFFFF, s).to(tl.float32, bitcast=True)


@triton.jit
def _radix_search(base, vocab, temp, target, floor, m, HAS_TEMP: tl.constexpr, MASS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Largest unsigned key t with F(t) >= target, F(t) = sum over logits with key >= t of
    1 (MASS off) or exp(x - m) restricted to keys >= floor (MASS on)."""
    digits = tl.arange(0, 16)
    floor32 = (floor - 2147483648).to(tl.int32)
    t = floor * 0
    for i in tl.static_range(8):
        shift = 28 - 4 * i
        cand = (t + (digits.to(tl.int64) << shift) - 2147483648).to(tl.int32)  # [16] signed keys
        acc = tl.zeros([16], dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = _load_scaled(base, cols, vocab, temp, HAS_TEMP)
            key = _key(x)
            if MASS:
                w = tl.where(key >= floor32, tl.exp(x - m), 0.0)
            else:
                w = tl.where(cols < vocab, 1.0, 0.0)
            acc += tl.sum(tl.where(key[:, None] >= cand[None, :], w[:, None], 0.0), axis=0)
        ok = ((acc >= target) & (digits > 0)).to(tl.int64)
        t += tl.sum(ok, axis=0) << shift
    return t


@triton.jit
def _masked_softmax_stats(base, vocab, temp, floor, HAS_TEMP: tl.constexpr, BLOCK: tl.constexpr):
    """(max, sum of exp(x - max) over keys >= floor) of one row, in one pass."""
    floor32 = (floor - 2147483648).to(tl.int32)
    m = tl.max(tl.full([BLOCK], -3.0e38, tl.float32), axis=0)
    z = m * 0.0
    for start in range(0, vocab, BLOCK):
        x = _load_scaled(base, start + tl.arange(0, BLOCK), vocab, temp, HAS_TEMP)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        e = tl.where(_key(x) >= floor32, tl.exp(x - m_new), 0.0)
        z = z * tl.exp(m - m_new) + tl.sum(e, axis=0)
        m = m_new
    return m, z


@triton.jit
def _threshold_kernel(logits_ptr, stride, temp_ptr, k_ptr, p_ptr, thr_ptr, vocab,
                      HAS_TEMP: tl.constexpr, HAS_K: tl.constexpr, HAS_P: tl.constexpr,
                      BLOCK: tl.constexpr):
    """One program per row: the smallest kept scaled logit (-inf: the row is untouched)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temp_ptr + row)
    t = row * 0  # unsigned key 0: keep everything
    if HAS_K:
        k = tl.load(k_ptr + row).to(tl.int64)
        if (k > 0) & (k < vocab):
            t = _radix_search(base, vocab, temp, k.to(tl.float32), t, 0.0, HAS_TEMP, False, BLOCK)
    if HAS_P:
        p = tl.load(p_ptr + row).to(tl.float32)
        if p < 1.0:
            m, z = _masked_softmax_stats(base, vocab, temp, t, HAS_TEMP, BLOCK)
            t = tl.maximum(t, _radix_search(base, vocab, temp, p * z, t, m, HAS_TEMP, True, BLOCK))
    thr = _key_to_float(t)
    tl.store(thr_ptr + row, tl.where(t == 0, -float("inf"), thr))


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be [num_seqs, vocab] float, got {tuple(logits.shape)} {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits must be unit-stride in the vocabulary dim")


def _check_rows(logits: torch.Tensor, **per_row: torch.Tensor | None) -> None:
    for name, t in per_row.items():
        if t is not None and (t.shape != (logits.shape[0],) or t.device != logits.device):
            raise ValueError(f"{name} must be [{logits.shape[0]}] on {logits.device}, got {tuple(t.shape)}")


def top_k_top_p_threshold(logits: torch.Tensor, temperature: torch.Tensor | None,
                          top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Per-row threshold on x = logits / temperature: top-k then top-p keep exactly `x >= thr`.

    logits [N, V] f32 (bf16/f16 read as f32); temperature [N] f32 > 0 or None (1);
    top_k [N] int (<= 0 or >= V: off) or None; top_p [N] f32 in (0, 1] (1: off) or None.
    Returns thr [N] f32 (-inf on rows neither filter touches).
    """
    _check_logits(logits)
    _check_rows(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    thr = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0] == 0:
        return thr
    dummy = thr  # placeholder pointer for absent per-row tensors (never read)
    temp = None if temperature is None else temperature.float()
    p = None if top_p is None else top_p.float()
    _threshold_kernel[(logits.shape[0],)](
        logits, logits.stride(0), dummy if temp is None else temp, dummy if top_k is None else top_k,
        dummy if p is None else p, thr, logits.shape[1], HAS_TEMP=temp is not None,
        HAS_K=top_k is not None, HAS_P=p is not None, BLOCK=_BLOCK, num_warps=8)
    return thr


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """`apply_top_p(apply_top_k(logits, k), p)` without a sort: [N, V] f32 -> [N, V] f32."""
    thr = top_k_top_p_threshold(logits, None, top_k, top_p)
    return logits.float().masked_fill(logits < thr[:, None], -float("inf"))


def apply_top_k_top_p_ref(logits: torch.Tensor, top_k: torch.Tensor | None,
                          top_p: torch.Tensor | None) -> torch.Tensor:
    """Reference: the sampler's own sort-based functions, top-k then top-p."""
    from deepserve.layers.sampler import apply_top_k, apply_top_p

    logits = logits.float()
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    return logits if top_p is None else apply_top_p(logits, top_p.float())


# ----------------------------------------------------------------------------- sampling


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche) on uint32."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _uniform(seed, cols):
    """[BLOCK] f32 uniforms in (0, 1) from an int64 seed and int32 token ids."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k1 = _fmix32(lo ^ _fmix32(hi ^ 0x85EBCA77))
    k2 = _fmix32(k1 ^ 0x27D4EB2F)
    h = _fmix32(_fmix32((cols.to(tl.uint32) * 0x9E3779B1) ^ k1) + k2)
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _race_kernel(logits_ptr, stride, seed_ptr, temp_ptr, thr_ptr, best_ptr, idx_ptr, vocab, split_len,
                 HAS_TEMP: tl.constexpr, HAS_THR: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, split): max and argmax over the split's tokens of x - log(-log(u)),
    x = logits / temperature; written to best/idx [N, num_splits]."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, vocab)
    base = logits_ptr + row * stride
    seed = tl.load(seed_ptr + row).to(tl.int64)
    temp = 1.0
    if HAS_TEMP:
        temp = tl.load(temp_ptr + row)
    thr = -float("inf")
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    best = tl.max(tl.full([BLOCK], -float("inf"), tl.float32), axis=0)
    best_idx = row * 0
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = _load_scaled(base, cols, hi, temp, HAS_TEMP)
        score = x - tl.log(-tl.log(_uniform(seed, cols)))
        score = tl.where((x >= thr) & (cols < hi), score, -float("inf"))
        chunk_best = tl.max(score, axis=0)
        chunk_idx = start + tl.argmax(score, axis=0)
        take = chunk_best > best
        best_idx = tl.where(take, chunk_idx.to(tl.int64), best_idx)
        best = tl.where(take, chunk_best, best)
    tl.store(best_ptr + row * tl.num_programs(1) + split, best)
    tl.store(idx_ptr + row * tl.num_programs(1) + split, best_idx)


def exponential_race_sample(logits: torch.Tensor, seeds: torch.Tensor,
                            temperature: torch.Tensor | None = None,
                            threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token per row with probability softmax(x) where x = logits / temperature.

    logits [N, V] f32/bf16 (-inf: never chosen); seeds [N] int64 (the row's whole randomness);
    temperature [N] f32 > 0 or None; threshold [N] f32 or None: tokens with x < threshold are
    excluded (from `top_k_top_p_threshold`). Returns token ids [N] int64.
    """
    _check_logits(logits)
    _check_rows(logits, seeds=seeds, temperature=temperature, threshold=threshold)
    if seeds.dtype != torch.int64:
        raise ValueError(f"seeds must be int64, got {seeds.dtype}")
    rows, vocab = logits.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    chunks = cdiv(vocab, _BLOCK)
    splits = max(1, min(chunks, cdiv(_TARGET_PROGRAMS, rows)))  # fill the GPU at small N
    split_len = cdiv(chunks, splits) * _BLOCK
    splits = cdiv(vocab, split_len)
    best = torch.empty(rows, splits, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, splits, dtype=torch.int64, device=logits.device)
    temp = None if temperature is None else temperature.float()
    thr = None if threshold is None else threshold.float()
    _race_kernel[(rows, splits)](
        logits, logits.stride(0), seeds, seeds if temp is None else temp, seeds if thr is None else thr,
        best, idx, vocab, split_len, HAS_TEMP=temp is not None, HAS_THR=thr is not None, BLOCK=_BLOCK,
        num_warps=8)
    return idx.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)  # first split wins ties


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 h in [0, 2^32) without int64 overflow."""
    low = h * (c & 0xFFFF)
    high = ((h * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & 0xFFFFFFFF


def _fmix32_ref(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_ref(seeds: torch.Tensor, vocab: int) -> torch.Tensor:
    """The kernel's uniforms: seeds [N] int64 -> [N, V] f32 in (0, 1)."""
    lo, hi = (seeds & 0xFFFFFFFF)[:, None], ((seeds >> 32) & 0xFFFFFFFF)[:, None]  # [N, 1]
    k1 = _fmix32_ref(lo ^ _fmix32_ref(hi ^ 0x85EBCA77))
    k2 = _fmix32_ref(k1 ^ 0x27D4EB2F)
    cols = torch.arange(vocab, dtype=torch.int64, device=seeds.device)[None, :]  # [1, V]
    h = _fmix32_ref((_fmix32_ref(_mul32(cols, 0x9E3779B1) ^ k1) + k2) & 0xFFFFFFFF)  # [N, V]
    return ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)


def exponential_race_sample_ref(logits: torch.Tensor, seeds: torch.Tensor,
                                temperature: torch.Tensor | None = None,
                                threshold: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: probs = softmax(x), q = -log(u) with the kernel's u; argmax(probs / q)."""
    x = logits.float()
    if temperature is not None:
        x = x / temperature.float()[:, None]
    if threshold is not None:
        x = x.masked_fill(x < threshold[:, None], -float("inf"))
    q = -torch.log(uniform_ref(seeds, logits.shape[1]))
    return (x.softmax(dim=-1) / q).argmax(dim=-1)
