"""What the quantizer sees: activation and weight ranges, and each layer's quantization error.

Everything here is statistics collected with forward hooks; results are plain dicts of floats
and lists (JSON-ready via `to_json`), so the numbers behind every plot can be saved next to it.

Ranges (ZeroQuant's Figure 1):
  * activation range: for the input of each linear layer inside the transformer blocks, the min
    and max over the hidden dimension, for every token of a sample text. Layers that read the
    very same tensor (q/k/v after one norm, gate/up) form one *input group* with one record.
  * weight range: the min and max of every output row of every weight matrix ([N, K]; GPT-2's
    transposed ``Conv1D`` is read as [N, K] too).

Per-layer error, as a signal-to-noise ratio in dB, SNR = 10 log10(sum y_fp^2 / sum (y_fp - y_q)^2)
summed over every token and output channel, measured two ways:
  * ``isolated_db``: the quantized layer is fed exactly the input that the floating-point layer
    received inside the floating-point model (captured with a hook), so the number is the
    layer's own error (weight rounding + activation quantization) and nothing else;
  * ``end_to_end_db``: the quantized layer's output inside the quantized model, whose input
    already carries every earlier layer's error, against the floating-point layer's output in
    the floating-point model: what a user's model actually suffers at that point.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .data import CHARS_PER_TOKEN, read_text
from .hooks import hooks
from .modules import QuantLinear, float_weight
from .plan import LayerPlan, Plan, layer_plan
from .record import record_of


def sample_input(tokenizer, text: str, tokens: int = 256) -> Tensor:
    """int64 [1, T<=tokens]: the start of a text (packaged name or UTF-8 file), tokenized with the
    special tokens the tokenizer adds by default (BERT's [CLS] ... [SEP]), as the model usually
    sees text."""
    if tokens < 2:
        raise ValueError(f"tokens must be at least 2, got {tokens}")
    body = read_text(text)[: tokens * CHARS_PER_TOKEN]
    ids = tokenizer(body, truncation=True, max_length=tokens, return_tensors="pt")["input_ids"]
    if ids.shape[1] < 2:
        raise ValueError(f"text {text!r} gives fewer than 2 tokens")
    return ids


def select_blocks(spec: str, count: int) -> list[int]:
    """Blocks to keep in full detail: ``auto`` (first, middle, last), ``all``, or ``0,5,11``."""
    if spec == "auto":
        return sorted({0, count // 2, count - 1})
    if spec == "all":
        return list(range(count))
    try:
        wanted = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"blocks must be 'auto', 'all' or comma-separated block numbers, got {spec!r}") from None
    bad = [b for b in wanted if not 0 <= b < count]
    if not wanted or bad:
        raise ValueError(f"blocks {spec!r}: the model has blocks 0..{count - 1}")
    return wanted


def _targets(model: nn.Module, plan: Plan | None) -> list[LayerPlan]:
    return list((plan or layer_plan(model)).layers)


def _weight(module: nn.Module) -> Tensor:
    """Float weight [N, K] as the layer uses it (dequantized for a `QuantLinear`)."""
    if isinstance(module, QuantLinear):
        return module.dequantized_weight()
    return float_weight(module)[0]


def _run(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Final hidden states [B, T, H] of the model's transformer. A causal LM's head is skipped:
    no statistic here needs the logits, and the vocabulary projection is a fifth of the work."""
    base = getattr(model, "base_model", None) or model
    out = base(input_ids=input_ids)
    value = getattr(out, "last_hidden_state", None)
    return out[0] if value is None else value


# ---------------------------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def activation_ranges(model: nn.Module, input_ids: Tensor, plan: Plan | None = None) -> list[list[dict]]:
    """Per block, the input groups of its linear layers with per-token min/max of the input.

    Returns ``blocks[i] = [{"names": [...], "relative": [...], "width": K,
    "token_min": float32 [B*T], "token_max": float32 [B*T]}, ...]`` in call order. Two layers
    are one group when their forward received the same tensor (same storage, shape and strides;
    earlier inputs of the block are kept alive, so an address cannot be reused meanwhile).
    """
    targets = _targets(model, plan)
    by_name = {t.name: t for t in targets}
    blocks: list[list[dict]] = [[] for _ in range(max(t.block for t in targets) + 1)]
    seen: dict[int, list[tuple[Tensor, dict]]] = {}    # block -> (input tensor, its group record)

    def same(a: Tensor, b: Tensor) -> bool:
        return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())

    def hook(name: str):
        t = by_name[name]

        def record(_module, args):
            x = args[0]
            for other, group in seen.setdefault(t.block, []):
                if same(x, other):
                    group["names"].append(name)
                    group["relative"].append(t.relative)
                    return
            flat = x.detach().reshape(-1, x.shape[-1]).float()          # [B*T, K]
            group = {"names": [name], "relative": [t.relative], "width": x.shape[-1],
                     "token_min": flat.amin(-1), "token_max": flat.amax(-1)}
            seen[t.block].append((x, group))
            blocks[t.block].append(group)
        return record

    with hooks(model, {t.name: hook(t.name) for t in targets}):
        _run(model, input_ids)
    seen.clear()
    return blocks


