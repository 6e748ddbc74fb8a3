"""Calibration algorithms: steps of the sequential block pipeline (`zquant.pipeline`).

* `StaticRanges` (``static.py``): per-tensor input ranges of the static-activation layers, the
  paper's W8A8-static baseline.
* `LKD` (``lkd.py``): ZeroQuant's layer-by-layer knowledge distillation.

A new algorithm subclasses `zquant.pipeline.Algorithm` (prepare / per block / finish), names the
data it needs as streams, and adds its record key to `zquant.record.STEP_KEYS`.
"""
from .lkd import LKD
from .static import StaticRanges

__all__ = ["LKD", "StaticRanges"]
