"""Runtime fusions for the fast CPU path: fewer passes over memory between the quantized GEMMs.

`fuse(model)` swaps a few modules of a quantized model for fused twins, as the model-family
adapter declares them (`zquant.models.NormFeed`, `ActMLP`, `GatedMLP`):

* `NormFeed`: a LayerNorm / RMSNorm whose output only feeds dynamically quantized linears
  becomes a `FusedNorm`, which normalizes and quantizes per token in one pass and attaches the
  INT8 data to its output, so q / k / v (or gate / up) read it instead of re-quantizing.
* `ActMLP`: a module computing ``second(act(first(x)))`` (BERT's intermediate, GPT-2's MLP)
  becomes a `FusedActMLP`: the activation (and the bias) run in the first GEMM's epilogue, which
  also quantizes the result for the next linear.
* `GatedMLP`: ``down(act(gate(x)) * up(x))`` (Llama) becomes a `FusedGatedMLP`: gate and up
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
from .convert import set_submodule
from .models import ActMLP, GatedMLP, NormFeed
from .modules import QuantLinear
from .plan import Plan, plan_of

# Normalizations the kernel computes, by class name; the formula must match the kernel's.
# The gated epilogue computes act(gate) * up for these activations only.
GATED_ACTS = ("silu",)
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


def _get(root: nn.Module | None, name: str) -> nn.Module | None:
    try:
        return None if root is None else root.get_submodule(name)
    except AttributeError:
        return None


def _only_children_state(module: nn.Module, names: tuple[str, ...]) -> bool:
    """True if all of the module's parameters and buffers live in the named children."""
    own = {id(t) for t in [*module.parameters(), *module.buffers()]}
    kids = {id(t) for n in names if n for t in [*getattr(module, n).parameters(), *getattr(module, n).buffers()]}
    return own == kids


def _activation(module: nn.Module, name: str) -> str | None:
    act = _get(module, name)
    return activation_kind(act) if act is not None else None


def _fuse_norm(d: NormFeed, block: nn.Module, following: nn.Module | None) -> nn.Module | None:
    norm = _get(block, d.norm)
    kind = NORM_KINDS.get(type(norm).__name__) if norm is not None else None
    if kind is None or getattr(norm, "weight", None) is None:
        return None
    layers = [_get(following, r[5:]) if r.startswith("next.") else _get(block, r) for r in d.readers]
    spec = _dynamic_spec(layers)
    return None if spec is None else FusedNorm(norm, kind, spec, layers[0])


def _fuse_act(d: ActMLP, block: nn.Module, following: nn.Module | None) -> nn.Module | None:
    module = _get(block, d.module)
    if module is None or isinstance(module, _Fused):
        return None
    kind = _activation(module, d.act)
    if (not isinstance(_get(module, d.first), QuantLinear) or kind is None
            or not _only_children_state(module, (d.first, d.act, d.second))):
        return None
    return FusedActMLP(module, d.first, d.act, d.second, kind, _dynamic_spec([_get(block, d.reader)]))


def _fuse_gated(d: GatedMLP, block: nn.Module, following: nn.Module | None) -> nn.Module | None:
    module = _get(block, d.module)
    if module is None or isinstance(module, _Fused):
        return None
    g, u, kind = _get(module, d.gate), _get(module, d.up), _activation(module, d.act)
    if (kind not in GATED_ACTS or not isinstance(g, QuantLinear) or not isinstance(u, QuantLinear) or g.spec != u.spec
            or (g.in_features, g.out_features) != (u.in_features, u.out_features)
            or not _only_children_state(module, (d.gate, d.up, d.down, d.act))):
        return None
    return FusedGatedMLP(module, d.gate, d.up, d.down, d.act, kind, _dynamic_spec([_get(module, d.down)]))


# declaration type -> (the fused operation it needs from the backend, the builder)
_BUILDERS = {NormFeed: ("norm", _fuse_norm), ActMLP: ("linear_act", _fuse_act), GatedMLP: ("gated", _fuse_gated)}


def fuse(model: nn.Module, plan: Plan | None = None, ops: frozenset[str] | None = None) -> int:
    """Swap in the fused modules the plan's adapter declares, where the layers allow it (and, with
    ``ops``, where the backend offers the fused operation); returns how many. Idempotent.
    ``plan`` defaults to the one the quantized model carries."""
    plan = plan or plan_of(model)
    if plan is None:
        raise ValueError("fuse expects a model quantized by zquant (it carries no plan)")
    blocks = plan.blocks(model)
    count = 0
    for i, block in enumerate(blocks):
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        for d in plan.adapter.fusions:
            op, build = _BUILDERS[type(d)]
            fused = build(d, block, following) if ops is None or op in ops else None
            if fused is not None:
                set_submodule(block, d.target, fused)
                count += 1
    return count


def unfuse(model: nn.Module) -> int:
    """Put the original modules back; returns how many fused modules were replaced."""
    fused = [(name, m) for name, m in model.named_modules() if isinstance(m, _Fused)]
    for name, m in fused:
        set_submodule(model, name, m.original())
    return len(fused)


def prepare_runtime(model: nn.Module, plan: Plan | None = None) -> int:
    """Make a quantized model fast where it is: the fusions that the dispatch point says the
    backend for the model's device offers (`zquant.kernels.fusions_for`; for the CPU fast path
    the first call may take ~25 s to compile the kernels). Returns how many modules were fused."""
    p = next(model.parameters(), None)
    ops = kernels.fusions_for(p.device.type if p is not None else "cpu")
    return fuse(model, plan, ops) if ops else 0
