"""Perplexity of a causal LM on a token sequence.

Windowing (fixed, so numbers are comparable across runs and schemes): the token sequence is cut
into non-overlapping windows of ``window`` tokens (the last, shorter window is kept if it has at
least 2 tokens); no BOS is added; each window is scored independently with no cache; the result
is exp(mean negative log-likelihood) over every predicted token (``window - 1`` per window).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..progress import Progress

DEFAULT_WINDOW = 1024


def position_limit(model: nn.Module) -> int | None:
    """The most tokens ``model`` can take at once if it looks positions up in a table (GPT-2's
    ``wpe``, OPT's learned positions: longer input is an IndexError), else None (rotary, ALiBi)."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tables = (m for m in model.modules() if isinstance(m, nn.Embedding) and m is not inputs)
    return limit if any(m.num_embeddings >= limit for m in tables) else None


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, window: int = DEFAULT_WINDOW, batch_size: int = 1,
               desc: str = "perplexity", quiet: bool = False) -> dict:
    """``{"perplexity", "nll", "tokens"}`` of ``model`` on the 1-D token sequence ``ids``."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError("perplexity needs a 1-D sequence of at least 2 tokens")
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    limit = position_limit(model)
    if limit is not None and min(window, ids.numel()) > limit:
        raise ValueError(f"a window of {window} tokens exceeds the model's {limit} positions: use --window {limit} "
                         "or less")
    chunks = [ids[i:i + window] for i in range(0, ids.numel(), window)]
    chunks = [c for c in chunks if c.numel() >= 2]
    total_nll, total_tokens = 0.0, 0
    with Progress(len(chunks), desc, quiet=quiet) as bar:
        for i in range(0, len(chunks), batch_size):
            group = chunks[i:i + batch_size]
            if len({c.numel() for c in group}) > 1:   # the short tail window goes alone
                group = [group[0]]
            batch = torch.stack(group)                                     # [B, T]
            logits = model(input_ids=batch, use_cache=False).logits        # [B, T, V]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                  batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
            bar.update(len(group), ppl=math.exp(total_nll / total_tokens))
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}
