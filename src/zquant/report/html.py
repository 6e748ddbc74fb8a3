"""``zquant compare --report``: one self-contained HTML page (inline CSS, plots as data: URIs)."""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import torch
from torch import nn

from .. import analysis as I
from .. import plots
from ..plots import Caption
from .figures import Plot, range_plots, snr_plots
from .jsonfile import write_json
from .snr import SnrCollector


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1040px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 4px 9px; text-align: right; }
th { background: #f3f3f3; } td.t, th:first-child { text-align: left; } td:first-child { white-space: nowrap; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
nav ol { columns: 2; } code { background: #f3f3f3; padding: 0 3px; }
.note { color: #444; font-size: 0.92em; }
"""


def _cell(text: str) -> str:
    # Numbers right-aligned (the CSS default for cells), words left-aligned.
    numeric = text[:1].isdigit() or text[:1] in "+-—" or text[:2] in ("-.", "+.")
    return f"<td>{html.escape(text)}</td>" if numeric else f'<td class="t">{html.escape(text)}</td>'


def _table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody></table>"


def _db(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def comparison_table(rows: list[dict], snrs: dict[str, dict]) -> str:
    """The compare rows with sizes, and each scheme's SNR of the final hidden states and of its
    weakest layer (alone)."""
    decoder = rows[0]["kind"] == "decoder"
    head = (["scheme", "perplexity", "vs fp32"] if decoder else ["scheme", "accuracy %", "vs fp32", "cosine"]) + \
        ["model MB", "size vs fp32", "block layers vs FP16", "final hidden state SNR dB", "lowest layer SNR dB", "quantize s"]
    body = []
    for r in rows:
        snr = snrs.get(r["scheme"])
        lowest = min((l["isolated_db"] for l in snr["layers"] if l["isolated_db"] is not None), default=None) \
            if snr else None
        quality = ([f"{r['perplexity']:.3f}", f"{(r['ppl_vs_fp32'] - 1) * 100:+.2f}%"] if decoder else
                   [f"{r['accuracy'] * 100:.2f}", f"{r['accuracy_delta'] * 100:+.2f}", f"{r['cosine']:.4f}"])
        name = r["scheme"] + (" (LKD)" if r.get("lkd") and "lkd" not in r["scheme"] else "")
        body.append([name, *quality, f"{r['bytes'] / 1e6:.1f}", f"{r['bytes_vs_fp32'] * 100:.1f}%",
                     f"{r['layer_ratio_to_fp16'] * 100:.1f}%", _db(snr and snr.get("output_db")), _db(lowest),
                     f"{r['quantize_seconds']:.1f}" if "quantize_seconds" in r else "—"])
    return _table(head, body)


def weakest_layers(snrs: dict[str, dict], count: int = 3) -> str:
    """Per scheme, the ``count`` layers with the lowest isolated SNR."""
    body = []
    for name, snr in snrs.items():
        scored = sorted((l for l in snr["layers"] if l["isolated_db"] is not None), key=lambda l: l["isolated_db"])
        for l in scored[:count]:
            body.append([name, l["name"], f"W{l['bits']} act {l['act']}", _db(l["isolated_db"]),
                         _db(l["end_to_end_db"])])
    return _table(["scheme", "layer", "quantization", "SNR alone dB", "SNR in model dB"], body)


def _figure_html(p: Plot, png: bytes) -> str:
    w, h = p.pixels
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="plot-{p.id}"><img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
            f'alt="{html.escape(p.title)}"><figcaption>{html.escape(p.title)}</figcaption></figure>')


_SECTIONS = (
    ("snr", "Per-layer quantization error",
     "SNR = 10·log10(Σ y_fp² / Σ (y_fp − y_q)²) over every token and output channel of a layer's output, in dB; "
     "30 dB means the error has 1/1000 of the signal's power. <em>Alone</em>: the quantized layer gets exactly "
     "the input the floating-point layer got inside the floating-point model, so only its own error counts. "
     "<em>In the model</em>: the layer's output inside the quantized model, errors of earlier layers included."),
    ("lkd", "Layer-by-layer distillation (LKD)",
     "Before = the same scheme without LKD; the loss is what LKD recorded for each block's output. The "
     "layer-alone SNR can fall after LKD: distillation moves a layer's weights away from the floating-point "
     "ones to cancel the errors of the other layers in its block; what it improves is the block output, "
     "which shows in the in-model SNR."),
    ("ranges", "Activation and weight ranges (floating-point model)",
     "As in ZeroQuant's Figure 1: bars span the min to max over the hidden dimension of each token of a layer's "
     "input, and over each output row of a weight matrix. The dashed lines are the whole tensor's absmax, which one "
     "shared scale must cover; token-wise activation and row-group weight scales follow the bars instead."),
    ("sizes", "Model sizes", "Whole-model bytes as stored; embeddings and norms stay floating point."),
)


def write_report(directory: str | Path, rows: list[dict], ranges_json: dict, snrs: dict[str, dict], cap: Caption,
                 command: str | None = None) -> Path:
    """Write ``index.html`` (self-contained) and ``report.json`` to ``directory``; return the page."""
    from .. import __version__
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    all_plots = snr_plots(snrs, cap) + range_plots(ranges_json, cap) + \
        [Plot("sizes", "sizes", "Model size per scheme", plots.sizes(rows, cap))]
    figures = {p.id: _figure_html(p, plots.png_bytes(p.figure)) for p in all_plots}

    parts = [f"<h1>zquant report: {html.escape(cap.model)}</h1>",
             f'<p class="meta">zquant {html.escape(__version__)}, torch {html.escape(torch.__version__)}, '
             f'{time.strftime("%Y-%m-%d %H:%M")}. Ranges and SNR measured on text '
             f'<code>{html.escape(cap.text)}</code> ({cap.tokens} tokens).'
             + (f" Command: <code>{html.escape(command)}</code>" if command else "") + "</p>",
             "<nav><b>Plots</b><ol>" + "".join(f'<li><a href="#plot-{p.id}">{html.escape(p.title)}</a></li>'
                                               for p in all_plots) + "</ol></nav>",
             "<h2>Comparison</h2>", comparison_table(rows, snrs)]
    if snrs:
        parts += ["<h3>Layers with the lowest SNR</h3>", weakest_layers(snrs)]
    for section, heading, note in _SECTIONS:
        members = [p for p in all_plots if p.section == section]
        if members:
            parts += [f"<h2>{html.escape(heading)}</h2>", f'<p class="note">{note}</p>', *(figures[p.id] for p in members)]
    page = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>zquant report: {html.escape(cap.model)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
    index = directory / "index.html"
    index.write_text(page, encoding="utf-8")
    write_json(directory / "report.json", {
        "model": cap.model, "text": cap.text, "tokens": cap.tokens, "command": command,
        "plots": [{"id": p.id, "section": p.section, "title": p.title, "width": p.pixels[0], "height": p.pixels[1]}
                  for p in all_plots],
        "rows": rows, "snr": snrs, "ranges": ranges_json})
    return index


def compare_report(directory: str | Path, fp_model: nn.Module, collector: SnrCollector, rows: list[dict],
                   model_name: str, text: str, blocks: str = "auto", command: str | None = None) -> Path:
    """``zquant compare --report``: ranges of the floating-point model on the collector's sample
    text, plus the compare rows and the collector's per-layer SNR, as one page."""
    measured = I.ranges(fp_model, collector.input_ids)
    ranges_json = I.to_json(measured, I.select_blocks(blocks, len(measured["blocks"])))
    cap = Caption(model_name, text, collector.input_ids.numel())
    return write_report(directory, rows, ranges_json, collector.results, cap, command)
