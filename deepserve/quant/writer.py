"""`deepserve quantize`: write an INT8 or FP8 checkpoint folder in the HF layout.

    quantize_checkpoint("in/", "out/", "int8", calibration=DEFAULT_CALIBRATION)
        -> out/model.safetensors   <p>.weight int8 [out, in], <p>.weight_scale f32 [out]
                                   (<p>.weight_zero_point int8 [out]: asymmetric W8A16;
                                   fp8: <p>.weight float8_e4m3fn [out, in], <p>.weight_scale f32 [out])
           out/config.json         + quantization_config (method, input rotation, recipe)
           out/tokenizer* ...      copied

Recipes (`plan`):
    int8 (W8A8)            calibrated: SmoothQuant factors (alpha 0.5) folded into the float weights,
                           block-Hadamard input rotation (method int8-hadamard; `rotation="none"`:
                           plain int8), GPTQ rounding. benchmarks/results/quant_accuracy.md has the
                           measurements behind each step.
    int8-weight-only       calibrated: GPTQ rounding (symmetric); asymmetric: round-to-nearest
    fp8 (W8A8, e4m3)       round-to-nearest per output channel (scale max|w| / 448), the weights
                           `--quantization fp8` computes at load; no calibration, smoothing, rotation or
                           GPTQ (the CLI refuses those options; `plan` ignores them). Served as fp8 (or
                           fp8-exact-accum / fp8-per-tensor when asked: the loader dequantises)
    calibration=None       every weight rounded to nearest on its own, tensor by tensor (any
                           architecture, constant memory: the input is streamed)
The calibrated path holds the whole float32 model and its calibration statistics in memory and
handles Llama-style decoder stacks (quant/calibrated.py). Which tensors are quantised is decided
by the model itself: the weights of `quantizable` LinearBase layers (not the embedding, LM head,
MLA kv_b_proj or stacked MoE experts). One output file (no sharding yet).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from deepserve.quant import (WRITABLE_METHODS, check_quantization, hadamard_block_of, quantization_config,
                             quantization_from_hf_config)
from deepserve.quant.calibrated import ROUNDINGS, Recipe

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration_text.txt"
DEFAULT_ALPHA = 0.5
ROTATIONS = ("hadamard", "none")


@dataclass(frozen=True)
class QuantizeSummary:
    out: Path
    method: str
    quantized: int  # tensors written as int8 / e4m3
    kept: int  # tensors written unchanged
    bytes_in: int
    bytes_out: int
    recipe: Recipe | None = None


def method_name(method: str, asymmetric: bool, rotation: str = "none") -> str:
    """The registered method a checkpoint is written for (ValueError for impossible combinations)."""
    if method not in WRITABLE_METHODS:
        raise ValueError(f"quantize writes {', '.join(WRITABLE_METHODS)} checkpoints, not {method!r} "
                         f"(fp8-exact-accum and fp8-per-tensor are serving choices: write fp8 and serve it with "
                         f"--quantization)")
    if asymmetric and method != "int8-weight-only":
        raise ValueError("--asymmetric needs --method int8-weight-only (W8A8 activations are symmetric)")
    if rotation not in ROTATIONS:
        raise ValueError(f"unknown rotation {rotation!r}; use one of {', '.join(ROTATIONS)}")
    if rotation == "hadamard" and method == "int8":
        return "int8-hadamard"
    return check_quantization(method + "-asym" if asymmetric else method)


def plan(method: str, asymmetric: bool = False, calibration: str | Path | None = DEFAULT_CALIBRATION,
         rotation: str = "hadamard", smoothing_alpha: float | None = DEFAULT_ALPHA,
         rounding: str = "gptq") -> Recipe:
    """The recipe for a method and options (see the module docstring)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {', '.join(ROUNDINGS)}")
    w8a8 = method == "int8"
    name = method_name(method, asymmetric, rotation if w8a8 else "none")
    if calibration is None or name == "fp8":
        return Recipe(name, None, "rtn", None)
    digest = hashlib.sha256(Path(calibration).read_bytes()).hexdigest()
    return Recipe(name, smoothing_alpha if w8a8 else None, "rtn" if asymmetric else rounding,
                  Path(calibration).name, digest)


def _quantizable(model: torch.nn.Module, param_name: str) -> bool:
    module_name, _, leaf = param_name.rpartition(".")
    if leaf != "weight":
        return False
    module = model.get_submodule(module_name)
    return getattr(module, "quantizable", False) and not getattr(module, "keep_dense_weight", False)


def _progress(enabled: bool, label: str = "quantizing"):
    from deepserve.loader.model_loader import _progress as loader_progress

    if not enabled:
        return loader_progress(False)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.description}"), TimeElapsedColumn(),
                    transient=True, console=Console(stderr=True))


@torch.no_grad()
def quantize_checkpoint(model: str | Path | None, out: str | Path, method: str, asymmetric: bool = False,
                        progress: bool = True, calibration: str | Path | None = None,
                        rotation: str = "hadamard", smoothing_alpha: float | None = DEFAULT_ALPHA,
                        rounding: str = "gptq") -> QuantizeSummary:
    """Quantise the float checkpoint `model` (folder or bundled name) into the folder `out`;
    `calibration`: a text file for the calibrated recipe (None: round-to-nearest, streamed)."""
    from safetensors.torch import save_file

    from deepserve.engine.args import EngineArgs

    recipe = plan(method, asymmetric, calibration, rotation, smoothing_alpha, rounding)
    config = EngineArgs(model=None if model is None else str(model), device="cpu",
                        dtype="float32").create_engine_config()
    folder, out = Path(config.model), Path(out)
    if quantization_from_hf_config(config.model_config.hf_config) is not None:
        raise ValueError(f"{folder} is already a deepserve-quantised checkpoint")
    if out.resolve() == folder.resolve():
        raise ValueError("--out must differ from the input folder")
    if recipe.needs_calibration:
        tensors, num_tokens = _calibrated(config, Path(calibration), recipe, progress)
    else:
        tensors, num_tokens = _streamed(config, recipe.method, progress), 0
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_config(folder, out, recipe, num_tokens)
    _copy_side_files(folder, out)
    return _summary(out, recipe, tensors, config)


