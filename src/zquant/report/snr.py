"""Per-layer SNR of each quantized model, collected while `compare` or `inspect` runs."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

from torch import Tensor, nn

from .. import analysis as I
from ..record import record_of


class SnrCollector:
    """Measures per-layer SNR of each quantized model against the floating-point model on
    ``input_ids``; call it as ``collector(name, qmodel)`` (e.g. from `zquant.eval.compare`'s
    ``on_quantized``), read ``collector.results[name]``.

    A model quantized with LKD (``zquant_info["lkd"]["blocks"]``) also gets ``"lkd": {"blocks":
    [...], "before": <SNR of the same scheme without LKD>}``. "Before" reuses an earlier result of
    the identical scheme when there is one, else quantizes a copy of the floating-point model
    without LKD (static schemes are calibrated on the text the LKD model recorded).
    """

    def __init__(self, fp_model: nn.Module, input_ids: Tensor, tokenizer=None,
                 log: Callable[[str], None] = lambda s: None):
        self.fp_model, self.input_ids, self.tokenizer, self.log = fp_model, input_ids, tokenizer, log
        self.results: dict[str, dict] = {}
        self._plain: dict[str, dict] = {}          # scheme config as JSON -> SNR without LKD

    @staticmethod
    def _key(model: nn.Module) -> str:
        return json.dumps((record_of(model) or {}).get("scheme"), sort_keys=True)

    def __call__(self, name: str, qmodel: nn.Module) -> dict:
        self.log(f"per-layer SNR of {name}")
        result = I.layer_snr(self.fp_model, qmodel, self.input_ids)
        blocks = I.lkd_blocks(qmodel)
        if blocks is None:
            self._plain.setdefault(self._key(qmodel), result)
        else:
            result["lkd"] = {"blocks": blocks, "before": self._without_lkd(qmodel)}
        self.results[name] = result
        return result

    def _without_lkd(self, qmodel: nn.Module) -> dict:
        key = self._key(qmodel)
        if key not in self._plain:
            from ..api import quantize        # the report is a top layer, like the CLI
            from ..data import DEFAULT_CALIB_TEXT, PACKAGED_TEXTS
            record = record_of(qmodel)
            calib = (record.get("calibration") or {}).get("text", DEFAULT_CALIB_TEXT)
            if calib not in PACKAGED_TEXTS and not Path(calib).is_file():
                calib = DEFAULT_CALIB_TEXT         # e.g. "user batches": not reproducible here
            self.log("per-layer SNR of the same scheme without LKD")
            plain = quantize(copy.deepcopy(self.fp_model), record.scheme,
                             tokenizer=self.tokenizer, calib_text=calib)
            self._plain[key] = I.layer_snr(self.fp_model, plain, self.input_ids)
            del plain
        return self._plain[key]
