"""Rotary kernel against its reference and the RotaryEmbedding module."""

import pytest
import torch

from deepserve.layers.rotary import RotaryEmbedding
from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("rotary")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


def _tables(max_pos, rot_dim, dev):
    rope = RotaryEmbedding(rot_dim, max_pos, 10000.0)
    return rope.cos.to(dev), rope.sin.to(dev)


def _compare(positions, q, k, cos, sin, interleaved):
    want = K.rotary_embedding_ref(positions, q, k, cos, sin, interleaved)
    atol, rtol = TOL[q.dtype]
    got = K.rotary_embedding(positions, q, k, cos, sin, interleaved)
    torch.testing.assert_close(got.q, want.q, atol=atol, rtol=rtol)
    if k is not None:
        torch.testing.assert_close(got.k, want.k, atol=atol, rtol=rtol)
    q2, k2 = q.clone(), None if k is None else k.clone()
    got = K.rotary_embedding(positions, q2, k2, cos, sin, interleaved, inplace=True)
    assert got.q is q2 and got.k is k2
    torch.testing.assert_close(q2, want.q, atol=atol, rtol=rtol)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,hq,hk,head_dim,rot_dim", [
    (1, 4, 2, 16, 16), (5, 3, 1, 32, 32), (3, 2, 2, 24, 16), (4, 6, 1, 64, 32),
    (2, 40, 2, 32, 32)])  # 40 heads x 16 pairs: two q head blocks
def test_matches_reference(interleaved, dtype, tokens, hq, hk, head_dim, rot_dim):
    dev = device()
    cos, sin = _tables(64, rot_dim, dev)
    positions = torch.randint(0, 64, (tokens,), device=dev)
    q = torch.randn(tokens, hq, head_dim, dtype=dtype, device=dev)
    k = torch.randn(tokens, hk, head_dim, dtype=dtype, device=dev)
    _compare(positions, q, k, cos, sin, interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
def test_matches_module(interleaved):
    rope = RotaryEmbedding(16, 32, 10000.0, interleaved=interleaved)
    positions = torch.tensor([0, 5, 31])
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    want_q, want_k = rope(positions, q, k)
    got = K.rotary_embedding(positions.to(device()), q.to(device()), k.to(device()),
                             rope.cos.to(device()), rope.sin.to(device()), interleaved)
    torch.testing.assert_close(got.q.cpu(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.k.cpu(), want_k, atol=1e-5, rtol=1e-5)


def test_strided_views_of_a_merged_projection_and_mla_rope_only():
    dev = device()
    cos, sin = _tables(16, 8, dev)
    qkv = torch.randn(3, (4 + 2 + 2) * 8, device=dev)  # [T, (Hq + 2 Hkv) * D]
    q, k = qkv[:, :32].view(3, 4, 8), qkv[:, 32:48].view(3, 2, 8)
    positions = torch.tensor([1, 2, 9], device=dev)
    _compare(positions, q, k, cos, sin, True)
    _compare(positions, q, None, cos, sin, True)  # MLA q_pe alone


def test_bad_inputs():
    dev = device()
    cos, sin = _tables(16, 16, dev)
    q, positions = torch.randn(2, 2, 8, device=dev), torch.zeros(2, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError):
        K.rotary_embedding(positions, q, None, cos, sin, False)  # rot_dim 16 > head_dim 8
    with pytest.raises(ValueError):
        K.rotary_embedding(positions[:1], torch.randn(2, 2, 16, device=dev), None, cos, sin, False)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 100, 8192])
@pytest.mark.parametrize("hq,hk,head_dim,rot_dim,interleaved", [
    (28, 4, 128, 128, False), (32, 8, 128, 128, False), (128, 1, 64, 64, True), (16, 16, 192, 64, True)])
def test_gpu_real_shapes(tokens, hq, hk, head_dim, rot_dim, interleaved):
    cos, sin = _tables(32768, rot_dim, "cuda")
    positions = torch.randint(0, 32768, (tokens,), device="cuda")
    q = torch.randn(tokens, hq, head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(tokens, hk, head_dim, dtype=torch.bfloat16, device="cuda")
    _compare(positions, q, k, cos, sin, interleaved)


V3_YARN = {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
           "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}


@pytest.mark.parametrize("cast", ["to_bf16", "half", "to_device_bf16", "parent_to_bf16"])
def test_module_cast_keeps_float32_tables(cast):
    """A model built or moved to bf16 keeps float32 cos/sin of equal strides (a bf16 MLA layer on CUDA
    used to fail the kernel's check: `layer.to(dev, bf16)` had rounded the tables)."""
    rope = RotaryEmbedding(16, 64, 10000.0, V3_YARN, interleaved=True)
    want_cos, want_sin = rope.cos.clone(), rope.sin.clone()
    if cast == "to_bf16":
        rope.to(torch.bfloat16)
    elif cast == "half":
        rope.half()
    elif cast == "to_device_bf16":
        rope.to(device(), torch.bfloat16)
    else:
        torch.nn.ModuleDict({"rotary": rope}).to(device(), torch.bfloat16)
    assert rope.cos.dtype == rope.sin.dtype == torch.float32 and rope.cos.stride() == rope.sin.stride()
    assert torch.equal(rope.cos.cpu(), want_cos) and torch.equal(rope.sin.cpu(), want_sin)
    positions = torch.tensor([0, 7, 63], device=rope.cos.device)
    q = torch.randn(3, 4, 16, device=rope.cos.device).to(torch.bfloat16)
    got = K.rotary_embedding(positions, q, None, rope.cos, rope.sin, True)  # the check that used to raise
    want = K.rotary_embedding_ref(positions, q, None, rope.cos, rope.sin, True)
    torch.testing.assert_close(got.q, want.q, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("heads", [4, 16, 40])  # 40: several q head blocks, k_pe rotated by the first
def test_mla_q_pe_and_k_pe_in_one_launch(heads):
    """MLAAttention's call: q_pe a strided view of [T, h, Dn + Dr], k_pe [T, 1, Dr] a view of the kv_a output
    [T, R + Dr]; rotated together they equal the two separate rotations the layer used to launch."""
    dev = device()
    cos, sin = _tables(64, 16, dev)
    positions = torch.tensor([0, 7, 63], device=dev)
    q_pe = torch.randn(3, heads, 24 + 16, device=dev)[..., 24:]  # [T, h, Dr]
    k_pe = torch.randn(3, 32 + 16, device=dev)[:, 32:].unsqueeze(1)  # [T, 1, Dr]
    both = K.rotary_embedding(positions, q_pe, k_pe, cos, sin, True)
    assert torch.equal(both.q, K.rotary_embedding(positions, q_pe, None, cos, sin, True).q)
    assert torch.equal(both.k, K.rotary_embedding(positions, k_pe, None, cos, sin, True).q)
    _compare(positions, q_pe, k_pe, cos, sin, True)
