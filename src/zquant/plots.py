"""Plots of what `zquant.analysis` measures, as small PNGs.

Figures are built on `matplotlib.figure.Figure` and rendered by the Agg canvas directly, never
through pyplot, so importing zquant changes no global matplotlib state and needs no display.
Every figure has a fixed size (`DPI` dots per inch, no tight-bbox cropping), so a PNG's pixel size
is known in advance (`pixels`), and PNGs are written with an adaptive 256-colour palette, which
keeps a line plot at a few tens of kB.

Each function takes the dicts `zquant.analysis` returns and a `Caption` naming the model, the
scheme and the text, and returns a `Figure`; `save_png` writes it.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

DPI = 100
WIDTH = 10.0                    # inches: 1000 px
ROW_HEIGHT = 2.5                # inches per row of panels
HEADER = 0.8                    # inches for the two-line title
ACT_COLOR, WEIGHT_COLOR = "tab:blue", "tab:orange"
MAX_BARS = 400                  # range bars drawn per panel at most
BEFORE_COLOR, AFTER_COLOR = "0.55", "tab:green"


@dataclass(frozen=True)
class Caption:
    """What a figure is about: every title names the model, the scheme and the text."""

    model: str
    text: str
    tokens: int
    scheme: str = "floating point"

    def line(self, scheme: str | None = None) -> str:
        return f"{self.model}  ·  {scheme or self.scheme}  ·  text: {self.text} ({self.tokens} tokens)"


# ---------------------------------------------------------------------------------------------
# Figure plumbing
# ---------------------------------------------------------------------------------------------

def figure_size(panels: int, columns: int = 2) -> tuple[float, float]:
    """(width, height) in inches of a figure with ``panels`` panels in ``columns`` columns."""
    rows = max(1, math.ceil(panels / columns))
    return WIDTH, HEADER + ROW_HEIGHT * rows


def pixels(fig: Figure) -> tuple[int, int]:
    """(width, height) in pixels that `save_png` writes for ``fig``."""
    w, h = fig.get_size_inches()
    return int(round(w * DPI)), int(round(h * DPI))


def _figure(panels: int, columns: int = 2, title: str = "", caption: str = ""):
    fig = Figure(figsize=figure_size(panels, columns), dpi=DPI, layout="constrained")
    rows = max(1, math.ceil(panels / columns))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\n{caption}", fontsize=11)
    return fig, list(axes[:panels])


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (palette-quantized; exactly `pixels(fig)` in size)."""
    from PIL import Image
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    image = Image.fromarray(rgba[..., :3]).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(fig))
    return path


