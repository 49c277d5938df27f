"""Engine <-> server messages: round trips of every type, clean errors on garbage, msgpack only."""

from __future__ import annotations

import dataclasses
import pickle

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from deepserve.engine import messages as M
from deepserve.engine.outputs import EngineOutput
from deepserve.engine.sequence import FinishReason, TokenLogprob
from deepserve.sampling_params import SamplingParams

CODEC = M.MessageCodec()
PARAMS = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, seed=11,
                        repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5,
                        logit_bias={5: -100.0, 17: 2.5}, logprobs=3, stop=("a", "\u00e9\u6771"),
                        stop_token_ids=(1, 2), ignore_eos=True, include_stop_str_in_output=True,
                        skip_special_tokens=False, n=2)
STATS = M.EngineStatsMsg(num_running=2, num_waiting=1, kv_cache_usage=0.25, prefix_cache_hit_rate=0.5,
                         num_preemptions=3, prefix_queried_tokens=64, prefix_hit_tokens=32,
                         step_prompt_tokens=9, step_generation_tokens=2, timestamp=12.5)
CLIENT_MESSAGES = [
    M.AddRequest("r-1", [1, 2, 3], M.params_to_msg(PARAMS), arrival_time=3.25),
    M.AbortRequests(["a", "b"]),
    M.Shutdown(),
]
ENGINE_MESSAGES = [
    M.EngineReady(vocab_size=320, max_model_len=512, num_kv_blocks=63, block_size=16, pid=42),
    M.EngineOutputs([M.RequestOutputMsg("r", [4, 5], [M.TokenLogprobMsg(4, -0.5, [(4, -0.5), (9, -1.0)])],
                                        "stop", "\n", 3, 16, 1.5),
                     M.RequestOutputMsg("bad", finish_reason="abort", error="prompt too long")], STATS),
    M.EngineOutputs([]),
    M.EngineError("CUDA exploded", "RuntimeError", ["r"], fatal=True),
]


def test_struct_mirrors_sampling_params():
    assert set(M.SamplingParamsMsg.__struct_fields__) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_sampling_params_round_trip():
    msg = CODEC.decode_client(CODEC.encode(CLIENT_MESSAGES[0])).params
    back = M.params_from_msg(msg)
    assert back == PARAMS and dict(back.logit_bias) == {5: -100.0, 17: 2.5}
    assert all(isinstance(k, int) for k in msg.logit_bias)


def test_decoded_params_are_validated():
    bad = msgspec.structs.replace(M.params_to_msg(SamplingParams()), temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        M.params_from_msg(CODEC.decode_client(CODEC.encode(M.AddRequest("r", [1], bad))).params)


@pytest.mark.parametrize("message", CLIENT_MESSAGES, ids=lambda m: type(m).__name__)
def test_client_messages_round_trip(message):
    data = CODEC.encode(message)
    assert CODEC.decode_client(data) == message
    with pytest.raises(M.MessageError):  # wrong direction is refused, not misread
        CODEC.decode_engine(data)


@pytest.mark.parametrize("message", ENGINE_MESSAGES, ids=lambda m: type(m).__name__)
def test_engine_messages_round_trip(message):
    data = CODEC.encode(message)
    assert CODEC.decode_engine(data) == message
    with pytest.raises(M.MessageError):
        CODEC.decode_client(data)


@pytest.mark.parametrize("message", CLIENT_MESSAGES + ENGINE_MESSAGES, ids=lambda m: type(m).__name__)
def test_encoding_is_plain_msgpack_not_pickle(message):
    data = CODEC.encode(message)
    assert not data.startswith(b"\x80")  # every pickle protocol >= 2 starts with PROTO
    plain = msgspec.msgpack.decode(data)  # decodable as untyped msgpack: builtins only
    assert isinstance(plain, dict) and plain["type"] == type(message).__name__
    with pytest.raises(Exception):
        pickle.loads(data)


@pytest.mark.parametrize("data", [b"", b"\x80\x04\x95garbage", b"\xc1", b"not msgpack at all",
                                  msgspec.msgpack.encode({"type": "Nope"}),
                                  msgspec.msgpack.encode({"type": "AbortRequests", "request_ids": "x"}),
                                  msgspec.msgpack.encode({"type": "Shutdown", "extra": 1}),
                                  msgspec.msgpack.encode([1, 2, 3])])
def test_garbage_raises_message_error(data):
    for decode in (CODEC.decode_client, CODEC.decode_engine):
        with pytest.raises(M.MessageError):
            decode(data)


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(M.MessageError):
        CODEC.decode_client(pickle.dumps(Evil()))
    assert not marker.exists()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash_the_decoder(data):
    for decode in (CODEC.decode_client, CODEC.decode_engine):
        try:
            decode(data)
        except M.MessageError:
            pass


def test_engine_output_conversion_round_trip():
    out = EngineOutput("r", [7, 8], [TokenLogprob(7, -0.1, [(7, -0.1), (3, -2.0)]), TokenLogprob(8, -0.2)],
                       FinishReason.LENGTH, None, 5, 0)
    msg = CODEC.decode_engine(CODEC.encode(M.EngineOutputs([M.output_to_msg(out, 2.0)]))).outputs[0]
    back = M.output_from_msg(msg)
    assert back == out and back.finish_reason is FinishReason.LENGTH and msg.first_scheduled_time == 2.0
    assert M.output_from_msg(M.output_to_msg(EngineOutput("s", [1]))).finish_reason is None


def test_engine_config_round_trip():
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
           "max_position_embeddings": 512, "eos_token_id": [1, 2],
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "nested": [1, {"a": None}]}}
    config = EngineConfig(model="/m", model_config=ModelConfig.from_hf_dict(raw),
                          cache=CacheConfig(num_blocks=9, enable_prefix_caching=False),
                          scheduler=SchedulerConfig(max_num_seqs=3, max_model_len=128),
                          dtype="float32", seed=5, served_model_name="tiny").resolve()
    data = M.encode_engine_config(config)
    assert not data.startswith(b"\x80")
    assert M.decode_engine_config(data) == config
