"""A DeepSeek-V3-layout block-FP8 copy of a float checkpoint folder, for tests.

    write_block_fp8_checkpoint(src, dst, block=(128, 128), shards=1) -> dst

Every weight DeepSeek ships in fp8 becomes float8_e4m3fn [N, K] plus `<name>_scale_inv` float32
[ceil(N/bn), ceil(K/bk)] (`block_fp8_quantize_weight_ref`; the tiny model's dims below 128 make
partial blocks): the attention and MLP projections of every decoder layer, the MTP layer's included,
dense MLP, shared and routed experts. Kept as they are, as in the published V3 checkpoint: embeddings,
norms, lm_head, the router `mlp.gate.weight`, `e_score_correction_bias`, the MTP layer's `eh_proj`
and `shared_head`. config.json gains the V3 quantization_config. With shards > 1 the tensors are
spread over model-0000i-of-0000n.safetensors with an index, each scale in the shard after its
weight's (so loaders must pair them across files).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deepserve.quant.block_fp8_ref import DEFAULT_BLOCK, block_fp8_quantize_weight_ref

QUANTIZED = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\..*_proj(_with_mqa)?\.weight$")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def is_quantized(name: str) -> bool:
    """Whether DeepSeek-V3's published checkpoint stores `name` in fp8."""
    return bool(QUANTIZED.match(name))


def quantized_tensors(src: Path, block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, torch.Tensor]:
    """The block-FP8 tensors of `src`/model.safetensors, in file order (each weight then its scale)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        if is_quantized(name):
            out[name], out[name + "_scale_inv"] = block_fp8_quantize_weight_ref(tensor, block)
        else:
            out[name] = tensor
    return out


def _write_shards(tensors: dict[str, torch.Tensor], dst: Path, shards: int) -> None:
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    placed = {name: files[(i * shards // len(names) + name.endswith("_scale_inv")) % shards]
              for i, name in enumerate(names)}
    for file in files:
        part = {n: tensors[n].contiguous() for n in names if placed[n] == file}
        save_file(part, str(dst / file), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": placed}))


def write_block_fp8_checkpoint(src: Path, dst: Path, block: tuple[int, int] = DEFAULT_BLOCK,
                               shards: int = 1) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    _write_shards(quantized_tensors(src, block), dst, shards)
    return dst
