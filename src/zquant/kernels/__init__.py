"""The one kernel dispatch point.

Every `QuantLinear.forward` calls `qlinear(module, x)`. Backends register themselves with a
priority; the first one that is available and supports the call (layer config, device, shape)
runs it, and the reference backend, which supports everything, is the last resort. When a
preferred backend cannot be used for a reason other than the call's own shape or device, a
warning says so once.

`use_backend("reference")` forces one backend (tests and accuracy comparisons use it); so does
the environment variable ``ZQUANT_BACKEND``, read when zquant is imported.

Runtime fusions (`zquant.fusion`, never saved) reach the kernels through here too: a backend may
offer fused operations in ``Backend.fused`` (``linear_act``, ``gated``, ``norm``). `fusions_for`
decides which of them apply to a model on a given device (so which fused modules are worth
swapping in), `fused_op` finds the one a call runs. A fused module whose backend lacks the
operation runs the model's original modules instead, so forcing the reference backend always
gives the unfused model's numbers. Fused ops hand quantized activations to each other through
`zquant.kernels.activation`.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

from torch import Tensor

from . import reference


@dataclass
class Backend:
    name: str
    priority: int
    # available() -> None if usable, else the reason it is not (said once in a warning)
    available: Callable[[], str | None]
    # supports(module, x) -> True if this backend handles the call
    supports: Callable[[object, Tensor], bool]
    linear: Callable[[object, Tensor], Tensor]
    # optional fused operations by name (see the module docstring and `zquant.fusion`)
    fused: dict[str, Callable] = field(default_factory=dict)
    # device types it runs on (None: any)
    devices: tuple[str, ...] | None = None

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices


_BACKENDS: dict[str, Backend] = {}
_ORDER: list[Backend] = []          # by descending priority
_forced = threading.local()
_warned: set[str] = set()
# The ZQUANT_BACKEND environment variable, read once, when zquant is imported: `select` runs on
# every layer call, where os.environ.get alone would cost about half a microsecond.
ENV_BACKEND: str | None = os.environ.get("ZQUANT_BACKEND") or None


def register(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _ORDER[:] = sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def backends() -> list[str]:
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; registered: {backends()}")
    return _BACKENDS[name]


def warn_unavailable(backend: Backend, reason: str) -> None:
    """The one-time warning that ``backend`` cannot run, and why."""
    _warn_once(f"unavailable:{backend.name}", f"zquant: the {backend.name!r} kernels are unavailable ({reason}); "
               "falling back to the reference path")


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every `qlinear` call in this thread (within the block) onto backend ``name``."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; registered: {backends()}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def select(module, x: Tensor) -> Backend:
    """The backend that `qlinear` would run for this call."""
    forced = getattr(_forced, "name", None) or ENV_BACKEND
    if forced:
        backend = _BACKENDS.get(forced)
        if backend is None:
            raise ValueError(f"unknown kernel backend {forced!r}; registered: {backends()}")
        reason = backend.available()
        if reason is None and backend.supports(module, x):
            return backend
        _warn_once(f"forced:{forced}", f"zquant: backend {forced!r} cannot run this layer "
                   f"({reason or 'unsupported layer config or shape'}); using the reference path")
        return _BACKENDS["reference"]
    for backend in _ORDER:
        reason = backend.available()
        if reason is not None:
            warn_unavailable(backend, reason)
            continue
        if backend.supports(module, x):
            return backend
    return _BACKENDS["reference"]


def qlinear(module, x: Tensor) -> Tensor:
    """y [..., N] = x [..., K] through the quantized layer ``module``, on the best backend."""
    return select(module, x).linear(module, x)


def _runtime_backend(device_type: str) -> Backend | None:
    """The backend that will run layers on ``device_type``: the forced one, else the first
    available by priority. Warns once when a preferred backend cannot run."""
    forced = getattr(_forced, "name", None) or ENV_BACKEND
    for backend in ([_BACKENDS[forced]] if forced in _BACKENDS else _ORDER):
        if not backend.runs_on(device_type):
            continue
        reason = backend.available()
        if reason is not None:
            warn_unavailable(backend, reason)
            continue
        return backend
    return None


def fusions_for(device_type: str) -> frozenset[str]:
    """The fused operations worth preparing a model for on ``device_type``: those of the backend
    that will run its layers there. ``ZQUANT_FUSION=0`` turns them all off."""
    if os.environ.get("ZQUANT_FUSION", "1") == "0":
        return frozenset()
    backend = _runtime_backend(device_type)
    return frozenset(backend.fused) if backend is not None else frozenset()


def runtime_op(name: str, device_type: str) -> Callable | None:
    """A whole-model operation (``"decoder"``, ``"head"``) of the backend that runs ``device_type``,
    or None: the decode path's one entry to the kernels (`zquant.generate.fast`)."""
    if os.environ.get("ZQUANT_FUSION", "1") == "0":
        return None
    backend = _runtime_backend(device_type)
    return None if backend is None else backend.fused.get(name)


def fused_op(name: str, module, x: Tensor) -> Callable | None:
    """The fused operation ``name`` of the backend that would run ``module`` on ``x``, or None."""
    return select(module, x).fused.get(name)


register(Backend("reference", priority=0, available=lambda: None,
                 supports=lambda module, x: True, linear=reference.linear))  # any device

from . import cpu  # noqa: E402,F401  -- registers the "cpu" backend
