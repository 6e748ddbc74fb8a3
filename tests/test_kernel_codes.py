"""The integer codes that cross from Python into the C++ extension are the extension's own enums.

csrc/zquant_cpu.cpp defines each code once (an enum and a table of names) and exports the tables
as dicts; cpu.py reads them from there instead of writing integers of its own. Needs the extension
(built on first use; skipped on CPUs without AVX-512 VNNI).
"""
from __future__ import annotations

import pytest
import torch

from zquant.config import ActQuant
from zquant.kernels import build, cpu

pytestmark = pytest.mark.usefixtures("cpu_extension")


def test_the_extension_exports_its_code_tables():
    ops = build.extension()
    tables = {"ACT_CODES": {"none", "relu", "gelu", "gelu_tanh", "silu"},
              "QUANT_MODES": {"none", "sym", "asym", "static"},
              "NORM_CODES": {"rms", "layer"}}
    for table, names in tables.items():
        codes = getattr(ops, table)
        assert set(codes) == names, table
        assert all(isinstance(c, int) for c in codes.values()) and len(set(codes.values())) == len(codes), table


def test_cpu_reads_the_codes_from_the_extension():
    ops = build.extension()
    assert cpu.ACT_CODES == ops.ACT_CODES and cpu.NORM_CODES == ops.NORM_CODES
    assert cpu._codes.act == ops.ACT_CODES and cpu._codes.qmode == ops.QUANT_MODES
    assert cpu._codes.norm == ops.NORM_CODES
    assert cpu._out_mode(None) == ops.QUANT_MODES["none"]
    assert cpu._out_mode(ActQuant(mode="static")) == ops.QUANT_MODES["none"]   # never quantized for the next layer
    assert cpu._out_mode(ActQuant()) == ops.QUANT_MODES["sym"]
    assert cpu._out_mode(ActQuant(symmetric=False)) == ops.QUANT_MODES["asym"]
    with pytest.raises(AttributeError):
        cpu.NO_SUCH_TABLE  # noqa: B018


def test_codes_outside_the_tables_are_rejected():
    ops = build.extension()
    x = torch.randn(3, 8)
    for mode in (max(ops.QUANT_MODES.values()) + 1, min(ops.QUANT_MODES.values()) - 1):
        with pytest.raises(RuntimeError, match="bad mode"):
            ops.quantize(x, mode, 0.0)
    with pytest.raises(RuntimeError, match="kind must be"):
        ops.norm_quant(x, None, None, 1e-5, max(ops.NORM_CODES.values()) + 1, ops.QUANT_MODES["none"])
