"""Engine arguments shared by `LLM(...)`, `deepserve serve|generate|chat` and the benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from deepserve.config import (KV_CACHE_DTYPES, SPECULATIVE_METHODS, CacheConfig, ConfigError, EngineConfig,
                              ModelConfig, SchedulerConfig, SpeculativeConfig)


@dataclass
class EngineArgs:
    model: str | None = None  # folder, .gguf file, or bundled name; None: the default model
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 | int8
    enforce_eager: bool = False
    max_graph_batch_size: int = 512
    max_prefill_graph_tokens: int = 256
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_mode: str = "auto"
    seed: int = 0
    served_model_name: str | None = None
    speculative: str | None = None  # "mtp": draft with the checkpoint's MTP layer
    num_speculative_tokens: int = 1
    quantization: str | None = None  # deepserve.quant name (QUANTIZATION_HELP); None: the checkpoint's
    quantize_lm_head: bool = False  # the LM head as int8 W8A16 (quant/lm_head.py)
    async_scheduling: str = "auto"

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs()
        g = parser.add_argument_group("engine")
        g.add_argument("--model", default=d.model,
                       help="model folder, .gguf file, or bundled name (tiny-deepseek-v3); default: SmolLM2-135M")
        g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
        g.add_argument("--device", default=d.device, help="auto | cpu | cuda")
        g.add_argument("--load-format", default=d.load_format, choices=["auto", "safetensors", "dummy"])
        g.add_argument("--max-model-len", type=int, default=d.max_model_len)
        g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        g.add_argument("--block-size", type=int, default=d.block_size)
        g.add_argument("--num-kv-blocks", type=int, default=d.num_kv_blocks)
        g.add_argument("--kv-cache-memory-gb", type=float, default=d.kv_cache_memory_gb,
                       help="KV cache budget on CPU")
        g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                       help="fraction of the GPU's memory deepserve may use (weights, activations, "
                            "KV cache); the KV cache gets what is left")
        g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                       help="KV cache storage: auto = the model's dtype; fp8 (e4m3) or int8 = 8 bits per "
                            "element + a float32 scale per token and KV head, ~1.9x the blocks of bf16 "
                            "(dense Qwen2/Llama models; not yet MLA)")
        g.add_argument("--enforce-eager", action="store_true",
                       help="no CUDA graphs: run every batch eagerly")
        g.add_argument("--max-graph-batch-size", type=int, default=d.max_graph_batch_size,
                       help="largest decode batch captured in a CUDA graph (larger ones run eagerly)")
        g.add_argument("--max-prefill-graph-tokens", type=int, default=d.max_prefill_graph_tokens,
                       help="largest single-sequence prefill chunk replayed from a CUDA graph (capped at "
                            "--max-num-batched-tokens and --max-model-len; 0: prefill runs eagerly; off with "
                            "every graph under --enforce-eager or --max-graph-batch-size 0)")
        g.add_argument("--async-scheduling", default=d.async_scheduling, choices=["auto", "on", "off"],
                       help="schedule the next step while the device runs this one (auto: on for CUDA); "
                            "batches with logprobs, penalties or speculative decoding run in step")
        g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
        g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
        g.add_argument("--attention-mode", default=d.attention_mode, choices=["auto", "naive", "absorb"])
        g.add_argument("--seed", type=int, default=d.seed)
        g.add_argument("--served-model-name", default=d.served_model_name)
        g.add_argument("--speculative", default=d.speculative, choices=list(SPECULATIVE_METHODS),
                       help="speculative decoding of greedy requests: mtp drafts with the "
                            "checkpoint's multi-token-prediction layer (DeepSeek-V3/R1)")
        g.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens,
                       help="draft tokens verified per step with --speculative (1..3)")
        from deepserve.quant import QUANTIZATION_HELP, QUANTIZATION_METHODS

        g.add_argument("--quantization", default=d.quantization, choices=list(QUANTIZATION_METHODS),
                       help=QUANTIZATION_HELP)
        g.add_argument("--quantize-lm-head", action="store_true", default=d.quantize_lm_head,
                       help="store the LM head as int8 per output row with float activations (W8A16), any "
                            "--quantization: half its bytes at batch-1 decode, where the head is streamed once "
                            "per token; larger batches dequantise it per step (slower). The embedding stays in "
                            "float. Check the accuracy with `deepserve eval --quantize-lm-head`")
        return parser

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    def create_engine_config(self) -> EngineConfig:
        from deepserve.loader.resolve import resolve_model_path

        folder = resolve_model_path(self.model)
        model_config = ModelConfig.from_folder(folder)
        config = EngineConfig(
            model=str(folder),
            model_config=model_config,
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_kv_blocks,
                              enable_prefix_caching=self.enable_prefix_caching,
                              cpu_kv_cache_bytes=int(self.kv_cache_memory_gb * (1 << 30)),
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              kv_cache_dtype=self.kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=self.max_model_len,
                                      enable_chunked_prefill=self.enable_chunked_prefill),
            dtype=self.dtype, device=_resolve_device(self.device), load_format=self.load_format,
            seed=self.seed, attention_mode=self.attention_mode,
            served_model_name=self.served_model_name or _default_name(self.model, folder),
            enforce_eager=self.enforce_eager, max_graph_batch_size=self.max_graph_batch_size,
            max_prefill_graph_tokens=self.max_prefill_graph_tokens,
            speculative=self._speculative_config(), quantization=self._quantization(model_config),
            quantize_lm_head=self.quantize_lm_head, async_scheduling=self.async_scheduling,
        )
        self._check_kv_cache_dtype(config)
        return config.resolve()


    def _quantization(self, model_config: ModelConfig) -> str | None:
        from deepserve.quant import check_quantization, quantization_from_hf_config

        try:
            name = check_quantization(self.quantization)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return name or quantization_from_hf_config(model_config.hf_config)

    @staticmethod
    def _check_kv_cache_dtype(config: EngineConfig) -> None:
        """Refuse an unservable --kv-cache-dtype before any weight is loaded."""
        from deepserve.engine.kv_cache import check_kv_cache_dtype  # lazy: imports torch
        from deepserve.platforms import get_platform

        check_kv_cache_dtype(config.cache.kv_cache_dtype, config.model_config, get_platform(config.device))

    def _speculative_config(self) -> SpeculativeConfig | None:
        if self.speculative is None:
            return None
        return SpeculativeConfig(self.speculative, self.num_speculative_tokens)


def _resolve_device(device: str) -> str:
    """"auto" -> the detected platform's device type; anything else as given."""
    if device != "auto":
        return device
    from deepserve.platforms import current_platform  # lazy: imports torch

    return current_platform().device_type


def _default_name(model: str | None, folder) -> str:
    from pathlib import Path

    if model is None or model == "default":
        return "SmolLM2-135M-Instruct"
    return Path(str(model)).name.removesuffix(".gguf") or str(folder)
