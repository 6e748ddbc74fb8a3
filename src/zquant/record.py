"""The quantization record: how a model was quantized, as a frozen, versioned, validated value.

A quantized model carries it as ``model.zquant_info``; checkpoints store it in ``zquant.json``
and every loader and export format reads it back through `QuantRecord.from_dict`, which refuses
a malformed record with a message naming the field. It reads like the JSON it is written as
(``record["scheme"]["name"]``), and changes only through `dataclasses.replace`.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import nn

from .config import ConfigError, QuantConfig

RECORD_VERSION = 1
RECORD_ATTR = "zquant_info"
# What each calibration algorithm records, by record key (see `zquant.algorithms`).
STEP_KEYS = ("calibration", "lkd")


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists), so records compare like their JSON."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class QuantRecord(Mapping):
    scheme: QuantConfig
    adapter: str
    source: str | None = None                      # the MODEL argument the float model came from
    steps: Mapping[str, Any] = field(default_factory=dict)   # algorithm record key -> what it recorded
    version: int = RECORD_VERSION
    # SHA-256 of that float model's state dict (`zquant.sources.fingerprint`): a reference model
    # loaded later from ``source`` must be the same model
    source_sha256: str | None = None

    def __post_init__(self):
        if not isinstance(self.scheme, QuantConfig):
            raise ConfigError(f"record.scheme must be a QuantConfig, got {type(self.scheme).__name__}")
        if not isinstance(self.adapter, str) or not self.adapter:
            raise ConfigError(f"record.adapter must be a non-empty string, got {self.adapter!r}")
        if self.source is not None and not isinstance(self.source, str):
            raise ConfigError(f"record.source must be a string or null, got {type(self.source).__name__}")
        if self.source_sha256 is not None and not (isinstance(self.source_sha256, str)
                                                   and len(self.source_sha256) == 64):
            raise ConfigError(f"record.source_sha256 must be a hex SHA-256 or null, got {self.source_sha256!r}")
        unknown = sorted(set(self.steps) - set(STEP_KEYS))
        if unknown:
            raise ConfigError(f"record: unknown step(s) {unknown}; known: {list(STEP_KEYS)}")
        for key, value in self.steps.items():
            if not isinstance(value, Mapping):
                raise ConfigError(f"record.{key} must be an object, got {type(value).__name__}")
        object.__setattr__(self, "steps", _plain(dict(self.steps)))

    def with_step(self, key: str, value: Mapping) -> "QuantRecord":
        return dataclasses.replace(self, steps={**self.steps, key: value})

    def to_dict(self) -> dict[str, Any]:
        out = {"record_version": self.version, "scheme": self.scheme.to_dict(), "adapter": self.adapter}
        if self.source is not None:
            out["source"] = self.source
        if self.source_sha256 is not None:
            out["source_sha256"] = self.source_sha256
        return _plain({**out, **self.steps})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantRecord":
        if not isinstance(data, Mapping):
            raise ConfigError(f"record: expected an object, got {type(data).__name__}")
        version = data.get("record_version", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise ConfigError(f"record_version {version!r}; this zquant reads version {RECORD_VERSION}")
        for key in ("scheme", "adapter"):
            if key not in data:
                raise ConfigError(f"record: missing field {key!r}")
        scheme = data["scheme"]
        if isinstance(scheme, Mapping) and "float_dtype" not in scheme:
            # Records written before the field existed: their float parts were stored as float32.
            scheme = {**scheme, "float_dtype": "float32"}
        try:
            scheme = QuantConfig.from_dict(scheme)
        except TypeError as e:
            raise ConfigError(f"record.scheme: {e}") from None
        return cls(scheme, data["adapter"], data.get("source"), {k: data[k] for k in STEP_KEYS if k in data},
                   source_sha256=data.get("source_sha256"))

    # -- read it like its JSON form -----------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    __hash__ = object.__hash__


def record_of(model: nn.Module) -> QuantRecord | None:
    """The record of a quantized model, or None for a floating-point one."""
    return getattr(model, RECORD_ATTR, None) or None


def is_quantized(model: nn.Module) -> bool:
    return record_of(model) is not None


def refuse_quantized(model: nn.Module, what: str = "quantize it again") -> None:
    """The one error for a model that zquant already quantized."""
    if is_quantized(model):
        raise ValueError(f"this model is already quantized; load the floating-point model to {what}")
