"""Load the checkpoint's MTP layer (model.layers.{num_hidden_layers}.*) as a `DeepseekMTP`.

Its embedding and head are the main model's Parameters when the checkpoint has no copies of them or
copies equal to the main model's (DeepSeek-V3 ships equal copies); different copies are kept.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deepserve.config import EngineConfig
from deepserve.loader.dummy import fill_dummy_weights
from deepserve.loader.model_loader import build_model, float_weights, resolve_dtype
from deepserve.loader.resolve import resolve_model_path
from deepserve.loader.safetensors_loader import (CheckpointFiles, WeightStream, check_all_filled,
                                                find_checkpoint_files, load_into)
from deepserve.models.deepseek_mtp import DeepseekMTP

# Our MTP parameter -> the main model's parameter it may share.
_SHARED = {"embed_tokens.weight": "model.embed_tokens.weight",
           "shared_head.head.weight": "lm_head.weight"}


def load_mtp(config: EngineConfig, main_model: nn.Module) -> DeepseekMTP:
    """The MTP layer of `config`'s checkpoint, on the main model's device and dtype, eval mode."""
    v3 = bool(getattr(main_model, "v3_defaults", True))
    mtp = build_model(lambda cfg, attention_mode: DeepseekMTP(cfg, attention_mode, v3),
                      config.model_config, config.attention_mode, config.device, resolve_dtype(config))
    if config.load_format == "dummy":
        fill_dummy_weights(mtp, seed=config.seed + 1)
    else:
        files = find_checkpoint_files(Path(resolve_model_path(config.model)))
        _load(mtp, files, main_model, config)
    share_identical_weights(mtp, main_model)
    process_mtp_weights(mtp, main_model)
    return mtp.eval()


def process_mtp_weights(mtp: DeepseekMTP, main_model: nn.Module) -> None:
    """`process_weights_after_loading` (float: the MTP layer is never quantised) for the MTP's own
    modules, as the main model's loader did for its layers: the merged q / kv_a projection, on CUDA
    the folded shared experts and the router's half-precision weight, on CPU packed float32 GEMMs.
    Modules holding the main model's Parameters (the shared embedding and head) keep what the main
    model's processing left them."""
    shared = {id(p) for p in main_model.parameters()}
    for module in list(mtp.modules()):
        hook = getattr(module, "process_weights_after_loading", None)
        if callable(hook) and not any(id(p) in shared for p in module.parameters(recurse=False)):
            hook()


def _load(mtp: DeepseekMTP, files: CheckpointFiles, main_model: nn.Module, config: EngineConfig) -> None:
    """Fill from the checkpoint; the shareable copies it lacks are taken from the main model. A
    quantised checkpoint's weights (block-FP8, deepserve int8 / fp8) arrive dequantised: the MTP layer
    runs in float. (Reads every tensor of the checkpoint: fine for small ones; a name filter is
    left to do.)"""
    main, ours = dict(main_model.named_parameters()), dict(mtp.named_parameters())
    with torch.no_grad():
        for name, theirs in _SHARED.items():  # overwritten below where the checkpoint has a copy
            ours[name].copy_(main[theirs])
    filled = load_into(mtp, float_weights(WeightStream(files), config))
    check_all_filled([n for n in ours if n not in _SHARED], filled, files)


def share_identical_weights(mtp: DeepseekMTP, main_model: nn.Module) -> None:
    """Replace the MTP's embedding / head by the main model's Parameters where they are equal."""
    main = dict(main_model.named_parameters())
    for ours, theirs in _SHARED.items():
        module_path, _, attr = ours.rpartition(".")
        module = mtp.get_submodule(module_path)
        if theirs in main and torch.equal(getattr(module, attr), main[theirs]):
            setattr(module, attr, main[theirs])
