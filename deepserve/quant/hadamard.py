"""W8A8 on block-Hadamard-rotated inputs ("int8-hadamard"): per-token int8 of x H, weights W H.

    H = blockdiag(H_b, ..., H_b)     [in, in], H_b the normalised Sylvester Hadamard matrix of order
                                     b (entries +-1/sqrt(b), symmetric, orthogonal: H_b H_b = I)
    y = x W^T = (x H)(W H)^T         the layer computes the same function in float

A dynamic per-token int8 scale is set by the token's largest |x_j|; a few outlier channels (SmolLM2's
activations reach 100x their median in some channels) leave the other channels with few levels.
Rotating each block of b channels spreads an outlier over b channels, so the token's int8 grid fits
its values far better; on the default model this cut the activation part of the W8A8 error (mean
KL to float32) several-fold (benchmarks/results/quant_accuracy.md). The rotation costs one small
matmul per layer input at run time ([tokens, in/b, b] @ [b, b], b = 64: 64 / out_features of the
GEMM's work, 2-11% on SmolLM2); it is the one runtime op a deepserve int8-hadamard checkpoint needs.
It runs in the activations' dtype and then hands x H to Int8W8A8Method (its CUDA kernels included);
in bf16 that is one more rounding before the int8 quantisation (measured on CPU float32 only).

Weights: `process_weights_after_loading` rotates the layer's float weight (original basis) and
quantises it per output channel like Int8W8A8Method. A checkpoint stores the int8 weight of W H (as
`deepserve quantize` rounds it, see quant/gptq.py); `DequantizingStream(..., hadamard_block=b)`
rotates the dequantised weight back (H is its own inverse), and quantising it again here gives the
stored integers back (H_b entries are powers of two: the round trip is exact to float rounding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepserve.layers.linear_method import LinearMethod
from deepserve.quant.int8 import Int8W8A8Method

DEFAULT_BLOCK = 64


def hadamard_matrix(order: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix [order, order] (order a power of two)."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(order)).to(dtype=dtype, device=device)


def block_size_for(features: int, block: int = DEFAULT_BLOCK) -> int:
    """The rotation block for `features` input channels: the largest power of two <= block dividing it."""
    b = block
    while b > 1 and features % b:
        b //= 2
    return b


def rotate_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] -> x @ blockdiag(H_b) [..., K] (K divisible by b), computed in x's dtype."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"{k} features are not a multiple of the Hadamard block {block}")
    h = hadamard_matrix(block, x.dtype, x.device)
    return (x.reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)  # [..., K/b, b] -> [..., K]


class Int8HadamardW8A8Method(LinearMethod):
    """Dynamic W8A8 on block-Hadamard-rotated inputs; the GEMM is Int8W8A8Method's."""

    symmetric = True

    def __init__(self, block: int = DEFAULT_BLOCK):
        self.block, self.inner = block, Int8W8A8Method()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """layer.weight float [out, in] (original basis) -> int8 of W H + weight_scale [out]."""
        self.block = block_size_for(layer.weight.shape[1], self.block)
        if layer.weight.dtype != torch.int8:
            with torch.no_grad():
                rotated = rotate_blocks(layer.weight.detach().double(), self.block).to(layer.weight.dtype)
            layer.weight = nn.Parameter(rotated, requires_grad=False)
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] float -> [..., out] in x's dtype."""
        return self.inner.apply(layer, rotate_blocks(x, self.block), bias)
