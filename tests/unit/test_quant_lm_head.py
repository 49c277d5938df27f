"""`--quantize-lm-head` (deepserve/quant/lm_head.py): the LM head as int8 W8A16, the embedding left in float.

CPU: a tiny Llama checkpoint (tied and untied), loaded through the engine's loader with the flag; the head's
logits against the float head's within the per-row int8 bound; the flag's plumbing (CLI, EngineConfig, eval
spec) and its refusal with --speculative. GPU: the qwen-7b head shape at 1 row takes the int8 decode GEMV.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from deepserve.config import ConfigError
from deepserve.engine.args import EngineArgs
from deepserve.layers.embedding import LMHead, VocabEmbedding
from deepserve.loader.model_loader import load_model
from deepserve.quant.eval import ModelSpec, as_spec
from deepserve.quant.int8 import Int8WeightOnlyMethod
from deepserve.quant.lm_head import quantize_lm_head
from tests.tiny_checkpoints import make_tiny_llama


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("head") / "llama", tie_word_embeddings=request.param)


def _load(folder, **kw):
    return load_model(EngineArgs(model=str(folder), **kw).create_engine_config(), progress=False)


def _int8_bound(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|logit error| of per-row symmetric int8 weights: each weight is off by at most half a step
    (amax_row / 127 / 2), so a logit by at most that times sum |hidden| (+ float32 rounding slack)."""
    step = weight.abs().amax(dim=1) / 127.0  # [V]
    return hidden.abs().sum(dim=1, keepdim=True) * step[None, :] / 2 * 1.001 + 1e-5


def test_head_int8_embedding_float(checkpoint):
    """After loading with the flag: the head holds int8 [V, H] + float32 scales and runs W8A16; the embedding
    keeps the float matrix (for a tied model: the same values the float model has); every other layer is as
    without the flag."""
    flt, q8 = _load(checkpoint), _load(checkpoint, quantize_lm_head=True)
    assert q8.lm_head.weight.dtype == torch.int8 and q8.lm_head.weight_scale.dtype == torch.float32
    assert isinstance(q8.lm_head.method, Int8WeightOnlyMethod)
    emb = q8.model.embed_tokens.weight
    assert emb.dtype == torch.float32 and torch.equal(emb, flt.model.embed_tokens.weight)
    assert not hasattr(q8.lm_head, "packed_weight")
    others = {n: p for n, p in q8.named_parameters() if not n.startswith("lm_head.")}
    for name, p in flt.named_parameters():
        if not name.startswith("lm_head."):
            assert torch.equal(others[name], p), name


def test_head_logits_within_the_int8_bound(checkpoint):
    """Logits of the int8 head against the float head on the same hidden states: within the rounding bound of
    per-row int8 weights, and not equal (the head really is quantised); a 2% scale error leaves the bound."""
    flt, q8 = _load(checkpoint), _load(checkpoint, quantize_lm_head=True)
    hidden = torch.randn(5, flt.config.hidden_size, generator=torch.Generator().manual_seed(1))
    want, got = flt.compute_logits(hidden), q8.compute_logits(hidden)
    assert got.dtype == torch.float32 and got.shape == want.shape
    bound = _int8_bound(hidden, flt.lm_head.weight.detach())
    assert bool(((got - want).abs() <= bound).all()) and not torch.equal(got, want)
    q8.lm_head.weight_scale.mul_(1.02)
    assert not bool(((q8.compute_logits(hidden) - want).abs() <= bound).all())


def test_quantize_lm_head_counts_and_needs_a_head():
    net = torch.nn.Module()
    net.head = LMHead(64, 32)
    net.head.weight.data.normal_()
    assert quantize_lm_head(net) == 1 and net.head.weight.dtype == torch.int8
    with pytest.raises(ValueError, match="no LM head"):
        quantize_lm_head(torch.nn.Sequential(VocabEmbedding(8, 4)))


def test_flag_plumbing():
    """CLI -> EngineArgs -> EngineConfig; the eval spec carries it and names it; off by default."""
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--quantize-lm-head"]))
    assert args.quantize_lm_head and not EngineArgs().quantize_lm_head
    assert args.create_engine_config().quantize_lm_head
    spec = as_spec(args)
    assert spec.quantize_lm_head and "int8 LM head" in spec.describe()
    assert ModelSpec("m", "int8-weight-only", True).describe() == "m [int8-weight-only, int8 LM head]"


def test_refused_with_speculative(checkpoint):
    with pytest.raises(ConfigError, match="quantize-lm-head"):
        EngineArgs(model=str(checkpoint), quantize_lm_head=True, speculative="mtp").create_engine_config()


@pytest.mark.gpu
def test_gpu_head_takes_the_int8_gemv(monkeypatch):
    """qwen-7b's head [152064, 3584] on CUDA at one row: the int8 decode GEMV (the same bits as calling it),
    logits within the int8 bound of the bf16 head."""
    import deepserve.kernels.gemv as gemv_module

    head = LMHead(152064, 3584).to("cuda", torch.bfloat16)
    head.weight.data.normal_(std=3584 ** -0.5)
    dense = head.weight.detach().clone()
    net = torch.nn.Module()
    net.lm_head = head
    quantize_lm_head(net)
    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: calls.append(a[1].dtype) or real(*a, **k))
    x = torch.randn(1, 3584, device="cuda").bfloat16()
    got = head(x)
    assert calls == [torch.int8]
    assert torch.equal(got, real(x, head.weight, None, w_scale=head.weight_scale).float())
    want = x.float() @ dense.float().t()
    assert bool(((got - want).abs() <= _int8_bound(x.float(), dense.float()) + want.abs() / 128).all())


def test_quantize_rows_in_chunks_equals_the_whole_matrix():
    """Chunked quantisation (ROWS_PER_CHUNK rows at a time) gives quantize_per_channel_ref's values exactly,
    for a chunk size that does not divide the rows."""
    from deepserve.quant.int8 import quantize_per_channel_ref
    from deepserve.quant.lm_head import quantize_rows

    w = torch.randn(37, 24, generator=torch.Generator().manual_seed(5)).bfloat16()
    q, scale = quantize_rows(w, rows=8)
    want_q, want_scale, _ = quantize_per_channel_ref(w)
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
