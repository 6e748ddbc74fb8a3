"""Runtime fusions for the fast CPU path: fewer passes over memory between the quantized GEMMs.

`fuse(model)` swaps a few modules of a quantized model for fused twins, as the model-family
adapter declares them:

* ``norm_feeds``: a LayerNorm / RMSNorm whose output only feeds dynamically quantized linears
  becomes a `FusedNorm`, which normalizes and quantizes per token in one pass and attaches the
  INT8 data to its output, so q / k / v (or gate / up) read it instead of re-quantizing.
* ``act_mlps``: a module computing ``second(act(first(x)))`` (BERT's intermediate, GPT-2's MLP)
  becomes a `FusedActMLP`: the activation (and the bias) run in the first GEMM's epilogue, which
  also quantizes the result for the next linear.
* ``gated_mlps``: ``down(act(gate(x)) * up(x))`` (Llama) becomes a `FusedGatedMLP`: gate and up
  are one GEMM over interleaved weights whose epilogue computes ``act(gate) * up`` and quantizes
  it for ``down``.

The fused modules hold the very same parameters and child modules under the same names, so the
state dict (and a saved checkpoint) is unchanged, and `unfuse` restores the original modules.
Each one runs its original module instead whenever the fused kernel cannot give the same result
with the same side effects: when the selected backend has no fused operation (e.g.
``use_backend("reference")``), in training mode, when autograd needs gradients, or when a
forward hook watches one of its layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import kernels
from .config import ActQuant
from .models import Adapter, get_adapter
from .modules import QuantLinear
from .surgery import set_submodule

# Normalizations the kernel computes, by class name; the formula must match the kernel's.
NORM_KINDS = {"LayerNorm": "layer", "LlamaRMSNorm": "rms", "MistralRMSNorm": "rms", "Qwen2RMSNorm": "rms"}


def activation_kind(module: nn.Module) -> str | None:
    """The kernel's name for an activation module (relu, gelu, gelu_tanh, silu), or None.

    Only modules that are exactly one PyTorch op are recognized: the fused kernel then gives
    bit-identical results (e.g. transformers' ``NewGELUActivation`` is a Python formula whose
    rounding differs from ``F.gelu(approximate="tanh")``, so it is not fused).
    """
    name = type(module).__name__
    act = getattr(module, "act", None)
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name == "ReLU":
        return "relu"
    if name == "GELUActivation" and act is F.gelu:                      # transformers' "gelu"
        return "gelu"
    if name == "GELUTanh" and getattr(act, "func", None) is F.gelu and act.keywords == {"approximate": "tanh"}:
        return "gelu_tanh"
    if name == "GELU":                                                  # torch.nn.GELU
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(getattr(module, "approximate", None))
    return None


def _hooked(*modules: nn.Module) -> bool:
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class _Fused(nn.Module):
    """Common part: the original module is kept outside the module tree (not in the state dict)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self.training = original.training

    def original(self) -> nn.Module:
        """The module this one replaced, given this module's current children and parameters."""
        orig = self._original
        for name, child in self.named_children():
            if getattr(orig, name) is not child:
                setattr(orig, name, child)
        for name, param in self.named_parameters(recurse=False):
            if getattr(orig, name) is not param:
                setattr(orig, name, param)
        orig.training = self.training
        return orig


class FusedNorm(_Fused):
    """A LayerNorm / RMSNorm that also quantizes its output (float [..., K]) per token for the
    quantized linears that read it; ``out`` is their activation spec."""

    def __init__(self, norm: nn.Module, kind: str, out: ActQuant, consumer: QuantLinear):
        super().__init__(norm)
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)
        self.eps = norm.eps if kind == "layer" else norm.variance_epsilon
        self.kind, self.out = kind, out
        object.__setattr__(self, "_consumer", consumer)   # decides the backend; not a submodule

    def forward(self, x: Tensor) -> Tensor:
        op = kernels.fused_op("norm", self._consumer, x)
        if (op is None or self.training or _hooked(self)
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                or self.weight.dtype != x.dtype or (self.bias is not None and self.bias.dtype != x.dtype)):
            return self.original()(x)
        return op(x, self.weight, self.bias, self.eps, self.kind, self.out)

    def extra_repr(self) -> str:
        return f"{self.kind}, {tuple(self.weight.shape)}, eps={self.eps}, fused per-token INT8 quantization"


class FusedActMLP(_Fused):
    """``second(act(first(x)))`` (or ``act(first(x))``) with the activation in first's GEMM epilogue."""

    def __init__(self, module: nn.Module, first: str, act: str, second: str, kind: str, out: ActQuant | None):
        super().__init__(module)
        self.names = (first, act, second)
        for name in self.names:
            if name:
                setattr(self, name, getattr(module, name))
        self.kind, self.out = kind, out

    def forward(self, x: Tensor) -> Tensor:
        first, _, second = self.names
        fc = getattr(self, first)
        op = kernels.fused_op("linear_act", fc, x)
        if op is None or self.training or _hooked(fc):
            return self.original()(x)
        h = op(fc, x, self.kind, self.out)
        return getattr(self, second)(h) if second else h

    def extra_repr(self) -> str:
        return f"{self.names[0]} + {self.kind} fused"


