"""Decode benchmark (issue 15): zquant's generation paths side by side with llama.cpp, SmolLM2-135M.

    python bench/bench_decode.py                       # every engine, 3 alternating rounds
    python bench/bench_decode.py --quick               # 1 round, fewer repetitions: a smoke run
    python bench/bench_decode.py --engines llama.cpp-Q8_0 zquant-w8a8 --rounds 5 --json out.json

Engines (``ENGINES``: name -> callable(Settings) -> metrics): llama.cpp Q8_0 / Q4_0 / BF16 (llama-bench and
llama-batched-bench, see llama_cpp.py); zquant's general path, ``model.generate`` on the saved ``w8a8`` and
``w4/8a8`` checkpoints (as bench_models.py loads them: fusions on) and on PyTorch BF16; zquant's own decode
path ``zquant.generate`` on the same checkpoints (skipped, with a note, while the package has none), with the
float32 KV cache (``fast-w8a8``) and the INT8 one (``fast-w8a8-kv8``: ``kv_cache="int8"``, one scale per token
per head; its perplexity and top-1 cost: bench_kv_cache.py), and with the explicit INT8 head
(``fast-w8a8-int8head``: the checkpoint quantized with ``--embeddings int8``, whose tied head runs W8A8).

Metrics (``METRICS``), 2 threads: decode tok/s at batch 1, 64 new tokens after a 16-token prompt and after a
1,024-token prompt; prefill tok/s of 512 tokens (last logits only); time to first token of the 16-token prompt;
aggregate decode tok/s of 1, 4 and 16 sequences of 64 new tokens after 16-token prompts; peak RSS of the
engine's processes (for torch BF16 it includes the FP32 model it is cast from). zquant's decode rates are
``n * 63 / (t(64 new) - t(1 new))`` by wall clock over ``n`` sequences (greedy, EOS ignored; a batch is
left-padded), so the prefill is not counted; TTFT is ``t(1 new)``. Prompts are random token ids, as
llama-bench's are.

Each round runs every engine once, in ``ENGINES`` order (each zquant engine next to its llama.cpp peer), each
in a fresh process (its peak RSS is its own); the table gives the median over rounds, and each ratio row the
median of the per-round ratios (the machine is shared and noisy: ratios within one run are what count).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402
from timing import FOREIGN_LIMIT, keep_freed_memory, measure, peak_rss_mb, wait_for_quiet  # noqa: E402

MODEL = "smollm2-135m"
NEW = 64
METRICS = {                     # key -> column heading
    "decode_16": "decode b1 tok/s (16 ctx)", "decode_1024": "decode b1 tok/s (1,024 ctx)",
    "prefill_512": "prefill 512 tok/s", "ttft_16_ms": "TTFT 16 (ms)",
    "agg_1": "agg. 1 seq tok/s", "agg_4": "agg. 4 seq tok/s", "agg_16": "agg. 16 seq tok/s",
    "peak_rss_mb": "peak RSS (MiB)",
}
RATIOS = [                      # (numerator, denominator), shown when both engines ran
    ("zquant-w8a8", "llama.cpp-Q8_0"), ("zquant-w4/8a8", "llama.cpp-Q4_0"), ("torch-bf16", "llama.cpp-BF16"),
    ("fast-w8a8", "llama.cpp-Q8_0"), ("fast-w4/8a8", "llama.cpp-Q4_0"),
    ("fast-w8a8", "zquant-w8a8"), ("fast-w4/8a8", "zquant-w4/8a8"),
    ("fast-w8a8-kv8", "fast-w8a8"), ("fast-w4/8a8-kv8", "fast-w4/8a8"),
    ("fast-w8a8-int8head", "llama.cpp-Q8_0"), ("fast-w4/8a8-int8head", "llama.cpp-Q4_0"),
    ("fast-w8a8", "llama.cpp-BF16"),           # prefill's yardstick: llama.cpp's fastest format for it
]


@dataclasses.dataclass(frozen=True)
class Settings:
    threads: int = 2
    reps: int = 3           # llama-bench repetitions
    calls: int = 3          # timed calls per zquant measurement (after one warm-up)
    retries: int = 3        # re-measurements while other processes use the CPU (timing.measure)
    max_wait: float = 120.0  # seconds an engine waits for a quiet machine first


class Skipped(Exception):
    """The engine cannot run here; the message says why."""


def left_pad(prompts: list[list[int]], pad_id: int):
    """Token-id lists -> (input_ids, attention_mask), both int64 [len(prompts), longest], padded on the left."""
    import torch
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids, mask


def random_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids in [100, 1000) (ordinary vocabulary, no special tokens)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 1000, (n, length), generator=g).tolist()


# A zquant engine is a pair: generate(prompts, n_new) and prefill(prompt) (the last position's logits).
GenerateFn = Callable[[list[list[int]], int], object]
PrefillFn = Callable[[list[int]], object]


def general_path(model) -> tuple[GenerateFn, PrefillFn]:
    """``model.generate``, greedy, exactly ``n`` new tokens; a batch is left-padded."""
    import torch
    pad = model.config.eos_token_id

    def generate(prompts, n):
        ids, mask = left_pad(prompts, pad)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=pad)

    def prefill(prompt):
        with torch.no_grad():
            return model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    return generate, prefill


def fast_path(model, tokenizer, kv_cache: str = "fp") -> tuple[GenerateFn, PrefillFn]:
    """``zquant.generate`` (issue 15's API: token-id prompts, ``max_new_tokens``, ``ignore_eos``, ``kv_cache``)."""
    import zquant

    def generate(prompts, n):
        results = zquant.generate(model, tokenizer, prompts, max_new_tokens=n, ignore_eos=True, kv_cache=kv_cache)
        for r in results:
            get = r.get if isinstance(r, dict) else lambda key, default=None: getattr(r, key, default)
            if len(get("token_ids")) != n:
                raise SystemExit(f"zquant.generate returned {len(get('token_ids'))} tokens, asked for {n}")
            if get("path", "fast") != "fast":           # a fall-back would be measured as the fast path
                raise SystemExit(f"zquant.generate ran on the {get('path')!r} path, not the fast one")
        return results

    return generate, lambda prompt: generate([prompt], 1)


def measure_zquant(generate: GenerateFn, prefill: PrefillFn, s: Settings) -> dict:
    """Every metric of one zquant engine in this process (keys of METRICS, plus "foreign")."""
    log = lambda m: print(f"#{m}", file=sys.stderr)  # noqa: E731
    foreign = []

    def seconds(fn) -> float:
        r = measure(fn, min_time=0.0, min_calls=s.calls, warmup=1, retries=s.retries, log=log)
        foreign.append(r["foreign"])
        return r["median"]

    def decode(prompts) -> tuple[float, float]:      # (aggregate tok/s, seconds for the first token)
        first = seconds(lambda: generate(prompts, 1))
        return len(prompts) * (NEW - 1) / (seconds(lambda: generate(prompts, NEW)) - first), first

    generate(random_prompts(1, 16), 2)                  # first call: kernel build / prepacking
    wait_for_quiet(max_wait=s.max_wait, log=log)
    out = {}
    out["decode_16"], ttft = decode(random_prompts(1, 16))
    out["agg_1"], out["ttft_16_ms"] = out["decode_16"], ttft * 1e3
    log(f" decode_16 {out['decode_16']:.1f} tok/s, TTFT {ttft * 1e3:.1f} ms")
    out["decode_1024"] = decode(random_prompts(1, 1024, seed=1))[0]
    out["prefill_512"] = 512 / seconds(lambda: prefill(random_prompts(1, 512, seed=2)[0]))
    log(f" decode_1024 {out['decode_1024']:.1f} tok/s, prefill_512 {out['prefill_512']:.0f} tok/s")
    for n in (4, 16):
        out[f"agg_{n}"] = decode(random_prompts(n, 16, seed=3))[0]
        log(f" agg_{n} {out[f'agg_{n}']:.1f} tok/s")
    out["peak_rss_mb"] = peak_rss_mb()
    out["foreign"] = max(foreign)
    return out


def _zquant(variant: str, fast: bool, kv_cache: str = "fp") -> Callable[[Settings], dict]:
    def run(s: Settings) -> dict:
        import torch
        import zquant
        from bench_models import build
        if fast and not hasattr(zquant, "generate"):
            raise Skipped("zquant has no generate() yet")
        torch.set_num_threads(s.threads)
        keep_freed_memory()
        model = build(MODEL, variant).eval()
        fns = fast_path(model, zquant.load_tokenizer(MODEL), kv_cache) if fast else general_path(model)
        return measure_zquant(*fns, s)
    run.variant = variant                # what main() builds before any engine is measured
    return run


def _llama(fmt: str) -> Callable[[Settings], dict]:
    def run(s: Settings) -> dict:        # re-measured while others use the CPU, as timing.measure does
        log = lambda m: print(f"#{m}", file=sys.stderr)  # noqa: E731
        best = None
        for _ in range(s.retries):
            wait_for_quiet(max_wait=s.max_wait, log=log)
            out = llama_cpp.measure(fmt, s.threads, s.reps)
            if best is None or out["foreign"] < best["foreign"]:
                best = out
            if out["foreign"] <= FOREIGN_LIMIT:
                break
            log(f"  contention: others used {out['foreign']:.2f} cores; re-measuring")
        return best
    return run


# In round order: each zquant engine next to the llama.cpp engine it is compared with.
ENGINES: dict[str, Callable[[Settings], dict]] = {
    "llama.cpp-Q8_0": _llama("Q8_0"), "zquant-w8a8": _zquant("w8a8", fast=False),
    "fast-w8a8": _zquant("w8a8", fast=True), "fast-w8a8-kv8": _zquant("w8a8", fast=True, kv_cache="int8"),
    "llama.cpp-Q4_0": _llama("Q4_0"), "zquant-w4/8a8": _zquant("w4/8a8", fast=False),
    "fast-w4/8a8": _zquant("w4/8a8", fast=True), "fast-w4/8a8-kv8": _zquant("w4/8a8", fast=True, kv_cache="int8"),
    "fast-w8a8-int8head": _zquant("w8a8+int8-embed", fast=True),
    "fast-w4/8a8-int8head": _zquant("w4/8a8+int8-embed", fast=True),
    "llama.cpp-BF16": _llama("BF16"), "torch-bf16": _zquant("bf16", fast=False),
}


def median_row(rounds: list[dict]) -> dict:
    """Per-metric median over an engine's rounds (metrics missing from every round are left out)."""
    out = {}
    for key in METRICS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


def ratio_row(num: list[dict], den: list[dict]) -> dict:
    """Per-metric median of the per-round ratios num/den (rounds paired by index)."""
    out = {}
    for key in METRICS:
        ratios = [a[key] / b[key] for a, b in zip(num, den) if a.get(key) is not None and b.get(key)]
        if ratios:
            out[key] = statistics.median(ratios)
    return out


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if key == "ttft_16_ms" or value < 100 else f"{value:,.0f}"


def render(results: dict[str, list[dict]]) -> str:
    """Markdown: one row per engine (medians), then the ratio rows. ``results``: engine -> its rounds."""
    keys = [k for k in METRICS if any(r.get(k) is not None for rounds in results.values() for r in rounds)]
    head = "| engine | " + " | ".join(METRICS[k] for k in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for name, rounds in results.items():
        row = median_row(rounds)
        star = "*" if any(r.get("foreign", 0) > FOREIGN_LIMIT for r in rounds) else ""
        lines.append(f"| {name}{star} | " + " | ".join(_cell(k, row.get(k)) for k in keys) + " |")
    for a, b in RATIOS:
        if a in results and b in results:
            row = ratio_row(results[a], results[b])
            lines.append(f"| {a} / {b} | " + " | ".join(f"{row[k]:.2f}x" if k in row else "-" for k in keys) + " |")
    n = max(len(r) for r in results.values())
    lines += ["", f"Medians over {n} round{'s' if n > 1 else ''}; ratio rows: median of the per-round "
              "ratios (higher is better for tok/s, lower for TTFT and RSS). `*`: other processes used more than "
              f"{FOREIGN_LIMIT} cores during a measurement of that engine in at least one round."]
    return "\n".join(lines)


def run_worker(name: str, s: Settings) -> dict:
    """Run engine ``name`` in a fresh process; returns its metrics, or {"skipped": reason}."""
    cmd = [sys.executable, __file__, "--worker", name, "--settings", json.dumps(dataclasses.asdict(s))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    tail: list[str] = []
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        for line in proc.stderr:                    # the worker's notes, as they come
            if line.startswith("#"):
                print(f"#  {name}: {line[1:].strip()}", file=sys.stderr, flush=True)
            tail = (tail + [line])[-40:]
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed:\n{''.join(tail)}")
        out.seek(0)
        return json.loads(out.read().strip().splitlines()[-1])


def worker(name: str, s: Settings) -> dict:
    try:
        return ENGINES[name](s)
    except Skipped as e:
        return {"skipped": str(e)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 round, 1 timed call per measurement: a smoke run")
    ap.add_argument("--max-wait", type=float, default=120.0,
                    help="seconds each engine waits for a quiet machine before measuring (default 120)")
    ap.add_argument("--json", type=Path, help="also write every round's raw results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Settings(**json.loads(args.settings)))))
        return
    if args.rounds < 1 or args.threads < 1:
        ap.error(f"--rounds and --threads must be at least 1 (got {args.rounds}, {args.threads})")
    s, rounds = Settings(threads=args.threads, max_wait=args.max_wait), args.rounds
    if args.quick:
        s, rounds = dataclasses.replace(s, reps=2, calls=1, retries=1), 1
    for name in args.engines:                       # build and quantize outside the measured processes
        variant = getattr(ENGINES[name], "variant", None)
        if name.startswith("llama.cpp-"):
            llama_cpp.gguf_file(name.removeprefix("llama.cpp-"))
        elif variant and variant.removesuffix("+int8-embed") in ("w8a8", "w4/8a8"):
            from bench_models import checkpoint
            checkpoint(MODEL, variant)
    results: dict[str, list[dict]] = {name: [] for name in args.engines}
    for r in range(rounds):
        for name in args.engines:
            t = time.perf_counter()
            out = run_worker(name, s)
            if "skipped" in out:
                print(f"# {name}: skipped ({out['skipped']})", file=sys.stderr)
                results.pop(name, None)
                continue
            results[name].append(out)
            print(f"# round {r + 1} {name}: {out} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        args.engines = [n for n in args.engines if n in results]
    if not results:
        raise SystemExit("bench_decode: every engine was skipped")
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
