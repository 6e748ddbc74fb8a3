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
(seed, k) alone. With a ``resume_dir`` each finished block is saved atomically as it finishes
(safetensors + ``progress.json``); a restarted run loads those blocks, recomputes the float
inputs of the next block with the original float blocks, and ends with the same bytes as a run
that was never interrupted.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import resource
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data
from .config import ConfigError, LKDConfig, QuantConfig
from .io import atomic_file
from .models import Adapter, get_adapter
from .modules import FakeQuantLinear
from .progress import Progress, _fmt
from .surgery import Target, attach_info, plan, set_submodule, static_absmax

RESUME_FORMAT = "zquant-lkd-resume"
RESUME_VERSION = 1
PROGRESS_FILE = "progress.json"


# ---------------------------------------------------------------------------------------------
# Distillation data and block inputs
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


@dataclass
class BlockInput:
    """One batch of a block's call: ``block(hidden, *args, **kwargs)``.

    ``hidden`` is float [B, T, H]; ``args``/``kwargs`` are whatever else the model passes its
    blocks (attention masks, position ids, rotary cos/sin), captured once and reused by every block.
    """

    hidden: Tensor
    args: tuple
    kwargs: dict


def _block_output(out) -> Tensor:
    """The hidden states [B, T, H] of a block's return value (a tensor, or a tuple in older families)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _no_cache(value):
    # A KV cache object would grow with every call; blocks run here never need one.
    return None if type(value).__name__.endswith("Cache") else value


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: Adapter, ids: Tensor, batch_size: int) -> list[BlockInput]:
    """The inputs that ``model`` feeds its first block, for ``ids`` [S, T] in batches of ``batch_size``.

    Only the embeddings and block 0 run: the block list is swapped for a one-block list while a
    forward pre-hook on block 0 records its arguments.
    """
    blocks_name, blocks = adapter.find_blocks(model)
    captured: list[BlockInput] = []

    def record(_module, args, kwargs):
        kwargs = {k: _no_cache(v) for k, v in kwargs.items()}
        if args:
            hidden, rest = args[0], tuple(_no_cache(a) for a in args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append(BlockInput(hidden.detach(), rest, kwargs))

    extra = {"use_cache": False} if adapter.kind == "decoder" else {}
    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    set_submodule(model, blocks_name, nn.ModuleList([blocks[0]]))
    try:
        for i in range(0, ids.shape[0], batch_size):
            model.base_model(input_ids=ids[i:i + batch_size], **extra)
    finally:
        set_submodule(model, blocks_name, blocks)
        handle.remove()
    if len(captured) != -(-ids.shape[0] // batch_size):
        raise RuntimeError(f"{type(model).__name__}: block 0 was called {len(captured)} times for "
                           f"{-(-ids.shape[0] // batch_size)} batches; cannot capture its inputs")
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: Sequence[BlockInput]) -> list[Tensor]:
    """The block's outputs [B, T, H] for every captured batch (no gradients)."""
    return [_block_output(block(b.hidden, *b.args, **b.kwargs)) for b in inputs]


# ---------------------------------------------------------------------------------------------
# One block
# ---------------------------------------------------------------------------------------------

def make_student(block: nn.Module, targets: Sequence[Target], absmax: dict[str, Tensor]) -> nn.Module:
    """A copy of ``block`` with each target linear replaced by a `FakeQuantLinear` (``block`` is untouched)."""
    student = copy.deepcopy(block)
    for t in targets:
        set_submodule(student, t.relative,
                      FakeQuantLinear.from_float(student.get_submodule(t.relative), t.spec, absmax.get(t.name)))
    student.eval()                      # no dropout: the student must see what the teacher saw
    student.requires_grad_(True)
    return student


