"""Static-range calibration: one per-tensor input scale for each static-activation layer.

Like DeepSpeed's static ``QuantAct``: an exponential moving average (``momentum``) of each
calibration batch's absolute maximum of the layer's input, starting from the first batch's. The
inputs are observed while the pipeline runs the floating-point block on the calibration stream.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from ..pipeline import Algorithm, BlockStep

STREAM = "calibration"


class StaticRanges(Algorithm):
    name = "calibration"

    def __init__(self, batches: Sequence[Mapping[str, Tensor]], source: str, momentum: float = 0.95):
        self.batches, self.source, self.momentum = list(batches), source, momentum
        self._stats: dict[str, Tensor] = {}

    def streams(self) -> dict[str, list[dict]]:
        return {STREAM: self.batches}

    def settings(self) -> dict:
        return {"text": self.source, "momentum": self.momentum}

    def observers(self, step: BlockStep) -> dict:
        self._stats = {}
        return {STREAM: {t.relative: self._hook(t.name) for t in step.layers if t.spec.act.mode == "static"}}

    def _hook(self, name: str):
        def record(_module, args):
            batch_max = args[0].detach().abs().amax().float()
            prev = self._stats.get(name)
            self._stats[name] = batch_max if prev is None else self.momentum * prev + (1 - self.momentum) * batch_max
        return record

    def block(self, step: BlockStep) -> None:
        missing = [t.name for t in step.layers if t.spec.act.mode == "static" and t.name not in self._stats]
        if missing:
            raise ValueError(f"calibration never reached {len(missing)} layer(s), e.g. {missing[0]}")
        step.absmax.update(self._stats)

    def finish(self, records, seconds, peak_mib) -> dict:
        return {"text": self.source}
