"""Pure quantization primitives: tensors in, tensors out.

No modules, no device moves, no printing. Conventions used everywhere in zquant:

* Symmetric quantization uses the restricted range ``[-qmax, qmax]`` with ``qmax = 2**(bits-1) - 1``
  (127 for INT8, 7 for INT4) and ``scale = absmax / qmax``, the paper's formula.
* Rounding is round-half-to-even (``torch.round``), the same as ``rintf`` in the C++ kernels.
* A group whose values are all zero gets scale 1.0 (its integers are all zero anyway), so no
  division by zero ever happens.
* A group or token with a NaN or an infinity (or an asymmetric range wider than float32) gets
  scale NaN and integers 0: it dequantizes to NaN, as floating point would propagate it, instead
  of to finite numbers. The C++ kernels do the same (csrc/zquant_cpu.cpp, ``nonfinite_row``).
* Weights are ``[N, K]`` (output rows x input columns), activations ``[M, K]`` (tokens x features).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import WeightQuant


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric ``bits``-bit integer (restricted range)."""
    return 2 ** (bits - 1) - 1


def _scale(span: Tensor, levels: float) -> Tensor:
    """``span / levels`` (span: an absmax or a range); 1.0 where it is 0, NaN where it is not finite."""
    span = span.float()
    scale = torch.where(span > 0, span / levels, torch.ones_like(span))
    return torch.where(span.isfinite(), scale, torch.full_like(span, math.nan))


def _safe_scale(absmax: Tensor, bits: int) -> Tensor:
    return _scale(absmax, qmax(bits))


def _to_int8(q: Tensor) -> Tensor:
    """Rounded, clamped float integers -> int8, with the NaNs of a non-finite group or token as 0."""
    return q.nan_to_num_(0.0).to(torch.int8)


def rows_per_group(n_rows: int, groups: int) -> int:
    """Rows in one ZeroQuant row group; the last group may be shorter when ``groups`` does not divide N."""
    return math.ceil(n_rows / max(1, min(groups, n_rows)))


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

