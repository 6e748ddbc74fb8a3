"""The CPU fast path: backend ``cpu`` (priority 10), an AVX-512 VNNI INT8 GEMM in C++.

One call does what the reference does in many eager ops: token-wise quantization of the input
(unless the producer of the input already did it, see below), the INT8 x INT8 -> INT32 GEMM
against a prepacked weight, and the dequantizing epilogue (int32 x weight scale x token scale +
bias, optionally followed by an activation), applied to the accumulator registers and written
once. The extension is a Python module (pybind11), called directly: through ``torch.ops`` each
call would cost ~2 µs more. Weights are prepacked on first use into ``module.kernel_cache["cpu"]``
(never saved; cleared when the weights change); INT4 weights stay packed two per byte and are
unpacked in registers inside the GEMM's inner loop.

Fused quantization: the norm and activation-epilogue ops quantize their output in the same pass
and attach it (`zquant.kernels.activation`); the GEMM consumes an attached quantization instead of
quantizing its input again.

Numerics: bit-identical to the reference path, fused or not. Quantization divides by the scale and
rounds half to even like ``torch.round``; a token with a NaN or an infinity gets scale NaN, so its
output row is NaN in both paths (NaN propagates as in floating point; the finite check rides on
the abs-max reduction and costs nothing measurable); the epilogue rounds like the reference's separate
multiply and add; the fused RMSNorm sums in the order of torch's own reduction; the fused SiLU
(gated MLPs) uses the exp torch's kernel uses, including its scalar tails; LayerNorm and the other
activations are torch's own ops, run inside the fused op. This matters: INT8 rounding turns a
1-ulp difference into a 1-LSB one, and on models with massive activation outliers (SmolLM2) such
flips move the perplexity in its third digit.

Paths by shape (all inside one C++ call; measured in docs/benchmarks.md). The thresholds are
constants of csrc/zquant_cpu.cpp, and attributes of the extension module under these names:

* Fewer than ROW_SPLIT_MIN_ROWS_PER_THREAD rows per thread (ROW_SPLIT_MIN_ROWS_PER_THREAD_NARROW
  when the weight has fewer than two 16-column tiles, gated: tile pairs, per thread), or a weight
  over ROW_SPLIT_MAX_WEIGHT_BYTES: the threads split the output columns, each streaming only its
  part of the weight (decode is weight-bandwidth bound), after quantizing their share of the rows;
  micro-kernels of up to 6 rows x 64 columns, with 2-4 interleaved accumulator sets when there are
  1-3 rows so that one token still keeps 16 VNNI chains busy. With PREFETCH_BLOCKS or more row
  blocks, the next weight strip is prefetched while one strip runs (those weights come from L3 or
  DRAM).
* More rows and a weight of at most ROW_SPLIT_MAX_WEIGHT_BYTES (L3-resident): the threads split
  the rows; each quantizes, multiplies and re-quantizes its own row blocks while they are in L2,
  with no barrier.
* Tiny layers (M x N x K < SINGLE_THREAD_MAX_MNK) run on one thread: a fork/join would cost more.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.autograd import profiler as _autograd_profiler

from ..config import ActQuant
from . import Backend, build, register
from .activation import ATTR, QuantizedActivation, attach, attached  # noqa: F401 -- ATTR: where tests look
from .decoder import DecoderSpec

# int32 accumulation of u8 (<= 255) x s8 (<= 127 in magnitude) products stays exact below this.
MAX_K = 65536
# How many linear calls reused an attached quantization / quantized their input themselves
# (tests check that the fusions are really taken; two integer increments per call).
stats = {"reused": 0, "quantized": 0}


_OPS = None


def _ops():
    """The extension module (built or loaded on first use)."""
    global _OPS
    if _OPS is None:
        _OPS = build.extension()
    return _OPS


def _kernel(name: str, *args):
    """``_ops().<name>(*args)``, named ``zquant::<name>`` in torch.profiler's tables while it records.

    The extension is a plain Python module, which the profiler does not see by itself: without the
    label a profile of a quantized model would show its attention and elementwise ops but not the
    GEMMs. The check is the global that torch keeps for exactly this, one attribute read per call.
    """
    fn = getattr(_ops(), name)
    if getattr(_autograd_profiler, "_is_profiler_enabled", False):
        with torch.profiler.record_function(f"zquant::{name}"):
            return fn(*args)
    return fn(*args)


class _Codes(dict):
    """The extension's {name: code} table ``table`` (its C++ enums), read on the first lookup, which
    then rebinds the module global ``name`` to a plain dict: as fast as a dict literal from then on.
    (No ``__getattr__`` here or on the module: either one costs every attribute read 20-40 ns.)"""

    def __init__(self, table: str, name: str):
        super().__init__()
        self.table, self.name = table, name

    def __missing__(self, key: str) -> int:
        if self:                          # read already, and no such name
            raise KeyError(key)
        self.update(getattr(_ops(), self.table))
        globals()[self.name] = dict(self)
        return self[key]


# activations (none, relu, gelu, gelu_tanh, silu); quantization modes (none, sym, asym, static); norms
_ACT = _Codes("ACT_CODES", "_ACT")
_QMODE = _Codes("QUANT_MODES", "_QMODE")
_NORM = _Codes("NORM_CODES", "_NORM")


def _attach(y: Tensor, outs: list[Tensor], out: ActQuant | None) -> Tensor:
    if out is not None and len(outs) == 4:
        attach(y, outs[1], outs[2], outs[3], out.symmetric)
    return y


def _out_mode(out: ActQuant | None) -> int:
    if out is None or out.mode != "dynamic":
        return _QMODE["none"]
    return _QMODE["sym" if out.symmetric else "asym"]


# ---------------------------------------------------------------------------------------------
# Weight prepacking
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedWeight:
    """A weight in the kernel's tile layout (see csrc/zquant_cpu.cpp).

    ``wpack`` int8 [T, K4, 64] (INT4: uint8 [T, ceil(K4 / 2), 64]) for T tiles of 16 output rows and
    K4 = ceil(K/4) groups of 4 inputs; ``wsum`` int32 [16T] row sums of the integer weight;
    ``wscale`` float32 [16T] per-row scales; ``wbias`` float32 [16T] or None. Padding rows are 0.
    ``gated``: tiles alternate gate and up rows (16 each) and ``n`` counts one half.
    """
    wpack: Tensor
    wsum: Tensor
    wscale: Tensor
    wbias: Tensor | None
    bits: int
    n: int
    k: int
    gated: bool = False


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    pad = [0, 0] * (t.dim() - 1) + [0, rows - t.shape[0]]
    return torch.nn.functional.pad(t, pad)


def _layer_parts(module) -> tuple[Tensor, Tensor, Tensor | None]:
    """(int8 weight [Np, Kp], float32 row scales [Np], float32 bias [Np] or None), rows padded to 16."""
    n, k = module.out_features, module.in_features
    np_, kp = -(-n // 16) * 16, -(-k // 4) * 4
    w = torch.nn.functional.pad(module.int_weight(), (0, kp - k, 0, np_ - n))
    scale = _pad_rows(module.row_scale().float(), np_)
    bias = None if module.bias is None else _pad_rows(module.bias.detach().float(), np_)
    return w, scale, bias


def _pack(w: Tensor, scale: Tensor, bias: Tensor | None, bits: int, n: int, k: int, gated: bool) -> PackedWeight:
    np_, kp = w.shape
    tiles = w.view(np_ // 16, 16, kp // 4, 4).permute(0, 2, 1, 3).reshape(np_ // 16, kp // 4, 64)
    if bits == 4:                       # w + 8 in nibbles; vector t: k groups 2t (low) and 2t + 1 (high)
        nib = (tiles.to(torch.int16) + 8).to(torch.uint8)
        if nib.shape[1] % 2:
            nib = torch.nn.functional.pad(nib, (0, 0, 0, 1))
        tiles = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return PackedWeight(tiles.contiguous(), w.sum(dim=1, dtype=torch.int32), scale.contiguous(),
                        None if bias is None else bias.contiguous(), bits, n, k, gated)


def pack(module) -> PackedWeight:
    """Prepack a `QuantLinear` (row or row_group scales)."""
    w, scale, bias = _layer_parts(module)
    return _pack(w, scale, bias, module.weight_spec.bits, module.out_features, module.in_features, False)


def pack_gated(gate, up) -> PackedWeight:
    """Prepack two `QuantLinear`s of the same shape and bits with their 16-row tiles interleaved
    (gate tile j, up tile j, ...), so one GEMM's epilogue computes act(gate) * up."""
    (wg, sg, bg), (wu, su, bu) = _layer_parts(gate), _layer_parts(up)

    def interleave(a: Tensor, b: Tensor) -> Tensor:          # [Hp, ...] x 2 -> [2 Hp, ...]
        return torch.stack((a.view(-1, 16, *a.shape[1:]), b.view(-1, 16, *b.shape[1:])), 1).flatten(0, 2)

    bias = None
    if bg is not None or bu is not None:
        bias = interleave(bg if bg is not None else torch.zeros_like(sg), bu if bu is not None else torch.zeros_like(su))
    return _pack(interleave(wg, wu), interleave(sg, su), bias, gate.weight_spec.bits, gate.out_features,
                 gate.in_features, True)


