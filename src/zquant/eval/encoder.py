"""Encoder evaluation: sentence embeddings, their cosine to the floating-point model's, and a
sentiment probe (logistic regression trained on the floating-point model's embeddings).

Embeddings are the attention-mask mean of the last hidden states, L2-normalized (the
sentence-transformers recipe for all-MiniLM-L6-v2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..progress import Progress


@torch.no_grad()
def embed(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128,
          desc: str = "embed", quiet: bool = False) -> Tensor:
    """float32 [len(texts), hidden] normalized mean-pooled embeddings."""
    out = []
    # Sorting by length keeps padding small; the original order is restored at the end.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with Progress(len(texts), desc, quiet=quiet) as bar:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state.float()               # [B, T, H]
            mask = enc["attention_mask"].unsqueeze(-1).float()            # [B, T, 1]
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
            bar.update(len(idx))
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[torch.tensor(order)] = emb
    return result


def cosine_to_reference(emb: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity between matching rows of two embedding matrices."""
    return F.cosine_similarity(emb.float(), reference.float(), dim=-1).mean().item()


class SentimentProbe:
    """L2-regularized logistic regression on frozen embeddings, fitted with L-BFGS (deterministic)."""

    def __init__(self, l2: float = 1e-4, steps: int = 200):
        self.l2, self.steps = l2, steps
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, x: Tensor, y: Tensor) -> "SentimentProbe":
        x, y = x.double(), y.double()
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        if self.weight is None:
            raise RuntimeError("fit the probe first")
        pred = (x.double() @ self.weight + self.bias) > 0
        return (pred == y.bool()).double().mean().item()