class FusedGatedMLP(_Fused):
    """``down(act(gate(x)) * up(x))`` with gate and up in one GEMM whose epilogue forms the product."""

    def __init__(self, module: nn.Module, gate: str, up: str, down: str, act: str, kind: str, out: ActQuant | None):
        super().__init__(module)
        self.names = (gate, up, down, act)
        for name in self.names:
            setattr(self, name, getattr(module, name))
        self.kind, self.out = kind, out

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down, _ = (getattr(self, n) for n in self.names)
        op = kernels.fused_op("gated", gate, x)
        if op is None or self.training or _hooked(gate, up):
            return self.original()(x)
        return down(op(gate, up, x, self.kind, self.out))

    def extra_repr(self) -> str:
        return f"{self.names[0]} + {self.names[1]} + {self.kind} fused"


# ---------------------------------------------------------------------------------------------
# The model transform
# ---------------------------------------------------------------------------------------------

def _dynamic_spec(layers: list) -> ActQuant | None:
    """The shared dynamic activation spec of quantized layers, or None if they do not share one."""
    if not layers or not all(isinstance(m, QuantLinear) for m in layers):
        return None
    specs = {m.act_spec for m in layers}
    if len(specs) != 1:
        return None
    spec = specs.pop()
    return spec if spec.mode == "dynamic" else None


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _only_children_state(module: nn.Module, names: tuple[str, ...]) -> bool:
    """True if all of the module's parameters and buffers live in the named children."""
    own = {id(t) for t in [*module.parameters(), *module.buffers()]}
    kids = {id(t) for n in names if n for t in [*getattr(module, n).parameters(), *getattr(module, n).buffers()]}
    return own == kids


def fuse(model: nn.Module, adapter: Adapter | None = None) -> int:
    """Swap in the fused modules the adapter declares, where the layers allow it; returns how many.

    Idempotent. Call it on a quantized model (`zquant.quantize` and `zquant.load` do, when the CPU
    fast path is in use).
    """
    adapter = adapter or get_adapter(model)
    blocks_name, blocks = adapter.find_blocks(model)
    count = 0
    for i, block in enumerate(blocks):
        for norm_name, readers in adapter.norm_feeds:
            norm = _get(block, norm_name)
            kind = NORM_KINDS.get(type(norm).__name__) if norm is not None else None
            if kind is None or getattr(norm, "weight", None) is None:
                continue
            layers = [_get(blocks[i + 1], r[5:]) if r.startswith("next.") and i + 1 < len(blocks)
                      else (None if r.startswith("next.") else _get(block, r)) for r in readers]
            spec = _dynamic_spec(layers)
            if spec is not None:
                set_submodule(block, norm_name, FusedNorm(norm, kind, spec, layers[0]))
                count += 1
        for name, first, act, second, reader in adapter.act_mlps:
            module = _get(block, name)
            if module is None or isinstance(module, _Fused):
                continue
            fc, act_module = _get(module, first), _get(module, act)
            kind = activation_kind(act_module) if act_module is not None else None
            if not isinstance(fc, QuantLinear) or kind is None or not _only_children_state(module, (first, act, second)):
                continue
            set_submodule(block, name, FusedActMLP(module, first, act, second, kind, _dynamic_spec([_get(block, reader)])))
            count += 1
        for name, gate, up, down, act in adapter.gated_mlps:
            module = _get(block, name)
            if module is None or isinstance(module, _Fused):
                continue
            g, u, act_module = _get(module, gate), _get(module, up), _get(module, act)
            kind = activation_kind(act_module) if act_module is not None else None
            if (kind is None or not isinstance(g, QuantLinear) or not isinstance(u, QuantLinear) or g.spec != u.spec
                    or (g.in_features, g.out_features) != (u.in_features, u.out_features)
                    or not _only_children_state(module, (gate, up, down, act))):
                continue
            set_submodule(block, name, FusedGatedMLP(module, gate, up, down, act, kind,
                                                     _dynamic_spec([_get(module, down)])))
            count += 1
    return count


def unfuse(model: nn.Module) -> int:
    """Put the original modules back; returns how many fused modules were replaced."""
    fused = [(name, m) for name, m in model.named_modules() if isinstance(m, _Fused)]
    for name, m in fused:
        set_submodule(model, name, m.original())
    return len(fused)


def auto_fuse(model: nn.Module) -> int:
    """`fuse` a quantized model if the CPU fast path will run it: the model is on the CPU, no
    backend is forced (``ZQUANT_BACKEND``), ``ZQUANT_FUSION`` is not 0, and the kernels build
    (the first call may take ~25 s to compile them; the reason they cannot is warned once)."""
    import os
    if os.environ.get("ZQUANT_FUSION", "1") == "0" or kernels.ENV_BACKEND:
        return 0
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        return 0
    cpu = kernels.backend("cpu")
    reason = cpu.available()
    if reason is not None:
        kernels.warn_unavailable(cpu, reason)
        return 0
    return fuse(model)
