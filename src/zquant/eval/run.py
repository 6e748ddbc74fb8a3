"""Evaluate one model: perplexity for decoders, embeddings against a floating-point reference for encoders.

Decoders are scored by perplexity on a text (default: packaged ``wiki``); encoders by the cosine
of their sentence embeddings to the floating-point model's and by sentiment accuracy of a probe
trained on the floating-point model's embeddings (see `zquant.eval.encoder`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import data
from ..plan import kind_of, layer_plan
from .encoder import SentimentProbe, cosine_to_reference, embed
from .perplexity import perplexity
from .sizes import layer_bytes, model_bytes


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
    names = [t.name for t in layer_plan(model).layers]
    layers = layer_bytes(model, names)
    return {"bytes": model_bytes(model), "layer_bytes": layers["bytes"], "layer_fp16_bytes": layers["fp16_bytes"],
            "layer_ratio_to_fp16": layers["ratio_to_fp16"]}


def evaluate(model: nn.Module, tokenizer, opts: EvalOptions, reference: EncoderReference | None = None,
             label: str = "model") -> dict:
    """Metrics of one model. Encoders need the floating-point `EncoderReference`."""
    kind = kind_of(model)
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
