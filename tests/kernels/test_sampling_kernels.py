"""Sort-free top-k / top-p and the seeded exponential-race sampler against their references."""

import pytest
import torch

from deepserve.layers.sampler import apply_top_k, apply_top_p
from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("sampling")


def _logits(rows, vocab, dev, scale=3.0):
    return scale * torch.randn(rows, vocab, device=dev)


def _assert_same_mask(got, want):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("vocab", [7, 100, 1500])
def test_top_k_matches_sampler(vocab):
    logits = _logits(6, vocab, device())
    k = torch.tensor([0, 1, 3, vocab - 1, vocab, -1], device=device())
    _assert_same_mask(K.apply_top_k_top_p(logits, k, None), apply_top_k(logits, k))


def test_top_k_keeps_ties_and_handles_inf_and_signed_zero():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, -2.0, 0.0],
                           [0.0, -0.0, -0.0, 5.0, -float("inf"), -1.0],
                           [-float("inf"), -3.0, -float("inf"), -float("inf"), -2.5, -7.0]], device=device())
    k = torch.tensor([2, 3, 4], device=device())
    _assert_same_mask(K.apply_top_k_top_p(logits, k, None), apply_top_k(logits, k))


@pytest.mark.parametrize("vocab", [5, 100, 1500])
def test_top_p_matches_sampler(vocab):
    logits = _logits(5, vocab, device())
    p = torch.tensor([1.0, 0.9, 0.5, 1e-4, 0.999], device=device())
    _assert_same_mask(K.apply_top_k_top_p(logits, None, p), apply_top_p(logits, p))


def test_top_k_then_top_p_matches_sampler():
    logits = _logits(4, 300, device())
    k = torch.tensor([0, 50, 5, 299], device=device())
    p = torch.tensor([0.8, 0.7, 1.0, 0.95], device=device())
    _assert_same_mask(K.apply_top_k_top_p(logits, k, p), K.apply_top_k_top_p_ref(logits, k, p))


def test_threshold_with_temperature():
    logits, temp = _logits(3, 200, device()), torch.tensor([0.5, 1.0, 2.0], device=device())
    k, p = torch.tensor([10, 0, 40], device=device()), torch.tensor([0.9, 0.6, 0.5], device=device())
    thr = K.top_k_top_p_threshold(logits, temp, k, p)
    scaled = logits / temp[:, None]
    want = K.apply_top_k_top_p_ref(scaled, k, p)
    _assert_same_mask(scaled.masked_fill(scaled < thr[:, None], -float("inf")), want)
    assert torch.isinf(K.top_k_top_p_threshold(logits, None, None, None)).all()


def test_uniforms_match_the_kernel_and_look_uniform():
    seeds = torch.tensor([0, 1, 2**40 + 7, -5], device=device())
    u = K.uniform_ref(seeds.cpu(), 4096)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert not torch.equal(u[0], u[1])
    logits = torch.zeros(4, 4096, device=device())  # uniform logits: argmax of the noise alone
    assert torch.equal(K.exponential_race_sample(logits, seeds).cpu(), (-torch.log(u)).argmin(dim=-1))


@pytest.mark.parametrize("vocab", [10, 1500])
def test_sample_matches_reference(vocab):
    logits = _logits(5, vocab, device())
    seeds = torch.randint(0, 2**62, (5,), device=device())
    temp = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.7], device=device())
    thr = K.top_k_top_p_threshold(logits, temp, torch.tensor([0, 3, 0, 1, 8], device=device()), None)
    for args in ((None, None), (temp, None), (temp, thr)):
        want = K.exponential_race_sample_ref(logits.cpu(), seeds.cpu(), *(a if a is None else a.cpu() for a in args))
        assert torch.equal(K.exponential_race_sample(logits, seeds, *args).cpu(), want)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = _logits(4, 64, device())
    seeds = torch.tensor([11, 12, 13, 14], device=device())
    alone = K.exponential_race_sample(logits[2:3], seeds[2:3])
    batch = K.exponential_race_sample(logits.flip(0), seeds.flip(0))
    assert batch[1] == alone[0]


def test_sample_frequencies_follow_the_distribution():
    """The hash noise gives the right frequencies (checked on the reference, which draws the same
    noise; the kernel is then compared with it on a slice, as the interpreter is slow)."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    n = 20000
    logits = probs.log().expand(n, -1).contiguous()
    seeds = torch.arange(n) * 7919
    ids = K.exponential_race_sample_ref(logits, seeds)
    freq = torch.bincount(ids, minlength=5).float() / n
    assert freq[4] == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    got = K.exponential_race_sample(logits[:64].to(device()), seeds[:64].to(device())).cpu()
    assert torch.equal(got, ids[:64])


def test_bad_inputs():
    logits = torch.zeros(2, 8, device=device())
    with pytest.raises(ValueError):
        K.exponential_race_sample(logits, torch.zeros(2, dtype=torch.int32, device=device()))
    with pytest.raises(ValueError):
        K.top_k_top_p_threshold(logits, None, torch.ones(3, dtype=torch.int64, device=device()), None)
    with pytest.raises(ValueError):
        K.top_k_top_p_threshold(logits.t(), None, None, None)


# ----------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 256])
def test_gpu_top_k_top_p_real_vocab(rows):
    logits = _logits(rows, 152064, "cuda", scale=4.0)
    k = torch.randint(0, 2000, (rows,), device="cuda")
    p = torch.rand(rows, device="cuda") * 0.5 + 0.5
    _assert_same_mask(K.apply_top_k_top_p(logits, k, None), apply_top_k(logits, k))
    got, want = K.apply_top_k_top_p(logits, k, p), K.apply_top_k_top_p_ref(logits, k, p)
    differ = torch.isinf(got) != torch.isinf(want)
    # top-p sums in another order than the reference's cumsum: only tokens at the boundary may differ
    assert differ.sum(dim=-1).max() <= 2


@pytest.mark.gpu
def test_gpu_sample_real_vocab():
    logits = _logits(128, 152064, "cuda").to(torch.bfloat16)
    seeds = torch.randint(0, 2**62, (128,), device="cuda")
    temp = torch.rand(128, device="cuda") + 0.3
    got = K.exponential_race_sample(logits, seeds, temp)
    want = K.exponential_race_sample_ref(logits, seeds, temp)
    assert (got == want).float().mean() > 0.99  # fast-math log may flip a near tie
    assert torch.equal(got, K.exponential_race_sample(logits, seeds, temp))
