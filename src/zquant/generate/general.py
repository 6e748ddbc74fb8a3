"""The general decode path: any causal LM through its own transformers forward and cache.

One transformers cache per sequence, and each sequence's step is its own forward call, so a
sequence's tokens never depend on the others in the batch (padding would change the float
arithmetic). Slower than the fast path (`zquant.generate.fast`), but it runs every model
`model.generate` runs, floating point included.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GeneralRunner:
    name = "general"

    def __init__(self, model: nn.Module):
        self.model = model
        config = model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.caches: list = []
        import inspect
        # transformers >= 5.24 names the argument `cache` (`past_key_values` is deprecated there)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def reserve(self, slots: int, max_len: int, kv_cache: str = "fp", attention: str = "zquant") -> None:
        """Per-sequence caches; attention is the model's own (``attention`` is the fast path's choice)."""
        if kv_cache != "fp":
            raise ValueError(f"the general decode path keeps a floating-point cache (kv_cache {kv_cache!r} needs "
                             "the fast path)")
        self.caches = [None] * slots

    @torch.no_grad()
    def forward(self, seqs: list[tuple[int, int, list[int]]]) -> Tensor:
        """See `FastRunner.forward`."""
        from transformers import DynamicCache
        out = []
        for slot, start, toks in seqs:
            cache = self.caches[slot]
            if start == 0 or cache is None:
                cache = self.caches[slot] = DynamicCache(config=self.model.config)
            if cache.get_seq_length() > start:            # a chat turn that rewrites the end of the context
                cache.crop(start)
            if cache.get_seq_length() != start:
                raise RuntimeError(f"slot {slot}: cache holds {cache.get_seq_length()} tokens, step starts at {start}")
            ids = torch.tensor([toks], dtype=torch.long)
            res = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
            out.append(res.logits[0, -1].float())
        return torch.stack(out)
