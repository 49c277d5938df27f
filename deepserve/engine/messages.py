"""Typed messages between the server process and the engine-core process (msgpack, never pickle).

    server -> engine   AddRequest | AbortRequests | Shutdown                 (ClientMessage)
    engine -> server   EngineReady | EngineOutputs | EngineError             (EngineMessage)

Every message is a tagged `msgspec.Struct` (the tag is the class name, under the key "type"), so one
decoder per direction turns bytes into the right class or raises `MessageError`. The engine only
sees token ids; sampling parameters travel as `SamplingParamsMsg`, a mirror of `SamplingParams`
with converters both ways. The engine configuration travels to the spawned process as msgpack too
(`encode_engine_config` / `decode_engine_config`).
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Union

import msgspec

from deepserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from deepserve.engine.outputs import EngineOutput
from deepserve.engine.sequence import FinishReason, TokenLogprob
from deepserve.sampling_params import SamplingParams


class MessageError(ValueError):
    """Bytes that are not a valid message of the expected direction."""


class _Tagged(msgspec.Struct, tag=True, tag_field="type", forbid_unknown_fields=True):
    pass


# ---- server -> engine ------------------------------------------------------------------------------


class SamplingParamsMsg(msgspec.Struct, forbid_unknown_fields=True):
    """`SamplingParams` on the wire (same field names; logit_bias keys are ints)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = {}
    logprobs: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1


def params_to_msg(params: SamplingParams) -> SamplingParamsMsg:
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    values.update(logit_bias=dict(params.logit_bias), stop=list(params.stop),
                  stop_token_ids=list(params.stop_token_ids))
    return SamplingParamsMsg(**values)


def params_from_msg(msg: SamplingParamsMsg) -> SamplingParams:
    """Back to a validated `SamplingParams` (ValueError when the values are out of range)."""
    return SamplingParams(**msgspec.structs.asdict(msg))


class AddRequest(_Tagged):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParamsMsg
    arrival_time: float = 0.0  # time.monotonic() in the server process


class AbortRequests(_Tagged):
    request_ids: list[str]


class Shutdown(_Tagged):
    pass


# ---- engine -> server ------------------------------------------------------------------------------


class EngineReady(_Tagged):
    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    pid: int = 0


class TokenLogprobMsg(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class RequestOutputMsg(msgspec.Struct, forbid_unknown_fields=True):
    """New tokens of one request from one step; `error` set when the engine refused the request."""

    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: list[TokenLogprobMsg] = []
    finish_reason: str | None = None  # FinishReason value
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None  # time.monotonic() when it first ran (first output only)
    error: str | None = None


class EngineStatsMsg(msgspec.Struct, forbid_unknown_fields=True):
    """Engine state after a step; the two `step_*` counts are per message (sum them for totals)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0
    num_preemptions: int = 0  # cumulative
    prefix_queried_tokens: int = 0  # cumulative
    prefix_hit_tokens: int = 0  # cumulative
    step_prompt_tokens: int = 0
    step_generation_tokens: int = 0
    spec_num_draft_tokens: int = 0  # cumulative: speculative draft tokens verified
    spec_num_accepted_tokens: int = 0  # cumulative: of those, accepted
    timestamp: float = 0.0  # time.monotonic() in the engine process


class EngineOutputs(_Tagged):
    outputs: list[RequestOutputMsg]
    stats: EngineStatsMsg | None = None


class EngineError(_Tagged):
    """The core hit an exception. fatal: the engine process exits after sending this."""

    message: str
    error_type: str = "RuntimeError"
    request_ids: list[str] = []
    fatal: bool = True


ClientMessage = Union[AddRequest, AbortRequests, Shutdown]
EngineMessage = Union[EngineReady, EngineOutputs, EngineError]


def output_to_msg(out: EngineOutput, first_scheduled_time: float | None = None) -> RequestOutputMsg:
    logprobs = [TokenLogprobMsg(lp.token_id, lp.logprob, [tuple(t) for t in lp.top]) for lp in out.new_logprobs]
    reason = None if out.finish_reason is None else FinishReason(out.finish_reason).value
    return RequestOutputMsg(out.request_id, list(out.new_token_ids), logprobs, reason, out.stop_reason,
                            out.num_prompt_tokens, out.num_cached_tokens, first_scheduled_time)


def output_from_msg(msg: RequestOutputMsg) -> EngineOutput:
    logprobs = [TokenLogprob(lp.token_id, lp.logprob, [tuple(t) for t in lp.top]) for lp in msg.new_logprobs]
    reason = None if msg.finish_reason is None else FinishReason(msg.finish_reason)
    return EngineOutput(msg.request_id, msg.new_token_ids, logprobs, reason, msg.stop_reason,
                        msg.num_prompt_tokens, msg.num_cached_tokens)


# ---- codecs ------------------------------------------------------------------------------------------


class MessageCodec:
    """Encoder + one decoder per direction; decode_* raise MessageError on anything invalid."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._client = msgspec.msgpack.Decoder(ClientMessage)
        self._engine = msgspec.msgpack.Decoder(EngineMessage)

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode_client(self, data: bytes) -> Any:
        return _decode(self._client, data)

    def decode_engine(self, data: bytes) -> Any:
        return _decode(self._engine, data)


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes) -> Any:
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(f"invalid message: {exc}") from None


# ---- engine configuration (parent -> spawned engine process) ------------------------------------------


def _thaw(value: Any) -> Any:
    if isinstance(value, (dict, MappingProxyType)):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _refreeze(value: Any) -> Any:
    """Inverse of `_thaw` for ModelConfig values: dicts -> read-only mappings, lists -> tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: _refreeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_refreeze(v) for v in value)
    return value


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: _thaw(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def encode_engine_config(config: EngineConfig) -> bytes:
    plain = _fields(config) | {"model_config": _fields(config.model_config),
                               "cache": _fields(config.cache), "scheduler": _fields(config.scheduler),
                               "speculative": config.speculative and _fields(config.speculative)}
    return msgspec.msgpack.encode(plain)


def decode_engine_config(data: bytes) -> EngineConfig:
    plain = msgspec.msgpack.decode(data, type=dict[str, Any])
    model = ModelConfig(**{k: _refreeze(v) for k, v in plain.pop("model_config").items()})
    spec = plain.pop("speculative", None)
    plain["speculative"] = None if spec is None else SpeculativeConfig(**spec)
    return EngineConfig(model_config=model, cache=CacheConfig(**plain.pop("cache")),
                        scheduler=SchedulerConfig(**plain.pop("scheduler")), **plain)
