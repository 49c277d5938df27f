"""`deepserve quantize`: write an INT8 checkpoint folder in the HF layout.

    quantize_checkpoint("in/", "out/", "int8")  ->  out/model.safetensors   <p>.weight int8 [out, in]
                                                                             <p>.weight_scale f32 [out]
                                                                             <p>.weight_zero_point int8 [out] (asymmetric)
                                                     out/config.json         + quantization_config
                                                     out/tokenizer* ...      copied
Which tensors are quantised is decided by the model itself: each checkpoint tensor is loaded into
the float32 model on its own, and it is quantised when the parameter it fills is the weight of a
`quantizable` LinearBase (not the embedding, LM head, MLA kv_b_proj or stacked MoE experts). The
other tensors are written unchanged. Per-channel quantisation is row-wise, so quantising q_proj
and k_proj apart equals quantising the fused qkv matrix. One output file (no sharding yet).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from deepserve.quant import check_quantization, quantization_config, quantization_from_hf_config


@dataclass(frozen=True)
class QuantizeSummary:
    out: Path
    method: str
    quantized: int  # tensors written as int8
    kept: int  # tensors written unchanged
    bytes_in: int
    bytes_out: int


def method_name(method: str, asymmetric: bool) -> str:
    if asymmetric and method != "int8-weight-only":
        raise ValueError("--asymmetric needs --method int8-weight-only (W8A8 activations are symmetric)")
    return check_quantization(method + "-asym" if asymmetric else method)


def _quantizable(model: torch.nn.Module, param_name: str) -> bool:
    module_name, _, leaf = param_name.rpartition(".")
    if leaf != "weight":
        return False
    module = model.get_submodule(module_name)
    return getattr(module, "quantizable", False) and not getattr(module, "keep_dense_weight", False)


def _progress(enabled: bool):
    from deepserve.loader.model_loader import _progress as loader_progress

    if not enabled:
        return loader_progress(False)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("quantizing"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.description}"), TimeElapsedColumn(),
                    transient=True, console=Console(stderr=True))


@torch.no_grad()
def quantize_checkpoint(model: str | Path | None, out: str | Path, method: str, asymmetric: bool = False,
                        progress: bool = True) -> QuantizeSummary:
    """Quantise the float checkpoint `model` (folder or bundled name) into the folder `out`."""
    from safetensors.torch import save_file

    from deepserve.engine.args import EngineArgs
    from deepserve.loader.model_loader import build_model, model_class
    from deepserve.loader.safetensors_loader import WeightStream, check_all_filled, find_checkpoint_files

    name = method_name(method, asymmetric)
    config = EngineArgs(model=None if model is None else str(model), device="cpu",
                        dtype="float32").create_engine_config()
    folder, out = Path(config.model), Path(out)
    if quantization_from_hf_config(config.model_config.hf_config) is not None:
        raise ValueError(f"{folder} is already a deepserve-quantised checkpoint")
    if out.resolve() == folder.resolve():
        raise ValueError("--out must differ from the input folder")
    net = build_model(model_class(config.model_config), config.model_config, "auto", "cpu", torch.float32)
    files = find_checkpoint_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    filled: set[str] = set()
    quantized = kept = bytes_in = 0
    with _progress(progress) as bar:
        task = bar.add_task("", total=len(files.files))
        stream = WeightStream(files, on_file=lambda p: bar.update(task, advance=1, description=p.name))
        for hf_name, tensor in stream:
            bytes_in += tensor.numel() * tensor.element_size()
            params = net.load_weights([(hf_name, tensor)])
            filled |= set(params)
            if tensor.dim() == 2 and params and all(_quantizable(net, p) for p in params):
                from deepserve.quant.int8 import quantize_per_channel_ref

                q, scale, zp = quantize_per_channel_ref(tensor.float(), symmetric=not asymmetric)
                tensors[hf_name], tensors[hf_name + "_scale"] = q, scale
                if zp is not None:
                    tensors[hf_name + "_zero_point"] = zp
                quantized += 1
            else:
                tensors[hf_name] = tensor.contiguous()
                kept += 1
    check_all_filled([n for n, _ in net.named_parameters()], filled, files)
    del net
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_config(folder, out, name)
    _copy_side_files(folder, out)
    bytes_out = sum(t.numel() * t.element_size() for t in tensors.values())
    return QuantizeSummary(out, name, quantized, kept, bytes_in, bytes_out)


def _write_config(folder: Path, out: Path, name: str) -> None:
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = quantization_config(name)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


def _copy_side_files(folder: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file but weights and config."""
    for path in folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(path, out / path.name)
