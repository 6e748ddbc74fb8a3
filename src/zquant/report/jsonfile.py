"""Strict JSON files for the numbers behind the plots."""
from __future__ import annotations

import json
import math
from pathlib import Path


def finite(data):
    """``data`` with NaN and infinities as None, so the file is strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def write_json(path: Path, data, indent: int | None = None) -> None:
    """Strict JSON; compact by default, since the per-token and per-row arrays dominate the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite(data), indent=indent, allow_nan=False,
                      separators=(",", ": ") if indent else (",", ":"))
    path.write_text(text + "\n", encoding="utf-8")
