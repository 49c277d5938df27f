"""`load_model(engine_config) -> nn.Module`: weights in place, eval mode, target dtype and device.

    1. dtype: float32 on CPU whatever the checkpoint ("auto"); the checkpoint's dtype elsewhere.
    2. class from `deepserve.models.registry` by config.json's `architectures[0]`.
    3. build the modules directly on the target device under the target default dtype.
    4. fill: dummy weights, or every tensor of the safetensors files (rich progress per shard);
       a parameter left unfilled is an error naming it and the files searched. Quantised
       checkpoints: `deepserve quantize` int8 ones are dequantised on the way in; DeepSeek block-FP8
       ones are kept in fp8 or dequantised, by the serving mode (`deepserve/quant/block_fp8.py`).
    5. process_weights_after_loading: each layer's method (quantisation, packed CPU weights).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from deepserve.config import EngineConfig, ModelConfig
from deepserve.loader.dummy import fill_dummy_weights
from deepserve.layers.linear_method import process_weights_after_loading
from deepserve.loader.errors import LoadError
from deepserve.loader.safetensors_loader import (
    CheckpointFiles, WeightStream, check_all_filled, find_checkpoint_files, load_into,
)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
LOAD_FORMATS = ("auto", "safetensors", "dummy")


def parse_dtype(name: str, source: str = "dtype") -> torch.dtype:
    try:
        return _DTYPES[str(name).removeprefix("torch.").lower()]
    except KeyError:
        raise LoadError(f"{source}: unsupported dtype {name!r}; use one of {', '.join(_DTYPES)}") from None


def resolve_dtype(engine_config: EngineConfig) -> torch.dtype:
    """The dtype parameters are built in (see the module docstring)."""
    if engine_config.dtype != "auto":
        return parse_dtype(engine_config.dtype)
    if torch.device(engine_config.device).type == "cpu":
        return torch.float32
    return _DTYPES.get(str(engine_config.model_config.torch_dtype).lower(), torch.bfloat16)


def model_class(model_config: ModelConfig) -> type[nn.Module]:
    """The registered class for config.json's architecture; LoadError listing the supported ones."""
    from deepserve.models.registry import get_model_class  # lazy: pulls in torch model code

    try:
        return get_model_class(model_config.architecture)
    except (KeyError, ValueError) as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        raise LoadError(f"config.json: architecture {model_config.architecture!r}: {message}") from None


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cls: type[nn.Module], model_config: ModelConfig, attention_mode: str,
                device: str, dtype: torch.dtype) -> nn.Module:
    """Modules created on `device` with floating parameters in `dtype` (explicit dtypes kept)."""
    with torch.device(device), _default_dtype(dtype):
        return cls(model_config, attention_mode=attention_mode)


class _NoProgress:
    """Stands in for rich's Progress when the bar is off or rich is not installed."""

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None


def _progress(enabled: bool):
    """A weight-loading bar on stderr, so piped stdout (generated text) stays clean. rich is
    imported only here: the offline benchmarks run where it is not installed."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return _NoProgress()
    if not enabled:
        return _NoProgress()
    return Progress(TextColumn("loading weights"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.description}"), TimeElapsedColumn(),
                    transient=True, console=Console(stderr=True))


def _expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    # Parameters with a `weight_loader` are sharded or fused: the model checks those itself.
    return {n: p.shape for n, p in model.named_parameters() if not hasattr(p, "weight_loader")}


@torch.no_grad()
def load_checkpoint(model: nn.Module, files: CheckpointFiles, progress: bool = True,
                    quantized: str | None = None, transform: Callable[[WeightStream], Iterable] | None = None
                    ) -> set[str]:
    """Fill `model` from safetensors files; LoadError on a bad file, shape or a missing tensor.
    `quantized`: the method that wrote a `deepserve quantize` checkpoint; its int8 weights are
    dequantised to float on the way in (the layer's method quantises them again). `transform`
    wraps the stream of (name, tensor) (block-FP8 checkpoints: `BlockFp8Plan.wrap`)."""
    with _progress(progress) as bar:
        task = bar.add_task("", total=len(files.files))
        stream = WeightStream(files, _expected_shapes(model),
                              on_file=lambda path: bar.update(task, advance=1, description=path.name))
        if quantized is not None:
            from deepserve.quant.int8 import DequantizingStream

            stream = DequantizingStream.for_method(stream, quantized)
        if transform is not None:
            stream = transform(stream)
        filled = load_into(model, stream)
    check_all_filled([name for name, _ in model.named_parameters()], filled, files)
    return filled


def load_model(engine_config: EngineConfig, progress: bool = True) -> nn.Module:
    """The model of `engine_config`, weights loaded, in eval mode."""
    fmt = engine_config.load_format
    if fmt not in LOAD_FORMATS:
        raise LoadError(f"unknown load format {fmt!r}; use one of {', '.join(LOAD_FORMATS)}")
    cls = model_class(engine_config.model_config)
    files = None if fmt == "dummy" else find_checkpoint_files(_model_folder(engine_config.model))
    model = build_model(cls, engine_config.model_config, engine_config.attention_mode,
                        engine_config.device, resolve_dtype(engine_config))
    quantization = engine_config.quantization
    if files is None:
        fill_dummy_weights(model, seed=engine_config.seed)
    else:
        quantization = _load_weights(model, files, engine_config, progress)
    process_weights_after_loading(model, quantization=None if quantization == "none" else quantization)
    if engine_config.quantize_lm_head:
        from deepserve.quant.lm_head import quantize_lm_head

        quantize_lm_head(model)
    return model.eval()


def _load_weights(model: nn.Module, files: CheckpointFiles, engine_config: EngineConfig,
                  progress: bool) -> str | None:
    """Fill `model` from the checkpoint; the quantization its linear layers get afterwards (a
    block-FP8 checkpoint resolves its serving mode here, see deepserve/quant/block_fp8.py)."""
    from deepserve.quant import quantization_from_hf_config
    from deepserve.quant.block_fp8 import checkpoint_block_size

    hf_config = engine_config.model_config.hf_config
    block = checkpoint_block_size(hf_config)
    if block is None:
        load_checkpoint(model, files, progress, quantized=quantization_from_hf_config(hf_config))
        return engine_config.quantization
    from deepserve.quant.block_fp8_loading import plan_block_fp8_load

    plan = plan_block_fp8_load(model, files, block, engine_config.quantization, engine_config.device,
                               resolve_dtype(engine_config))
    load_checkpoint(model, files, progress, transform=plan.wrap)
    plan.finish(model)
    return plan.mode


def float_weights(stream: Iterable, engine_config: EngineConfig) -> Iterable:
    """`stream` of (name, tensor) with a quantised checkpoint's weights dequantised to the model
    dtype, for modules loaded on their own (the MTP layer): `load_into(mtp, float_weights(stream, cfg))`."""
    from deepserve.quant import quantization_from_hf_config
    from deepserve.quant.block_fp8 import checkpoint_block_size

    hf_config = engine_config.model_config.hf_config
    quantized = quantization_from_hf_config(hf_config)
    if quantized is not None:
        from deepserve.quant.int8 import DequantizingStream

        return DequantizingStream.for_method(stream, quantized)
    block = checkpoint_block_size(hf_config)
    if block is None:
        return stream
    from deepserve.quant.block_fp8_loading import dequantizing

    return dequantizing(stream, block, engine_config.device, resolve_dtype(engine_config))


def _model_folder(model: str) -> Path:
    from deepserve.loader.resolve import resolve_model_path

    return resolve_model_path(model)
