"""Accuracy gate for quantised checkpoints: perplexity and next-token agreement on held-out text.

    nll, n = score_text(model, ids, window=512)     # summed -log p(next token) in nats, tokens scored
    perplexity(model, ids, window)                  # exp(nll / n)
    agreement(ref_model, cand_model, prompts)       # teacher-forced top-1 match and KL(ref || cand)
    gate(reference, candidate)                      # EvalReport; AccuracyGateError when it fails

Windows: the text is cut into windows of `window` tokens that overlap by one token, so every token
after the first is predicted exactly once, from the context inside its window. Each window is one
fresh prefill through a temporary paged KV cache (the model's own caches are put back afterwards);
the logits of every position come from `model.compute_logits`. Scores are computed in float32.

Positions compared: every position of the held-out text that predicts a text token (teacher-forced,
the same windows as the perplexity: N - 1 positions for N tokens, about 3150 for the shipped text)
plus every position of a few short prompts. Top-1 agreement is the fraction of positions where both
models' most likely next token is the same; it comes with a 95% Wilson score interval. The interval
treats positions as independent draws, which neighbouring tokens of one text are not: read it as a
lower bound on the real uncertainty. The pass/fail decision uses the point estimate.

The evaluation text must be held out from the calibration text `deepserve quantize` smooths and
rounds with (data/calibration_text.txt by default; `check_held_out` refuses overlapping files).

`gate` loads one model at a time (the reference first); the reference's log-distributions stay on
the host for the candidate pass: positions x vocab x 4 bytes (3200 x 49152: 0.6 GiB; `max_tokens`
caps it for large vocabularies).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from deepserve.engine.kv_cache import allocate_kv_caches, attention_layers, bind_kv_cache
from deepserve.forward_context import build_forward_context, forward_context

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_TEXT = DATA / "eval_text.txt"
DEFAULT_WINDOW = 512
BLOCK_SIZE = 16
Z_95 = 1.959964  # two-sided 95% normal quantile
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To compute the average of a list of numbers in Python, you",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colours are red, blue and",
    "Water boils at a temperature of",
    "A good way to learn a new language is to",
    "import json\n\nwith open('data.json') as f:\n",
)


class AccuracyGateError(RuntimeError):
    """The candidate's accuracy is below the gate's thresholds; the message has the numbers."""

    def __init__(self, message: str, report: "EvalReport"):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a folder / .gguf / bundled name (None: the default model) + quantization."""

    model: str | None = None
    quantization: str | None = None
    quantize_lm_head: bool = False  # the head as int8 W8A16 (quant/lm_head.py)

    def describe(self) -> str:
        name = self.model if self.model is not None else "default"
        tags = [t for t in (self.quantization, "int8 LM head" if self.quantize_lm_head else None) if t]
        return f"{name} [{', '.join(tags)}]" if tags else str(name)


@dataclass(frozen=True)
class AgreementReport:
    top1_agreement: float  # fraction of positions whose argmax matches
    mean_kl: float  # mean over positions of KL(ref || cand), nats
    max_kl: float
    num_positions: int
    top1_low: float = 1.0  # 95% Wilson score interval of top1_agreement
    top1_high: float = 1.0


@dataclass(frozen=True)
class EvalReport:
    ppl_ref: float
    ppl_cand: float
    ppl_ratio: float  # ppl_cand / ppl_ref
    top1_agreement: float
    mean_kl: float
    passed: bool
    reasons: tuple[str, ...]  # why it failed; empty when it passed
    max_kl: float = 0.0
    num_tokens: int = 0  # tokens scored for perplexity
    num_positions: int = 0  # positions compared for agreement / KL (text + prompts)
    num_text_positions: int = 0  # of which on the held-out text
    top1_low: float = 1.0  # 95% Wilson score interval of top1_agreement
    top1_high: float = 1.0

    def summary(self) -> str:
        return (f"ppl ref {self.ppl_ref:.4f}, ppl cand {self.ppl_cand:.4f}, ratio {self.ppl_ratio:.4f}, "
                f"top-1 agreement {self.top1_agreement:.4f} (95% CI {self.top1_low:.4f}-{self.top1_high:.4f}, "
                f"{self.num_positions} positions), mean KL {self.mean_kl:.5f} nats")


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) without observations."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends, whatever the rounding
    return low, 1.0 if successes == n else min(1.0, centre + half)


# ---- scoring ----------------------------------------------------------------------------------------


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


