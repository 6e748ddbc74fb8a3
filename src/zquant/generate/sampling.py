"""Choosing the next token from logits: pure functions, transformers' semantics.

Order as in transformers' logits processors: repetition penalty (over the prompt and the tokens
so far), then temperature, top-k, top-p; temperature 0 is greedy (argmax, first index on ties).
Sampling draws from a per-sequence `torch.Generator`, so a seed reproduces a sequence's text
whatever else is in the batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .options import GenerationOptions


def apply_repetition_penalty(logits: Tensor, seen: Tensor | None, penalty: float) -> Tensor:
    """logits [V] with every token in ``seen`` (int64 ids) made less likely: divided by ``penalty``
    where positive, multiplied where negative (the CTRL paper's rule, as transformers applies it)."""
    if penalty == 1.0 or seen is None or seen.numel() == 0:
        return logits
    ids = torch.unique(seen)
    picked = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return out


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits [V] (ties at the k-th kept), the rest -inf; k = 0 keeps all."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p          # tokens entirely past the mass p
    drop[0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


def next_token(logits: Tensor, seen: Tensor | None, opts: GenerationOptions, generator: torch.Generator | None) -> int:
    """The next token id from one sequence's float32 logits [V]."""
    logits = apply_repetition_penalty(logits, seen, opts.repetition_penalty)
    if opts.temperature == 0:
        return int(torch.argmax(logits))
    logits = filter_top_p(filter_top_k(logits / opts.temperature, opts.top_k), opts.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
