"""Linear-layer benchmark: zquant's CPU fast path against FP32, BF16, the bare INT8 GEMM and the peers.

    python bench/bench_linear.py                 # all shapes and token counts, 2 threads
    python bench/bench_linear.py --quick         # 576-wide shapes only
    python bench/bench_linear.py --summarize a.json b.json ...   # the done-when ratios over several runs

Every path maps float32 activations x [M, K] to float32 outputs [M, N] except `torch._int_mm`, which
is given pre-quantized int8 inputs and returns int32: it is the GEMM alone, the limit for a
quantized layer. For it the faster weight layout at each M is used (an [N, K] weight passed as
a transposed view is ~2x faster at M = 1, a contiguous [K, N] one at M >= 16).
torchao is a benchmark-only dependency (``pip install torchao``); without it its column says so.
Each cell is a median over >= 0.3 s of calls, re-measured while other processes use more than
0.15 cores (see bench/timing.py); cells that never got a quiet window are marked with ``*``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import FOREIGN_LIMIT, keep_freed_memory, measure, wait_for_quiet  # noqa: E402

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 11008)]    # (K in, N out)
TOKENS = [1, 16, 128, 512]
FAULTS_LIMIT = 1        # minor page faults per call above which a cell is marked
PATHS = ["fp32", "bf16", "int_mm", "zquant w8a8", "zquant w4/8a8", "quantize_dynamic", "torchao int8-dyn"]


def build_paths(k: int, n: int) -> dict:
    """({path name: callable(x, _) or None}, int8 weight [N, K], int8 weight [K, N]) for one shape."""
    from zquant.config import ActQuant, LayerQuant, WeightQuant
    from zquant.modules import QuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(k, n).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k) / k ** 0.5)
    lin_bf16 = nn.Linear(k, n).to(torch.bfloat16).eval()
    lin_bf16.load_state_dict({kk: v.to(torch.bfloat16) for kk, v in lin.state_dict().items()})
    # zquant's decoder default: 64 row groups of the weight; token-wise dynamic INT8 activations.
    w8 = QuantLinear.from_float(lin, LayerQuant(WeightQuant(bits=8, groups=64), ActQuant()))
    w4 = QuantLinear.from_float(lin, LayerQuant(WeightQuant(bits=4, groups=64), ActQuant()))
    wq = w8.qweight                                                   # int8 [N, K]
    w_kn = wq.t().contiguous()                                        # int8 [K, N]
    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():   # torch.ao.quantization is deprecated (and warns), still the fbgemm path
        warnings.simplefilter("ignore")
        ref = nn.Sequential(nn.Linear(k, n))
        ref.load_state_dict({f"0.{kk}": v for kk, v in lin.state_dict().items()})
        qd = torch.ao.quantization.quantize_dynamic(ref, {nn.Linear}, dtype=torch.qint8)
    paths = {
        "fp32": lambda x, a: lin(x),
        "bf16": lambda x, a: lin_bf16(x.to(torch.bfloat16)),
        "int_mm": None,                                               # filled per M (layout choice)
        "zquant w8a8": lambda x, a: w8(x),
        "zquant w4/8a8": lambda x, a: w4(x),
        "quantize_dynamic": lambda x, a: qd(x),
    }
    ao = _torchao_linear(lin)
    paths["torchao int8-dyn"] = (lambda x, a: ao(x)) if ao is not None else None
    return paths, wq, w_kn


_TORCHAO_REASON = None


def _torchao_linear(lin: nn.Linear):
    global _TORCHAO_REASON
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
            m = nn.Sequential(nn.Linear(lin.in_features, lin.out_features))
            m.load_state_dict({f"0.{k}": v for k, v in lin.state_dict().items()})
            quantize_(m, Int8DynamicActivationInt8WeightConfig())
        return m
    except Exception as e:  # noqa: BLE001 -- a missing or broken optional peer is reported, not fatal
        _TORCHAO_REASON = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return None


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the 576-wide shapes")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--max-wait", type=float, default=300.0,
                    help="seconds to wait for a quiet machine before each token count (default 300)")
    ap.add_argument("--summarize", type=Path, nargs="+", metavar="JSON",
                    help="measure nothing: the w8a8 ratios of these --json runs, side by side")
    args = ap.parse_args()
    if args.summarize:
        print(summarize([json.loads(f.read_text()) for f in args.summarize]))
        return
    torch.set_num_threads(args.threads)
    # Before anything is allocated: no path may page-fault on every call (see timing.py).
    keep_freed_memory()
    from zquant.kernels import build
    reason = build.load()
    print(f"# zquant CPU kernels: {'ready' if reason is None else reason}", file=sys.stderr)

    shapes = SHAPES[:3] if args.quick else SHAPES
    results = []
    for k, n in shapes:
        paths, wq, w_kn = build_paths(k, n)
        for m in TOKENS:
            wait_for_quiet(max_wait=args.max_wait, log=lambda s: print(s, file=sys.stderr))
            x = torch.randn(m, k)
            a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            row = {"K": k, "N": n, "M": m, "paths": {}}
            for name in PATHS:
                if name == "int_mm":
                    fns = {"[N,K].t()": lambda: torch._int_mm(a8, wq.t()), "[K,N]": lambda: torch._int_mm(a8, w_kn)}
                    best = None
                    for layout, fn in fns.items():
                        r = measure(fn, log=lambda s: print(s, file=sys.stderr))
                        if best is None or r["median"] < best["median"]:
                            best = {**r, "layout": layout}
                    row["paths"][name] = best
                    continue
                fn = paths[name]
                if fn is None:
                    row["paths"][name] = None
                    continue
                with torch.no_grad():
                    row["paths"][name] = measure(lambda: fn(x, None), log=lambda s: print(s, file=sys.stderr))
            results.append(row)
            cells = "  ".join(f"{p}={fmt_time(v['median'])}" for p, v in row["paths"].items() if v)
            print(f"# K={k} N={n} M={m}: {cells}", file=sys.stderr, flush=True)
    print(render(results, args.threads))
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "torch": torch.__version__, "threads": args.threads,
                                         "results": results}, indent=1))


def speedup(row: dict, other: str) -> float | None:
    """How many times faster zquant w8a8 ran than path ``other`` in this cell (None: not measured)."""
    p = row["paths"]
    return p[other]["median"] / p["zquant w8a8"]["median"] if p.get(other) else None


def render(results: list[dict], threads: int) -> str:
    lines = [f"Times per call (median), and speed-up over FP32 in parentheses; {threads} threads. "
             f"`*`: other processes used > {FOREIGN_LIMIT} cores during every attempt. "
             f"`†`: more than {FAULTS_LIMIT} page faults per call.", ""]
    head = "| K x N (in x out) | M | " + " | ".join(PATHS) + " |"
    lines += [head, "|" + "---|" * (len(PATHS) + 2)]
    for row in results:
        fp = row["paths"]["fp32"]["median"]
        cells = []
        for p in PATHS:
            v = row["paths"][p]
            if v is None:
                cells.append("n/a")
                continue
            mark = ("*" if v["foreign"] > FOREIGN_LIMIT else "") + ("†" if v.get("faults", 0) > FAULTS_LIMIT else "")
            cells.append(f"{fmt_time(v['median'])} ({fp / v['median']:.1f}x){mark}")
        lines.append(f"| {row['K']} x {row['N']} | {row['M']} | " + " | ".join(cells) + " |")
    lines += ["", "Done-when checks (zquant w8a8):", ""]
    lines += ["| K x N | M | vs `_int_mm` alone (speed, >= 85%) | vs quantize_dynamic (>= 1.2x) | "
              "vs torchao (>= 2x) | vs FP32 at M=1 (>= 1x) |", "|---|---|---|---|---|---|"]
    for row in results:
        def ratio(name, inverse=False):
            r = speedup(row, name)
            if r is None:
                return "n/a"
            return f"{r * 100:.0f}%" if inverse else f"{r:.2f}x"
        if row["M"] >= 128:
            lines.append(f"| {row['K']} x {row['N']} | {row['M']} | {ratio('int_mm', True)} | "
                         f"{ratio('quantize_dynamic')} | {ratio('torchao int8-dyn')} | |")
        elif row["M"] == 1:
            lines.append(f"| {row['K']} x {row['N']} | 1 | | | | {ratio('fp32')} |")
    if _TORCHAO_REASON:
        lines += ["", f"torchao unavailable: {_TORCHAO_REASON} (pip install torchao)"]
    return "\n".join(lines)


def summarize(runs: list[dict]) -> str:
    """zquant w8a8 against quantize_dynamic, _int_mm and torchao at M >= 128 in each run, and the
    median over the runs: the ratio of two paths measured a second apart in one process is what
    one run can vouch for; how it moves from run to run is what the machine does."""
    cells: dict[tuple, list[dict]] = {}
    for run in runs:
        for row in run["results"]:
            if row["M"] >= 128:
                cells.setdefault((row["K"], row["N"], row["M"]), []).append(row)
    lines = [f"zquant w8a8 against quantize_dynamic (>= 1.2x) in each of {len(runs)} runs, the median, and the "
             "lowest ratio against `_int_mm` (speed, >= 85%) and torchao (>= 2x) over the runs:", "",
             "| K x N | M | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | median | runs >= 1.2x "
             "| vs `_int_mm`, lowest | vs torchao, lowest |",
             "|---|---|" + "---|" * (len(runs) + 4)]
    for (k, n, m), rows in cells.items():
        fb, mm, ao = ([v for v in (speedup(r, other) for r in rows) if v is not None]
                      for other in ("quantize_dynamic", "int_mm", "torchao int8-dyn"))
        lines.append(f"| {k} x {n} | {m} | " + " | ".join(f"{v:.2f}x" for v in fb)
                     + f" | {statistics.median(fb):.2f}x | {sum(v >= 1.2 for v in fb)} of {len(fb)} | "
                     + (f"{min(mm):.0%}" if mm else "n/a") + " | " + (f"{min(ao):.2f}x" if ao else "n/a") + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
