"""Accuracy gate (deepserve.quant.eval): perplexity vs HF, self-agreement, a broken candidate, the CLI."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepserve import cli
from deepserve.engine.args import EngineArgs
from deepserve.loader.model_loader import load_model
from deepserve.quant.eval import (DEFAULT_PROMPTS, DEFAULT_TEXT, AccuracyGateError, EvalReport, ModelSpec, _windows,
                                  agreement, check_held_out, format_report, gate, perplexity, score_text,
                                  wilson_interval)
from tests.tiny_checkpoints import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory):
    """A copy of the tiny checkpoint with layer 1's weights replaced by noise."""
    folder = tmp_path_factory.mktemp("broken") / "llama"
    shutil.copytree(tiny, folder)
    tensors = load_file(tiny / "model.safetensors")
    gen = torch.Generator().manual_seed(99)
    for name, t in tensors.items():
        if name.startswith("model.layers.1.") and t.dim() == 2:
            tensors[name] = torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def ours(tiny):
    return load_model(EngineArgs(model=str(tiny)).create_engine_config(), progress=False)


def text_ids(n: int, seed: int = 3, vocab: int = 320) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_nll(hf, ids: list[int], window: int) -> tuple[float, int]:
    """Summed NLL from plain full forwards of HF over the same windows (overlap of one token)."""
    total, count = 0.0, 0
    for start, end in _windows(len(ids), window):
        x = torch.tensor([ids[start:end]])
        with torch.no_grad():
            logits = hf(x).logits[0].float()  # [len, vocab]
        lp = torch.log_softmax(logits, -1)[:-1].gather(1, x[0, 1:, None])
        total -= float(lp.double().sum())
        count += end - start - 1
    return total, count


def test_windows_overlap_by_one_and_cover_every_token():
    assert _windows(10, 4) == [(0, 4), (3, 7), (6, 10)]
    assert _windows(4, 4) == [(0, 4)]
    assert _windows(0, 4) == []
    for n in (2, 5, 17, 100):
        predicted = [t for s, e in _windows(n, 6) for t in range(s + 1, e)]
        assert predicted == list(range(1, n))


@pytest.mark.parametrize("window", [512, 37])
def test_perplexity_matches_hf_full_forward(tiny, ours, window):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    ids = text_ids(150)
    nll, count = score_text(ours, ids, window)
    ref_nll, ref_count = hf_nll(hf, ids, window)
    assert count == ref_count == len(ids) - 1
    assert abs(nll - ref_nll) <= 1e-4 * abs(ref_nll)
    assert math.isclose(perplexity(ours, ids, window), math.exp(ref_nll / ref_count), rel_tol=1e-4)


def test_scoring_leaves_the_models_own_kv_cache_in_place(ours):
    from deepserve.engine.kv_cache import attention_layers

    before = [layer.kv_cache for layer in attention_layers(ours)]
    score_text(ours, text_ids(40), 16)
    assert all(a is b for a, b in zip(before, [layer.kv_cache for layer in attention_layers(ours)]))


def test_agreement_with_itself_is_perfect(ours):
    prompts = [text_ids(9, seed=s) for s in range(3)]
    report = agreement(ours, ours, prompts)
    assert report.top1_agreement == 1.0
    assert report.mean_kl == 0.0 and report.max_kl == 0.0
    assert report.num_positions == 27


def test_broken_candidate_is_refused_and_forced_through(tiny, broken):
    with pytest.raises(AccuracyGateError) as exc:
        gate(str(tiny), str(broken), max_tokens=200)
    assert "top-1 agreement" in str(exc.value) and "ppl" in str(exc.value)
    assert exc.value.report.passed is False
    report = gate(ModelSpec(str(tiny)), EngineArgs(model=str(broken)), max_tokens=200, force=True)
    assert isinstance(report, EvalReport) and report.passed is False and report.reasons
    assert report.top1_agreement < 0.97 and report.mean_kl > 0.01


def test_same_checkpoint_passes(tiny):
    report = gate(str(tiny), str(tiny), max_tokens=200)
    assert report.passed and report.ppl_ratio == 1.0 and report.top1_agreement == 1.0


def test_wilson_interval():
    low, high = wilson_interval(97, 100)
    assert low == pytest.approx(0.9155, abs=1e-4) and high == pytest.approx(0.9897, abs=1e-4)
    low, high = wilson_interval(3100, 3200)
    assert low < 3100 / 3200 < high and high - low < 0.013  # ~3000 positions: +-0.6% around 97%
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_gate_compares_every_text_position_and_the_prompts(tiny, broken):
    report = gate(str(tiny), str(broken), max_tokens=300, force=True)
    assert report.num_tokens == 299 and report.num_text_positions == 299
    assert report.num_positions > report.num_text_positions  # + every position of the default prompts
    assert report.top1_low <= report.top1_agreement <= report.top1_high
    table = format_report(report, "ref", "cand")
    assert f"{report.num_positions} positions (299 text + " in table and "95% interval" in table


def test_held_out_check():
    calibration = (DEFAULT_TEXT.parent / "calibration_text.txt").read_text()
    check_held_out(calibration, DEFAULT_TEXT.read_text())
    with pytest.raises(ValueError, match="not held out"):
        check_held_out(calibration, "intro\n" + calibration.splitlines()[0] + "\n")


def test_cli_exit_codes(tiny, broken, capsys):
    assert cli.main(["eval", "--model", str(tiny), "--max-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out and "PASS" in out
    assert cli.main(["eval", "--model", str(broken), "--reference", str(tiny), "--max-tokens", "200"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert cli.main(["eval", "--model", "/nonexistent/model"]) == 2


def test_default_model_against_itself_on_shipped_text():
    """Plumbing on the bundled SmolLM2: shipped text, default prompts, 512 tokens."""
    assert DEFAULT_TEXT.is_file() and len(DEFAULT_TEXT.read_text()) > 2000
    report = gate(None, None, max_tokens=512)
    assert report.passed and report.top1_agreement == 1.0 and report.mean_kl == 0.0
    assert report.num_tokens == 511 and report.num_text_positions == 511
    assert 1.0 < report.ppl_ref < 100.0  # a real model finds our prose predictable