@contextmanager
def _temporary_kv_cache(model: nn.Module, num_tokens: int, block_size: int = BLOCK_SIZE) -> Iterator[None]:
    """Bind a cache big enough for one sequence of `num_tokens`; put the model's own caches back."""
    previous = [layer.kv_cache for layer in attention_layers(model)]
    p = _param(model)
    num_blocks = -(-num_tokens // block_size)
    bind_kv_cache(model, allocate_kv_caches(model, num_blocks, block_size, p.dtype, p.device))
    try:
        yield
    finally:
        bind_kv_cache(model, previous)


def _windows(num_tokens: int, window: int) -> list[tuple[int, int]]:
    """[start, end) spans of at most `window` tokens, overlapping by one (see the module docstring)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    spans: list[tuple[int, int]] = []
    start = 0
    while num_tokens > 0:
        end = min(start + window, num_tokens)
        spans.append((start, end))
        if end == num_tokens:
            return spans
        start = end - 1
    return spans


@torch.no_grad()
def _prefill_logprobs(model: nn.Module, token_ids: Sequence[int], block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """log p(. | prefix) at every position of one fresh sequence: [len, vocab] float32 (model device)."""
    n = len(token_ids)
    ctx = build_forward_context([n], [n], [list(range(-(-n // block_size)))], block_size, _param(model).device)
    ids = torch.tensor(list(token_ids), dtype=torch.int64, device=ctx.positions.device)  # [n]
    with forward_context(ctx):
        hidden = model(ids, ctx.positions)  # [n, hidden]
    return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)  # [n, vocab]


def text_logprobs(model: nn.Module, token_ids: Sequence[int], window: int = DEFAULT_WINDOW
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per window: (log p(. | prefix) [len - 1, vocab] f32 at the positions that predict a token of the
    text, targets [len - 1] int64), both on the model's device; every token after the first once."""
    token_ids = [int(t) for t in token_ids]
    spans = [(s, e) for s, e in _windows(len(token_ids), window) if e - s >= 2]
    if not spans:
        return
    with _temporary_kv_cache(model, max(e - s for s, e in spans)):
        for start, end in spans:
            chunk = token_ids[start:end]
            logprobs = _prefill_logprobs(model, chunk)[:-1]  # [len - 1, vocab]
            yield logprobs, torch.tensor(chunk[1:], dtype=torch.int64, device=logprobs.device)


def _nll(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed -log p(target) over the rows of logprobs [n, vocab], targets [n]."""
    return -float(logprobs.gather(1, targets[:, None]).double().sum())


def score_text(model: nn.Module, token_ids: Sequence[int], window: int = DEFAULT_WINDOW) -> tuple[float, int]:
    """(summed -log p(next token) in nats, number of predicted tokens) over windows of the text."""
    total, count = 0.0, 0
    for logprobs, targets in text_logprobs(model, token_ids, window):
        total += _nll(logprobs, targets)
        count += len(targets)
    return total, count


def perplexity(model: nn.Module, token_ids: Sequence[int], window: int = DEFAULT_WINDOW) -> float:
    nll, count = score_text(model, token_ids, window)
    if count == 0:
        raise ValueError("perplexity needs at least 2 tokens")
    return math.exp(nll / count)


def next_token_logprobs(model: nn.Module, prompts_token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Teacher-forced log-distributions at every position of each prompt, [len_i, vocab] on the host."""
    out = []
    for ids in prompts_token_ids:
        if not ids:
            raise ValueError("empty prompt")
        with _temporary_kv_cache(model, len(ids)):
            out.append(_prefill_logprobs(model, list(ids)).cpu())
    return out


class AgreementTally:
    """Running top-1 matches and KL(ref || cand) over [n, vocab] log-probability pairs."""

    def __init__(self) -> None:
        self.matches, self.positions, self.kl_sum, self.kl_max = 0, 0, 0.0, 0.0

    def add(self, ref: torch.Tensor, cand: torch.Tensor) -> None:
        if ref.shape != cand.shape:
            raise ValueError(f"distribution shapes differ: reference {tuple(ref.shape)}, candidate {tuple(cand.shape)}")
        cand = cand.to(ref.device)
        self.matches += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0).double()  # [n] nats; rounding below 0 clamped
        self.positions += int(kl.numel())
        if kl.numel():
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max()))

    def report(self) -> AgreementReport:
        n = self.positions
        if n == 0:
            return AgreementReport(1.0, 0.0, 0.0, 0)
        low, high = wilson_interval(self.matches, n)
        return AgreementReport(self.matches / n, self.kl_sum / n, self.kl_max, n, low, high)


