"""The KV-cache benchmark's scoring (bench/bench_kv_cache.py) on a tiny model: what the numbers mean, never timed."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zquant
from conftest import make_tiny
from zquant.eval import perplexity

BENCH = Path(__file__).resolve().parent.parent / "bench"
_spec = importlib.util.spec_from_file_location("bench_bench_kv_cache", BENCH / "bench_kv_cache.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench              # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_add_window_scores_against_the_float_cache():
    g = torch.Generator().manual_seed(0)
    ids, logits = torch.randint(0, 11, (6,), generator=g), torch.randn(6, 11, generator=g)
    fp, other = bench.Tally(), bench.Tally()
    ref = bench.add_window(fp, logits, ids, None)
    assert fp.tokens == 5 and fp.agree == 5 and fp.kl == pytest.approx(0.0, abs=1e-6)
    assert fp.nll == pytest.approx(float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum")), rel=1e-6)
    moved = logits.clone()
    moved[0] = logits[0].flip(0)                 # another distribution (and argmax) at position 0 only
    bench.add_window(other, moved, ids, ref)
    assert other.agree == 4 and other.kl > 0


def test_measure_scheme_on_a_tiny_model(cpu_extension):
    q = zquant.quantize(make_tiny("llama", vocab_size=300), "w8a8")
    windows = torch.randint(4, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    tallies = bench.measure_scheme(q, windows)
    fp, i8 = tallies["fp"], tallies["int8"]
    # the float cache's perplexity is the model's own, window by window (head sums in another order)
    ref = perplexity(q, windows.flatten(), window=24, quiet=True)["perplexity"]
    assert fp.tokens == i8.tokens == 3 * 23 and fp.perplexity == pytest.approx(ref, rel=1e-4)
    assert fp.agree == fp.tokens and fp.kl == pytest.approx(0.0, abs=1e-4)
    assert 0.5 < i8.agree / i8.tokens <= 1 and i8.kl > 0 and math.isfinite(i8.perplexity)
    d = q.config.hidden_size // q.config.num_attention_heads       # int8 + one float32 scale per head vector
    assert i8.bytes_per_token * 4 * d == pytest.approx(fp.bytes_per_token * (d + 4), rel=1e-12)
    rows = bench.rows_of("w8a8", tallies, 24)
    text = bench.render(rows, "header")
    assert [r["kv_cache"] for r in rows] == ["fp", "int8"] and rows[0]["ppl_change"] == 0
    assert text.count("| w8a8 |") == 2 and f"{100 * rows[1]['ppl_change']:+.2f}%" in text
