"""Sampler: float32 logits of the sequences to sample -> token ids (+ logprobs).

Order of operations for each row (see docs/design.md, "Sampler"):

1. logit_bias is added;
2. repetition penalty (HF / CTRL): over prompt + output tokens, positive logits are divided by
   the penalty and negative ones multiplied;
3. presence / frequency penalties (OpenAI): over output tokens,
   ``logit -= presence * (count > 0) + frequency * count``;
4. logprobs (when asked) are ``log_softmax`` of these processed logits;
5. greedy rows take the argmax; the others are divided by their temperature, masked by top-k,
   top-p and min-p (in that order), and sampled.

Sampling uses the exponential race (``argmax(probs / q)`` with ``q ~ Exp(1)``), which picks token
``i`` with probability ``probs[i]``. A request with a seed draws its ``q`` from its own
``torch.Generator`` (made by `make_generator` and kept by the caller for the request's whole life),
so its tokens do not depend on which other requests share the batch.

The common case (all greedy, no bias, no penalties, no logprobs) is one ``argmax``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from deepserve.engine.sequence import TokenLogprob
from deepserve.platforms import upload
from deepserve.sampling_params import GREEDY_TEMPERATURE, SamplingParams



class SamplingRequest(NamedTuple):
    """What the sampler needs to know about one sequence to sample this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # from `make_generator`, kept per request


class SamplerOutput(NamedTuple):
    token_ids: torch.Tensor  # [num_seqs] int64
    logprobs: list[TokenLogprob | None] | None  # per seq (None where not asked); None: nobody asked


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator for a seeded request (None without a seed). Keep it per request."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def _upload(values: Sequence, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list as a [N] tensor on `device` (asynchronously on CUDA: the sampler's inputs are
    built while the device still runs the forward)."""
    return upload(torch.tensor(values, dtype=dtype), device)


# ----------------------------------------------------------------------------- pure logit ops


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     values: torch.Tensor) -> torch.Tensor:
    """logits [N, V] f32; rows, cols [B] int64, values [B] f32 -> logits + bias, [N, V] f32."""
    return logits.index_put((rows, cols), values, accumulate=True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: torch.Tensor) -> torch.Tensor:
    """logits [N, V] f32, seen [N, V] bool, penalty [N] f32 -> [N, V] f32 (HF semantics)."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalties(logits: torch.Tensor, counts: torch.Tensor,
                                       presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits [N, V] f32, counts [N, V] f32 (output tokens), presence/frequency [N] f32 -> [N, V]."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties at the k-th value kept), the rest -> -inf.

    logits [N, V] f32, k [N] int64 (k <= 0 or k >= V: row untouched) -> [N, V] f32.
    """
    vocab = logits.shape[-1]
    active = (k > 0) & (k < vocab)
    if not bool(active.any()):
        return logits
    k_safe = torch.where(active, k, torch.ones_like(k))
    top = logits.topk(int(k_safe.max()), dim=-1).values  # [N, k_max]
    kth = top.gather(1, (k_safe - 1)[:, None])  # [N, 1]
    kth = torch.where(active[:, None], kth, torch.full_like(kth, -float("inf")))
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (top one always).

    A token is dropped when the mass of the tokens ranked above it already reaches p.
    logits [N, V] f32, p [N] f32 (p >= 1: row untouched) -> [N, V] f32.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V] each
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # [N, V], exactly 0 for the top token
    drop_sorted = (mass_above >= p[:, None]) & (p[:, None] < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill(drop, -float("inf"))


def apply_min_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below p * (the row's top probability).

    logits [N, V] f32, p [N] f32 (0: row untouched) -> [N, V] f32.
    """
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * p[:, None]  # [N, 1]
    return logits.masked_fill(probs < threshold, -float("inf"))


