"""gemv_dp4a (kernels/gemv_dp4a.py): the W8A16 decode GEMV on dp4a, and its arithmetic (kernels/dp4a.py), against
exact references.

Two errors, bounded separately:
  * the activations' int16 form (`quant_groups_ref`, the kernel's definition): per group of 16 columns a
    power-of-two scale s = 2^(E-14) from the largest |x|; q s = x exactly for bf16 elements with |x| >= 2^(E-7)
    (f16: 2^(E-4)), |q s - x| <= s / 2 for the rest (`test_int16_form_*`);
  * the kernel against the exact sum over that form, s_q = sum_g s_g sum_k w q (float64, exact: integers and
    powers of two) times w_scale, plus the bias. A group's sum is an exact int32, one rounding to float32 when
    |d| > 2^24, exact times s (a power of two), then added to a float32 accumulator: one rounding per chunk, the
    lanes' reduction (at most G terms a row), the scale and the bias. With B = w_scale sum_k |w q s| + |b|,
        |a - s_q| <= gamma_D B,   D = 1 + chunks + G + 2,   gamma_n = n u / (1 - n u), u = 2^-24,
    and the output rounding to x.dtype adds r 2^(1-p) (|s_q| + gamma_D B) (r = 1/2 on a GPU, 1 in the
    interpreter, which truncates float32 -> bf16), as tests/kernels/test_gemv.py's bound.
CPU (interpreter): the portable form (shifts and multiplies for dp4a and prmt), small shapes with a partial last
chunk, M = 1..4, bias, gated, the x-stationary kernel; equalities between the kernels; input checks; the table;
gemv's routing. GPU: the PTX form's bits equal the portable form's at qwen-7b shapes, the bound there, and a CUDA
graph replay.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from tests.kernels.interpret import INTERPRET, device, load_kernel_module

P = load_kernel_module("dp4a")
D = load_kernel_module("gemv_dp4a")
G = load_kernel_module("gemv")
S = load_kernel_module("silu_and_mul")
U = 2.0 ** -24
EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # 2^(1-p)
TINY = {torch.float16: 2.0 ** -24}
ROUNDING = 1.0 if INTERPRET else 0.5
CONFIGS = [D.Dp4aConfig(4, 1), D.Dp4aConfig(2, 2), D.Dp4aConfig(4, 1, False, None, 3),
           D.Dp4aConfig(2, 1, True, None, 2)]  # streaming, streaming 2 warps, x-stationary, x-stationary ahead


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def depth(cfg, k: int) -> int:
    """D of the module docstring."""
    g = 32 * cfg.num_warps
    return 1 + math.ceil(k / (16 * g)) + g + 2


def quantised_exact(x, w, w_scale, bias):
    """(s_q, B) of the module docstring, float64 [M, N]."""
    q, s = P.quant_groups_ref(x)
    xq = q.double() * s.double().repeat_interleave(P.GROUP, dim=1)
    exact = (xq @ w.double().t()) * w_scale.double()
    mags = (xq.abs() @ w.double().abs().t()) * w_scale.double()
    if bias is not None:
        exact, mags = exact + bias.double(), mags + bias.double().abs()
    return exact, mags


def within(got, x, w, w_scale, bias, cfg) -> torch.Tensor:
    """[M, N] bool: got within the bound of the exact sum over x's int16 form."""
    exact, mags = quantised_exact(x, w, w_scale, bias)
    err = gamma(depth(cfg, x.shape[1])) * mags
    allowed = ROUNDING * EPS[x.dtype] * (exact.abs() + err) + err + ROUNDING * TINY.get(x.dtype, 0.0)
    return (got.double() - exact).abs() <= allowed


