"""The attached-activation hand-off between fused kernels (part of the dispatch layer).

An op that produces a linear layer's input (a normalization, a GEMM with an activation epilogue)
may quantize its output in the same pass and attach the result to the float tensor it returns
(`QuantizedActivation`, attribute `ATTR`). A consumer uses it only if it asks for the same
quantization and the tensor was not modified in place since; otherwise it quantizes the float
tensor itself, so an attachment can never change a result. Any backend may produce or consume it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ActQuant

ATTR = "zquant_quantized"


@dataclass(frozen=True)
class QuantizedActivation:
    """A token-wise INT8 activation, attached to the float tensor it encodes.

    ``u`` uint8 [M, Kp] holds q + 128 (Kp = K rounded up to 4, padding q = 0); ``scale`` float32 [M];
    ``offset`` int32 [M] is 128 + the zero point (128 when symmetric), so x ~= (u - offset) * scale.
    """
    u: Tensor
    scale: Tensor
    offset: Tensor
    symmetric: bool
    version: int | None

    def as_reference(self, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(q int8 [M, K], scale [M], zero int32 [M] or None), the `primitives.quantize_per_token` form."""
        q = (self.u[:, :k].to(torch.int16) - 128).to(torch.int8)
        return q, self.scale, None if self.symmetric else self.offset - 128


def version_of(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:   # inference-mode tensors have no version counter
        return None


def attach(y: Tensor, u: Tensor, scale: Tensor, offset: Tensor, symmetric: bool) -> Tensor:
    """Attach the quantization (u, scale, offset) of ``y`` to ``y`` and return ``y``."""
    setattr(y, ATTR, QuantizedActivation(u, scale, offset, symmetric, version_of(y)))
    return y


def attached(x: Tensor, act: ActQuant) -> QuantizedActivation | None:
    """The quantization attached to ``x`` if it is the one ``act`` asks for and still current."""
    qa = getattr(x, ATTR, None)
    if qa is None or act.mode != "dynamic" or qa.symmetric != act.symmetric or qa.version != version_of(x):
        return None
    return qa
