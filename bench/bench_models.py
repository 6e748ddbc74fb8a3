"""Whole-model benchmark: prefill latency, decode speed and resident memory, FP32 vs BF16 vs zquant vs
`torch.ao.quantization.quantize_dynamic`.

    python bench/bench_models.py                                   # SmolLM2-135M and MiniLM-L6, every variant
    python bench/bench_models.py --models minilm-l6 --variants fp32 w8a8

Each model variant runs in a fresh process (so its peak RSS is its own), with 2 threads:

* prefill: one forward pass over ``--batch`` x ``--seq`` random tokens (default 8 x 256). For the
  causal LM it is what ``generate`` does first: fill the KV cache and compute the next-token
  logits (``logits_to_keep=1``); the full-vocabulary logits of every position, which only a
  perplexity evaluation needs, are not computed. Median of 3 after a warm-up.
* decode (causal LM): greedy ``generate`` of 64 tokens after a 64-token prompt, batch 1;
  tokens/s = 63 / (time(64 new tokens) - time(1 new token)), i.e. without the prefill.
* memory: peak RSS of the process (VmHWM, see timing.peak_rss_mb; for BF16 and quantize_dynamic it includes the
  FP32 model they are made from, while zquant variants load their saved checkpoint) and its RSS
  after the runs.

zquant variants are quantized once and saved under ``$ZQUANT_CACHE/bench`` (``zquant.load`` of
the checkpoint turns the fast path's fusions on, as it does for users); ``quantize_dynamic``
quantizes the same block linear layers zquant does (per-tensor INT8, engine fbgemm).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import FOREIGN_LIMIT, keep_freed_memory, measure, peak_rss_mb, wait_for_quiet  # noqa: E402

MODELS = ["smollm2-135m", "minilm-l6"]
VARIANTS = ["fp32", "bf16", "w8a8", "w4/8a8", "quantize_dynamic"]


INT8_TABLE = "+int8-embed"      # a variant suffix: the embedding table (and a tied head) as INT8 rows


def checkpoint(model_name: str, variant: str) -> Path:
    """The saved zquant checkpoint of ``model_name`` quantized as ``variant`` (a scheme, with
    `INT8_TABLE` appended for ``--embeddings int8``), made once."""
    import dataclasses
    import zquant
    from zquant.config import file_stem
    from zquant.fsutil import cache_root
    from zquant.checkpoint import CheckpointError, read_meta
    scheme, int8_table = variant.removesuffix(INT8_TABLE), variant.endswith(INT8_TABLE)
    path = cache_root() / "bench" / f"{model_name}-{file_stem(scheme)}{'-int8-embed' if int8_table else ''}"
    try:
        read_meta(path)
    except CheckpointError:            # none yet, or written by an older zquant: make it (again)
        tok = zquant.load_tokenizer(model_name)
        config = dataclasses.replace(zquant.get_scheme(scheme), embeddings="int8") if int8_table else scheme
        zquant.save(zquant.quantize(zquant.load(model_name), config), path, tok, force=True)
    return path


def build(model_name: str, variant: str):
    import zquant
    from zquant.plan import make_plan
    if variant.removesuffix(INT8_TABLE) in ("w8a8", "w4/8a8"):
        return zquant.load(checkpoint(model_name, variant))
    model = zquant.load(model_name)
    if variant == "bf16":
        return model.to(torch.bfloat16)
    if variant == "quantize_dynamic":
        names = [t.name for t in make_plan(model, zquant.get_scheme("w8a8")).layers]
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qconfig = torch.ao.quantization.default_dynamic_qconfig
            return torch.ao.quantization.quantize_dynamic(model, {n: qconfig for n in names}, dtype=torch.qint8)
    return model


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(model_name: str, variant: str, batch: int, seq: int, threads: int, max_wait: float) -> dict:
    torch.set_num_threads(threads)
    keep_freed_memory()     # no variant page-faults on every call (see timing.py)
    model = build(model_name, variant).eval()
    decoder = hasattr(model, "generation_config") and model.config.model_type != "bert"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (batch, seq), generator=g)
    if decoder:
        kwargs = dict(input_ids=ids, use_cache=True, logits_to_keep=1)
    else:
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))

    def prefill():
        with torch.no_grad():
            model(**kwargs)

    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    out = {"model": model_name, "variant": variant, "batch": batch, "seq": seq}
    prefill()                                            # first call: kernel build / prepacking
    wait_for_quiet(max_wait=max_wait, log=log)
    r = measure(prefill, min_time=0.0, min_calls=3, warmup=1, log=log)
    out["prefill_s"], out["prefill_foreign"] = r["median"], r["foreign"]
    if decoder:
        prompt = ids[:1, :64]

        def gen(n):
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=model.config.eos_token_id)
        one = measure(lambda: gen(1), min_time=0.0, min_calls=3, warmup=1, log=log)
        many = measure(lambda: gen(64), min_time=0.0, min_calls=3, warmup=1, log=log)
        out["decode_tok_s"] = 63 / (many["median"] - one["median"])
        out["decode_foreign"] = max(one["foreign"], many["foreign"])
    out["rss_mb"] = rss_mb()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def render(rows: list[dict]) -> str:
    lines = [f"`*`: other processes used > {FOREIGN_LIMIT} cores during every attempt of that measurement.", ""]
    for model_name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model_name]
        fp = next((r for r in rs if r["variant"] == "fp32"), None)
        dec = "decode_tok_s" in rs[0]
        b, s = rs[0]["batch"], rs[0]["seq"]
        head = f"| {model_name} | prefill {b}x{s} | vs FP32 |" + (" decode tok/s | vs FP32 |" if dec else "") + \
            " peak RSS | RSS after runs |"
        lines += [head, "|---" * (head.count("|") - 1) + "|"]
        for r in rs:
            star = "*" if r["prefill_foreign"] > FOREIGN_LIMIT else ""
            cells = [r["variant"], f"{r['prefill_s'] * 1e3:.0f} ms{star}",
                     f"{fp['prefill_s'] / r['prefill_s']:.2f}x" if fp else ""]
            if dec:
                star = "*" if r["decode_foreign"] > FOREIGN_LIMIT else ""
                ratio = f"{r['decode_tok_s'] / fp['decode_tok_s']:.2f}x" if fp else ""
                cells += [f"{r['decode_tok_s']:.1f}{star}", ratio]
            cells += [f"{r['peak_rss_mb']:.0f} MB", f"{r['rss_mb']:.0f} MB"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--max-wait", type=float, default=300.0,
                    help="seconds each variant waits for a quiet machine before measuring (default 300)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.seq, args.threads, args.max_wait)))
        return
    rows = []
    for model_name in args.models:
        for variant in args.variants:
            if variant in ("w8a8", "w4/8a8"):
                checkpoint(model_name, variant)       # quantize outside the measured process
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--worker", model_name, variant, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--threads", str(args.threads), "--max-wait", str(args.max_wait)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                raise SystemExit(f"{model_name} {variant} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            for line in proc.stderr.splitlines():      # the worker's notes, e.g. an allocator left as it is
                if line.startswith("# "):
                    print(line, file=sys.stderr)
            print(f"# {model_name} {variant}: {rows[-1]} ({time.perf_counter() - t:.0f} s)",
                  file=sys.stderr, flush=True)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