def finalize(student: nn.Module, targets: Sequence[Target]) -> nn.Module:
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
    total = sum(block_loss(_block_output(block(b.hidden, *b.args, **b.kwargs)), t, kind).item() * t.shape[0]
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
        loss = block_loss(_block_output(student(b.hidden, *b.args, **b.kwargs)), targets[i], lkd.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def distill_block(block: nn.Module, targets: Sequence[Target], absmax: dict[str, Tensor],
                  inputs: Sequence[BlockInput], teacher: Sequence[Tensor], lkd: LKDConfig,
                  k: int) -> tuple[nn.Module, float, float, bool]:
    """(quantized trained copy of ``block``, loss before, loss after, whether training was undone)
    for the block's float ``inputs`` and the float block's outputs ``teacher``.

    If training ends with a higher loss than it started from (a rate too high for this block),
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
        if after > before:
            student.load_state_dict(initial)
            after, undone = before, True
    return finalize(student, targets), before, after, undone


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class and every tensor of its state dict (names, dtypes, values)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


class ResumeState:
    """The finished blocks of a run, in ``directory``: ``block-NNNN.safetensors`` (the quantized
    block's state dict) and ``progress.json`` (the run's key and one record per finished block).

    ``key`` identifies the run (settings, scheme, model and data hashes); a directory written by a
    run with another key is refused rather than silently mixed in.
    """

    def __init__(self, directory: str | Path, key: dict):
        self.dir = Path(directory)
        self.key = json.loads(json.dumps(key))          # the form it has once read back from JSON
        self.blocks: list[dict] = []
        path = self.dir / PROGRESS_FILE
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            ours = saved["format"] == RESUME_FORMAT and saved["version"] == RESUME_VERSION
            blocks, saved_key = list(saved["blocks"]), dict(saved["key"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise ValueError(f"{path}: not an LKD progress file of this zquant; delete {self.dir} to start over")
        if saved_key != self.key:
            differ = sorted(k for k in set(saved_key) | set(self.key) if saved_key.get(k) != self.key.get(k))
            raise ValueError(f"{self.dir} holds an LKD run with a different {', '.join(differ)}; delete it or "
                             "choose another resume directory")
        for i, record in enumerate(blocks):
            if record.get("block") != i or not self.path(i).is_file():
                raise ValueError(f"{self.dir}: block {i} is missing or out of order; delete the directory to start over")
        self.blocks = blocks

    def path(self, k: int) -> Path:
        return self.dir / f"block-{k:04d}.safetensors"

    def save(self, k: int, block: nn.Module, record: dict) -> None:
        """Write block ``k`` and then the progress file, each atomically (a crash in between only
        leaves an unlisted block file, which the next run overwrites)."""
        from safetensors.torch import save_file
        if k != len(self.blocks):
            raise RuntimeError(f"block {k} finished out of order (expected {len(self.blocks)})")
        with atomic_file(self.path(k)) as tmp:
            save_file({n: t.detach().contiguous().clone() for n, t in block.state_dict().items()}, str(tmp))
        self.blocks.append(record)
        with atomic_file(self.dir / PROGRESS_FILE) as tmp:
            tmp.write_text(json.dumps({"format": RESUME_FORMAT, "version": RESUME_VERSION, "key": self.key,
                                       "blocks": self.blocks}, indent=1), encoding="utf-8")

    def load(self, k: int, skeleton: nn.Module) -> nn.Module:
        """``skeleton`` (a quantized block of the right structure) with block ``k``'s saved tensors."""
        from safetensors.torch import load_file
        skeleton.load_state_dict(load_file(str(self.path(k))), strict=True)
        return skeleton


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _check_model(model: nn.Module, lkd: LKDConfig) -> None:
    if getattr(model, "zquant_info", None):
        raise ValueError("this model is already quantized; LKD needs the floating-point model")
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit and lkd.seq_len > limit:
        raise ConfigError(f"lkd.seq_len ({lkd.seq_len}) exceeds the model's {limit} positions")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def distill(model: nn.Module, config: QuantConfig, lkd: LKDConfig = LKDConfig(), tokenizer=None,
            calibration: Iterable[dict[str, Tensor]] | None = None, adapter: Adapter | None = None,
            resume_dir: str | Path | None = None, quiet: bool = False) -> nn.Module:
    """Quantize ``model`` in place with ``config``, distilling every block with LKD, and return it.

    ``tokenizer`` turns the distillation text into tokens (not needed for ``lkd.data='random'``);
    ``calibration`` batches are needed for static activation scales (as in `quantize_model`).
    The original float parameter tensors are never written: each block is replaced by a trained
    copy. With ``resume_dir``, finished blocks are saved there and reused by a restarted run.
    """
    _check_model(model, lkd)
    adapter = adapter or get_adapter(model)
    targets = [t for t in plan(model, config, adapter) if t.spec.weight is not None]
    if lkd.data == data.DEFAULT_EVAL_TEXT:
        warnings.warn(f"LKD distills on {lkd.data!r}, the default evaluation text: its perplexity will be "
                      "optimistic", UserWarning, stacklevel=2)
    absmax = static_absmax(model, config, targets, calibration)
    ids = distillation_ids(lkd, tokenizer, model.get_input_embeddings().num_embeddings)
    blocks_name, blocks = adapter.find_blocks(model)
    per_block = [[t for t in targets if t.block == k] for k in range(len(blocks))]

    state = None
    if resume_dir is not None:
        key = {"lkd": lkd.to_dict(), "scheme": config.to_dict(), "adapter": adapter.name,
               "model": fingerprint(model), "data": hashlib.sha256(_tensor_bytes(ids)).hexdigest(),
               "absmax": {n: float(v) for n, v in sorted(absmax.items())}}
        state = ResumeState(resume_dir, key)
    records = list(state.blocks) if state else []
    first = len(records)

    bar = Progress(len(blocks) - first, "lkd", quiet=quiet)
    if first:
        bar.log(f"lkd: resuming after block {first - 1} from {resume_dir}")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    trained_seconds: list[float] = []
    inputs = capture_inputs(model, adapter, ids, lkd.batch_size) if first < len(blocks) else []
    if inputs:
        held = sum(b.hidden.numel() * b.hidden.element_size() for b in inputs) / 2**20
        bar.log(f"lkd: {len(blocks)} blocks, {lkd.samples} x {lkd.seq_len} tokens of {lkd.data!r}; "
                f"block inputs + targets hold {2 * held:.0f} MiB")
    try:
        for k in range(len(blocks)):
            t0 = time.perf_counter()
            # The float block's outputs: block k's targets, and block k+1's inputs. A resumed run
            # recomputes them for its finished blocks too (a forward pass each) to reach block `first`.
            teacher = run_block(blocks[k], inputs) if inputs else None
            if k < first:
                blocks[k] = state.load(k, finalize(make_student(blocks[k], per_block[k], absmax), per_block[k]))
            else:
                blocks[k], before, after, undone = distill_block(blocks[k], per_block[k], absmax, inputs, teacher,
                                                                 lkd, k)
                seconds = time.perf_counter() - t0
                record = {"block": k, "loss_before": before, "loss_after": after, "seconds": round(seconds, 2)}
                if state:
                    state.save(k, blocks[k], record)
                records.append(record)
                trained_seconds.append(seconds)
                left = sum(trained_seconds) / len(trained_seconds) * (len(blocks) - 1 - k)
                change = f" ({(after / before - 1) * 100:+.0f}%)" if before > 0 else ""
                if undone:
                    change = " (training raised the loss: kept the untrained block)"
                bar.log(f"lkd block {k + 1}/{len(blocks)}: loss {before:.4g} -> {after:.4g}{change}, "
                        f"{seconds:.1f} s, ~{_fmt(left)} left")
            if teacher is not None:
                # The next block's inputs are the ORIGINAL float model's outputs (the paper's choice).
                inputs = [replace(b, hidden=t) for b, t in zip(inputs, teacher)]
    finally:
        model.train(was_training)
    total = time.perf_counter() - start
    peak = peak_rss_mib()
    bar.log(f"lkd: done in {_fmt(total)}, peak RSS {peak:.0f} MiB")
    attach_info(model, config, adapter, lkd={"settings": lkd.to_dict(), "blocks": records,
                                             "seconds": round(total, 2), "peak_rss_mib": round(peak)})
    return model
