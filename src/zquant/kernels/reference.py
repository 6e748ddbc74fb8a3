"""The plain-PyTorch reference backend: the ground truth every fast kernel is tested against.

It computes exactly what the integer pipeline computes: int8 activations x int8 weights
accumulated in int32 (``torch._int_mm``), then the int32 result scaled by the token scale and the
weight scale, plus the bias. It runs on any device and any shape, with no extension to build.

A token with a NaN or an infinity gets token scale NaN (`zquant.primitives`), so its output row is
NaN, as a floating-point layer's would be, and attention then spreads it as it does in floating
point; the other tokens' rows are unaffected here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import primitives as P


def int_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N], exact."""
    if a.shape[1] == 1:
        # torch._int_mm returns wrong values for K = 1 on CPU (torch 2.13); the outer product is exact.
        return a.to(torch.int32) * b_t.to(torch.int32).t()
    if a.device.type == "cpu" or (a.shape[0] > 16 and a.shape[1] % 8 == 0 and b_t.shape[0] % 8 == 0):
        return torch._int_mm(a, b_t.t())
    # CUDA's _int_mm wants M > 16 and multiples of 8: int32 matmul is not supported on GPU, but
    # float64 holds every int8 x int8 dot product up to K = 2^38 exactly.
    return (a.double() @ b_t.double().t()).to(torch.int32)


def quantize_input(module, x2: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(q int8 [M, K], token scale float32 [M], zero int32 [M] or None) for the layer's act mode."""
    act = module.act_spec
    if act.mode == "dynamic":
        return P.quantize_per_token(x2, act.symmetric)
    return P.quantize_per_tensor(x2, module.act_scale), P.static_token_scales(x2, module.act_scale), None


def _int_linear(module, q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """float32 [M, N] = dequant(int8 activations [M, K] x int8 weights), without bias."""
    w = module.weight_spec
    wq = module.int_weight()                                          # int8 [N, K]
    if w.granularity == "input_group":
        # GPTQ-style layout: one integer GEMM per input group, each scaled by its own weight scale.
        gs = w.group_size
        acc = torch.zeros(q.shape[0], wq.shape[0], dtype=torch.float32, device=q.device)
        for g, k0 in enumerate(range(0, q.shape[1], gs)):
            part = int_matmul(q[:, k0:k0 + gs].contiguous(), wq[:, k0:k0 + gs].contiguous()).float()
            if zero is not None:
                part -= zero[:, None].float() * wq[:, k0:k0 + gs].sum(dim=1, dtype=torch.int32).float()[None, :]
            acc += part * module.wscale[:, g][None, :]
        out = acc
    else:
        acc = int_matmul(q, wq)                                       # int32 [M, N]
        if zero is not None:
            # sum_k (q - z) w = q.w - z * rowsum(w): the asymmetric zero-point correction.
            acc = acc - zero[:, None] * wq.sum(dim=1, dtype=torch.int32)[None, :]
        out = acc.float() * module.row_scale()[None, :]
    return out * scale[:, None]


def linear(module, x: Tensor) -> Tensor:
    """Reference forward of a `QuantLinear` for ``x`` [..., K]; returns [..., N] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if module.act_spec.enabled:
        out = _int_linear(module, *quantize_input(module, x2))
    else:
        # A16 (weight only): the float activation meets the dequantized weight.
        out = x2.float() @ module.dequantized_weight().t()
    if module.bias is not None:
        out = out + module.bias.float()
    return out.to(x.dtype).view(*shape[:-1], module.out_features)
