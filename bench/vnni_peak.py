"""The INT8 roofline of this CPU: how many int8 operations per second AVX-512 VNNI can do at most.

    python bench/vnni_peak.py                          # 1 thread and --threads (default 2)
    python bench/vnni_peak.py --linear linear.json     # + each INT8 path's share of that peak

Compiles (with g++) and times a loop of independent ``vpdpbusd`` instructions on 24 register
accumulators, with no memory traffic: each one is 64 int8 multiply-adds, 128 operations. No INT8
GEMM on this machine can exceed that rate, so it is the yardstick for bench_linear.py's results,
read as 2·M·K·N / time. ``--linear`` takes bench_linear.py's ``--json`` output and prints, for
M >= 128, every INT8 path's rate as a share of the peak at the same thread count.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#define DP(c) asm volatile("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "v"(b))
int main(int argc, char** argv) {
  const int threads = std::atoi(argv[1]);
  const long iters = 20000000;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads)
    {
      const __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x01010101);
      __m512i c0 = a, c1 = a, c2 = a, c3 = a, c4 = a, c5 = a, c6 = a, c7 = a;
      __m512i c8 = a, c9 = a, c10 = a, c11 = a, c12 = a, c13 = a, c14 = a, c15 = a;
      __m512i c16 = a, c17 = a, c18 = a, c19 = a, c20 = a, c21 = a, c22 = a, c23 = a;
      for (long i = 0; i < iters; ++i) {
        DP(c0); DP(c1); DP(c2); DP(c3); DP(c4); DP(c5); DP(c6); DP(c7); DP(c8); DP(c9); DP(c10); DP(c11);
        DP(c12); DP(c13); DP(c14); DP(c15); DP(c16); DP(c17); DP(c18); DP(c19); DP(c20); DP(c21); DP(c22); DP(c23);
      }
      __m512i s = _mm512_add_epi32(_mm512_add_epi32(c0, c23), _mm512_add_epi32(c11, c12));
      volatile int keep = _mm512_reduce_add_epi32(s);
      (void)keep;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tops = 24.0 * 128.0 * iters * threads / dt / 1e12;
    if (tops > best) best = tops;
  }
  std::printf("%.4f\n", best);
}
"""

INT8_PATHS = ("int_mm", "zquant w8a8", "zquant w4/8a8", "quantize_dynamic", "torchao int8-dyn")


def peak_tops(threads: int, workdir: Path) -> float:
    """Measured VNNI peak in TOPS (10^12 int8 operations per second) on ``threads`` threads."""
    exe = workdir / "vnni_peak"
    if not exe.exists():
        src = workdir / "vnni_peak.cpp"
        src.write_text(SOURCE)
        subprocess.run(["g++", "-O2", "-mavx512f", "-mavx512vnni", "-fopenmp", str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), str(threads)], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def shares(linear: dict, peak: float) -> list[str]:
    """Markdown rows: each INT8 path's TOPS at M >= 128 and its share of ``peak``."""
    rows = ["| K x N | M | " + " | ".join(INT8_PATHS) + " |", "|---|---|" + "---|" * len(INT8_PATHS)]
    for r in linear["results"]:
        if r["M"] < 128:
            continue
        cells = []
        for name in INT8_PATHS:
            p = r["paths"].get(name)
            if not p or not p.get("median"):
                cells.append("-")
                continue
            tops = 2 * r["M"] * r["K"] * r["N"] / p["median"] / 1e12
            cells.append(f"{tops:.2f} ({tops / peak:.0%})")
        rows.append(f"| {r['K']} x {r['N']} | {r['M']} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--linear", type=Path,
                    help="bench_linear.py --json output: print each INT8 path's share of the peak")
    args = ap.parse_args()
    if shutil.which("g++") is None:
        raise SystemExit("vnni_peak: needs g++ on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        peaks = {n: peak_tops(n, Path(tmp)) for n in sorted({1, args.threads})}
    print("| threads | VNNI peak (int8 TOPS) |\n|---|---|")
    for n, tops in peaks.items():
        print(f"| {n} | {tops:.2f} |")
    if args.linear:
        linear = json.loads(args.linear.read_text())
        threads = linear.get("threads", args.threads)
        if threads not in peaks:
            raise SystemExit(f"vnni_peak: {args.linear} was measured on {threads} threads; pass --threads {threads}")
        print(f"\nTOPS (2·M·K·N / time) and share of the {threads}-thread peak, M >= 128:\n")
        print("\n".join(shares(linear, peaks[threads])))


if __name__ == "__main__":
    main()