def compare_distributions(ref: Sequence[torch.Tensor], cand: Sequence[torch.Tensor]) -> AgreementReport:
    """Top-1 agreement and KL(ref || cand) over matching [len, vocab] log-probability tensors."""
    if len(ref) != len(cand):
        raise ValueError(f"{len(ref)} reference prompts but {len(cand)} candidate prompts")
    tally = AgreementTally()
    for r, c in zip(ref, cand):
        tally.add(r, c)
    return tally.report()


def agreement(ref_model: nn.Module, cand_model: nn.Module,
              prompts_token_ids: Sequence[Sequence[int]]) -> AgreementReport:
    """Teacher-forced next-token agreement of two models on the same prompts (no sampling)."""
    return compare_distributions(next_token_logprobs(ref_model, prompts_token_ids),
                                 next_token_logprobs(cand_model, prompts_token_ids))


# ---- the gate ---------------------------------------------------------------------------------------


def as_spec(spec: Any) -> ModelSpec:
    """A ModelSpec from a ModelSpec, an EngineArgs-like object (.model, .quantization), a path or None."""
    if isinstance(spec, ModelSpec):
        return spec
    if spec is None or isinstance(spec, (str, Path)):
        return ModelSpec(None if spec is None else str(spec))
    if hasattr(spec, "model"):
        model = getattr(spec, "model")
        return ModelSpec(None if model is None else str(model), getattr(spec, "quantization", None),
                         bool(getattr(spec, "quantize_lm_head", False)))
    raise TypeError(f"cannot make a model spec from {type(spec).__name__}")


def _engine_config(spec: ModelSpec) -> Any:
    from deepserve.engine.args import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs: dict[str, Any] = {"model": spec.model}
    if spec.quantization:
        if "quantization" not in fields:
            raise ValueError(f"{spec.describe()}: this deepserve has no quantization support; "
                             f"pass a quantized checkpoint folder instead")
        kwargs["quantization"] = spec.quantization
    if spec.quantize_lm_head:
        kwargs["quantize_lm_head"] = True
    return EngineArgs(**kwargs).create_engine_config()


def load_spec(spec: ModelSpec) -> tuple[nn.Module, Path]:
    """(model, checkpoint folder) for a spec."""
    from deepserve.loader.model_loader import load_model

    config = _engine_config(spec)
    return load_model(config, progress=False), Path(config.model)


def read_eval_text(text_file: str | Path | None) -> str:
    path = Path(text_file) if text_file is not None else DEFAULT_TEXT
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: empty evaluation text")
    return text


def _prompt_ids(tokenizer: Any, prompts: Sequence[str | Sequence[int]] | None) -> list[list[int]]:
    items = DEFAULT_PROMPTS if prompts is None else prompts
    return [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in items]


def check_held_out(calibration_text: str, eval_text: str, min_line: int = 60) -> None:
    """ValueError when the evaluation text repeats a line of the calibration text (lines of at least
    `min_line` characters): a gate scored on calibration data would flatter the candidate."""
    seen = {line.strip() for line in calibration_text.splitlines() if len(line.strip()) >= min_line}
    shared = [line.strip() for line in eval_text.splitlines() if line.strip() in seen]
    if shared:
        raise ValueError(f"the evaluation text is not held out from the calibration text: {len(shared)} "
                         f"shared line(s), e.g. {shared[0][:70]!r}")


@dataclass(frozen=True)
class _Reference:
    """The reference model's pass: text NLL and the log-distributions the candidate is compared with."""

    nll: float
    num_tokens: int
    text_logprobs: list[torch.Tensor]  # per window [len - 1, vocab] f32, host
    prompt_logprobs: list[torch.Tensor]  # per prompt [len, vocab] f32, host

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.num_tokens)


@dataclass(frozen=True)
class _Candidate:
    ppl: float
    text: AgreementReport  # text positions only
    pooled: AgreementReport  # text and prompt positions


def _reference_pass(model: nn.Module, text_ids: list[int], prompt_ids: list[list[int]], window: int) -> _Reference:
    nll, count, kept = 0.0, 0, []
    for logprobs, targets in text_logprobs(model, text_ids, window):
        nll += _nll(logprobs, targets)
        count += len(targets)
        kept.append(logprobs.cpu())
    if count == 0:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    return _Reference(nll, count, kept, next_token_logprobs(model, prompt_ids))


def _candidate_pass(model: nn.Module, ref: _Reference, text_ids: list[int], prompt_ids: list[list[int]],
                    window: int) -> _Candidate:
    """Score the candidate window by window against the kept reference distributions."""
    nll, tally = 0.0, AgreementTally()
    windows = text_logprobs(model, text_ids, window)
    for ref_logprobs, (logprobs, targets) in zip(ref.text_logprobs, windows, strict=True):
        nll += _nll(logprobs, targets)
        tally.add(ref_logprobs, logprobs.cpu())
    text = tally.report()
    for ref_logprobs, logprobs in zip(ref.prompt_logprobs, next_token_logprobs(model, prompt_ids), strict=True):
        tally.add(ref_logprobs, logprobs)
    return _Candidate(math.exp(nll / ref.num_tokens), text, tally.report())


