"""Export TinyV3 as a published-layout DeepSeek-V3 HF folder, and `assemble` the asset folder.

Tensor names are those of deepseek-ai/DeepSeek-V3's checkpoint: per-expert
model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight (transformers 5 fuses them into
experts.gate_up_proj [E, 2I, H] / experts.down_proj [E, H, I]; split here), the MTP layer as
model.layers.N.{embed_tokens,enorm,hnorm,eh_proj,shared_head.norm,shared_head.head,<decoder>}.
All tensors bf16 except mlp.gate.e_score_correction_bias (fp32, as published).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .model import CONFIG, GENERATION_CONFIG
from .readme import render_readme

SHARD_BYTES = 15 * 1000 * 1000           # $OUT takes files up to 16 MB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OUT_FILES = ("config.json", "generation_config.json", "metrics.json")


def _split_experts(prefix: str, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fused expert tensors -> per-expert published names; anything else passes through."""
    if name.endswith("experts.gate_up_proj"):
        base, inter = prefix + name[: -len("gate_up_proj")], t.shape[1] // 2
        out = {}
        for e in range(t.shape[0]):
            out[f"{base}{e}.gate_proj.weight"] = t[e, :inter]
            out[f"{base}{e}.up_proj.weight"] = t[e, inter:]
        return out
    if name.endswith("experts.down_proj"):
        base = prefix + name[: -len("down_proj")]
        return {f"{base}{e}.down_proj.weight": t[e] for e in range(t.shape[0])}
    return {prefix + name: t}


def published_state_dict(model) -> dict[str, torch.Tensor]:
    """TinyV3 -> {published name: tensor}, main model first, then the MTP layer."""
    n = model.lm.config.num_hidden_layers
    out = {}
    for name, t in model.lm.state_dict().items():
        out.update(_split_experts("", name, t))
    mtp = f"model.layers.{n}."
    out[mtp + "embed_tokens.weight"] = model.lm.model.embed_tokens.weight
    for name, t in model.mtp.state_dict().items():
        name = name[len("block."):] if name.startswith("block.") else name
        out.update(_split_experts(mtp, name, t))
    out[mtp + "shared_head.head.weight"] = model.lm.lm_head.weight
    return {k: _cast(k, v) for k, v in out.items()}


def _cast(name: str, t: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
    return t.detach().to("cpu", dtype).contiguous()


def save_weights(sd: dict[str, torch.Tensor], dst: Path, shard_bytes: int | None) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors + index when over shard_bytes."""
    from safetensors.torch import save_file
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if shard_bytes is None or total <= shard_bytes:
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        (dst / "model.safetensors").chmod(0o644)
        return ["model.safetensors"]
    shards, cur, size = [], {}, 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += nbytes
    shards.append(cur)
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        (dst / fname).chmod(0o644)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def export(model, pack: Path, dst: Path, metrics: dict, out: Path | None = None) -> None:
    """Write the full HF folder to dst; copy the weights, configs and metrics (not the
    tokenizer files, which are in the pack) to `out` when given."""
    import transformers
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("model*.safetensors*"):
        old.unlink()
    weights = save_weights(published_state_dict(model), dst, SHARD_BYTES)
    _write_json(dst / "config.json", dict(CONFIG, transformers_version=transformers.__version__))
    _write_json(dst / "generation_config.json",
                dict(GENERATION_CONFIG, transformers_version=transformers.__version__))
    _write_json(dst / "metrics.json", metrics)
    for name in TOKENIZER_FILES:
        shutil.copyfile(pack / name, dst / name)
    (dst / "README.md").write_text(render_readme(metrics))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name in (*OUT_FILES, *weights):
            shutil.copyfile(dst / name, out / name)
            print(f"$OUT <- {name} ({(out / name).stat().st_size:,d} B)")


def _merge_shards(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = json.loads((src / "model.safetensors.index.json").read_text())
    sd = {}
    for fname in dict.fromkeys(index["weight_map"].values()):
        sd.update(load_file(str(src / fname)))
    return {k: sd[k] for k in index["weight_map"]}


def assemble(src: Path, pack: Path, dst: Path, keep_shards: bool = False) -> None:
    """Asset folder from train's returned files + the pack's tokenizer files; shards are
    merged into one model.safetensors unless keep_shards."""
    from safetensors.torch import save_file
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.glob("model*.safetensors*"):
        old.unlink()
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(src / name, dst / name)
    for name in TOKENIZER_FILES:
        shutil.copyfile(pack / name, dst / name)
    sharded = (src / "model.safetensors.index.json").exists()
    if sharded and not keep_shards:
        save_file(_merge_shards(src), str(dst / "model.safetensors"), metadata={"format": "pt"})
        (dst / "model.safetensors").chmod(0o644)
    else:
        for p in src.glob("model*.safetensors*"):
            shutil.copyfile(p, dst / p.name)
    metrics = json.loads((src / "metrics.json").read_text())
    _write_json(dst / "metrics.json", metrics)
    (dst / "README.md").write_text(render_readme(metrics))
