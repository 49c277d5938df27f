"""Offline API: `LLM(model).generate(prompts, params)` and `.chat(messages, params)`."""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

from deepserve.engine.args import EngineArgs
from deepserve.engine.llm_engine import LLMEngine, expand_n
from deepserve.engine.output_processor import OutputKind
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.sampling_params import SamplingParams

Prompt = str | list[int]
Messages = Sequence[Mapping[str, Any]]


class LLM:
    """Runs requests to completion in this process. `model=None` is the bundled default model."""

    def __init__(self, model: str | None = None, progress: bool = False, **engine_args: Any):
        config = EngineArgs(model=model, **engine_args).create_engine_config()
        self.engine = LLMEngine.from_config(config, progress=progress)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        prompts = _as_list(prompts)
        params_list = _broadcast(params, len(prompts))
        ids = [self._submit(p, sp) for p, sp in zip(prompts, params_list)]
        return self._run(ids)

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                      chat_template=chat_template) for c in conversations]
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(token_ids, params)
        for out, text in zip(outputs, prompts):
            out.prompt = text
        return outputs

    def _submit(self, prompt: Prompt, params: SamplingParams) -> tuple[str, list[str]]:
        request_id = str(next(self._ids))
        subs = expand_n(request_id, params)
        for sub_id, sub_params in subs:
            self.engine.add_request(sub_id, prompt, sub_params, OutputKind.FINAL_ONLY)
        return request_id, [sub_id for sub_id, _ in subs]

    def _run(self, requests: list[tuple[str, list[str]]]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [_merge(rid, [done[s] for s in subs]) for rid, subs in requests]


def _merge(request_id: str, parts: list[RequestOutput]) -> RequestOutput:
    first = parts[0]
    outputs = [CompletionOutput(i, p.outputs[0].text, p.outputs[0].token_ids, p.outputs[0].logprobs,
                                p.outputs[0].finish_reason, p.outputs[0].stop_reason)
               for i, p in enumerate(parts)]
    return RequestOutput(request_id, first.prompt, first.prompt_token_ids, outputs, True,
                         first.num_cached_tokens)


def _as_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _broadcast(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"{len(params)} SamplingParams for {count} prompts")
    return list(params)
