"""Compact float parts on SmolLM2: what BF16 storage, the INT8 table and BF16 compute cost.

    python bench/bench_float_parts.py rounding --tokens 8192     # float model and w8a8, float parts rounded
    python bench/bench_float_parts.py head --tokens 8192         # INT8 table on the float model, per head
    python bench/bench_float_parts.py compute CHECKPOINT         # FP32 vs BF16 compute of a saved checkpoint

* ``rounding``: perplexity of the float model with the parts zquant keeps in floating point (all
  but the block linear layers) rounded to BF16 / FP16, then of ``w8a8`` (FP32 float parts) with
  every float part, only the 2-D ones (the table) or only the 1-D ones (norms) rounded.
* ``head``: the float model with its embedding table as INT8 rows (`QuantEmbedding`) and the head
  as an FP32 copy, A16 from the INT8 table (dequantize, float GEMM) or `TiedHead` (W8A8); with the
  head's time on ``x`` [1024, hidden].
* ``compute``: a checkpoint as `zquant.load` gives it (FP32 compute) and with its float parts kept
  as BF16 tensors in memory (every activation BF16); perplexity and prefill of ``--batch`` x
  ``--seq`` random tokens.

Perplexity is on the first ``--tokens`` of ``wiki.utf8`` (windows of 1,024); times are
`timing.measure` medians. Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import keep_freed_memory, measure  # noqa: E402

MODEL = "smollm2-135m"


def _ppl(model, ids) -> float:
    from zquant.eval import perplexity
    with torch.no_grad():
        return perplexity(model, ids, quiet=True)["perplexity"]


def _rounded(model, keep, dtype):
    """``model`` with the tensors that ``keep(name, tensor)`` selects rounded to ``dtype`` in place."""
    with torch.no_grad():
        for name, t in keep(model):
            t.copy_(t.to(dtype).float())
    return model


def rounding(ids) -> None:
    import zquant
    from zquant.config import get_scheme
    from zquant.float_parts import float_parts
    fp = zquant.load(MODEL)
    outside_blocks = lambda m: [(n, p) for n, p in m.named_parameters()   # noqa: E731 -- the tied table once
                                if ".layers." not in n or "norm" in n]
    for dtype in (None, torch.bfloat16, torch.float16):
        m = _rounded(copy.deepcopy(fp), outside_blocks, dtype) if dtype else fp
        print(json.dumps({"model": "float", "rounded to": str(dtype), "perplexity": _ppl(m, ids)}), flush=True)
    base = zquant.quantize(copy.deepcopy(fp), dataclasses.replace(get_scheme("w8a8"), float_dtype="float32"))
    variants = {"none": (lambda t: False, None), "all": (lambda t: True, torch.bfloat16),
                "2-D (table)": (lambda t: t.dim() == 2, torch.bfloat16),
                "1-D (norms)": (lambda t: t.dim() == 1, torch.bfloat16), "all, fp16": (lambda t: True, torch.float16)}
    for label, (select, dtype) in variants.items():
        parts = lambda m: [(n, t) for n, t in float_parts(m).items() if select(t)]   # noqa: E731
        m = _rounded(copy.deepcopy(base), parts, dtype or torch.float32)
        print(json.dumps({"model": "w8a8", "rounded": label, "perplexity": _ppl(m, ids)}), flush=True)


class _A16Head(nn.Module):
    """A head tied to an INT8 table with float activations: per call, dequantize the table, then a float GEMM."""

    def __init__(self, table):
        super().__init__()
        object.__setattr__(self, "table", table)

    def forward(self, x):
        return nn.functional.linear(x, self.table.dequantized_weight())


def head(ids) -> None:
    import zquant
    from zquant.embedding import QuantEmbedding, TiedHead
    for kind in ("fp32 copy", "a16 from int8", "w8a8 from int8"):
        m = zquant.load(MODEL)
        table = m.model.embed_tokens = QuantEmbedding.from_float(m.model.embed_tokens)
        if kind == "a16 from int8":
            m.lm_head = _A16Head(table)
        elif kind == "w8a8 from int8":
            m.lm_head = TiedHead(table)
        x = torch.randn(1024, table.embedding_dim)
        with torch.no_grad():
            t = measure(lambda: m.lm_head(x), min_calls=3)
        print(json.dumps({"head": kind, "perplexity": _ppl(m, ids), "head_ms": round(t["median"] * 1e3, 1),
                          "others_cores": round(t["foreign"], 2)}), flush=True)


def compute(ids, checkpoint: str, batch: int, seq: int) -> None:
    import zquant
    from zquant.float_parts import float_parts
    tokens = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    for label in ("float32", "bfloat16"):
        model = zquant.load(checkpoint)
        if label == "bfloat16":         # in place: the fused modules hold the same tensors
            for t in float_parts(model).values():
                t.data = t.data.bfloat16()
        with torch.no_grad():
            t = measure(lambda: model(input_ids=tokens, use_cache=False, logits_to_keep=1), min_calls=3, warmup=1)
        print(json.dumps({"compute": label, "perplexity": _ppl(model, ids), "prefill_ms": round(t["median"] * 1e3, 1),
                          "others_cores": round(t["foreign"], 2)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=["rounding", "head", "compute"])
    p.add_argument("checkpoint", nargs="?", help="compute: a checkpoint directory")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    warnings.simplefilter("ignore")
    import zquant
    from zquant import data
    ids = data.token_stream(zquant.load_tokenizer(MODEL), data.read_text("wiki"), args.tokens)
    if args.experiment == "compute":
        if not args.checkpoint:
            p.error("compute needs a CHECKPOINT directory")
        compute(ids, args.checkpoint, args.batch, args.seq)
    else:
        {"rounding": rounding, "head": head}[args.experiment](ids)


if __name__ == "__main__":
    main()
