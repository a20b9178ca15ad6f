"""`InputScaled`: a layer whose input is divided by stored per-channel scales first.

SmoothQuant (quant/baselines/smoothing.py) moves quantization difficulty between a Linear's
inputs and its weights; where no norm can absorb the 1/s, the scale is kept explicitly around the
quantized layer. (AWQ folds every scale it uses, so it stores none.) It is a stored module kind of the quantized-checkpoint format
(checkpoint.py), so it lives beside the other stored layouts rather than with the methods.
"""
from __future__ import annotations

import torch
from torch import nn


class InputScaled(nn.Module):
    """`inner(x / scale)`: the input rescaling of a Linear with no norm to fold it into.

    scale is float16 [K] (the stored numbers; the weight was multiplied by exactly these values).
    """

    def __init__(self, inner: nn.Module, scale: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("scale", scale.detach().to(torch.float16).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x / self.scale.to(x.dtype))

    @property
    def in_features(self) -> int:
        return int(self.scale.numel())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}"