def pack_concat(modules) -> PackedWeight:
    """Prepack `QuantLinear`s that read the same input (same K and bits) as one weight whose output
    columns are theirs, in order (q, k, v as one GEMM): each column is computed exactly as by its
    own layer, since a column's integer dot product, scale and bias are its own."""
    bits = {m.weight_spec.bits for m in modules}
    if len(bits) != 1 or len({m.in_features for m in modules}) != 1:
        raise ValueError("pack_concat: the layers must have the same input size and weight bits")
    parts = [(m.out_features, *_layer_parts(m)) for m in modules]
    n = sum(p[0] for p in parts)
    w = _pad_rows(torch.cat([p[1][:p[0]] for p in parts]), -(-n // 16) * 16)
    scale = _pad_rows(torch.cat([p[2][:p[0]] for p in parts]), w.shape[0])
    bias = None
    if any(p[3] is not None for p in parts):
        bias = _pad_rows(torch.cat([(p[3] if p[3] is not None else torch.zeros_like(p[2]))[:p[0]] for p in parts]),
                         w.shape[0])
    return _pack(w, scale, bias, bits.pop(), n, modules[0].in_features, False)


def _packed(module) -> PackedWeight:
    p = module.kernel_cache.get("cpu")
    if p is None:
        p = module.kernel_cache["cpu"] = pack(module)
    return p


def _packed_gated(gate, up) -> PackedWeight:
    # Cached on the gate layer, valid while the up layer's cache still holds the same token
    # (each layer's cache is cleared when its own weights change).
    cached = gate.kernel_cache.get("cpu_gated")
    if cached is not None and up.kernel_cache.get("cpu_gated_token") is cached[0]:
        return cached[1]
    token = object()
    p = pack_gated(gate, up)
    gate.kernel_cache["cpu_gated"] = (token, p)
    up.kernel_cache["cpu_gated_token"] = token
    return p


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16)


def supports(module, x: Tensor) -> bool:
    """INT8 activations (dynamic or static), row / row_group weight scales, float32 / bfloat16 on CPU."""
    ok = module.kernel_cache.get("cpu_ok")          # the layer's part of the answer never changes
    if ok is None:
        ok = module.kernel_cache["cpu_ok"] = (module.act_spec.enabled and module.in_features <= MAX_K
                                              and module.weight_spec.granularity != "input_group")
    return ok and x.is_cpu and x.dtype in _DTYPES


def _run(module, p: PackedWeight, x: Tensor, act: int, out: ActQuant | None) -> Tensor:
    """One call of the C++ op: quantize x (unless its producer did), GEMM, epilogue [, quantize y]."""
    spec = module.act_spec
    x2 = x.detach() if x.requires_grad else x      # like the reference: the integer path has no gradient
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    qa = None
    if spec.mode == "static":
        amode, static_scale = _QMODE["static"], float(module.act_scale)
    else:
        amode, static_scale = _QMODE["sym" if spec.symmetric else "asym"], 0.0
        qa = attached(x, spec)
    if qa is None:
        stats["quantized"] += 1
        outs = _kernel("linear", x2, None, None, None, amode, static_scale, p.wpack, p.wsum, p.wscale, p.wbias,
                       p.bits, p.n, act, p.gated, _out_mode(out))
    else:
        stats["reused"] += 1
        outs = _kernel("linear", x2, qa.u, qa.scale, qa.offset, amode, static_scale, p.wpack, p.wsum, p.wscale,
                       p.wbias, p.bits, p.n, act, p.gated, _out_mode(out))
    return _attach(outs[0], outs, out)


def linear(module, x: Tensor) -> Tensor:
    """``y [..., N] = x [..., K] W^T + b`` for a `QuantLinear`, in x's dtype."""
    return _run(module, _packed(module), x, _ACT["none"], None)


def linear_act(module, x: Tensor, act: str, out: ActQuant | None = None) -> Tensor:
    """``act(linear(x))`` with the activation in the GEMM epilogue, quantized for the next layer
    when ``out`` (that layer's activation spec) asks for dynamic quantization."""
    return _run(module, _packed(module), x, _ACT[act], out)


def gated(gate, up, x: Tensor, act: str, out: ActQuant | None = None) -> Tensor:
    """``act(gate(x)) * up(x)`` in one GEMM over interleaved weights (gate and up share x's quantization)."""
    return _run(gate, _packed_gated(gate, up), x, _ACT[act], out)


def norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, kind: str,
         out: ActQuant | None) -> Tensor:
    """RMSNorm (``kind="rms"``, Llama's) or LayerNorm over the last dim, quantized for the consumers."""
    x2 = x.detach() if x.requires_grad else x
    outs = _kernel("norm_quant", x2.contiguous(), weight, bias, float(eps), _NORM[kind], _out_mode(out))
    return _attach(outs[0], outs, out)


