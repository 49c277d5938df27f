"""In-process engine with text in and out: tokenizer + EngineCore + OutputProcessor."""

from __future__ import annotations

import dataclasses

from deepserve.config import EngineConfig
from deepserve.engine.engine_core import EngineCore, EngineStats
from deepserve.engine.output_processor import OutputKind, OutputProcessor
from deepserve.engine.outputs import RequestOutput
from deepserve.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, core: EngineCore, tokenizer):
        self.config = config
        self.core = core
        self.tokenizer = tokenizer
        self.output_processor = OutputProcessor(tokenizer.backend)

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> "LLMEngine":
        from deepserve.loader.model_loader import load_model
        from deepserve.loader.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.model)
        model = load_model(config, progress=progress)
        eos = tuple(dict.fromkeys(tokenizer.eos_token_ids + config.model_config.eos_token_id))
        return cls(config, EngineCore(config, model, eos), tokenizer)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    output_kind: OutputKind = OutputKind.DELTA) -> list[int]:
        """Queue a request; returns its prompt token ids. ValueError for a prompt it cannot serve."""
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        if not token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        self.core.add_request(request_id, token_ids, params)
        self.output_processor.add_request(request_id, text, token_ids, params, output_kind)
        return token_ids

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests([request_id])
        self.output_processor.abort_requests([request_id])

    def step(self) -> list[RequestOutput]:
        processed = self.output_processor.process(self.core.step())
        if processed.requests_to_abort:
            self.core.abort_requests(processed.requests_to_abort)
        return processed.request_outputs

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished() or self.output_processor.has_unfinished_requests()

    def stats(self) -> EngineStats:
        return self.core.stats()


def expand_n(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """n > 1 becomes n requests `<id>-<i>`; seeded ones get seeds seed, seed+1, ..."""
    if params.n == 1:
        return [(request_id, params)]
    one = dataclasses.replace(params, n=1)
    return [(f"{request_id}-{i}", one if params.seed is None else dataclasses.replace(one, seed=params.seed + i))
            for i in range(params.n)]