@torch.no_grad()
def weight_ranges(model: nn.Module, plan: Plan | None = None) -> list[list[dict]]:
    """Per block, per weight matrix: ``{"name", "relative", "shape": [N, K],
    "row_min": float32 [N], "row_max": float32 [N]}`` (min/max over each output row)."""
    targets = _targets(model, plan)
    blocks: list[list[dict]] = [[] for _ in range(max(t.block for t in targets) + 1)]
    for t in targets:
        w = _weight(model.get_submodule(t.name)).detach().float()      # [N, K]
        row_min, row_max = torch.aminmax(w, dim=1)
        blocks[t.block].append({"name": t.name, "relative": t.relative, "shape": list(w.shape),
                                "row_min": row_min, "row_max": row_max})
    return blocks


def spread(mins: Tensor, maxs: Tensor) -> dict:
    """How much one shared scale would waste on this tensor, from per-token (or per-row) min/max.

    ``absmax_max_over_median`` is the largest absmax over the median one: a single per-tensor
    scale is set by the largest, so the median token/row uses 1/ratio of the integer range
    (log2(ratio) bits lost). ``range_max_over_min`` is the paper's plain max/min range ratio.
    """
    absmax = torch.maximum(mins.abs(), maxs.abs()).double()
    rng = (maxs - mins).double()
    tiny = torch.finfo(torch.float32).tiny
    return {
        "absmax_max": absmax.max().item(),
        "absmax_median": absmax.median().item(),
        "absmax_min": absmax.min().item(),
        "absmax_max_over_median": (absmax.max() / absmax.median().clamp(min=tiny)).item(),
        "range_max_over_min": (rng.max() / rng.min().clamp(min=tiny)).item(),
    }


def ranges(model: nn.Module, input_ids: Tensor, plan: Plan | None = None) -> dict:
    """Activation and weight ranges of every block, plus their `spread` summaries."""
    acts, weights = activation_ranges(model, input_ids, plan), weight_ranges(model, plan)
    blocks = []
    for i, (groups, mats) in enumerate(zip(acts, weights)):
        for g in groups:
            g.update(spread(g["token_min"], g["token_max"]))
        for m in mats:
            m.update(spread(m["row_min"], m["row_max"]))
        blocks.append({"block": i, "inputs": groups, "weights": mats})
    return {"tokens": int(input_ids.numel()), "blocks": blocks}


# ---------------------------------------------------------------------------------------------
# Per-layer quantization error
# ---------------------------------------------------------------------------------------------