def short_names(relatives: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each layer name that is unique among ``relatives``
    (``self_attn.q_proj`` -> ``q_proj``; BERT's two ``*.dense`` keep a parent)."""
    result = {}
    for name in relatives:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if sum(1 for other in relatives if other == suffix or other.endswith("." + suffix)) == 1:
                result[name] = suffix
                break
        else:
            result[name] = name
    return result


def _group_label(relatives: list[str], short: dict[str, str]) -> str:
    names = ", ".join(short[r] for r in relatives)
    return f"{names} (one shared input)" if len(relatives) > 1 else names


def _ratio_note(ax, text: str) -> None:
    ax.text(0.99, 0.97, text, transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="0.8", alpha=0.9))


def _figure_legend(fig, ax) -> None:
    """One legend for all panels, below them, so it never hides data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9, frameon=False)


def _range_panel(ax, mins, maxs, color: str, absmax_label: str) -> None:
    """Figure 1 style: one vertical bar from min to max per token (or row), and the +-absmax of
    the whole tensor, which is what a single shared scale has to cover."""
    mins, maxs = np.asarray(mins, dtype=float), np.asarray(maxs, dtype=float)
    n = len(mins)
    absmax = float(max(np.abs(mins).max(), np.abs(maxs).max()))
    # A panel is ~400 px wide: beyond MAX_BARS, bars would share pixel columns and only blur
    # (and bloat the PNG). Each drawn bar then spans the min..max of a run of consecutive
    # rows, which is exactly the union of their bars; the JSON keeps every row.
    if n > MAX_BARS:
        starts = np.linspace(0, n, MAX_BARS + 1).astype(int)[:-1]
        x = starts + (np.diff(np.append(starts, n)) - 1) / 2
        mins, maxs = np.minimum.reduceat(mins, starts), np.maximum.reduceat(maxs, starts)
    else:
        x = np.arange(n)
    lw = max(0.5, min(1.5, 300 / len(x)))              # thinner bars when there are many
    ax.vlines(x, mins, maxs, color=color, lw=lw, label="min–max", antialiased=False)
    x = np.arange(n)
    ax.axhline(absmax, color="0.35", ls="--", lw=0.8, label=absmax_label)
    ax.axhline(-absmax, color="0.35", ls="--", lw=0.8)
    ax.axhline(0, color="0.8", lw=0.5, zorder=0)
    pad = 0.5 + 0.01 * len(x)              # keeps the first token's bar off the left spine
    ax.set_xlim(-pad, len(x) - 1 + pad)
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------------------------

def activation_block(block: dict, cap: Caption) -> Figure:
    """Per-token input range of each linear layer (input group) of one block."""
    groups = block["inputs"]
    short = short_names([r for g in groups for r in g["relative"]])
    fig, axes = _figure(len(groups), title=f"Block {block['block']}: input range of each linear layer, per token",
                        caption=cap.line())
    for ax, g in zip(axes, groups):
        _range_panel(ax, g["token_min"], g["token_max"], ACT_COLOR, "±absmax of the whole tensor")
        ax.set_title(_group_label(g["relative"], short), fontsize=10)
        ax.set_xlabel("token position in the sample text")
        ax.set_ylabel(f"input value\n(min/max over {g['width']} channels)")
        _ratio_note(ax, f"largest / median token absmax: {g['absmax_max_over_median']:.1f}×")
    _figure_legend(fig, axes[0])
    return fig


def weight_block(block: dict, cap: Caption) -> Figure:
    """Per-output-row weight range of each weight matrix of one block."""
    mats = block["weights"]
    short = short_names([m["relative"] for m in mats])
    fig, axes = _figure(len(mats), title=f"Block {block['block']}: weight range of each output row",
                        caption=cap.line())
    for ax, m in zip(axes, mats):
        _range_panel(ax, m["row_min"], m["row_max"], WEIGHT_COLOR, "±absmax of the whole matrix")
        n, k = m["shape"]
        ax.set_title(f"{short[m['relative']]}  [{n} × {k}]", fontsize=10)
        ax.set_xlabel("output row")
        ax.set_ylabel(f"weight value\n(min/max over {k} inputs)")
        _ratio_note(ax, f"largest / median row absmax: {m['absmax_max_over_median']:.1f}×")
    _figure_legend(fig, axes[0])
    return fig


def _block_axis(ax) -> None:
    ax.set_xlabel("transformer block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _block_panel(ax, title: str, ylabel: str, grid: str = "major") -> None:
    """Title, block x axis, y label, grid and the legend outside on the right: every per-block panel."""
    ax.set_title(title, fontsize=10)
    _block_axis(ax)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which=grid)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)


def _times(value, _pos) -> str:
    return f"{value:g}×"


def range_summary(ranges_json: dict, cap: Caption) -> Figure:
    """Across all blocks: how far the largest token (row) absmax is above the median one, per
    layer input and per weight matrix. Above 1× a single shared scale wastes log2(ratio) bits."""
    blocks = ranges_json["blocks"]
    fig, axes = _figure(2, columns=1, title="Range spread in every block: largest / median absmax "
                        "(what one shared scale costs the median token or row)", caption=cap.line())
    x = [b["block"] for b in blocks]
    in_keys = [tuple(g["relative"]) for g in blocks[0]["inputs"]]
    short = short_names([r for k in in_keys for r in k])
    for key in in_keys:
        y = [next((g["absmax_max_over_median"] for g in b["inputs"] if tuple(g["relative"]) == key), np.nan)
             for b in blocks]
        axes[0].plot(x, y, marker="o", ms=3, label=", ".join(short[r] for r in key))
    mat_keys = [m["relative"] for m in blocks[0]["weights"]]
    short_w = short_names(mat_keys)
    for key in mat_keys:
        y = [next((m["absmax_max_over_median"] for m in b["weights"] if m["relative"] == key), np.nan)
             for b in blocks]
        axes[1].plot(x, y, marker="o", ms=3, label=short_w[key])
    for ax, what in zip(axes, ("activations: per-token absmax of each layer's input",
                               "weights: per-output-row absmax of each matrix")):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))   # ratios span 1x to ~1000x
        ax.yaxis.set_major_formatter(FuncFormatter(_times))
        ax.yaxis.set_minor_formatter(NullFormatter())
        _block_panel(ax, what, "largest / median\n(×, log scale)", grid="both")
    return fig


# ---------------------------------------------------------------------------------------------
# Per-layer error
# ---------------------------------------------------------------------------------------------

def _by_layer(layers: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for l in layers:
        xs, ys = series.setdefault(l["relative"], ([], []))
        xs.append(l["block"])
        ys.append(np.nan if l[key] is None else l[key])
    return series


def _mark_worst(ax, layers: list[dict], key: str, short: dict[str, str]) -> None:
    scored = [l for l in layers if l[key] is not None]
    if not scored:
        return
    worst = min(scored, key=lambda l: l[key])
    ax.plot([worst["block"]], [worst[key]], "o", ms=10, mfc="none", mec="red", mew=1.5)
    # Text on the side of the point with more room, so it stays inside the axes.
    blocks = [l["block"] for l in layers]
    right_half = worst["block"] > (min(blocks) + max(blocks)) / 2
    ax.annotate(f"lowest: block {worst['block']} {short[worst['relative']]}, {worst[key]:.1f} dB",
                (worst["block"], worst[key]), textcoords="offset points", xytext=(-10 if right_half else 10, 2),
                ha="right" if right_half else "left", va="bottom", fontsize=8, color="red",
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))


def layer_snr(snr: dict, cap: Caption) -> Figure:
    """Per-layer SNR of one scheme, the layer alone and inside the quantized model."""
    layers = snr["layers"]
    short = short_names(list(dict.fromkeys(l["relative"] for l in layers)))
    out = "" if snr.get("output_db") is None else f"; final hidden states: {snr['output_db']:.1f} dB"
    fig, axes = _figure(2, columns=1, title=f"Per-layer quantization error: SNR of each layer's output vs "
                        f"floating point{out}", caption=cap.line())
    titles = {"isolated_db": "layer alone: fed the floating-point model's input to that layer",
              "end_to_end_db": "inside the quantized model: errors of earlier layers included"}
    for ax, key in zip(axes, titles):
        for rel, (xs, ys) in _by_layer(layers, key).items():
            ax.plot(xs, ys, marker="o", ms=3, lw=1, label=short[rel])
        _mark_worst(ax, layers, key, short)
        _block_panel(ax, titles[key], "SNR (dB)")
    return fig


def _per_block_min(layers: list[dict], key: str) -> tuple[list[int], list[float]]:
    worst: dict[int, float] = {}
    for l in layers:
        if l[key] is not None:
            worst[l["block"]] = min(worst.get(l["block"], math.inf), l[key])
    xs = sorted(worst)
    return xs, [worst[x] for x in xs]


def snr_overview(snrs: dict[str, dict], cap: Caption) -> Figure:
    """Every scheme at a glance: the lowest layer SNR in each block."""
    fig, axes = _figure(2, columns=1, title="Weakest layer of each block, per scheme: lowest layer SNR vs "
                        "floating point (higher is better)", caption=cap.line(", ".join(snrs)))
    titles = {"isolated_db": "layer alone (floating-point input)",
              "end_to_end_db": "inside the quantized model (errors accumulated)"}
    for ax, key in zip(axes, titles):
        for scheme, snr in snrs.items():
            xs, ys = _per_block_min(snr["layers"], key)
            out = "" if snr.get("output_db") is None else f" (final hidden states {snr['output_db']:.1f} dB)"
            ax.plot(xs, ys, marker="o", ms=3, lw=1, label=f"{scheme}{out}")
        _block_panel(ax, titles[key], "lowest layer SNR (dB)")
    return fig


def lkd(blocks: list[dict], before: dict, after: dict, cap: Caption) -> Figure:
    """LKD: the per-block distillation loss, and per-layer SNR before and after distillation
    (before = the same scheme without LKD)."""
    fig, axes = _figure(3, columns=1, title="Layer-by-layer distillation (LKD): loss per block and per-layer SNR "
                        "before / after", caption=cap.line())
    xs = [b["block"] for b in blocks]
    loss_before = [b["loss_before"] for b in blocks]
    loss_after = [b["loss_after"] for b in blocks]
    ax = axes[0]
    ax.plot(xs, loss_before, marker="o", ms=3, color=BEFORE_COLOR, label="before LKD")
    ax.plot(xs, loss_after, marker="o", ms=3, color=AFTER_COLOR, label="after LKD")
    if min(loss_before + loss_after) > 0:
        ax.set_yscale("log")
    _block_panel(ax, "distillation loss of each block's output (as recorded by LKD)",
                 "block output loss\n(MSE, log scale)", grid="both")

    names = [l["name"] for l in after["layers"]]
    lookup = {l["name"]: l for l in before["layers"]}
    first_of_block = {}
    for i, l in enumerate(after["layers"]):
        first_of_block.setdefault(l["block"], i)
    step = max(1, math.ceil(len(first_of_block) / 15))      # at most ~15 block labels
    for ax, key, what in ((axes[1], "isolated_db", "layer alone"),
                          (axes[2], "end_to_end_db", "inside the quantized model")):
        y_before = [np.nan if lookup.get(n, {}).get(key) is None else lookup[n][key] for n in names]
        y_after = [np.nan if l[key] is None else l[key] for l in after["layers"]]
        ax.plot(y_before, marker=".", lw=1, color=BEFORE_COLOR, label="before LKD")
        ax.plot(y_after, marker=".", lw=1, color=AFTER_COLOR, label="after LKD")
        ticks = sorted(first_of_block.items())[::step]
        ax.set_xticks([i for _, i in ticks], [str(b) for b, _ in ticks])
        ax.set_title(f"per-layer SNR, {what}", fontsize=10)
        ax.set_xlabel("layer, in order (ticks: first layer of each block)")
        ax.set_ylabel("SNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return fig


def sizes(rows: list[dict], cap: Caption) -> Figure:
    """Whole-model size of floating point and each scheme, in MB."""
    fig = Figure(figsize=(WIDTH, HEADER + 0.4 * len(rows) + 0.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    names = [r["scheme"] for r in rows][::-1]
    mb = [r["bytes"] / 1e6 for r in rows][::-1]
    bars = ax.barh(names, mb, color="tab:purple")
    for bar, r in zip(bars, rows[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  {r['bytes'] / 1e6:.1f} MB "
                f"({r['bytes'] / rows[0]['bytes'] * 100:.0f}% of {rows[0]['scheme']})", va="center", fontsize=8)
    ax.set_xlim(0, max(mb) * 1.35)
    ax.set_xlabel("model size (MB, as stored: int8 / packed int4 weights, float embeddings and norms)")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Model size per scheme\n{cap.line(', '.join(r['scheme'] for r in rows[1:]))}", fontsize=11)
    return fig
