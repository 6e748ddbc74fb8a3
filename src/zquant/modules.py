"""`QuantLinear`: a linear layer whose weight is really stored as INT8 or packed INT4.

Its forward goes through the single kernel dispatch point, `zquant.kernels.qlinear`, so a faster
backend plugs in without touching this module. `from_float` never mutates its source.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from . import primitives as P
from .config import ActQuant, LayerQuant, WeightQuant


def is_float_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a GPT-2 style ``Conv1D``: the layers zquant quantizes."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features K, out_features N) of an ``nn.Linear``, ``Conv1D`` (weight [K, N]) or `QuantLinear`."""
    if isinstance(module, QuantLinear):
        return module.in_features, module.out_features
    n, k = float_weight(module)[0].shape
    return k, n


def float_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [N, K], bias [N] or None) of an ``nn.Linear`` or a GPT-2 style ``Conv1D``.

    ``Conv1D`` stores its weight transposed, as [K, N]; this returns the [N, K] view.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if is_float_linear(module):
        return module.weight.t(), module.bias
    raise TypeError(f"cannot quantize a {type(module).__name__}: expected nn.Linear or Conv1D")


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as integers plus scales.

    Buffers (all persistent, all saved):
      ``qweight``  int8 [N, K] (8-bit) or uint8 [N, ceil(K/2)] (4-bit, two values per byte)
      ``wscale``   float32 weight scales, shaped by the weight granularity (see `primitives.weight_scales`)
      ``bias``     float [N] (if the source had one)
      ``act_scale`` float32 0-d, the calibrated input scale (static activation mode only)
    """

    # quantization scales: stored float32 whatever the float parts' dtype (`zquant.float_parts`), and
    # finite and > 0 in any checkpoint (checked at load)
    scale_buffers = ("wscale", "act_scale")

    def __init__(self, in_features: int, out_features: int, spec: LayerQuant, bias: bool = True,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if spec.weight is None:
            raise ValueError("QuantLinear needs a weight spec; keep floating-point layers as nn.Linear")
        w = spec.weight
        if w.granularity == "row_group" and w.groups is None:
            raise ValueError("resolve the number of row groups before building a QuantLinear")
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        n, k = out_features, in_features
        cols = (k + 1) // 2 if w.bits == 4 else k
        self.register_buffer("qweight", torch.zeros(n, cols, dtype=torch.uint8 if w.bits == 4 else torch.int8))
        self.register_buffer("wscale", torch.ones(P.scale_shape(w, n, k), dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(n, dtype=dtype) if bias else None)
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32) if spec.act.mode == "static" else None)
        self._row_scale: Tensor | None = None
        self.kernel_cache: dict = {}   # backends may keep prepacked data here (never saved)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerQuant, act_absmax: Tensor | None = None) -> "QuantLinear":
        """Quantize an ``nn.Linear`` or ``Conv1D``; ``act_absmax`` is required for static activations."""
        weight, bias = float_weight(module)
        n, k = weight.shape
        layer = cls(k, n, spec, bias=bias is not None, dtype=weight.dtype)
        layer.set_weight(weight.detach(), None if bias is None else bias.detach())
        if spec.act.mode == "static":
            if act_absmax is None:
                raise ValueError("static activation quantization needs a calibrated act_absmax")
            layer.act_scale.copy_(P.static_scale(act_absmax))
        return layer

    @torch.no_grad()
    def set_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Quantize a float weight [N, K] into this layer's storage."""
        w = self.spec.weight
        scales = P.weight_scales(weight, w)
        q = P.quantize_weight(weight, scales, w)
        self.qweight.copy_(P.pack_int4(q) if w.bits == 4 else q)
        self.wscale.copy_(scales)
        if bias is not None:
            self.bias.copy_(bias)
        self._row_scale = None
        self.kernel_cache.clear()

    # -- views used by the kernels --------------------------------------------------------

    @property
    def weight_spec(self) -> WeightQuant:
        return self.spec.weight

    @property
    def act_spec(self) -> ActQuant:
        return self.spec.act

    def int_weight(self) -> Tensor:
        """The integer weight as int8 [N, K] (unpacked if INT4)."""
        if self.spec.weight.bits == 4:
            return P.unpack_int4(self.qweight, self.in_features)
        return self.qweight

    def row_scale(self) -> Tensor:
        """Per-output-row weight scale float32 [N] (row and row_group granularities)."""
        if self._row_scale is None or self._row_scale.device != self.wscale.device:
            w = self.spec.weight
            if w.granularity == "input_group":
                raise ValueError("input_group weights have no per-row scale")
            self._row_scale = P.expand_weight_scales(
                self.wscale, (self.out_features, self.in_features), w).reshape(-1).contiguous()
        return self._row_scale

    def dequantized_weight(self) -> Tensor:
        """Float32 weight [N, K] that this layer represents."""
        return P.dequantize_weight(self.int_weight(), self.wscale, self.spec.weight)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._row_scale = None
        self.kernel_cache.clear()

    # -- forward --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return kernels.qlinear(self, x)

    def extra_repr(self) -> str:
        w, a = self.spec.weight, self.spec.act
        g = {"row": "per-row", "row_group": f"{self.wscale.numel()} row groups",
             "input_group": f"input groups of {w.group_size}"}[w.granularity]
        act = "fp" if a.mode == "none" else f"int8 {a.mode}{'' if a.symmetric else ' asym'}"
        return f"in={self.in_features}, out={self.out_features}, W{w.bits} {g}, act={act}, bias={self.bias is not None}"