def snr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise); None when the noise is exactly zero (JSON has no infinity)."""
    if noise == 0:
        return None
    return 10 * math.log10(signal / noise)


@torch.no_grad()
def layer_snr(fp_model: nn.Module, qmodel: nn.Module, input_ids: Tensor, plan: Plan | None = None) -> dict:
    """SNR (dB) of every `QuantLinear` of ``qmodel`` against the same layer of ``fp_model``.

    Returns ``{"layers": [{"name", "block", "relative", "role", "bits", "act", "isolated_db",
    "end_to_end_db"}, ...], "output_db": SNR of the transformer's final hidden states}``.
    Layers that stay floating point in ``qmodel`` are not listed. Memory: one float32 copy of
    every quantized layer's FP output on ``input_ids`` is kept for the end-to-end pass.
    """
    targets = [t for t in _targets(qmodel, plan) if isinstance(qmodel.get_submodule(t.name), QuantLinear)]
    if not targets:
        raise ValueError("the quantized model has no QuantLinear layers to measure")
    sums = {t.name: [0.0, 0.0, 0.0] for t in targets}      # signal, isolated noise, end-to-end noise
    fp_out: dict[str, Tensor] = {}

    def fp_hook(name: str):
        qlayer = qmodel.get_submodule(name)

        def record(_module, args, out):
            y_fp = out.detach().double()
            y_q = qlayer(args[0]).double()               # same input as the FP layer: isolated error
            sums[name][0] += y_fp.pow(2).sum().item()
            sums[name][1] += (y_fp - y_q).pow(2).sum().item()
            fp_out[name] = out.detach().float().clone()
        return record

    def q_hook(name: str):
        def record(_module, _args, out):
            sums[name][2] += (fp_out[name].double() - out.detach().double()).pow(2).sum().item()
        return record

    def run(model, make_hook):
        with hooks(model, {t.name: make_hook(t.name) for t in targets}, after=True):
            return _run(model, input_ids).detach().double()

    try:
        fp_model.get_submodule(targets[0].name)
    except AttributeError:
        raise ValueError("the floating-point and quantized models have different layers") from None
    y_fp = run(fp_model, fp_hook)
    y_q = run(qmodel, q_hook)
    layers = []
    for t in targets:
        signal, iso, e2e = sums[t.name]
        spec = qmodel.get_submodule(t.name).spec
        layers.append({"name": t.name, "block": t.block, "relative": t.relative, "role": t.role,
                       "bits": spec.weight.bits, "act": spec.act.mode,
                       "isolated_db": snr_db(signal, iso), "end_to_end_db": snr_db(signal, e2e)})
    output_db = snr_db(y_fp.pow(2).sum().item(), (y_fp - y_q).pow(2).sum().item())
    return {"layers": layers, "output_db": output_db}


def lkd_blocks(model: nn.Module) -> list[dict] | None:
    """The per-block LKD record ``[{"block", "loss_before", "loss_after", "seconds"}, ...]`` of a
    model quantized with LKD, else None."""
    lkd = (record_of(model) or {}).get("lkd")
    if not isinstance(lkd, dict) or not lkd.get("blocks"):
        return None
    return sorted(lkd["blocks"], key=lambda b: b["block"])


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------

def float32_list(t: Tensor) -> list[float]:
    """A float tensor as the shortest decimals that round-trip its float32 values exactly."""
    return [float(s) for s in np.asarray(t.detach().float().cpu().numpy(), dtype=np.float32).astype(str).tolist()]


def to_json(ranges_result: dict, detail_blocks: list[int] | None = None) -> dict:
    """`ranges` output as JSON-ready data: every block's summaries, and the per-token and per-row
    arrays for ``detail_blocks`` only (None = every block), since those dominate the size."""
    detail = set(range(len(ranges_result["blocks"]))) if detail_blocks is None else set(detail_blocks)
    arrays = ("token_min", "token_max", "row_min", "row_max")
    blocks = []
    for b in ranges_result["blocks"]:
        keep = b["block"] in detail
        strip = lambda rec: {k: (float32_list(v) if k in arrays else v) for k, v in rec.items()  # noqa: E731
                             if keep or k not in arrays}
        blocks.append({"block": b["block"], "detail": keep, "inputs": [strip(g) for g in b["inputs"]],
                       "weights": [strip(m) for m in b["weights"]]})
    return {"tokens": ranges_result["tokens"], "blocks": blocks}
