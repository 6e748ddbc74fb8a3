"""The sequential block pipeline: every calibration algorithm runs inside this one loop.

For each transformer block k, in order::

    inputs_k[s]   what the ORIGINAL floating-point model feeds block k on data stream s
    teacher_k[s]  = float block k (inputs_k[s])           (algorithms may observe this run)
    each algorithm's `Algorithm.block` sees the float block, its planned layers, the inputs and
    teacher outputs, and may produce the quantized block (LKD trains one)
    block k      <- that block, or the float block converted round-to-nearest
    inputs_{k+1}  = teacher_k

An algorithm names the data it needs as streams of model-kwargs batches (static calibration its
sample text, LKD its distillation set); with no stream the loop runs no forward pass at all. The
loop owns what every algorithm shares: capturing the float inputs, progress lines, memory
accounting, and resuming from the blocks a ``resume_dir`` holds (each finished block is written
there atomically).
"""
from __future__ import annotations

import copy
import hashlib
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .convert import convert_layers, set_submodule
from .hooks import hooks
from .modules import QuantLinear, linear_features
from .plan import LayerPlan, Plan
from .progress import Progress, fmt_seconds
from .resume import ResumeState, fingerprint, tensor_bytes


@dataclass
class BlockInput:
    """One batch of a block's call: ``block(hidden, *args, **kwargs)``.

    ``hidden`` is float [B, T, H]; ``args``/``kwargs`` are whatever else the model passes its
    blocks (attention masks, position ids, rotary cos/sin), captured once and reused by every block.
    """

    hidden: Tensor
    args: tuple
    kwargs: dict


def block_output(out) -> Tensor:
    """The hidden states [B, T, H] of a block's return value (a tensor, or a tuple in older families)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _no_cache(value):
    # A KV cache object would grow with every call; blocks run here never need one.
    return None if type(value).__name__.endswith("Cache") else value


@torch.no_grad()
def capture_inputs(model: nn.Module, plan: Plan, batches: Sequence[Mapping[str, Tensor]]) -> list[BlockInput]:
    """The inputs that ``model`` feeds its first block for each batch (model kwargs dicts).

    Only the embeddings and block 0 run: the block list is swapped for a one-block list while a
    forward pre-hook on block 0 records its arguments.
    """
    blocks = plan.blocks(model)
    captured: list[BlockInput] = []

    def record(_module, args, kwargs):
        kwargs = {k: _no_cache(v) for k, v in kwargs.items()}
        if args:
            hidden, rest = args[0], tuple(_no_cache(a) for a in args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append(BlockInput(hidden.detach(), rest, kwargs))

    extra = {"use_cache": False} if plan.kind == "decoder" else {}
    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    set_submodule(model, plan.blocks_name, nn.ModuleList([blocks[0]]))
    try:
        for batch in batches:
            model.base_model(**batch, **extra)
    finally:
        set_submodule(model, plan.blocks_name, blocks)
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(f"{type(model).__name__}: block 0 was called {len(captured)} times for "
                           f"{len(batches)} batches; cannot capture its inputs")
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: Sequence[BlockInput]) -> list[Tensor]:
    """The block's outputs [B, T, H] for every captured batch (no gradients)."""
    return [block_output(block(b.hidden, *b.args, **b.kwargs)) for b in inputs]


@dataclass
class BlockStep:
    """What the algorithms see of block ``k``; they fill ``absmax``, ``quantized`` and ``record``."""
    k: int
    float_block: nn.Module                 # the original block: never modified
    layers: list[LayerPlan]                # its quantized layers
    inputs: dict[str, list[BlockInput]]    # per stream: the float model's inputs of this block
    teacher: dict[str, list[Tensor]]       # per stream: the float block's outputs
    absmax: dict[str, Tensor] = field(default_factory=dict)   # static input ranges by layer name
    quantized: nn.Module | None = None     # the quantized block, if an algorithm made it
    record: dict = field(default_factory=dict)                # what this block's progress line reports
    note: str = ""


class Algorithm:
    """One calibration algorithm: a step of the pipeline. Subclasses override what they use."""
    name = "algorithm"                     # also its key in the record and the resume key
    reports = False                        # True: the run prints progress lines (long work)

    def prepare(self, model: nn.Module, plan: Plan) -> None:
        """Before the loop (validate, build data)."""

    def streams(self) -> dict[str, list[dict]]:
        """The data this algorithm needs, as named lists of model-kwargs batches."""
        return {}

    def settings(self) -> dict:
        """JSON settings that identify the algorithm's work (the resume key)."""
        return {}

    def describe(self) -> str:
        """Its data, in words, for the run's first progress line."""
        return ""

    def observers(self, step: BlockStep) -> dict[str, dict[str, Callable]]:
        """Per stream, forward pre-hooks ``{relative layer name: fn(module, args)}`` for the teacher run."""
        return {}

    def block(self, step: BlockStep) -> None:
        """Work on block ``step.k`` after the teacher run."""

    def finish(self, records: list[dict], seconds: float, peak_mib: float) -> dict | None:
        """What goes into the quantization record under ``name`` (None: nothing)."""
        return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def empty_block(float_block: nn.Module, layers: Sequence[LayerPlan]) -> nn.Module:
    """A copy of the block with empty `QuantLinear`s where the plan quantizes (to load a saved block)."""
    block = copy.deepcopy(float_block)
    for t in layers:
        src = block.get_submodule(t.relative)
        k, n = linear_features(src)
        set_submodule(block, t.relative, QuantLinear(k, n, t.spec, bias=src.bias is not None))
    return block