def _self_candidate(ref: _Reference) -> _Candidate:
    """The candidate pass of a model against its own distributions (same spec: a plumbing check)."""
    tally = AgreementTally()
    for r in ref.text_logprobs:
        tally.add(r, r)
    text = tally.report()
    for r in ref.prompt_logprobs:
        tally.add(r, r)
    return _Candidate(ref.ppl, text, tally.report())


def judge(ref: _Reference, cand: _Candidate, min_top1: float, max_ppl_increase: float) -> EvalReport:
    agree = cand.pooled
    ratio = cand.ppl / ref.ppl
    reasons = []
    if agree.top1_agreement < min_top1:
        reasons.append(f"top-1 agreement {agree.top1_agreement:.4f} < {min_top1:.4f}")
    if ratio > 1.0 + max_ppl_increase:
        reasons.append(f"perplexity ratio {ratio:.4f} > {1.0 + max_ppl_increase:.4f} "
                       f"({ref.ppl:.4f} -> {cand.ppl:.4f})")
    return EvalReport(ppl_ref=ref.ppl, ppl_cand=cand.ppl, ppl_ratio=ratio,
                      top1_agreement=agree.top1_agreement, mean_kl=agree.mean_kl, passed=not reasons,
                      reasons=tuple(reasons), max_kl=agree.max_kl, num_tokens=ref.num_tokens,
                      num_positions=agree.num_positions, num_text_positions=cand.text.num_positions,
                      top1_low=agree.top1_low, top1_high=agree.top1_high)


def gate(reference: Any, candidate: Any, text_file: str | Path | None = None,
         prompts: Sequence[str | Sequence[int]] | None = None, min_top1: float = 0.97,
         max_ppl_increase: float = 0.02, force: bool = False, window: int = DEFAULT_WINDOW,
         max_tokens: int | None = None) -> EvalReport:
    """Compare `candidate` against `reference` (ModelSpec / EngineArgs / folder); AccuracyGateError
    when it fails and not `force`. Text and prompts are tokenized with the reference's tokenizer;
    `max_tokens` caps the text's token count."""
    from deepserve.loader.tokenizer import load_tokenizer

    ref_spec, cand_spec = as_spec(reference), as_spec(candidate)
    ref_model, folder = load_spec(ref_spec)
    tokenizer = load_tokenizer(folder)
    text_ids = tokenizer.encode(read_eval_text(text_file))[:max_tokens]
    prompt_ids = _prompt_ids(tokenizer, prompts)
    ref_scores = _reference_pass(ref_model, text_ids, prompt_ids, window)
    del ref_model  # one model in memory at a time
    if cand_spec == ref_spec:
        cand_scores = _self_candidate(ref_scores)  # the same spec loads the same model
    else:
        cand_model, _ = load_spec(cand_spec)
        cand_scores = _candidate_pass(cand_model, ref_scores, text_ids, prompt_ids, window)
    report = judge(ref_scores, cand_scores, min_top1, max_ppl_increase)
    if not report.passed and not force:
        raise AccuracyGateError(f"{cand_spec.describe()} fails the accuracy gate against "
                                f"{ref_spec.describe()}: {'; '.join(report.reasons)} ({report.summary()})",
                                report)
    return report


def format_report(report: EvalReport, reference: str, candidate: str) -> str:
    """The table `deepserve eval` prints."""
    prompts = report.num_positions - report.num_text_positions
    rows = [("perplexity (reference)", f"{report.ppl_ref:.4f}", reference),
            ("perplexity (candidate)", f"{report.ppl_cand:.4f}", candidate),
            ("perplexity ratio", f"{report.ppl_ratio:.4f}", f"{report.num_tokens} tokens scored"),
            ("top-1 agreement", f"{report.top1_agreement:.4f}",
             f"{report.num_positions} positions ({report.num_text_positions} text + {prompts} prompt)"),
            ("top-1 95% interval", f"{report.top1_low:.4f}-{report.top1_high:.4f}", "Wilson score"),
            ("mean KL(ref||cand)", f"{report.mean_kl:.6f}", "nats"),
            ("max KL(ref||cand)", f"{report.max_kl:.6f}", "nats"),
            ("result", "PASS" if report.passed else "FAIL", "; ".join(report.reasons))]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>{vwidth}}  {note}".rstrip() for name, value, note in rows)
