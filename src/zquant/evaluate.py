"""Evaluate one model, or compare floating point with every scheme in one run.

Decoders are scored by perplexity on a text (default: packaged ``wiki``); encoders by the cosine
of their sentence embeddings to the floating-point model's and by sentiment accuracy of a probe
trained on the floating-point model's embeddings (see `zquant.eval.encoder`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from . import data, io
from .config import QuantConfig
from .eval import SentimentProbe, cosine_to_reference, embed, layer_bytes, model_bytes, perplexity
from .models import get_adapter
from .surgery import plan


_ALL_LAYERS = QuantConfig(name="all-layers")   # only used to list the quantizable layers


@dataclass
class EvalOptions:
    text: str = data.DEFAULT_EVAL_TEXT        # decoders: perplexity text (packaged name or file)
    max_tokens: int | None = 32768            # decoders: token budget (None = the whole text)
    window: int = 1024                        # decoders: perplexity window
    max_examples: int | None = None           # encoders: sentiment subset (None = all 12,808)
    batch_size: int = 64                      # encoders: embedding batch
    quiet: bool = False


@dataclass
class EncoderReference:
    """What every encoder evaluation is compared against: the floating-point test embeddings and
    a probe trained on the floating-point train embeddings."""

    texts: list[str]
    labels: Tensor
    embeddings: Tensor
    probe: SentimentProbe
    extra: dict = field(default_factory=dict)

    @classmethod
    def build(cls, fp_model: nn.Module, tokenizer, opts: EvalOptions) -> "EncoderReference":
        train, test = data.sentiment_split(data.sentiment_data(), opts.max_examples)
        emb_train = embed(fp_model, tokenizer, [t for t, _ in train], opts.batch_size, desc="embed train (fp)",
                          quiet=opts.quiet)
        probe = SentimentProbe().fit(emb_train, torch.tensor([y for _, y in train]))
        texts = [t for t, _ in test]
        emb_test = embed(fp_model, tokenizer, texts, opts.batch_size, desc="embed test (fp)", quiet=opts.quiet)
        return cls(texts, torch.tensor([y for _, y in test]), emb_test, probe,
                   {"train_examples": len(train), "test_examples": len(test)})


def sizes(model: nn.Module) -> dict:
    """Whole-model bytes and the bytes of the quantizable block layers against FP16."""
    names = [t.name for t in plan(model, _ALL_LAYERS)]
    layers = layer_bytes(model, names)
    return {"bytes": model_bytes(model), "layer_bytes": layers["bytes"], "layer_fp16_bytes": layers["fp16_bytes"],
            "layer_ratio_to_fp16": layers["ratio_to_fp16"]}


def evaluate(model: nn.Module, tokenizer, opts: EvalOptions, reference: EncoderReference | None = None,
             label: str = "model") -> dict:
    """Metrics of one model. Encoders need the floating-point `EncoderReference`."""
    kind = get_adapter(model).kind
    start = time.perf_counter()
    result: dict = {"kind": kind}
    if kind == "decoder":
        ids = data.token_stream(tokenizer, data.read_text(opts.text), opts.max_tokens)
        result.update(perplexity(model, ids, opts.window, desc=f"perplexity {label}", quiet=opts.quiet))
        result["text"] = opts.text
    else:
        if reference is None:
            raise ValueError("encoder evaluation needs the floating-point reference model")
        emb = embed(model, tokenizer, reference.texts, opts.batch_size, desc=f"embed test {label}", quiet=opts.quiet)
        result.update(accuracy=reference.probe.accuracy(emb, reference.labels),
                      cosine=cosine_to_reference(emb, reference.embeddings), **reference.extra)
    result.update(sizes(model))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def compare(fp_model: nn.Module, tokenizer, schemes: list, opts: EvalOptions,
            quantize_fn: Callable[[nn.Module, object], nn.Module], save_dir: str | Path | None = None,
            log: Callable[[str], None] = lambda s: None,
            on_quantized: Callable[[str, nn.Module], object] | None = None) -> list[dict]:
    """Rows for floating point and each scheme. ``quantize_fn(model_copy, scheme)`` quantizes a
    deep copy of the floating-point model; with ``save_dir`` each quantized model is saved there.
    ``on_quantized(name, qmodel)`` sees each quantized model before it is freed (the report uses
    it to measure per-layer error)."""
    kind = get_adapter(fp_model).kind
    reference = EncoderReference.build(fp_model, tokenizer, opts) if kind == "encoder" else None
    log("evaluating floating point")
    rows = [{"scheme": "fp32", **evaluate(fp_model, tokenizer, opts, reference, "fp32")}]
    for scheme in schemes:
        name = getattr(scheme, "name", scheme)
        log(f"quantizing with {name}")
        t0 = time.perf_counter()
        qmodel = quantize_fn(copy.deepcopy(fp_model), scheme)
        quantize_seconds = time.perf_counter() - t0
        if save_dir is not None:
            out = io.save(qmodel, Path(save_dir) / name.replace("/", "_"), tokenizer)
            log(f"saved {out}")
        row = {"scheme": name, **evaluate(qmodel, tokenizer, opts, reference, name),
               "quantize_seconds": round(quantize_seconds, 2)}
        if getattr(qmodel, "zquant_info", {}).get("lkd"):
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