def _chain(fns: list[Callable]) -> Callable:
    def hook(module, args):
        for fn in fns:
            fn(module, args)
    return hook


class Pipeline:
    """Runs ``algorithms`` over the blocks of ``model`` (quantized in place) following ``plan``."""

    def __init__(self, model: nn.Module, plan: Plan, algorithms: Sequence[Algorithm],
                 resume_dir: str | Path | None = None, quiet: bool = False):
        self.model, self.plan, self.algorithms = model, plan, list(algorithms)
        self.resume_dir, self.quiet = resume_dir, quiet
        self.label = "+".join(a.name for a in self.algorithms if a.reports)

    def _resume_state(self, data: dict[str, list[dict]]) -> ResumeState | None:
        if self.resume_dir is None:
            return None
        h = {name: hashlib.sha256(b"".join(tensor_bytes(t) for batch in batches for _, t in sorted(batch.items())))
             .hexdigest() for name, batches in sorted(data.items())}
        key = {a.name: a.settings() for a in self.algorithms}
        key.update(scheme=self.plan.config.to_dict(), adapter=self.plan.adapter.name,
                   model=fingerprint(self.model), data=h)
        return ResumeState(self.resume_dir, key)

    def run(self) -> dict[str, dict]:
        """Quantize every block; returns each algorithm's record entry by name."""
        for a in self.algorithms:
            a.prepare(self.model, self.plan)
        data = {name: batches for a in self.algorithms for name, batches in a.streams().items()}
        state = self._resume_state(data)
        records = list(state.blocks) if state else []
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        bar = Progress(self.plan.num_blocks - len(records), self.label, quiet=self.quiet or not self.label)
        try:
            self._loop(data, state, records, bar)
        finally:
            self.model.train(was_training)
        total, peak = time.perf_counter() - start, peak_rss_mib()
        if data:     # (a quiet bar prints nothing)
            bar.log(f"{self.label}: done in {fmt_seconds(total)}, peak RSS {peak:.0f} MiB")
        out = {}
        for a in self.algorithms:
            entry = a.finish(records, total, peak)
            if entry is not None:
                out[a.name] = entry
        return out

    def _loop(self, data: dict[str, list[dict]], state: ResumeState | None, records: list[dict], bar: Progress):
        blocks, n, first = self.plan.blocks(self.model), self.plan.num_blocks, len(records)
        if first:
            bar.log(f"{self.label}: resuming after block {first - 1} from {self.resume_dir}")
        inputs = {name: capture_inputs(self.model, self.plan, b) for name, b in data.items()} if first < n else {}
        if inputs:
            held = sum(x.hidden.numel() * x.hidden.element_size() for s in inputs.values() for x in s) / 2**20
            described = "; ".join(d for d in (a.describe() for a in self.algorithms) if d)
            bar.log(f"{self.label}: {n} blocks, {described}; block inputs + targets hold {2 * held:.0f} MiB")
        seconds: list[float] = []
        for k in range(n):
            t0 = time.perf_counter()
            step = BlockStep(k, blocks[k], self.plan.block_layers(k), inputs, {})
            self._teacher(step)
            if k < first:
                blocks[k] = state.load(k, empty_block(blocks[k], step.layers))
            else:
                blocks[k] = self._quantize_block(step)
                seconds.append(time.perf_counter() - t0)
                record = {"block": k, **step.record, "seconds": round(seconds[-1], 2)}
                if state:
                    state.save(k, blocks[k], record)
                records.append(record)
                self._log_block(bar, step, seconds)
            # The next block's inputs are the ORIGINAL float model's outputs (the paper's choice).
            inputs = {name: [replace(b, hidden=t) for b, t in zip(inputs[name], step.teacher[name])]
                      for name in inputs}

    def _teacher(self, step: BlockStep) -> None:
        """The float block's outputs on every stream, with the algorithms' observers attached."""
        observers = [a.observers(step) for a in self.algorithms]
        for name, inputs in step.inputs.items():
            fns: dict[str, list[Callable]] = {}
            for observed in observers:
                for rel, fn in observed.get(name, {}).items():
                    fns.setdefault(rel, []).append(fn)
            with hooks(step.float_block, {rel: _chain(f) for rel, f in fns.items()}):
                step.teacher[name] = run_block(step.float_block, inputs)

    def _quantize_block(self, step: BlockStep) -> nn.Module:
        for a in self.algorithms:
            a.block(step)
        if step.quantized is not None:
            return step.quantized
        return convert_layers(step.float_block, step.layers, step.absmax, relative=True)

    def _log_block(self, bar: Progress, step: BlockStep, seconds: list[float]) -> None:
        if not step.note:
            return
        left = sum(seconds) / len(seconds) * (self.plan.num_blocks - 1 - step.k)
        bar.log(f"{self.label} block {step.k + 1}/{self.plan.num_blocks}: {step.note}, {seconds[-1]:.1f} s, "
                f"~{fmt_seconds(left)} left")