def scale_shape(spec: WeightQuant, n: int, k: int) -> tuple[int, ...]:
    """Shape of the float32 scales of an [N, K] weight quantized with ``spec`` (see `weight_scales`)."""
    if spec.granularity == "row":
        return (n,)
    if spec.granularity == "row_group":
        if spec.groups is None:
            raise ValueError("row_group granularity needs `groups`")
        return (-(-n // rows_per_group(n, spec.groups)),)
    if spec.granularity == "input_group":
        return (n, -(-k // spec.group_size))
    raise ValueError(f"unknown granularity {spec.granularity!r}")


def weight_scales(w: Tensor, spec: WeightQuant) -> Tensor:
    """Symmetric ``spec.bits`` scales for a weight ``w`` [N, K].

    Returns float32 scales shaped by ``spec.granularity`` (`scale_shape`):
      ``row``         -> [N]
      ``row_group``   -> [ceil(N / rows_per_group(N, groups))], one per block of consecutive rows
      ``input_group`` -> [N, ceil(K / group_size)]
    """
    n, k = w.shape
    shape = scale_shape(spec, n, k)
    a = w.detach().abs().float()
    if spec.granularity == "row":
        return _safe_scale(a.amax(dim=1), spec.bits)
    if spec.granularity == "row_group":
        r = rows_per_group(n, spec.groups)
        row_max = torch.nn.functional.pad(a.amax(dim=1), (0, shape[0] * r - n))  # zeros never raise a max
        return _safe_scale(row_max.view(-1, r).amax(dim=1), spec.bits)          # [G]
    gs = spec.group_size
    a = torch.nn.functional.pad(a, (0, shape[1] * gs - k)).view(n, -1, gs)      # [N, K/gs, gs]
    return _safe_scale(a.amax(dim=2), spec.bits)


def expand_weight_scales(scales: Tensor, shape: tuple[int, int], spec: WeightQuant) -> Tensor:
    """Broadcast ``scales`` to something that multiplies a [N, K] tensor: [N, 1] or [N, K]."""
    n, k = shape
    if spec.granularity == "row":
        return scales.view(n, 1)
    if spec.granularity == "row_group":
        return scales.repeat_interleave(rows_per_group(n, spec.groups))[:n].view(n, 1)
    if spec.granularity == "input_group":
        return scales.repeat_interleave(spec.group_size, dim=1)[:, :k]
    raise ValueError(f"unknown granularity {spec.granularity!r}")


def quantize_weight(w: Tensor, scales: Tensor, spec: WeightQuant) -> Tensor:
    """Integer weight [N, K] int8 (values in ``[-qmax, qmax]``) for the given scales."""
    s = expand_weight_scales(scales, tuple(w.shape), spec)
    return _to_int8(torch.round(w.detach().float() / s).clamp_(-qmax(spec.bits), qmax(spec.bits)))


def dequantize_weight(q: Tensor, scales: Tensor, spec: WeightQuant) -> Tensor:
    """Float32 weight [N, K] from integers [N, K] and scales."""
    return q.float() * expand_weight_scales(scales, tuple(q.shape), spec)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

def quantize_per_token(x: Tensor, symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token-wise dynamic INT8 quantization of ``x`` [M, K].

    Returns ``(q int8 [M, K], scale float32 [M], zero_point int32 [M] or None)`` with
    ``x ~= (q - zero_point) * scale``. Symmetric: ``scale = absmax / 127``, ``q`` in [-127, 127].
    Asymmetric: the token's range, widened to include 0, maps onto [-128, 127]. A token with a NaN
    or an infinity gets scale NaN, ``q`` 0 and zero point 0, so a linear layer's output for it is NaN.
    """
    xf = x.float()
    if symmetric:
        scale = _safe_scale(xf.abs().amax(dim=1), 8)               # amax propagates NaN
        q = _to_int8(torch.round(xf / scale[:, None]).clamp_(-127, 127))
        return q, scale, None
    lo = xf.amin(dim=1).clamp(max=0.0)
    hi = xf.amax(dim=1).clamp(min=0.0)
    scale = _scale(hi - lo, 255.0)                  # an overflowing range (hi - lo = inf) is not finite either
    zero = (-128 - torch.round(lo / scale)).clamp_(-128, 127).nan_to_num_(0.0)
    q = _to_int8((torch.round(xf / scale[:, None]) + zero[:, None]).clamp_(-128, 127))
    return q, scale, zero.to(torch.int32)


def quantize_per_tensor(x: Tensor, scale: Tensor) -> Tensor:
    """Static symmetric INT8 quantization of ``x`` [..., K] with one calibrated ``scale`` (0-d float).
    A token (a row along K) with a NaN or an infinity gets ``q`` 0 and, from `static_token_scales`,
    token scale NaN (see the module docstring)."""
    xf = x.float()
    q = torch.round(xf / scale).clamp_(-127, 127).masked_fill_(~_finite_tokens(xf)[..., None], 0)
    return _to_int8(q)


def static_token_scales(x: Tensor, scale: Tensor) -> Tensor:
    """The token scales float32 [...] of `quantize_per_tensor` for ``x`` [..., K]: ``scale``, NaN for a
    token with a NaN or an infinity (its linear output is then NaN, as in floating point)."""
    finite = _finite_tokens(x.float())
    return torch.where(finite, scale.float(), torch.full_like(finite, math.nan, dtype=torch.float32))


def _finite_tokens(xf: Tensor) -> Tensor:
    return xf.abs().amax(dim=-1).isfinite()           # amax propagates NaN; an infinity stays infinite


def static_scale(absmax: Tensor) -> Tensor:
    """The per-tensor INT8 scale for a calibrated absolute maximum."""
    return _safe_scale(absmax.reshape(()), 8)


# ---------------------------------------------------------------------------------------------
# Straight-through fake quantization (used by LKD)
# ---------------------------------------------------------------------------------------------

class _StraightThrough(torch.autograd.Function):
    """Forward: ``xq`` exactly (``x + (xq - x)`` can be off by a rounding); backward: the
    gradient passes to ``x`` unchanged. Nothing is saved for the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, xq: Tensor) -> Tensor:
        return xq.view_as(xq)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def ste(x: Tensor, xq: Tensor) -> Tensor:
    """Value of ``xq``, gradient of the identity with respect to ``x`` (straight-through)."""
    return _StraightThrough.apply(x, xq.detach())


# The fake quantizers below compute exactly ``dequantize(quantize(x))`` of the functions above
# (the same division, rounding and clamping; integers in [-127, 127] are exact in float), but on
# detached tensors with in-place steps: LKD runs them on every linear layer at every step, where
# a few extra passes over the activations cost more than the matrix products.

def fake_quantize_weight(w: Tensor, spec: WeightQuant) -> Tensor:
    """Quantize-dequantize ``w`` [N, K] with scales from ``w`` itself; straight-through gradient."""
    wd = w.detach().float()
    s = expand_weight_scales(weight_scales(wd, spec), tuple(w.shape), spec)
    deq = (wd / s).round_().clamp_(-qmax(spec.bits), qmax(spec.bits)).mul_(s)
    return ste(w, deq.to(w.dtype))


def fake_quantize_per_token(x: Tensor, symmetric: bool = True) -> Tensor:
    """Token-wise dynamic INT8 quantize-dequantize of ``x`` [..., K]; straight-through gradient."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    if symmetric:
        scale = _safe_scale(flat.abs().amax(dim=1), 8)[:, None]             # [M, 1]
        deq = (flat / scale).round_().clamp_(-127, 127).mul_(scale)
    else:
        q, scale, zero = quantize_per_token(flat, symmetric)
        deq = (q.float() - zero[:, None].float()) * scale[:, None]
    return ste(x, deq.view(x.shape).to(x.dtype))


def fake_quantize_per_tensor(x: Tensor, scale: Tensor) -> Tensor:
    """Static INT8 quantize-dequantize of ``x`` with a fixed ``scale``; straight-through gradient."""
    return ste(x, (x.detach().float() / scale).round_().clamp_(-127, 127).mul_(scale).to(x.dtype))


# ---------------------------------------------------------------------------------------------
# INT4 packing
# ---------------------------------------------------------------------------------------------

def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 values in [-8, 7] of shape [N, K] into uint8 [N, ceil(K/2)].

    Column ``2j`` goes into the low nibble of byte ``j``, column ``2j+1`` into the high nibble
    (two's complement nibbles). An odd K is padded with a zero nibble.
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8, got {q.dtype}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    n, k = q.shape
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = q.view(torch.uint8) & 0x0F                                  # two's complement nibbles
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(p: Tensor, k: int) -> Tensor:
    """Inverse of `pack_int4`: uint8 [N, ceil(K/2)] -> int8 [N, K]."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {p.dtype}")
    lo = (p & 0x0F).to(torch.int8)
    hi = (p >> 4).to(torch.int8)
    # Sign-extend a 4-bit two's complement value: (v ^ 8) - 8.
    lo = (lo ^ 8) - 8
    hi = (hi ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).view(p.shape[0], -1)[:, :k].contiguous()
