"""Convert a GGUF file (llama.cpp) into an HF-layout folder, once, cached.

    folder = ensure_converted("SmolLM2-135M-Instruct.Q4_1.gguf")   # cache_dir/gguf/<stem>-<key>/
    # config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json,
    # generation_config.json; then loaded like any checkpoint folder.

Every tensor is dequantised with `gguf.quants.dequantize` (Q4_0/1, Q8_0, K-quants, F16, F32...),
renamed with the table below, and, for Llama, the Q/K rows are put back in HF order: llama.cpp's
converter interleaves the two rotary halves of each head (GGUF rows [head, hd/2, 2] are HF rows
[head, 2, hd/2]), which HF-layout "rotate half" rope needs undone. The cache key is the file's
path, size and mtime; the folder is written into a temp dir and renamed, so a crash never leaves a
half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from safetensors.torch import save_file

from deepserve import envs
from deepserve.loader.errors import LoadError
from deepserve.loader.gguf_tokenizer import gguf_tokenizer, gguf_tokenizer_config

CONVERTER_VERSION = 1  # bump when the converted folder's layout changes


@dataclass(frozen=True)
class GGUFArch:
    hf_architecture: str
    model_type: str
    unpermute_qk: bool  # llama.cpp permuted q/k rows for its rope


ARCHS = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", unpermute_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", unpermute_qk=False),
}

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
}
BLOCK_NAMES = {  # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
IGNORED = {"rope_freqs.weight"}  # llama-3 rope factors; config.json's rope_scaling carries them


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name for a GGUF one; None for tensors with no HF counterpart; KeyError if unknown."""
    if gguf_name in IGNORED:
        return None
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    prefix, layer, rest = (gguf_name.split(".", 2) + ["", ""])[:3]
    if prefix == "blk" and layer.isdigit() and rest in BLOCK_NAMES:
        return f"model.layers.{layer}.{BLOCK_NAMES[rest]}"
    raise KeyError(gguf_name)


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rope row permutation. [n_head * head_dim, ...] -> same shape, HF row order."""
    head_dim = weight.shape[0] // n_head
    return (weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])  # rows as llama.cpp wrote them
            .swapaxes(1, 2)  # [n_head, 2, head_dim/2, ...]
            .reshape(weight.shape))


def read_gguf(path: Path):
    """gguf.GGUFReader over the file (memory-mapped); LoadError naming the file on a bad one."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise LoadError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def gguf_metadata(reader) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _arch(meta: Mapping[str, Any], source: Path) -> tuple[str, GGUFArch]:
    name = meta.get("general.architecture")
    if name not in ARCHS:
        raise LoadError(f"{source}: GGUF architecture {name!r} is not supported; "
                        f"supported: {', '.join(sorted(ARCHS))}")
    return name, ARCHS[name]


def _rope_scaling(meta: Mapping[str, Any], arch: str) -> dict[str, Any] | None:
    kind, factor = meta.get(f"{arch}.rope.scaling.type"), meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    scaling = {"rope_type": kind, "factor": float(factor)}
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def gguf_config(meta: Mapping[str, Any], tensor_names: set[str], source: Path) -> dict[str, Any]:
    """HF config.json contents from the `<arch>.*` metadata."""
    arch, info = _arch(meta, source)

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise LoadError(f"{source}: GGUF metadata lacks {arch}.{name}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": [info.hf_architecture], "model_type": info.model_type,
        "vocab_size": int(vocab) if vocab else int(key("vocab_size")),
        "hidden_size": hidden, "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }


def dequantized_tensors(reader, config: Mapping[str, Any], source: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, float32 tensor in HF layout) for every tensor of the file."""
    from gguf.quants import dequantize

    unpermute = ARCHS[reader_arch(reader)].unpermute_qk
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        try:
            name = hf_name(tensor.name)
        except KeyError:
            raise LoadError(f"{source}: tensor {tensor.name} has no HF name in deepserve's GGUF table") from None
        if name is None:
            continue
        try:
            array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        except (NotImplementedError, ValueError) as exc:
            raise LoadError(f"{source}: cannot dequantise {tensor.name} "
                            f"({tensor.tensor_type.name}): {exc}") from None
        array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))  # GGUF lists dims fastest first
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if unpermute and kind in heads:
            array = unpermute_rows(array, heads[kind])
        if not array.flags.writeable:  # an F32 tensor is a view of the read-only memory map
            array = array.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(array))


def reader_arch(reader) -> str:
    return reader.fields["general.architecture"].contents()


def generation_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
              "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    for gguf_key, hf_key in (("temp", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
        if f"general.sampling.{gguf_key}" in meta:
            config[hf_key] = meta[f"general.sampling.{gguf_key}"]
    return {k: v for k, v in config.items() if v is not None}


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF folder for `gguf_path` into `out_dir` (created; not atomic, see ensure_converted)."""
    source, out = Path(gguf_path), Path(out_dir)
    reader = read_gguf(source)
    meta = gguf_metadata(reader)
    config = gguf_config(meta, {t.name for t in reader.tensors}, source)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = gguf_tokenizer(meta, str(source))
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", gguf_tokenizer_config(meta, config["max_position_embeddings"]))
    _write_json(out / "generation_config.json", generation_config(meta))
    save_file(dict(dequantized_tensors(reader, config, source)), str(out / "model.safetensors"),
              metadata={"format": "pt", "source": source.name})
    _write_json(out / "config.json", config)  # written last: its presence marks a finished folder
    return out


def cache_key(gguf_path: Path) -> str:
    """Identity of the file for the cache: resolved path, size, mtime, converter version."""
    stat = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cached_folder(gguf_path: Path, cache_root: Path) -> Path:
    return cache_root / "gguf" / f"{gguf_path.stem}-{cache_key(gguf_path)}"


def ensure_converted(gguf_path: str | Path, cache_root: str | Path | None = None) -> Path:
    """The cached HF folder for a GGUF file, converting it first if needed (atomic rename)."""
    source = Path(gguf_path)
    if not source.is_file():
        raise LoadError(f"{source}: GGUF file does not exist")
    final = cached_folder(source, Path(cache_root) if cache_root else envs.cache_dir())
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        convert_gguf(source, tmp)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place; a stale half folder is replaced."""
    if final.exists() and not (final / "config.json").is_file():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a concurrent converter winning the race
            raise