class FakeQuantLinear(nn.Module):
    """The trainable floating-point twin of `QuantLinear`, used by LKD.

    It holds a float ``weight`` [N, K] (always [N, K], also for a GPT-2 ``Conv1D`` source) and
    ``bias`` [N] as parameters. The forward fake-quantizes the weight with the layer's
    `WeightQuant` and the input with its `ActQuant` (token-wise dynamic, static with the
    calibrated ``act_scale``, or none), both with a straight-through gradient, then runs a float
    ``F.linear``. Its output therefore matches, up to float rounding, the `QuantLinear` that
    `to_quant()` builds from the same weight.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, spec: LayerQuant, act_scale: Tensor | None = None):
        super().__init__()
        if spec.weight is None or (spec.weight.granularity == "row_group" and spec.weight.groups is None):
            raise ValueError("FakeQuantLinear needs a resolved weight spec (bits and, for row groups, groups)")
        if spec.act.mode == "static" and act_scale is None:
            raise ValueError("static activation quantization needs a calibrated act_scale")
        self.spec = spec
        self.out_features, self.in_features = weight.shape
        # A Conv1D weight arrives as a transposed view: store a contiguous [N, K] copy.
        self.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("act_scale", None if spec.act.mode != "static" else act_scale.detach().float().clone())

    @classmethod
    def from_float(cls, module: nn.Module, spec: LayerQuant, act_absmax: Tensor | None = None) -> "FakeQuantLinear":
        """Copy an ``nn.Linear`` or ``Conv1D`` (never mutated); ``act_absmax`` for static activations."""
        weight, bias = float_weight(module)
        scale = None if act_absmax is None else P.static_scale(act_absmax)
        return cls(weight, bias, spec, scale)

    def forward(self, x: Tensor) -> Tensor:
        import torch.nn.functional as F
        w, a = self.spec.weight, self.spec.act
        weight = P.fake_quantize_weight(self.weight, w)
        if a.mode == "dynamic":
            x = P.fake_quantize_per_token(x, a.symmetric)
        elif a.mode == "static":
            x = P.fake_quantize_per_tensor(x, self.act_scale)
        return F.linear(x, weight, self.bias)

    @torch.no_grad()
    def to_quant(self) -> QuantLinear:
        """The real `QuantLinear` for the current weight (this module is left as it is)."""
        layer = QuantLinear(self.in_features, self.out_features, self.spec, bias=self.bias is not None,
                            dtype=self.weight.dtype)
        layer.set_weight(self.weight, self.bias)
        if self.act_scale is not None:
            layer.act_scale.copy_(self.act_scale)
        return layer

    def extra_repr(self) -> str:
        w, a = self.spec.weight, self.spec.act
        return f"in={self.in_features}, out={self.out_features}, W{w.bits} fake, act={a.mode}"
