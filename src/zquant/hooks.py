"""Forward hooks on named submodules, removed when the block ends (whatever happens inside)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

from torch import nn


@contextlib.contextmanager
def hooks(root: nn.Module, fns: Mapping[str, Callable], after: bool = False) -> Iterator[None]:
    """``with hooks(model, {name: fn})``: run code while the hooks record. ``fn(module, args)``
    runs before each call of the named submodule, or ``fn(module, args, output)`` after it with
    ``after=True``."""
    register = (lambda m, fn: m.register_forward_hook(fn)) if after else (lambda m, fn: m.register_forward_pre_hook(fn))
    handles = [register(root.get_submodule(name), fn) for name, fn in fns.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
