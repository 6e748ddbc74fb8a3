"""Compare floating point with every scheme in one run, as rows and a Markdown table."""
from __future__ import annotations

import copy
import time
from typing import Callable

from torch import nn

from ..plan import kind_of
from ..record import record_of
from .run import EncoderReference, EvalOptions, evaluate


def compare(fp_model: nn.Module, tokenizer, schemes: list, opts: EvalOptions,
            quantize_fn: Callable[[nn.Module, object], nn.Module],
            log: Callable[[str], None] = lambda s: None,
            on_quantized: Callable[[str, nn.Module], object] | None = None) -> list[dict]:
    """Rows for floating point and each scheme. ``quantize_fn(model_copy, scheme)`` quantizes a
    deep copy of the floating-point model. ``on_quantized(name, qmodel)`` sees each quantized
    model before it is freed (the CLI saves it there, the report measures per-layer error)."""
    kind = kind_of(fp_model)
    reference = EncoderReference.build(fp_model, tokenizer, opts) if kind == "encoder" else None
    log("evaluating floating point")
    rows = [{"scheme": "fp32", **evaluate(fp_model, tokenizer, opts, reference, "fp32")}]
    for scheme in schemes:
        name = getattr(scheme, "name", scheme)
        log(f"quantizing with {name}")
        t0 = time.perf_counter()
        qmodel = quantize_fn(copy.deepcopy(fp_model), scheme)
        quantize_seconds = time.perf_counter() - t0
        row = {"scheme": name, **evaluate(qmodel, tokenizer, opts, reference, name),
               "quantize_seconds": round(quantize_seconds, 2)}
        if "lkd" in (record_of(qmodel) or {}):
            row["lkd"] = True
        if on_quantized is not None:
            on_quantized(name, qmodel)
        rows.append(row)
        del qmodel
    fp = rows[0]
    for row in rows:
        row["bytes_vs_fp32"] = row["bytes"] / fp["bytes"]
        if kind == "decoder":
            row["ppl_vs_fp32"] = row["perplexity"] / fp["perplexity"]
        else:
            row["accuracy_delta"] = row["accuracy"] - fp["accuracy"]
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of compare rows."""
    if not rows:
        return ""
    if rows[0]["kind"] == "decoder":
        head = ["scheme", "perplexity", "vs fp32", "tokens", "model MB", "block layers vs FP16"]
        body = [[r["scheme"], f"{r['perplexity']:.3f}", f"{(r['ppl_vs_fp32'] - 1) * 100:+.2f}%", str(r["tokens"]),
                 f"{r['bytes'] / 1e6:.1f}", f"{r['layer_ratio_to_fp16'] * 100:.1f}%"] for r in rows]
    else:
        head = ["scheme", "accuracy", "vs fp32", "cosine", "model MB", "block layers vs FP16"]
        body = [[r["scheme"], f"{r['accuracy'] * 100:.2f}", f"{r['accuracy_delta'] * 100:+.2f}",
                 f"{r['cosine']:.4f}", f"{r['bytes'] / 1e6:.1f}", f"{r['layer_ratio_to_fp16'] * 100:.1f}%"]
                for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
