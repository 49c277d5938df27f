"""--kv-cache-dtype: the flag, its config field, the start-up refusal (fp8 without platform support),
the CPU byte budget, binding 8-bit caches to attention layers (dense and MLA), MLA block bytes."""

from __future__ import annotations

import pytest
import torch

from deepserve import LLM
from deepserve.bench.offline import build_parser as bench_parser
from deepserve.cli import build_parser
from deepserve.config import CacheConfig, ConfigError, ModelConfig
from deepserve.engine.args import EngineArgs
from deepserve.engine.kv_cache import (allocate_kv_caches, allocate_kv_scales, bind_kv_cache, bytes_per_block,
                                       check_kv_cache_dtype, resolve_kv_cache_dtype, temporary_kv_cache)
from deepserve.layers.attention import Attention
from deepserve.platforms import Platform
from deepserve.platforms.cpu import CpuPlatform
from deepserve.platforms.cuda import CudaPlatform
from tests.tiny_checkpoints import make_tiny_llama
from tests.unit.test_cli import run_cli

TINY_V3 = "deepserve/assets/tiny-deepseek-v3"
DENSE = ModelConfig.from_hf_dict({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "hidden_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2})


class NoFp8(Platform):
    name = "nofp8"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_flag_in_serve_generate_and_bench_help():
    for parser, argv in ((build_parser(), ["serve"]), (build_parser(), ["generate", "x"]),
                         (bench_parser(), ["throughput"]), (bench_parser(), ["latency"])):
        assert parser.parse_args(argv).kv_cache_dtype == "auto"
        assert parser.parse_args([*argv, "--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    assert "--kv-cache-dtype {auto,fp8,int8}" in " ".join(run_cli("serve", "--help").stdout.split())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--kv-cache-dtype", "int4"])
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, fp8, int8"):
        CacheConfig(kv_cache_dtype="fp16")


def test_storage_dtypes_and_platform_checks(monkeypatch):
    assert resolve_kv_cache_dtype("auto", DENSE, NoFp8(), torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("int8", DENSE, NoFp8(), torch.bfloat16) == torch.int8
    assert resolve_kv_cache_dtype("fp8", DENSE, CpuPlatform(), torch.float32) == torch.float8_e4m3fn
    with pytest.raises(ConfigError, match="--kv-cache-dtype fp8 needs float8_e4m3fn support.*use --kv-cache-dtype int8"):
        check_kv_cache_dtype("fp8", DENSE, NoFp8())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 0))  # A100: no fp8
    assert not CudaPlatform().supports_fp8_kv_cache()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))  # H100 / H200
    assert CudaPlatform().supports_fp8_kv_cache()


def test_mla_models_take_an_8bit_cache_fp8_keeps_its_platform_check():
    config = EngineArgs(model=TINY_V3, device="cpu", kv_cache_dtype="int8").create_engine_config()
    assert config.model_config.is_mla and config.cache.kv_cache_dtype == "int8"
    assert resolve_kv_cache_dtype("int8", config.model_config, NoFp8(), torch.bfloat16) == torch.int8
    with pytest.raises(ConfigError, match="--kv-cache-dtype fp8 needs float8_e4m3fn support"):
        check_kv_cache_dtype("fp8", config.model_config, NoFp8())


def test_mla_layers_bind_an_8bit_cache_with_one_scale_per_token():
    config = EngineArgs(model=TINY_V3, device="cpu").create_engine_config()
    from deepserve.loader.model_loader import load_model

    model = load_model(config, progress=False)
    caches = allocate_kv_caches(model, 2, 16, torch.int8, "cpu")
    with pytest.raises(ValueError, match="needs scales"):
        bind_kv_cache(model, caches)
    bind_kv_cache(model, caches, allocate_kv_scales(caches))
    mc = config.model_config
    row = mc.kv_lora_rank + mc.qk_rope_head_dim
    layers = [m for m in model.modules() if hasattr(m, "kv_cache")]
    assert all(m.kv_cache.shape == (2, 16, row) and m.kv_scales.shape == (2, 16) for m in layers)
    assert bytes_per_block(model, 16, torch.int8) == len(layers) * 16 * (row + 4)


class _LatentLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.kv_cache = torch.empty(0)


@pytest.mark.parametrize("num_layers", [27, 61], ids=["v2-lite", "v3"])
def test_mla_block_bytes_at_deepseek_shapes(num_layers):
    """[N, 16, 512 + 64] per layer: bf16 16 x 576 x 2 = 18,432 bytes; int8 / fp8 16 x 576 + 16 x 4 (one f32
    scale per token) = 9,280: 1.986x the blocks in the same memory."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(_LatentLayer() for _ in range(num_layers))

        def kv_cache_shape(self, num_blocks, block_size):
            return (num_blocks, block_size, 512 + 64)

    model = Model()
    assert bytes_per_block(model, 16, torch.bfloat16) == num_layers * 18_432
    for dtype in (torch.int8, torch.float8_e4m3fn):
        assert bytes_per_block(model, 16, dtype) == num_layers * 9_280
    assert (80 << 30) // bytes_per_block(model, 16, torch.int8) >= 1.98 * ((80 << 30) // bytes_per_block(
        model, 16, torch.bfloat16))


def test_cpu_budget_counts_8bit_elements_and_scales(folder):
    """--kv-cache-memory-gb on CPU: int8 blocks cost 1 byte per element + 4 per 16-element row
    (tiny Llama head_dim 16), against 4 per element in float32: 64 / 20 = 3.2x the blocks."""
    budget_gb = 64 * 2 * 2 * 16 * 2 * 16 * 4 / (1 << 30)  # 64 float32 blocks of the tiny Llama
    plans = {kv: LLM(str(folder), kv_cache_memory_gb=budget_gb, max_model_len=512, max_num_seqs=8,
                     kv_cache_dtype=kv).engine.core.kv_plan for kv in ("auto", "int8")}
    assert plans["auto"].num_blocks == 64 and plans["auto"].dtype == torch.float32
    assert plans["int8"].num_blocks == 204 and plans["int8"].dtype == torch.int8  # int(64 * 3.2)


def test_bind_checks_scales_and_temporary_cache_restores():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(2, 16, 1)

        def kv_cache_shape(self, num_blocks, block_size):
            return (2, num_blocks, block_size, 1, 16)

    model = Model()
    caches = allocate_kv_caches(model, 3, 4, torch.int8, "cpu")
    with pytest.raises(ValueError, match="needs scales"):
        bind_kv_cache(model, caches)
    bind_kv_cache(model, caches, allocate_kv_scales(caches))
    assert model.attn.kv_scales.shape == (2, 3, 4, 1) and model.attn.kv_scales.dtype == torch.float32
    before = (model.attn.kv_cache, model.attn.kv_scales)
    with temporary_kv_cache(model, 5, 4, torch.float32, "cpu") as temp:
        assert model.attn.kv_cache is temp[0] and model.attn.kv_scales.numel() == 0
    assert model.attn.kv_cache is before[0] and model.attn.kv_scales is before[1]
    assert bytes_per_block(model, 4, torch.int8) == 2 * 4 * 16 + 2 * 4 * 4


def test_engine_process_receives_the_kv_cache_dtype(folder):
    """The server's engine process gets its config over the wire (engine/messages.py)."""
    from deepserve.engine.messages import decode_engine_config, encode_engine_config

    config = EngineArgs(model=str(folder), device="cpu", kv_cache_dtype="int8").create_engine_config()
    assert decode_engine_config(encode_engine_config(config)).cache.kv_cache_dtype == "int8"