def _summary(out: Path, recipe: Recipe, tensors: dict[str, torch.Tensor], config) -> QuantizeSummary:
    from deepserve.loader.safetensors_loader import find_checkpoint_files

    bytes_in = sum(p.stat().st_size for p in find_checkpoint_files(config.model).files)
    quantized = sum(1 for t in tensors.values() if t.dtype in (torch.int8, torch.float8_e4m3fn) and t.dim() == 2)
    kept = sum(1 for n in tensors if not n.endswith(("_scale", "_zero_point"))) - quantized
    bytes_out = sum(t.numel() * t.element_size() for t in tensors.values())
    return QuantizeSummary(out, recipe.method, quantized, kept, bytes_in, bytes_out, recipe)


def _float_model(config):
    """The float32 model of `config`, loaded but not processed (dense weights, as in the checkpoint)."""
    from deepserve.loader.model_loader import build_model, load_checkpoint, model_class
    from deepserve.loader.safetensors_loader import find_checkpoint_files

    net = build_model(model_class(config.model_config), config.model_config, "auto", "cpu", torch.float32)
    load_checkpoint(net, find_checkpoint_files(config.model), progress=False)
    return net.eval()


def _calibrated(config, calibration: Path, recipe: Recipe, progress: bool) -> tuple[dict[str, torch.Tensor], int]:
    from deepserve.loader.safetensors_loader import WeightStream, find_checkpoint_files
    from deepserve.loader.tokenizer import load_tokenizer
    from deepserve.quant.calibrated import export_tensors, prepare, round_linears

    text = calibration.read_text(encoding="utf-8")
    token_ids = load_tokenizer(config.model).encode(text)
    if len(token_ids) < 2:
        raise ValueError(f"{calibration}: the calibration text needs at least 2 tokens")
    net = _float_model(config)
    stats = prepare(net, token_ids, recipe)
    with _progress(progress, f"rounding ({recipe.rounding})") as bar:
        task = bar.add_task("", total=len(stats.act_max))
        rounded = round_linears(net, stats, recipe, on_layer=lambda name: bar.update(task, advance=1, description=name))
    del stats
    return export_tensors(net, WeightStream(find_checkpoint_files(config.model)), rounded), len(token_ids)


def _streamed(config, method: str, progress: bool) -> dict[str, torch.Tensor]:
    """Round-to-nearest, one checkpoint tensor at a time (no calibration), for the registered `method`."""
    from deepserve.loader.model_loader import build_model, model_class
    from deepserve.loader.safetensors_loader import WeightStream, check_all_filled, find_checkpoint_files

    net = build_model(model_class(config.model_config), config.model_config, "auto", "cpu", torch.float32)
    files = find_checkpoint_files(config.model)
    tensors: dict[str, torch.Tensor] = {}
    filled: set[str] = set()
    with _progress(progress) as bar:
        task = bar.add_task("", total=len(files.files))
        stream = WeightStream(files, on_file=lambda p: bar.update(task, advance=1, description=p.name))
        for hf_name, tensor in stream:
            params = net.load_weights([(hf_name, tensor)])
            filled |= set(params)
            if tensor.dim() == 2 and params and all(_quantizable(net, p) for p in params):
                tensors.update(_rounded(hf_name, tensor.float(), method))
            else:
                tensors[hf_name] = tensor.contiguous()
    check_all_filled([n for n, _ in net.named_parameters()], filled, files)
    return tensors


def _rounded(name: str, w: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """One float weight [out, in] rounded to nearest for `method`: {name: q, name_scale: scale[, name_zero_point]}."""
    if method == "fp8":
        from deepserve.quant.fp8 import quantize_weight_fp8_ref

        q, scale = quantize_weight_fp8_ref(w)
        return {name: q.contiguous(), name + "_scale": scale}
    from deepserve.quant.int8 import quantize_per_channel_ref

    rotated = _rotated(w, hadamard_block_of(method))
    q, scale, zp = quantize_per_channel_ref(rotated, symmetric=not method.endswith("-asym"))
    return {name: q, name + "_scale": scale, **({} if zp is None else {name + "_zero_point": zp})}


def _rotated(w: torch.Tensor, block: int | None) -> torch.Tensor:
    """w [out, in] -> w H (block-diagonal Hadamard over the input channels), or w without a block."""
    if block is None:
        return w
    from deepserve.quant.hadamard import block_size_for, rotate_blocks

    return rotate_blocks(w.double(), block_size_for(w.shape[1], block)).float()


def _write_config(folder: Path, out: Path, recipe: Recipe, num_tokens: int) -> None:
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = {**quantization_config(recipe.method), "recipe": recipe.record(num_tokens)}
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


def _copy_side_files(folder: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file but weights and config."""
    for path in folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(path, out / path.name)
