"""LKD: ZeroQuant's layer-by-layer knowledge distillation, one transformer block at a time.

For each block k, in order::

    inputs_k   what the ORIGINAL floating-point model feeds block k on the distillation data
    targets_k  = float block k (inputs_k)              the teacher is the block itself
    student    = a copy of block k whose quantized linears are `FakeQuantLinear`s
    minimise loss(student(inputs_k), targets_k) with AdamW, straight through the quantizers
    block k   <- the student with real `QuantLinear`s;  inputs_{k+1} = targets_k

No labels and no second model: besides the model itself, memory holds the captured block inputs
and targets of the distillation set (2 x samples x seq_len x hidden floats) and one block's copy
with its gradients and AdamW state. The loop touches one block at a time, so a future loader that
streams blocks from disk fits in without changing it.

Two departures from the paper's recipe (constant rate 5e-6, 100 steps, batch 32 on a GPU), both
measured in docs/benchmarks.md: the default rate is higher and decays along a cosine, since a CPU
budget affords few small steps; and a block whose loss ends higher than it started is kept
untrained, so LKD never makes a block worse on its distillation set.

Blocks are independent given their float inputs, so every block's training is seeded by
(seed, k) alone: a run resumed by the pipeline (`zquant.pipeline`, ``resume_dir``) from its saved
blocks ends with the same bytes as a run that was never interrupted. The block loop itself (the
float inputs, the teacher outputs, progress, resume) is the pipeline's; this module is one step.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data
from ..config import ConfigError, LKDConfig
from ..convert import set_submodule
from ..modules import FakeQuantLinear
from ..pipeline import Algorithm, BlockInput, BlockStep, block_output
from ..plan import LayerPlan, Plan

STREAM = "lkd"


# ---------------------------------------------------------------------------------------------
# Distillation data
# ---------------------------------------------------------------------------------------------

def distillation_ids(lkd: LKDConfig, tokenizer=None, vocab_size: int | None = None) -> Tensor:
    """int64 [samples, seq_len] token ids: windows of the distillation text, or random ids."""
    if lkd.data == "random":
        if vocab_size is None:
            raise ValueError("random distillation data needs the model's vocabulary size")
        return data.random_tokens(vocab_size, lkd.samples, lkd.seq_len, lkd.seed)
    if tokenizer is None:
        raise ValueError(f"LKD on text {lkd.data!r} needs a tokenizer (or use lkd data 'random')")
    ids = data.token_stream(tokenizer, data.read_text(lkd.data), lkd.samples * lkd.seq_len)
    try:
        return data.windows(ids, lkd.seq_len, lkd.samples)
    except ValueError as e:
        raise ConfigError(f"lkd.data {lkd.data!r}: {e}; lower lkd.samples or lkd.seq_len") from None


# ---------------------------------------------------------------------------------------------
# One block
# ---------------------------------------------------------------------------------------------

def make_student(block: nn.Module, targets: Sequence[LayerPlan], absmax: dict[str, Tensor]) -> nn.Module:
    """A copy of ``block`` with each target linear replaced by a `FakeQuantLinear` (``block`` is untouched)."""
    student = copy.deepcopy(block)
    for t in targets:
        set_submodule(student, t.relative,
                      FakeQuantLinear.from_float(student.get_submodule(t.relative), t.spec, absmax.get(t.name)))
    student.eval()                      # no dropout: the student must see what the teacher saw
    student.requires_grad_(True)
    return student


def finalize(student: nn.Module, targets: Sequence[LayerPlan]) -> nn.Module:
    """Swap the student's `FakeQuantLinear`s for real `QuantLinear`s, in place."""
    for t in targets:
        set_submodule(student, t.relative, student.get_submodule(t.relative).to_quant())
    return student


def block_loss(out: Tensor, target: Tensor, kind: str) -> Tensor:
    """Scalar distillation loss between block outputs [B, T, H]."""
    if kind == "mse":
        return F.mse_loss(out, target)
    # rel_mse: each token's squared error relative to the teacher token's mean square.
    err = (out - target).pow(2).mean(dim=-1)
    return (err / target.pow(2).mean(dim=-1).clamp_min(1e-12)).mean()


@torch.no_grad()
def mean_loss(block: nn.Module, inputs: Sequence[BlockInput], targets: Sequence[Tensor], kind: str) -> float:
    """The loss over the whole distillation set (batches weighted by their size)."""
    total = sum(block_loss(block_output(block(b.hidden, *b.args, **b.kwargs)), t, kind).item() * t.shape[0]
                for b, t in zip(inputs, targets))
    return total / sum(t.shape[0] for t in targets)