def case(m, n, k, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[0, 3] = 300.0  # a group whose other elements fall below 2^(E-7): rounded
    x[-1, 16:32] = 0.0  # an all-zero group
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(n, generator=gen) / 100 + 1e-3
    b = torch.randn(n, generator=gen) if bias else None
    dev = device()
    return x.to(dev), w.to(dev), w_scale.to(dev), None if b is None else b.to(dev)


def run(x, w, w_scale, bias, cfg, **kw):
    return D.gemv_dp4a(x, w, w_scale, bias, cfg, ptx=False if INTERPRET else None, **kw)


# ---------------------------------------------------------------------------------- the activations' int16 form

@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 8), (torch.float16, 11)])
def test_int16_form_exact_near_the_group_max(dtype, bits):
    """q s = x for elements whose exponent is at least E - (15 - bits) (E the group max's: bf16 from 2^(E-7), f16
    from 2^(E-4)); within s / 2 otherwise; |q| < 2^15; s a power of two."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 256, generator=gen) * torch.exp2(torch.randint(-12, 12, (8, 256), generator=gen))).to(dtype)
    q, s = P.quant_groups_ref(x)
    assert int(q.abs().max()) < 2 ** 15
    assert torch.equal(torch.frexp(s)[0], torch.full_like(s, 0.5))  # powers of two
    xs = x.float().view(8, -1, 16)
    got = (q.double().view(8, -1, 16) * s.double()[:, :, None])
    e = torch.frexp(xs.abs().amax(dim=2))[1] - 1  # exponent of the group max
    near = xs.abs() >= torch.ldexp(torch.ones_like(xs), (e - (15 - bits))[:, :, None])
    assert torch.equal(got[near], xs.double()[near])
    assert bool(((got - xs.double()).abs() <= s.double()[:, :, None] / 2).all())
    assert bool(((~near) & (xs != 0)).any())  # the data has rounded elements too


def test_int16_form_of_special_groups():
    """An all-zero group gives q = 0; inf or NaN makes the group's scale NaN (its outputs NaN); a tiny group
    keeps s >= 2^-126 (no overflow of q)."""
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 16] = float("inf")
    x[0, 33] = float("nan")
    x[0, 48:64] = 1e-38
    q, s = P.quant_groups_ref(x)
    assert int(q[0, :16].abs().max()) == 0 and s[0, 0] > 0
    assert torch.isnan(s[0, 1]) and torch.isnan(s[0, 2])
    assert s[0, 3] == 2.0 ** -126 and int(q[0, 48:].abs().max()) < 2 ** 15


# ------------------------------------------------------------------------------------------------- the kernel

@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_exact_sum_of_the_int16_form(cfg, m, dtype):
    """N not a multiple of BLOCK_N, K with a partial last chunk (streaming: after three whole ones, so both of its
    loops run), bias: within the bound everywhere."""
    k = 3 * 32 * 16 * cfg.num_warps + 160 if not cfg.blocks else 32 * 16 * cfg.num_warps + 96
    x, w, w_scale, b = case(m, 13, k, dtype, bias=True)
    got = run(x, w, w_scale, b, cfg)
    assert got.shape == (m, 13) and got.dtype == dtype
    assert bool(within(got.cpu(), x.cpu(), w.cpu(), w_scale.cpu(), b.cpu(), cfg).all())


@pytest.mark.parametrize("cfg", CONFIGS[::2])
def test_tiny_rows(cfg):
    """Normal values whose group max is below 2^-112 (the scale clamps at 2^-126, so q stays an integer > 1):
    |x| in [2^-125, 2^-121]. (Subnormal x is left out: whether a kernel's conversions keep it is the backend's.)"""
    x, w, w_scale, _ = case(2, 9, 1024, torch.bfloat16, bias=False, seed=7)
    gen = torch.Generator().manual_seed(8)
    mag = 1 + 15 * torch.rand(x.shape, generator=gen)  # [1, 16)
    x = (torch.sign(x.cpu().float()) * mag * 2.0 ** -125).to(torch.bfloat16).to(x.device)
    got = run(x, w, w_scale, None, cfg)
    assert bool(within(got.cpu(), x.cpu(), w.cpu(), w_scale.cpu(), None, cfg).all())
    assert bool((got.cpu().float().abs() > 0).all())


def test_bound_rejects_wrong_results():
    """A 5% error in one output (bf16 resolves 2^-8), or a chunk's terms lost (an indexing error), falls outside the
    bound."""
    cfg = CONFIGS[0]
    x, w, w_scale, b = case(1, 8, 1024, torch.bfloat16, bias=False)
    got = run(x, w, w_scale, b, cfg).cpu()
    assert bool(within(got, x.cpu(), w.cpu(), w_scale.cpu(), b, cfg).all())
    wrong = got.clone()
    wrong[0, 2] = (got[0, 2].double() * 1.05).to(got.dtype)
    assert not bool(within(wrong, x.cpu(), w.cpu(), w_scale.cpu(), b, cfg).all())
    x_lost = x.clone()
    x_lost[0, 512:] = 0  # the kernel's answer with its second chunk dropped
    lost = run(x_lost, w, w_scale, b, cfg).cpu()
    assert not bool(within(lost, x.cpu(), w.cpu(), w_scale.cpu(), b, cfg).all())


@triton.jit
def _dots_kernel(w_ptr, hi_ptr, lo_ptr, out_ptr, G: tl.constexpr, PTX: tl.constexpr):
    """out[g] = P.group_dots of words g*4..g*4+3 (one row of w, one row of x)."""
    offs = (tl.arange(0, G)[:, None] * 4 + tl.arange(0, 4)[None, :])[None, None, :, :]  # [1, 1, G, 4]
    d = P.group_dots(tl.load(w_ptr + offs), tl.load(hi_ptr + offs), tl.load(lo_ptr + offs), 1, 1, G, PTX)
    tl.store(out_ptr + tl.arange(0, G)[None, None, :], d)


@triton.jit
def _pack_kernel(q_ptr, hi_ptr, lo_ptr, N: tl.constexpr, PTX: tl.constexpr):
    """hi, lo [N] = P.pack_words of q[4i..4i+3]."""
    offs = tl.arange(0, N) * 4
    hi, lo = P.pack_words(tl.load(q_ptr + offs), tl.load(q_ptr + offs + 1), tl.load(q_ptr + offs + 2),
                           tl.load(q_ptr + offs + 3), PTX)
    tl.store(hi_ptr + tl.arange(0, N), hi)
    tl.store(lo_ptr + tl.arange(0, N), lo)


def _words(byte_values: torch.Tensor) -> torch.Tensor:
    """[4n] byte values (-128..255) -> [n] int32 words, little-endian."""
    return (byte_values.to(torch.int64) & 255).to(torch.uint8).view(torch.int32)


@pytest.mark.parametrize("ptx", [False] if INTERPRET else [False, True])
def test_group_dots_every_byte_pair(ptx):
    """Every (weight byte, high byte) and (weight byte, low byte) pair: each group of 16 sums 256 w hi + w lo
    exactly (int64 reference), sign-extended weights and high bytes, zero-extended low bytes."""
    gen = torch.Generator().manual_seed(5)
    w = torch.arange(-128, 128).repeat_interleave(256)  # 65536: every pair with...
    hi = torch.arange(-128, 128).repeat(256)  # ...every high byte
    lo = torch.randperm(65536, generator=gen) % 256  # and low bytes 0..255, each 256 times
    dev = device()
    out = torch.empty(65536 // 16, dtype=torch.int32, device=dev)
    _dots_kernel[(1,)](_words(w).to(dev), _words(hi).to(dev), _words(lo).to(dev), out, G=65536 // 16, PTX=ptx)
    want = (w * (256 * hi + lo)).view(-1, 16).sum(dim=1)
    assert torch.equal(out.cpu().to(torch.int64), want)


@pytest.mark.parametrize("ptx", [False] if INTERPRET else [False, True])
def test_pack_words_every_int16(ptx):
    """Every int16 value, held in the low 16 bits of a word whose high bits are anything (the magic-number
    float's exponent, a sign): byte i of hi / lo is value i's high / low byte."""
    gen = torch.Generator().manual_seed(6)
    v = torch.arange(-32768, 32768)[torch.randperm(65536, generator=gen)]
    high = torch.randint(-2 ** 15, 2 ** 15, (65536,), generator=gen) * 65536
    q = (v & 0xFFFF) + high  # low 16 bits: v's two's complement
    dev = device()
    hi, lo = (torch.empty(16384, dtype=torch.int32, device=dev) for _ in range(2))
    _pack_kernel[(1,)](q.to(torch.int32).to(dev), hi, lo, N=16384, PTX=ptx)
    assert torch.equal(hi.cpu(), _words(v >> 8))
    assert torch.equal(lo.cpu(), _words(v & 255))


@pytest.mark.parametrize("cfg", CONFIGS[2:])
@pytest.mark.parametrize("m", [1, 2])
def test_stationary_equals_streaming(cfg, m):
    """The x-stationary kernel sums the same terms in the same order as the streaming one: the same bits."""
    x, w, w_scale, b = case(m, 21, 32 * 16 * cfg.num_warps + 48, torch.bfloat16, bias=True, seed=3)
    streaming = cfg._replace(blocks=0, ahead=False)
    assert torch.equal(run(x, w, w_scale, b, cfg), run(x, w, w_scale, b, streaming))


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("m", [1, 3])
def test_gated_is_silu_and_mul_of_the_output(cfg, m):
    """gated=True: silu_and_mul (kernels/silu_and_mul.py) of the ungated output, bit for bit; I not a multiple of
    BLOCK_N / 2."""
    x, w, w_scale, b = case(m, 2 * 11, 32 * 16 * cfg.num_warps + 32, torch.bfloat16, bias=False, seed=4)
    got = run(x, w, w_scale, b, cfg, gated=True)
    assert got.shape == (m, 11)
    assert torch.equal(got, S.silu_and_mul(run(x, w, w_scale, b, cfg)))


def test_inf_or_nan_in_x_gives_nan():
    """A non-finite x makes its row's outputs NaN (not a silently finite sum)."""
    x, w, w_scale, _ = case(2, 8, 512, torch.bfloat16, bias=False)
    x[1, 40] = float("inf")
    got = run(x, w, w_scale, None, CONFIGS[0]).cpu()
    assert bool(torch.isnan(got[1]).all()) and bool(torch.isfinite(got[0]).all())


def test_rejects_what_it_cannot_run():
    dev = device()
    w = torch.zeros(8, 64, dtype=torch.int8, device=dev)
    s = torch.ones(8, device=dev)
    x = torch.zeros(1, 64, device=dev, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16/f16"):
        D.gemv_dp4a(x.float(), w, s)
    with pytest.raises(ValueError, match="multiple of 16"):
        D.gemv_dp4a(x[:, :40], w[:, :40].contiguous(), s)
    with pytest.raises(ValueError, match="M <= 4"):
        D.gemv_dp4a(x.repeat(5, 1), w, s)
    with pytest.raises(ValueError, match="int8"):
        D.gemv_dp4a(x, w.to(torch.bfloat16), s)
    unaligned = torch.zeros(8 * 64 + 4, dtype=torch.int8, device=dev)[4:].view(8, 64)
    with pytest.raises(ValueError, match="aligned"):
        D.gemv_dp4a(x, unaligned, s)
    with pytest.raises(ValueError, match="w_scale"):
        D.gemv_dp4a(x, w, s[:7])
    with pytest.raises(ValueError, match="w_scale"):
        D.gemv_dp4a(x, w, None)
    with pytest.raises(ValueError, match="even"):
        D.gemv_dp4a(x, w[:7], s[:7], gated=True)
    with pytest.raises(ValueError, match="two chunks"):
        D.gemv_dp4a(torch.zeros(1, 2048, device=dev, dtype=torch.bfloat16),
                    torch.zeros(8, 2048, dtype=torch.int8, device=dev), s, None, D.Dp4aConfig(4, 1, False, None, 2))
    with pytest.raises(ValueError, match="powers of two"):
        D.gemv_dp4a(x, w, s, None, D.Dp4aConfig(3, 1))


# ---------------------------------------------------------------------------------------- table and routing

REAL = [(3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584), (2048, 3648), (2048, 2048), (2048, 21888),
        (10944, 2048)]  # (K, N): qwen-7b qkv, o, gate_up, down; V2-Lite q_kv_a, o, dense gate_up, dense down


@pytest.mark.parametrize("k,n", REAL)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_table_fits_every_decode_shape(k, n, m):
    """The fitted config: BLOCK_M * BLOCK_N within the cap, the x-stationary kernel only where K fits two chunks,
    the register limit only at M = 1, at least 2 programs per SM of an H200; a function of the shape."""
    cfg = D.dp4a_config(m, n, k)
    assert cfg == D.dp4a_config(m, n, k)
    assert (1 << (m - 1).bit_length()) * cfg.block_n <= 32
    assert not cfg.blocks or k <= 2 * 512 * cfg.num_warps
    assert cfg.maxnreg is None or m == 1
    programs = -(-n // cfg.block_n) // max(cfg.blocks, 1)
    assert programs >= 264


def test_fit_drops_the_stationary_kernel_for_long_rows():
    cfg = D.fit_config(D.Dp4aConfig(4, 4, True, None, 2), 1, 18944)
    assert cfg.blocks == 0
    assert D.fit_config(D.Dp4aConfig(4, 4, True, None, 2), 1, 3584).blocks == 2


def test_applies_only_where_it_can_run(monkeypatch):
    """dp4a_applies: int8 w with scales, 2-byte x with whole groups, aligned w, on an NVIDIA GPU (the portable
    form elsewhere would be slower than the float32 GEMV)."""
    dev = device()
    w = torch.zeros(8, 64, dtype=torch.int8, device=dev)
    s = torch.ones(8, device=dev)
    x = torch.zeros(1, 64, dtype=torch.bfloat16, device=dev)
    assert D.dp4a_applies(x, w, s) == (not INTERPRET)
    monkeypatch.setattr(D, "nvidia_ptx", lambda d: True)
    assert D.dp4a_applies(x, w, s) and D.dp4a_applies(x.half(), w, s)
    assert not D.dp4a_applies(x.float(), w, s)
    assert not D.dp4a_applies(x, w, None)
    assert not D.dp4a_applies(x, w.view(torch.uint8), s)
    assert not D.dp4a_applies(x[:, :40], w[:, :40].contiguous(), s)
    assert not D.dp4a_applies(x[:0], w, s)
    unaligned = torch.zeros(8 * 64 + 4, dtype=torch.int8, device=dev)[4:].view(8, 64)
    assert not D.dp4a_applies(x, unaligned, s)


def test_gemv_routes_int8_rows_to_dp4a(monkeypatch):
    """gemv (kernels/gemv.py) hands int8-weight calls to gemv_dp4a where it applies and no config is given (a
    GemvConfig keeps the float32 kernel), with static_weight and gated passed on."""
    calls = []
    monkeypatch.setattr(G, "_dp4a_applies", lambda x, w, s: True)
    monkeypatch.setattr(D, "run_dp4a", lambda *a, **kw: calls.append(a[4:]) or "dp4a")
    dev = device()
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8, device=dev)
    s = torch.rand(8, device=dev)
    x = torch.randn(1, 64, device=dev).bfloat16()
    assert G.gemv(x, w, None, w_scale=s, static_weight=True, gated=True) == "dp4a"
    assert calls == [(None, True, True)]  # config, static_weight, gated
    assert G.gemv(x, w, None, G.GemvConfig(2, 64, 1, 1), w_scale=s).shape == (1, 8)
    assert len(calls) == 1


# ----------------------------------------------------------------------------------------------------- GPU

SHAPES_GPU = [(3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584), (2048, 3648)]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", SHAPES_GPU)
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_ptx_form_equals_portable_form(k, n, m):
    """The dp4a / prmt form's bits equal the shifts-and-multiplies form's at the table configs, gated too, and
    both meet the bound."""
    x, w, w_scale, b = (t.cuda() if t is not None else None for t in case(m, n, k, torch.bfloat16, bias=True))
    cfg = D.dp4a_config(m, n, k)
    got = D.gemv_dp4a(x, w, w_scale, b)
    assert torch.equal(got, D.gemv_dp4a(x, w, w_scale, b, ptx=False))
    assert torch.equal(D.gemv_dp4a(x, w, w_scale, b, gated=True), D.gemv_dp4a(x, w, w_scale, b, gated=True, ptx=False))
    assert bool(within(got.cpu(), x.cpu(), w.cpu(), w_scale.cpu(), b.cpu(), cfg).all())
    assert torch.equal(G.gemv(x, w, b, w_scale=w_scale, static_weight=True), got)  # gemv routes here


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", SHAPES_GPU[:3])
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_stationary_equals_streaming_at_table_configs(k, n, m):
    """The table's x-stationary configs (4 warps) give the streaming kernel's bits, gated too."""
    x, w, w_scale, b = (t.cuda() for t in case(m, n, k, torch.bfloat16, bias=True))
    cfg = D.dp4a_config(m, n, k)
    assert cfg.blocks
    streaming = cfg._replace(blocks=0, ahead=False)
    assert torch.equal(D.gemv_dp4a(x, w, w_scale, b, cfg), D.gemv_dp4a(x, w, w_scale, b, streaming))
    assert torch.equal(D.gemv_dp4a(x, w, w_scale, b, cfg, gated=True),
                       D.gemv_dp4a(x, w, w_scale, b, streaming, gated=True))


@pytest.mark.gpu
def test_gpu_graph_replay_same_bits():
    """Captured behind a kernel that writes x (static_weight: the first row block's weights read before the PDL
    wait): each replay gives the eager bits of the new x, the first replay already on a different x."""
    k, n = 3584, 37888
    x, w, w_scale, _ = (t.cuda() if t is not None else None for t in case(1, n, k, torch.bfloat16, bias=False))
    src = x.clone()
    D.gemv_dp4a(x, w, w_scale, None, static_weight=True, gated=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(src * 1.0)
        out = D.gemv_dp4a(x, w, w_scale, None, static_weight=True, gated=True)
    for sign in (-1.0, 1.0, -1.0):
        src.copy_(sign * x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, D.gemv_dp4a(src, w, w_scale, None, gated=True))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3584, 18944])  # the x-stationary and the streaming kernel
def test_gpu_pdl_chain_matches_without_pdl(monkeypatch, k):
    """A chain where each GEMV reads what a PDL-launched kernel just wrote (add + RMSNorm, then gemv_dp4a with
    static_weight, gated, repeatedly): the same bits with PDL on as off, so nothing but the weights is read
    before the wait."""
    from deepserve.kernels import pdl

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    rms_norm = load_kernel_module("rms_norm").rms_norm
    torch.manual_seed(9)
    x = torch.randn(1, k, device="cuda").bfloat16()
    weights = [torch.randint(-127, 128, (2 * k, k), device="cuda", dtype=torch.int8) for _ in range(4)]
    scales = [torch.rand(2 * k, device="cuda") / (64 * k ** 0.5) for _ in weights]
    norm_w = (torch.rand(k, device="cuda") + 0.5).bfloat16()

    def chain():
        hidden, residual = x, torch.zeros_like(x)
        for w, s in zip(weights, scales):
            normed, residual = rms_norm(hidden, residual, norm_w, 1e-6)
            hidden = D.gemv_dp4a(normed, w, s, None, static_weight=True, gated=True)  # [1, k]
        return hidden + residual

    try:
        monkeypatch.setenv("DEEPSERVE_PDL", "0")
        pdl._pdl_on.cache_clear()
        expected = chain()
        monkeypatch.setenv("DEEPSERVE_PDL", "1")
        pdl._pdl_on.cache_clear()
        assert pdl.pdl_launch(x.device) == {"PDL": True, "launch_pdl": True}
        assert torch.equal(chain(), expected)
    finally:
        pdl._pdl_on.cache_clear()
