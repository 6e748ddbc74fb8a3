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
    tables = {"ACT_CODES": {"none", "relu", "gelu", "gelu_tanh", "silu", "gelu_new"},
              "QUANT_MODES": {"none", "sym", "asym", "static"},
              "NORM_CODES": {"rms", "layer"}}
    for table, names in tables.items():
        codes = getattr(ops, table)
        assert set(codes) == names, table
        assert all(isinstance(c, int) for c in codes.values()) and len(set(codes.values())) == len(codes), table


def test_cpu_reads_the_codes_from_the_extension():
    ops = build.extension()
    assert cpu._ACT["silu"] == ops.ACT_CODES["silu"] and cpu._NORM["layer"] == ops.NORM_CODES["layer"]
    assert cpu._QMODE["static"] == ops.QUANT_MODES["static"]
    assert cpu._ACT == ops.ACT_CODES and cpu._QMODE == ops.QUANT_MODES and cpu._NORM == ops.NORM_CODES
    assert type(cpu._ACT) is dict                          # read once, then a plain dict
    with pytest.raises(KeyError):
        cpu._ACT["no_such_activation"]
    with pytest.raises(KeyError):                          # also when the unknown name is the first lookup
        cpu._Codes("ACT_CODES", "_ACT")["no_such_activation"]
    assert cpu._out_mode(None) == ops.QUANT_MODES["none"]
    assert cpu._out_mode(ActQuant(mode="static")) == ops.QUANT_MODES["none"]   # never quantized for the next layer
    assert cpu._out_mode(ActQuant()) == ops.QUANT_MODES["sym"]
    assert cpu._out_mode(ActQuant(symmetric=False)) == ops.QUANT_MODES["asym"]


def test_codes_outside_the_tables_are_rejected():
    ops = build.extension()
    x = torch.randn(3, 8)
    for mode in (max(ops.QUANT_MODES.values()) + 1, min(ops.QUANT_MODES.values()) - 1):
        with pytest.raises(RuntimeError, match="bad mode"):
            ops.quantize(x, mode, 0.0)
    with pytest.raises(RuntimeError, match="kind must be"):
        ops.norm_quant(x, None, None, 1e-5, max(ops.NORM_CODES.values()) + 1, ops.QUANT_MODES["none"])


# ---------------------------------------------------------------------------------------------
# Path-selection thresholds: defined once in C++, exported, described by name in cpu.py
# ---------------------------------------------------------------------------------------------

THRESHOLDS = ("ROW_SPLIT_MIN_ROWS_PER_THREAD", "ROW_SPLIT_MIN_ROWS_PER_THREAD_NARROW", "ROW_SPLIT_MAX_WEIGHT_BYTES",
              "SINGLE_THREAD_MAX_MNK", "PREFETCH_BLOCKS")


def test_thresholds_are_exported_and_documented_by_name():
    ops = build.extension()
    for name in THRESHOLDS:
        value = getattr(ops, name)
        assert isinstance(value, int) and value > 0, name
        assert name in cpu.__doc__, name


def _layer(k: int, n: int, bits: int = 8):
    from zquant.config import LayerQuant, WeightQuant
    from zquant.modules import QuantLinear
    torch.manual_seed(0)
    return QuantLinear.from_float(torch.nn.Linear(k, n), LayerQuant(WeightQuant(bits=bits, groups=7), ActQuant()))


def _check(layer, m: int):
    from zquant.kernels import reference
    x = torch.randn(m, layer.in_features, generator=torch.Generator().manual_seed(m))
    assert torch.equal(cpu.linear(layer, x), reference.linear(layer, x)), (m, layer.in_features, layer.out_features)


def test_shapes_on_either_side_of_each_threshold_are_bit_identical():
    ops = build.extension()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = ops.ROW_SPLIT_MIN_ROWS_PER_THREAD * 2
        wide = _layer(256, 640)                        # 40 tiles: rows split from `rows` on
        for m in (rows - 1, rows):
            _check(wide, m)
        narrow = _layer(256, 48)                       # 3 tiles, fewer than 2 per thread
        for m in (ops.ROW_SPLIT_MIN_ROWS_PER_THREAD_NARROW * 2 - 1, ops.ROW_SPLIT_MIN_ROWS_PER_THREAD_NARROW * 2):
            _check(narrow, m)
        k = 2048                                        # INT8: N x K bytes, at and just over the limit
        n_at = ops.ROW_SPLIT_MAX_WEIGHT_BYTES // k
        blocks_rows = 6 * ops.PREFETCH_BLOCKS            # 6-row blocks: prefetching from PREFETCH_BLOCKS on
        for n in (n_at, n_at + 16):
            layer = _layer(k, n)
            for m in (blocks_rows - 6, blocks_rows):
                _check(layer, m)
        tiny = ops.SINGLE_THREAD_MAX_MNK                 # M x 64 x 64 on either side of the limit
        for m in (tiny // 4096 - 1, tiny // 4096):
            _check(_layer(64, 64), m)
    finally:
        torch.set_num_threads(before)
