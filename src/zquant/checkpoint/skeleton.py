"""Rebuild a model from a checkpoint's record without allocating anything the record claims.

`recorded_config` and `model_class` turn the recorded ``source_config`` and ``model_class`` into a
transformers config and the concrete model class for it; `build_skeleton` constructs that model
entirely on the meta device (parameters and buffers: no memory, no initialisation) and within a
budget of torch calls (no config can make it run for hours), so nothing an untrusted record asks
for is allocated before `validate.check_tensors` has compared the skeleton with the safetensors
header. `assign_weights` then puts the checkpoint's tensors in
place (tied weights re-tied, any tensor left unset refused), and `materialize_buffers` computes
the buffers that are never saved (rotary frequencies, position ids) the way transformers' own
loader does: real placeholders, then the model's ``_init_weights`` for just their modules.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import CheckpointError, one_line


def recorded_config(meta: dict):
    """The transformers config of the recorded ``source_config`` (validated by transformers)."""
    import transformers
    from transformers import AutoConfig
    cfg = dict(meta["source_config"])
    model_type = cfg.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except Exception as e:   # untrusted values: validators raise ValueError, KeyError, StrictDataclassError
        raise CheckpointError(f"checkpoint records a {model_type!r} config that this transformers "
                              f"({transformers.__version__}) cannot build: {one_line(e)}") from None


def model_class(meta: dict, config) -> type:
    """The recorded ``model_class``, which must be a concrete transformers model class whose config
    class is the recorded config's (not an Auto class, not a model of another family)."""
    import transformers
    from transformers import PreTrainedModel
    name = meta["model_class"]
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if (not isinstance(cls, type) or not issubclass(cls, PreTrainedModel) or name.endswith("PreTrainedModel")
            or getattr(cls, "config_class", None) is not type(config)):
        raise CheckpointError(f"checkpoint records model class {name!r}, which is not a transformers model class "
                              f"for its {type(config).__name__} (model type {config.model_type!r})")
    return cls


class _CallBudget(TorchFunctionMode):
    """Stops a construction after ``limit`` torch calls: a config can ask for 10^6 layers or experts,
    which takes hours to build even on the meta device (SmolLM2's 482 tensors take 788 calls)."""

    def __init__(self, limit: int, what: str):
        super().__init__()
        self.left, self.limit, self.what = limit, limit, what

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.left -= 1
        if self.left < 0:
            raise CheckpointError(f"building {self.what} from the recorded source_config takes more than "
                                  f"{self.limit} tensor operations, far more than its weights file holds")
        return func(*args, **(kwargs or {}))


def build_skeleton(cls: type, config, budget: int) -> nn.Module:
    """``cls`` built from ``config`` with every parameter and buffer on the meta device, in at most
    ``budget`` torch calls."""
    with warnings.catch_warnings(), torch.device("meta"), _CallBudget(budget, cls.__name__):
        warnings.simplefilter("ignore")
        try:
            return cls._from_config(config, dtype=torch.float32)
        except CheckpointError:
            raise
        except Exception as e:   # a config transformers accepted can still fail in a module's __init__
            raise CheckpointError(f"cannot build {cls.__name__} from the recorded source_config: "
                                  f"{one_line(e)}") from None


def assign_weights(model: nn.Module, weights: Path) -> None:
    """Assign the checkpoint's tensors to ``model`` (its tensors are still on meta), re-tie shared
    weights, and refuse a file that leaves any saved tensor unset or has extra ones."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(weights))
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
    # Tied weights (an LM head sharing the embeddings) are one tensor in the file, under one of
    # their names: give every name of a shared parameter that tensor, so they stay one tensor.
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        present = [n for n in group if n in state]
        for n in group:
            if present and n not in state:
                state[n] = state[present[0]]
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: does not match the recorded model and scheme: {one_line(e)}") from None
    for group in names.values():            # assign made one Parameter per name: make them one again
        shared = model.get_parameter(group[0])
        for n in group[1:]:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    # Buffers that are never saved are still on meta: `materialize_buffers` computes them.
    unset = sorted({*result.missing_keys, *(n for n, t in model.state_dict().items() if t.is_meta)})
    if result.unexpected_keys or unset:
        parts = ([f"unexpected tensors {result.unexpected_keys[:5]}"] if result.unexpected_keys else []) + \
                ([f"missing tensors {unset[:5]}"] if unset else [])
        raise CheckpointError(f"{weights}: does not match the recorded model and scheme: {'; '.join(parts)}")


def _placeholder(buf: torch.Tensor) -> torch.Tensor:
    """A CPU tensor like ``buf`` filled with a value initialisation never leaves (NaN, the integer minimum)."""
    if buf.is_floating_point():
        return torch.full(buf.shape, float("nan"), dtype=buf.dtype)
    if buf.dtype.is_signed:
        return torch.full(buf.shape, torch.iinfo(buf.dtype).min, dtype=buf.dtype)
    return torch.zeros(buf.shape, dtype=buf.dtype)


def _unfilled(buf: torch.Tensor) -> bool:
    """True if ``buf`` still holds a `_placeholder` value (bool buffers cannot tell)."""
    if buf.is_floating_point():
        return bool(buf.isnan().any())
    return buf.dtype.is_signed and bool((buf == torch.iinfo(buf.dtype).min).any())


@torch.no_grad()
def materialize_buffers(model: nn.Module) -> None:
    """Compute the buffers still on meta (never saved: rotary frequencies, position ids) with the
    model's own initialisation, which touches only their modules; every other tensor is already
    loaded and flagged so transformers leaves it alone. Refuse what initialisation did not fill."""
    pending = [(n, b) for n, b in model.named_buffers() if b.is_meta]
    if not pending:
        return
    for module in model.modules():
        module._is_hf_initialized = True
    for t in (*model.parameters(), *model.buffers()):
        t._is_hf_initialized = True
    for name, buf in pending:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[attr] = _placeholder(buf)      # keeps the buffer's persistence
        owner._is_hf_initialized = False
    model.initialize_weights()
    for name, _ in pending:
        if _unfilled(model.get_buffer(name)):
            raise CheckpointError(f"{type(model).__name__}: buffer {name} was not computed by the model's "
                                  "initialisation; this zquant cannot rebuild this model class")
    for mname, module in model.named_modules():    # a tensor kept as a plain attribute cannot be recomputed
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise CheckpointError(f"{type(model).__name__}: {mname}.{attr} is a tensor computed at "
                                      "construction; this zquant cannot rebuild this model class")