def train_block(student: nn.Module, inputs: Sequence[BlockInput], targets: Sequence[Tensor], lkd: LKDConfig,
                block_index: int) -> None:
    """``lkd.steps`` AdamW steps on the student, one captured batch per step, in a seeded order."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lkd.lr, weight_decay=0.0)
    scheduler = None
    if lkd.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / lkd.steps)))
    # Seeded by (seed, block) only, so a resumed run trains each block exactly as an uninterrupted one.
    generator = torch.Generator().manual_seed(lkd.seed * 1_000_003 + block_index)
    order: list[int] = []
    for _ in range(lkd.steps):
        if not order:
            order = torch.randperm(len(inputs), generator=generator).tolist()
        i = order.pop()
        b = inputs[i]
        loss = block_loss(block_output(student(b.hidden, *b.args, **b.kwargs)), targets[i], lkd.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def distill_block(block: nn.Module, targets: Sequence[LayerPlan], absmax: dict[str, Tensor],
                  inputs: Sequence[BlockInput], teacher: Sequence[Tensor], lkd: LKDConfig,
                  k: int) -> tuple[nn.Module, float, float, bool]:
    """(quantized trained copy of ``block``, loss before, loss after, whether training was undone)
    for the block's float ``inputs`` and the float block's outputs ``teacher``.

    If training ends with a higher (or NaN) loss than it started from (a rate too high for this block),
    the untrained copy is kept, so LKD never makes a block worse on its distillation set. A block
    without quantized layers is copied as it is (its loss is 0).
    """
    student = make_student(block, targets, absmax)
    before = after = mean_loss(student, inputs, teacher, lkd.loss)
    undone = False
    if targets and lkd.steps:
        initial = {name: t.detach().clone() for name, t in student.state_dict().items()}
        train_block(student, inputs, teacher, lkd, k)
        after = mean_loss(student, inputs, teacher, lkd.loss)
        if not after <= before:          # also a NaN loss: training that diverged must not be quantized
            student.load_state_dict(initial)
            after, undone = before, True
    return finalize(student, targets), before, after, undone


# ---------------------------------------------------------------------------------------------
# The pipeline step
# ---------------------------------------------------------------------------------------------

class LKD(Algorithm):
    """LKD as a pipeline step: distills every block on its own stream of distillation data."""
    name = "lkd"
    reports = True

    def __init__(self, lkd: LKDConfig, tokenizer=None):
        self.lkd, self.tokenizer = lkd, tokenizer
        self.batches: list[dict] = []

    def prepare(self, model: nn.Module, plan: Plan) -> None:
        cfg = getattr(model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if limit and self.lkd.seq_len > limit:
            raise ConfigError(f"lkd.seq_len ({self.lkd.seq_len}) exceeds the model's {limit} positions")
        if self.lkd.data == data.DEFAULT_EVAL_TEXT:
            warnings.warn(f"LKD distills on {self.lkd.data!r}, the default evaluation text: its perplexity will be "
                          "optimistic", UserWarning, stacklevel=4)
        ids = distillation_ids(self.lkd, self.tokenizer, model.get_input_embeddings().num_embeddings)
        bs = self.lkd.batch_size
        self.batches = [{"input_ids": ids[i:i + bs]} for i in range(0, ids.shape[0], bs)]

    def streams(self) -> dict[str, list[dict]]:
        return {STREAM: self.batches}     # filled by `prepare`

    def settings(self) -> dict:
        return self.lkd.to_dict()

    def describe(self) -> str:
        return f"{self.lkd.samples} x {self.lkd.seq_len} tokens of {self.lkd.data!r}"

    def block(self, step: BlockStep) -> None:
        block, before, after, undone = distill_block(step.float_block, step.layers, step.absmax,
                                                     step.inputs[STREAM], step.teacher[STREAM], self.lkd, step.k)
        step.quantized = block
        step.record.update(loss_before=before, loss_after=after)
        change = f" ({(after / before - 1) * 100:+.0f}%)" if before > 0 else ""
        if undone:
            change = " (training raised the loss: kept the untrained block)"
        step.note = f"loss {before:.4g} -> {after:.4g}{change}"

    def finish(self, records: list[dict], seconds: float, peak_mib: float) -> dict:
        return {"settings": self.lkd.to_dict(), "blocks": records, "seconds": round(seconds, 2),
                "peak_rss_mib": round(peak_mib)}