def quantize(x: Tensor, act: ActQuant, static_scale: float = 0.0) -> QuantizedActivation:
    """Token-wise (or static) quantization of ``x`` [M, K] in the kernel's format (tests, benchmarks)."""
    mode = _QMODE["static" if act.mode == "static" else ("sym" if act.symmetric else "asym")]
    u, s, o = _kernel("quantize", x.contiguous(), mode, float(static_scale))
    return QuantizedActivation(u, s, o, act.symmetric, None)


def _step_linear(p: PackedWeight, module):
    """The extension's QLinear (a packed weight and how its input is quantized) for the decode step."""
    spec = module.act_spec
    if spec.mode == "static":
        return _ops().QLinear(p.wpack, p.wsum, p.wscale, p.wbias, p.bits, p.n, p.gated, _QMODE["static"],
                              float(module.act_scale))
    return _ops().QLinear(p.wpack, p.wsum, p.wscale, p.wbias, p.bits, p.n, p.gated,
                          _QMODE["sym" if spec.symmetric else "asym"], 0.0)


def _norm_params(n):
    return _ops().NormParams(n.weight.detach(), None if n.bias is None else n.bias.detach(), float(n.eps))


def hugepage_copy(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors``, one after another (64-byte aligned) in one block of memory advised for
    transparent huge pages: weights a decode step streams once per token, in the order it reads them
    (measured: streaming the 56 MB bf16 head 10-20% faster than on 4 KiB pages in a C++ harness at 1
    thread; a whole SmolLM2 step ~4% faster at 2 threads, within the machine's noise)."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 64) * 64
    arena = _ops().hugepage_empty(total)
    out = []
    for t, o in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        out.append(arena[o:o + n].view(t.dtype).view(t.shape).copy_(t))
    return out


def _step_weights(spec: DecoderSpec) -> list[list[PackedWeight]]:
    """Per block (qkv, out, mlp_in, down) packed weights, their int8 / int4 tiles moved into one
    huge-page arena in the order a step reads them. The layers' own kernel caches are pointed at the
    arena too, so the general path shares the bytes instead of keeping a second copy."""
    packs = []
    for b in spec.blocks:
        qkv = _packed(b.qkv[0]) if len(b.qkv) == 1 else pack_concat(b.qkv)
        mlp_in = _packed_gated(*b.mlp_in) if len(b.mlp_in) == 2 else _packed(b.mlp_in[0])
        packs.append([qkv, _packed(b.out), mlp_in, _packed(b.down)])
    flat = [p for block in packs for p in block]
    moved = {id(p): replace(p, wpack=w) for p, w in zip(flat, hugepage_copy([p.wpack for p in flat]))}
    for b in spec.blocks:
        for m in (*b.qkv, b.out, *b.mlp_in, b.down):
            if id(m.kernel_cache.get("cpu")) in moved:
                m.kernel_cache["cpu"] = moved[id(m.kernel_cache["cpu"])]
        gated = b.mlp_in[0].kernel_cache.get("cpu_gated")
        if gated is not None and id(gated[1]) in moved:
            b.mlp_in[0].kernel_cache["cpu_gated"] = (gated[0], moved[id(gated[1])])
    return [[moved[id(p)] for p in block] for block in packs]


def decoder(spec: DecoderSpec):
    """The C++ whole-model decode step (csrc/decode.cpp) for a `DecoderSpec`: packs every layer once."""
    dec = _ops().Decoder(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, _NORM[spec.norm_kind],
                         spec.cos, spec.sin, _norm_params(spec.final_norm))
    for b, (qkv, out, mlp_in, down) in zip(spec.blocks, _step_weights(spec)):
        dec.add_block(_norm_params(b.norm1), _step_linear(qkv, b.qkv[0]), _step_linear(out, b.out),
                      _norm_params(b.norm2), _step_linear(mlp_in, b.mlp_in[0]), _step_linear(down, b.down),
                      _ACT[b.act], float(b.scaling))
    return dec


def head_weight(weight: Tensor) -> Tensor:
    """An output head's weight as `head` reads it fastest: bfloat16 when its values are exactly
    bfloat16 (BF16-stored float parts: half the bytes per token, the same logits), else float32; on
    huge pages (see `hugepage_copy`)."""
    w = weight.detach()
    as_bf16 = w.to(torch.bfloat16)
    # checked in slices of rows: no second float32 copy of a 113 MB table at once
    exact = all(torch.equal(a.float(), b.float()) for a, b in zip(as_bf16.split(4096), w.split(4096)))
    return hugepage_copy([as_bf16 if exact else w.float().contiguous()])[0]


def head(x: Tensor, weight: Tensor) -> Tensor:
    """logits [M, V] = x [M, K] float32 . weight [V, K]^T (float32 or bfloat16), each row on its own
    (batch-invariant, unlike a BLAS GEMM)."""
    return _kernel("head_logits", x, weight)


register(Backend("cpu", priority=10, available=build.load, supports=supports, linear=linear,
                 fused={"linear_act": linear_act, "gated": gated, "norm": norm, "decoder": decoder, "head": head,
                        "head_weight": head_weight},
                 devices=("cpu",)))
