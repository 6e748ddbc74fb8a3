"""INT8 KV cache vs the float32 one (issue 15): perplexity, top-1 agreement and bytes per token, SmolLM2-135M.

    python bench/bench_kv_cache.py                                  # w8a8 and w4/8a8, 16 windows of 512 tokens
    python bench/bench_kv_cache.py --windows 4 --threads 1          # a small run
    python bench/bench_kv_cache.py --schemes w8a8 --windows 16 --window 1024 --json out.json

For each scheme, the saved checkpoint (bench_models.py `checkpoint`) runs through zquant's own
decode path (`zquant.generate.fast.FastRunner`). Each window of ``wiki.utf8`` (exllamav3's
calibration text, read by `zquant.data` without importing the package; the windows of
``zquant eval``: non-overlapping, no BOS) is prefilled into a fresh float32 cache and into a fresh
INT8 one, in turn. A prefill already attends over what the cache stores, so with the INT8 cache
every position's logits see INT8 keys and values (one scale per token per head) of the tokens
before it, as decoding them one by one would. Reported per scheme and cache:

* perplexity: exp of the mean NLL of every predicted token (``window - 1`` per window), and the
  INT8 cache's relative change;
* top-1 agreement: the share of positions where the INT8 cache's next-token argmax is the float
  cache's, and the mean KL divergence of its next-token distribution from the float cache's (nats);
* KV-cache bytes per token: ``decoder.cache_bytes / slots / max_len`` (every layer, keys and values);
* prefill tok/s: the median window's decoder step (every position's final-normed hidden state; the
  full-vocabulary logits of every position, which only scoring needs, are not timed), for a rough
  idea only (bench_decode.py measures speed).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODEL = "smollm2-135m"
SCHEMES = ["w8a8", "w4/8a8"]
CACHES = ("fp", "int8")


@dataclass
class Tally:
    """Running totals of one (scheme, cache) over the windows."""
    nll: float = 0.0
    kl: float = 0.0                      # summed KL(float cache || this cache) of next-token distributions
    tokens: int = 0
    agree: int = 0                       # positions whose argmax is the float cache's
    seconds: list[float] = field(default_factory=list)
    bytes_per_token: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


def text_windows(tokenizer, count: int, length: int) -> torch.Tensor:
    """``count`` non-overlapping windows [count, length] from the start of wiki.utf8."""
    from zquant import data
    ids = data.token_stream(tokenizer, data.read_text("wiki"), count * length)
    return data.windows(ids, length, count)


@torch.no_grad()
def window_logits(runner, ids: torch.Tensor, kv_cache: str) -> tuple[torch.Tensor, float, float]:
    """(float32 logits [L, V] at every position of ``ids`` [L], seconds of the decoder step, KV bytes
    per token) of one prefill into a fresh cache."""
    n = ids.numel()
    runner.reserve(1, n, kv_cache)
    seqs = [(0, 0, ids.tolist())]
    x = runner.embed_tokens(ids, seqs)
    t0 = time.perf_counter()
    rows = runner.decoder.step(x, torch.tensor([[0, 0, n]]), True)        # [L, H], every position
    seconds = time.perf_counter() - t0
    return runner.logits(rows), seconds, runner.decoder.cache_bytes / n


def add_window(t: Tally, logits: torch.Tensor, ids: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """Add one window's scores to ``t``: logits [L, V] of ids [L], against the float cache's next-token
    log-probabilities ``ref`` [L - 1, V] (None: this is the float cache). Returns its log-probabilities."""
    logp = F.log_softmax(logits[:-1].float(), dim=-1)                       # predicts ids[1:]
    ref = logp if ref is None else ref
    t.nll -= float(logp.gather(1, ids[1:, None]).sum())
    t.kl += float((ref.exp() * (ref - logp)).sum())
    t.agree += int((logp.argmax(dim=-1) == ref.argmax(dim=-1)).sum())
    t.tokens += ids.numel() - 1
    return logp


def measure_scheme(model, windows: torch.Tensor, log=lambda s: None) -> dict[str, Tally]:
    """Both caches' tallies for a quantized model over ``windows`` [N, L], through the fast runner."""
    from zquant.generate import fast
    runner = fast.FastRunner(model)
    tallies = {kv: Tally() for kv in CACHES}
    for i, ids in enumerate(windows):
        ref = None
        for kv in CACHES:                    # in turn, so that a noisy moment hits both alike
            logits, seconds, tallies[kv].bytes_per_token = window_logits(runner, ids, kv)
            tallies[kv].seconds.append(seconds)
            logp = add_window(tallies[kv], logits, ids, ref)
            ref = logp if ref is None else ref
        log(f"# window {i + 1}/{len(windows)}: perplexity so far fp {tallies['fp'].perplexity:.4f}, "
            f"int8 {tallies['int8'].perplexity:.4f}")
    return tallies


def rows_of(scheme: str, tallies: dict[str, Tally], window: int) -> list[dict]:
    """One result row per cache of ``scheme``."""
    fp = tallies["fp"]
    return [{"scheme": scheme, "kv_cache": kv, "bytes_per_token": t.bytes_per_token, "perplexity": t.perplexity,
             "ppl_change": t.perplexity / fp.perplexity - 1, "top1_agreement": t.agree / t.tokens,
             "kl": t.kl / t.tokens, "tokens": t.tokens, "prefill_tok_s": window / statistics.median(t.seconds)}
            for kv, t in tallies.items()]


def render(rows: list[dict], header: str) -> str:
    """Markdown table: a row per (scheme, cache); the INT8 rows compared with their scheme's float cache."""
    lines = [header, "", "| scheme | KV cache | KV bytes / token | perplexity | vs fp cache | top-1 agreement "
             "with fp cache | KL(fp ‖ this) / token | prefill tok/s |", "|---" * 8 + "|"]
    for r in rows:
        fp = r["kv_cache"] == "fp"
        change = "-" if fp else f"{100 * r['ppl_change']:+.2f}%"
        agree = "-" if fp else f"{100 * r['top1_agreement']:.2f}%"
        kl = "-" if fp else f"{r['kl']:.4f}"
        lines.append(f"| {r['scheme']} | {r['kv_cache']} | {r['bytes_per_token']:,.0f} | {r['perplexity']:.4f} | "
                     f"{change} | {agree} | {kl} | {r['prefill_tok_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES)
    ap.add_argument("--windows", type=int, default=16, help="windows of wiki.utf8 (default 16)")
    ap.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.windows < 1 or args.window < 2 or args.threads < 1:
        ap.error(f"--windows and --threads must be at least 1 and --window at least 2 (got {args.windows}, "
                 f"{args.window}, {args.threads})")
    torch.set_num_threads(args.threads)
    import zquant
    from bench_models import build, checkpoint
    windows = text_windows(zquant.load_tokenizer(MODEL), args.windows, args.window)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for scheme in args.schemes:
        checkpoint(MODEL, scheme)                          # made once, outside the measurement
        t0 = time.perf_counter()
        rows += rows_of(scheme, measure_scheme(build(MODEL, scheme).eval(), windows, log), args.window)
        log(f"# {scheme}: {time.perf_counter() - t0:.0f} s")
    header = (f"{MODEL}, {args.windows} windows of {args.window} tokens of wiki.utf8 "
              f"({rows[0]['tokens']:,} predicted tokens per row), {args.threads} thread{'s' * (args.threads > 1)}")
    print(render(rows, header))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