def sample_from_probs(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Exponential race: probs [N, V] f32, one optional generator per row -> [N] int64."""
    q = torch.empty_like(probs)
    if any(g is None for g in generators):
        q.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            q[row].exponential_(generator=generator)
    q.clamp_min_(torch.finfo(q.dtype).tiny)  # an exact 0 would turn 0 / 0 into NaN
    return probs.div(q).argmax(dim=-1)


# ----------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class Penalties:
    seen: torch.Tensor  # [N, V] bool: token in prompt or output (repetition penalty)
    counts: torch.Tensor  # [N, V] f32: occurrences in the output
    repetition: torch.Tensor  # [N] f32, 1 = off
    presence: torch.Tensor  # [N] f32, 0 = off
    frequency: torch.Tensor  # [N] f32, 0 = off


@dataclass(frozen=True)
class LogitBias:
    rows: torch.Tensor  # [B] int64
    cols: torch.Tensor  # [B] int64
    values: torch.Tensor  # [B] f32


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling metadata of the sequences to sample, as tensors on the logits' device.

    Optional fields are None when no row of the batch uses that feature.
    """

    num_seqs: int
    greedy: torch.Tensor  # [N] bool
    all_greedy: bool
    temperature: torch.Tensor | None  # [N] f32 (1.0 on greedy rows); None when all greedy
    top_k: torch.Tensor | None  # [N] int64, 0 = off
    top_p: torch.Tensor | None  # [N] f32, 1.0 = off
    min_p: torch.Tensor | None  # [N] f32, 0.0 = off
    bias: LogitBias | None
    penalties: Penalties | None
    generators: tuple[torch.Generator | None, ...]
    num_logprobs: tuple[int | None, ...]

    @property
    def wants_logprobs(self) -> bool:
        return any(n is not None for n in self.num_logprobs)

    @property
    def is_plain_greedy(self) -> bool:
        """True when sampling is just an argmax of the raw logits."""
        return self.all_greedy and self.bias is None and self.penalties is None and not self.wants_logprobs

    @classmethod
    def build(cls, requests: Sequence[SamplingRequest], vocab_size: int,
              device: torch.device | str = "cpu") -> "SamplingBatch":
        params = [r.params for r in requests]
        greedy = [_is_greedy(p) for p in params]
        all_greedy = all(greedy)
        return cls(
            num_seqs=len(requests),
            greedy=_upload(greedy, torch.bool, device),
            all_greedy=all_greedy,
            temperature=None if all_greedy else _temperatures(params, greedy, device),
            top_k=_optional([max(p.top_k, 0) for p in params], 0, torch.int64, device, all_greedy),
            top_p=_optional([p.top_p for p in params], 1.0, torch.float32, device, all_greedy),
            min_p=_optional([p.min_p for p in params], 0.0, torch.float32, device, all_greedy),
            bias=_logit_bias(params, vocab_size, device),
            penalties=_penalties(requests, vocab_size, device),
            generators=tuple(r.generator for r in requests),
            num_logprobs=tuple(p.logprobs for p in params),
        )


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE


def _temperatures(params: list[SamplingParams], greedy: list[bool], device) -> torch.Tensor:
    values = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
    return _upload(values, torch.float32, device)


def _optional(values: list, off: float | int, dtype: torch.dtype, device,
              all_greedy: bool) -> torch.Tensor | None:
    """A [N] tensor of `values`, or None when every row is `off` (or nobody samples)."""
    if all_greedy or all(v == off for v in values):
        return None
    return _upload(values, dtype, device)


def _logit_bias(params: list[SamplingParams], vocab_size: int, device) -> LogitBias | None:
    """Token ids outside the vocabulary are ignored (the server rejects them up front)."""
    entries = [(row, tok, val) for row, p in enumerate(params)
               for tok, val in p.logit_bias.items() if 0 <= tok < vocab_size]
    if not entries:
        return None
    rows, cols, values = zip(*entries)
    return LogitBias(rows=_upload(rows, torch.int64, device), cols=_upload(cols, torch.int64, device),
                     values=_upload(values, torch.float32, device))


def _penalties(requests: Sequence[SamplingRequest], vocab_size: int, device) -> Penalties | None:
    if not any(r.params.uses_token_history for r in requests):
        return None
    counts = token_counts([r.output_token_ids for r in requests], vocab_size, device)
    in_prompt = token_counts([r.prompt_token_ids for r in requests], vocab_size, device) > 0

    def column(name: str) -> torch.Tensor:
        return _upload([getattr(r.params, name) for r in requests], torch.float32, device)

    return Penalties(seen=in_prompt | (counts > 0), counts=counts,
                     repetition=column("repetition_penalty"), presence=column("presence_penalty"),
                     frequency=column("frequency_penalty"))


def token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device="cpu") -> torch.Tensor:
    """Occurrences of each token id per row: lists of ids -> [N, vocab_size] f32."""
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.int64)  # pad -> spare column
    for row, ids in enumerate(token_lists):
        padded[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.int64)
    padded = upload(padded, device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


# ----------------------------------------------------------------------------- the sampler


class Sampler:
    """Stateless: ``Sampler()(logits [N, V] f32, batch) -> SamplerOutput``."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.num_seqs:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {batch.num_seqs} sequences")
        if batch.is_plain_greedy:
            return SamplerOutput(logits.argmax(dim=-1), None)
        logits = self.process_logits(logits.float(), batch)
        logprobs = logits.log_softmax(dim=-1) if batch.wants_logprobs else None  # [N, V] f32
        token_ids = self.choose(logits, batch)
        token_logprobs = None if logprobs is None else gather_logprobs(logprobs, token_ids, batch.num_logprobs)
        return SamplerOutput(token_ids, token_logprobs)

    @staticmethod
    def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logit_bias then penalties: [N, V] f32 -> [N, V] f32 (the logits logprobs are taken from)."""
        if batch.bias is not None:
            logits = apply_logit_bias(logits, batch.bias.rows, batch.bias.cols, batch.bias.values)
        pen = batch.penalties
        if pen is not None:
            logits = apply_repetition_penalty(logits, pen.seen, pen.repetition)
            logits = apply_presence_frequency_penalties(logits, pen.counts, pen.presence, pen.frequency)
        return logits

    @staticmethod
    def choose(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Processed logits [N, V] f32 -> token ids [N] int64 (argmax on greedy rows)."""
        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy_ids
        sampled = sample_from_probs(sampling_probs(logits, batch), batch.generators)
        return torch.where(batch.greedy, greedy_ids, sampled)


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, softmax: [N, V] f32 -> probabilities [N, V] f32."""
    logits = logits / batch.temperature[:, None]
    if batch.top_k is not None:
        logits = apply_top_k(logits, batch.top_k)
    if batch.top_p is not None:
        logits = apply_top_p(logits, batch.top_p)
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    return logits.softmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    num_logprobs: Sequence[int | None]) -> list[TokenLogprob | None]:
    """logprobs [N, V] f32, token_ids [N] int64 -> per row the chosen token's logprob + its top-k."""
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()  # [N]
    k_max = max((k for k in num_logprobs if k is not None), default=0)
    top_values, top_ids = logprobs.topk(k_max, dim=-1)  # [N, k_max] each
    top_values, top_ids, ids = top_values.tolist(), top_ids.tolist(), token_ids.tolist()
    return [None if k is None else
            TokenLogprob(ids[row], chosen[row], list(zip(top_ids[row][:k], top_values[row][:k])))
            for row, k in enumerate(num_logprobs)]
