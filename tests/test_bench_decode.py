"""The decode benchmark's pure helpers: llama.cpp output parsing, left padding, medians, ratios, the table.

The benchmarks themselves are never run as tests (they time things); these only check the bookkeeping.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str, module: str):
    # Loaded by path under a private name: an installed llama-cpp-python is also called llama_cpp.
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(module, BENCH / name)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod           # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


llama_cpp = _load("llama_cpp.py", "bench_llama_cpp")
bench_decode = _load("bench_decode.py", "bench_bench_decode")

# Trimmed llama-bench records: the fields the parser reads, plus some it ignores.
PP = {"build_commit": "0c1e570", "n_threads": 2, "n_prompt": 512, "n_gen": 0, "n_depth": 0,
      "avg_ts": 610.0, "stddev_ts": 20.0, "samples_ts": [600.0, 640.0, 590.0]}
TG = {"build_commit": "0c1e570", "n_threads": 2, "n_prompt": 0, "n_gen": 64, "n_depth": 1024,
      "avg_ts": 101.0, "stddev_ts": 3.0, "samples_ts": [99.0, 104.0]}


def test_llama_bench_json_array():
    rows = llama_cpp.parse_llama_bench(json.dumps([PP, TG], indent=2))
    assert rows == [{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "tok_s": 600.0},
                    {"n_prompt": 0, "n_gen": 64, "n_depth": 1024, "tok_s": 101.5}]


def test_llama_bench_jsonl_and_missing_samples():
    old = {k: v for k, v in TG.items() if k not in ("samples_ts", "n_depth")}     # an older llama-bench
    text = "main: some log line\n" + json.dumps(PP) + "\n" + json.dumps(old) + "\n"
    rows = llama_cpp.parse_llama_bench(text)
    assert [r["tok_s"] for r in rows] == [600.0, 101.0]
    assert rows[1]["n_depth"] == 0


def test_batched_bench_jsonl():
    line = ('{"n_kv_max": 2048, "n_batch": 2048, "pp": 16, "tg": 64, "pl": %d, "n_kv": 1280, "t_pp": 0.1, '
            '"speed_pp": 160.0, "t_tg": 2.0, "speed_tg": %f, "t": 2.1, "speed": 500.0}')
    text = "\n".join(["llama_model_loader: loaded", line % (1, 110.5), line % (16, 820.25), ""])
    assert llama_cpp.parse_batched_bench(text) == {1: 110.5, 16: 820.25}


def test_left_pad():
    ids, mask = bench_decode.left_pad([[5, 6, 7], [8], []], pad_id=2)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8], [2, 2, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_random_prompts_shape_range_and_seed():
    p = bench_decode.random_prompts(3, 16, seed=4)
    assert len(p) == 3 and {len(x) for x in p} == {16}
    assert all(100 <= t < 1000 for x in p for t in x)
    assert p == bench_decode.random_prompts(3, 16, seed=4) != bench_decode.random_prompts(3, 16, seed=5)


def test_median_row_skips_missing_metrics():
    rounds = [{"decode_16": 10.0, "agg_4": None}, {"decode_16": 30.0}, {"decode_16": 20.0, "agg_4": 7.0}]
    assert bench_decode.median_row(rounds) == {"decode_16": 20.0, "agg_4": 7.0}


def test_ratio_row_pairs_rounds():
    num = [{"decode_16": 10.0}, {"decode_16": 40.0}, {"decode_16": 90.0}]
    den = [{"decode_16": 10.0}, {"decode_16": 20.0}, {"decode_16": 90.0}]
    # per-round ratios 1, 2, 1 -> 1, where the ratio of the medians would be 40 / 20 = 2
    assert bench_decode.ratio_row(num, den) == {"decode_16": 1.0}


def test_render_table_and_ratio_rows():
    q8 = [{"decode_16": 120.0, "prefill_512": 600.0, "foreign": 0.0}]
    zq = [{"decode_16": 30.0, "prefill_512": 1200.0, "foreign": 0.5}]
    text = bench_decode.render({"llama.cpp-Q8_0": q8, "zquant-w8a8": zq})
    lines = text.splitlines()
    assert lines[0] == "| engine | decode b1 tok/s (16 ctx) | prefill 512 tok/s |"
    assert "| llama.cpp-Q8_0 | 120 | 600 |" in lines
    assert "| zquant-w8a8* | 30.0 | 1,200 |" in lines              # disturbed: starred
    assert "| zquant-w8a8 / llama.cpp-Q8_0 | 0.25x | 2.00x |" in lines
    assert not any("w4/8a8" in line for line in lines)            # no row for an engine that did not run


def test_ratio_rows_name_registered_engines():
    for a, b in bench_decode.RATIOS:
        assert a in bench_decode.ENGINES and b in bench_decode.ENGINES


def test_int8_kv_cache_engines():
    """Each fast engine has an INT8-KV-cache twin on the same checkpoint, compared with it in a ratio row."""
    for scheme in ("w8a8", "w4/8a8"):
        fp, kv8 = bench_decode.ENGINES[f"fast-{scheme}"], bench_decode.ENGINES[f"fast-{scheme}-kv8"]
        assert fp.variant == kv8.variant == scheme
        assert (f"fast-{scheme}-kv8", f"fast-{scheme}") in bench_decode.RATIOS


@pytest.mark.parametrize("engine, kv_cache", [("fast-w8a8", "fp"), ("fast-w4/8a8-kv8", "int8")])
def test_fast_engines_generate_with_their_kv_cache(monkeypatch, engine, kv_cache):
    import types
    import zquant
    built, asked = [], []

    class _Model:
        def eval(self):
            return self
    monkeypatch.setitem(sys.modules, "bench_models", types.SimpleNamespace(
        build=lambda model, variant: built.append(variant) or _Model()))
    monkeypatch.setattr(zquant, "load_tokenizer", lambda name: "tokenizer")
    monkeypatch.setattr(zquant, "generate", lambda *a, **kw: asked.append(kw["kv_cache"]) or [_Result([7] * 2)],
                        raising=False)
    monkeypatch.setattr(bench_decode, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(bench_decode, "measure_zquant", lambda generate, prefill, s: {"n": len(generate([[1]], 2))})
    assert bench_decode.ENGINES[engine](bench_decode.Settings(threads=torch.get_num_threads())) == {"n": 1}
    assert built == [engine.split("-")[1]] and asked == [kv_cache]


class _Result:                      # the attributes issue 15's zquant.generate results carry
    def __init__(self, token_ids, path="fast"):
        self.token_ids, self.path = token_ids, path


def test_fast_path_adapter_checks_results(monkeypatch):
    import zquant
    calls = []

    def fake(model, tokenizer, prompts, max_new_tokens, ignore_eos, kv_cache):
        calls.append((prompts, max_new_tokens, ignore_eos, kv_cache))
        return [_Result([7] * max_new_tokens) for _ in prompts]
    monkeypatch.setattr(zquant, "generate", fake, raising=False)
    generate, prefill = bench_decode.fast_path("model", "tokenizer")
    assert len(generate([[1, 2], [3]], 4)) == 2
    prefill([1, 2, 3])
    assert calls == [([[1, 2], [3]], 4, True, "fp"), ([[1, 2, 3]], 1, True, "fp")]
    bench_decode.fast_path("model", "tokenizer", kv_cache="int8")[0]([[1]], 2)
    assert calls[-1] == ([[1]], 2, True, "int8")

    monkeypatch.setattr(zquant, "generate", lambda *a, **k: [{"token_ids": [7, 7]}])      # dict results too
    with pytest.raises(SystemExit, match="returned 2 tokens, asked for 3"):
        generate([[1]], 3)
    monkeypatch.setattr(zquant, "generate", lambda *a, **k: [_Result([7], path="general")])
    with pytest.raises(SystemExit, match="'general' path"):
        generate([[1]], 1)


def test_fast_engine_skipped_without_zquant_generate(monkeypatch):
    import zquant
    monkeypatch.delattr(zquant, "generate", raising=False)
    assert bench_decode.worker("fast-w8a8", bench_decode.Settings()) == {"skipped": "zquant has no generate() yet"}
