"""Frozen configuration objects, resolved once at start-up.

`ModelConfig` is read from a Hugging Face `config.json`; the engine configs come from the CLI or
the `LLM(...)` keyword arguments. Nothing writes into a config after construction: derived values
come from `resolve()` / `dataclasses.replace`, which return new objects.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration that cannot be served; the message names the file and the problem."""


def read_json_object(path: Path, error: type[Exception] | None = None, required: bool = True) -> dict[str, Any]:
    """A model folder's JSON file as a dict; `error` (ConfigError by default) names the file and the
    problem when it is missing (and required), unreadable, or not a JSON object."""
    error = error or ConfigError
    if not path.is_file():
        if required:
            raise error(f"{path}: {path.name} not found in the model folder")
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: cannot read {path.name} ({exc})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: {path.name} is not a JSON object")
    return raw


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of one checkpoint (HF `config.json` field names)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    # DeepSeek-V2/V3 (MLA + MoE); None / 0 for dense models.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_nextn_predict_layers: int = 0
    # The raw dict, read-only, for anything a model file needs beyond the fields above.
    hf_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        if not archs:
            raise ConfigError(f"{source}: no 'architectures' entry, cannot tell which model this is")
        names = {f.name for f in dataclasses.fields(cls)} - {"architecture", "hf_config"}
        kwargs: dict[str, Any] = {k: _freeze(raw[k]) for k in names if raw.get(k) is not None}
        if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        eos = raw.get("eos_token_id")
        kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if kwargs.get("rope_scaling") is None and isinstance(raw.get("rope_parameters"), dict):
            params = dict(raw["rope_parameters"])
            kwargs.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
            if params.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = _freeze(params)
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if k not in kwargs]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        kwargs.setdefault("intermediate_size", 0)
        kwargs.setdefault("max_position_embeddings", 4096)
        try:
            return cls(architecture=archs[0], hf_config=_freeze(dict(raw)), **kwargs)
        except TypeError as exc:  # wrong types in the JSON
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        return cls.from_hf_dict(read_json_object(path), source=str(path))


KV_CACHE_DTYPES = ("auto", "fp8", "int8")  # auto: the model's dtype


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. `num_blocks` None means: size it from memory at start-up. `kv_cache_dtype`
    fp8 / int8 stores K and V in 8 bits with a float32 scale per token and head
    (deepserve/layers/kv_quant.py)."""

    block_size: int = 16
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    cpu_kv_cache_bytes: int = 2 << 30  # budget for the KV cache on CPU
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget per step
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True


SPECULATIVE_METHODS = ("mtp",)
MAX_SPECULATIVE_TOKENS = 3


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: `method` "mtp" drafts with the checkpoint's multi-token-prediction layer
    (model.layers.{num_hidden_layers}.*), chained on itself for k > 1; the main model verifies
    `num_speculative_tokens` drafts per greedy decode (non-greedy requests do not speculate)."""

    method: str = "mtp"
    num_speculative_tokens: int = 1

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative method {self.method!r} not in {SPECULATIVE_METHODS}")
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}, "
                              f"got {self.num_speculative_tokens}")

    @property
    def num_lookahead_slots(self) -> int:
        """KV slots past a step's tokens that the chained draft passes write (k - 1)."""
        return self.num_speculative_tokens - 1


@dataclass(frozen=True)
class EngineConfig:
    model: str  # folder, GGUF file, or bundled name
    model_config: ModelConfig
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype on GPU
    device: str = "cpu"
    load_format: str = "auto"  # auto | safetensors | dummy
    seed: int = 0
    attention_mode: str = "auto"  # MLA: auto | naive | absorb
    served_model_name: str | None = None
    enforce_eager: bool = False  # True: no CUDA graphs, every batch runs eagerly
    max_graph_batch_size: int = 512  # largest decode batch captured in a CUDA graph
    # Largest single-sequence prefill chunk captured in a CUDA graph (engine/prefill_graph.py), capped at
    # max_num_batched_tokens and max_model_len; 0: prefill always runs eagerly.
    max_prefill_graph_tokens: int = 256
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    quantization: str | None = None  # deepserve.quant method for LinearBase layers (int8, ...)
    quantize_lm_head: bool = False  # the LM head as int8 W8A16 (deepserve/quant/lm_head.py)
    # Schedule the next step while the device runs this one (sampled ids stay on the device):
    # "auto" = on where kernels run asynchronously to the host (CUDA), "on", "off".
    async_scheduling: str = "auto"

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len or self.model_config.max_position_embeddings

    def resolve(self) -> "EngineConfig":
        """Fill derived values (max_model_len) and return a new frozen config."""
        sched = self.scheduler
        if sched.max_model_len is None:
            sched = dataclasses.replace(sched, max_model_len=self.model_config.max_position_embeddings)
        if sched.max_model_len > self.model_config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {sched.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.model_config.max_position_embeddings}"
            )
        if self.max_prefill_graph_tokens < 0:
            raise ConfigError(f"max_prefill_graph_tokens must be >= 0, got {self.max_prefill_graph_tokens}")
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ConfigError(f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}")
        if self.speculative is not None and self.quantize_lm_head:
            raise ConfigError("--quantize-lm-head with --speculative is not supported: the MTP layer's head "
                              "shares the main model's float head")
        if self.speculative is not None and self.model_config.num_nextn_predict_layers < 1:
            raise ConfigError(f"{self.model}: --speculative mtp needs a checkpoint with an MTP layer "
                              f"(num_nextn_predict_layers >= 1 in config.json)")
        return dataclasses.replace(self, scheduler=sched)
