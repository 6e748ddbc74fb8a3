"""Write what `zquant.inspect` measures: a directory of PNG plots + JSON (``zquant inspect``) and
one self-contained HTML page for a comparison (``zquant compare --report``).

The HTML page has inline CSS and its plots embedded as base64 ``data:`` URIs; it loads nothing
else, so it opens offline and can be mailed as one file. Its numbers are also written next to it
as ``report.json``, which lists every plot the page contains (``plots``).
"""
from __future__ import annotations

import base64
import copy
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from . import inspect as I
from . import plots
from .plots import Caption


def file_stem(name: str) -> str:
    """A scheme name usable in a file name (``w4/8a8`` -> ``w4-8a8``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


# ---------------------------------------------------------------------------------------------
# Per-layer SNR of each quantized model (the `compare` callback)
# ---------------------------------------------------------------------------------------------

class SnrCollector:
    """Measures per-layer SNR of each quantized model against the floating-point model on
    ``input_ids``; call it as ``collector(name, qmodel)`` (e.g. from `zquant.evaluate.compare`'s
    ``on_quantized``), read ``collector.results[name]``.

    A model quantized with LKD (``zquant_info["lkd"]["blocks"]``) also gets ``"lkd": {"blocks":
    [...], "before": <SNR of the same scheme without LKD>}``. "Before" reuses an earlier result of
    the identical scheme when there is one, else quantizes a copy of the floating-point model
    without LKD (static schemes are calibrated on the text the LKD model recorded).
    """

    def __init__(self, fp_model: nn.Module, input_ids: Tensor, tokenizer=None,
                 log: Callable[[str], None] = lambda s: None):
        self.fp_model, self.input_ids, self.tokenizer, self.log = fp_model, input_ids, tokenizer, log
        self.results: dict[str, dict] = {}
        self._plain: dict[str, dict] = {}          # scheme config as JSON -> SNR without LKD

    @staticmethod
    def _key(model: nn.Module) -> str:
        return json.dumps((getattr(model, "zquant_info", None) or {}).get("scheme"), sort_keys=True)

    def __call__(self, name: str, qmodel: nn.Module) -> dict:
        self.log(f"per-layer SNR of {name}")
        result = I.layer_snr(self.fp_model, qmodel, self.input_ids)
        blocks = I.lkd_blocks(qmodel)
        if blocks is None:
            self._plain.setdefault(self._key(qmodel), result)
        else:
            result["lkd"] = {"blocks": blocks, "before": self._without_lkd(qmodel)}
        self.results[name] = result
        return result

    def _without_lkd(self, qmodel: nn.Module) -> dict:
        key = self._key(qmodel)
        if key not in self._plain:
            from .api import quantize
            from .config import QuantConfig
            from .data import DEFAULT_CALIB_TEXT, PACKAGED_TEXTS
            info = qmodel.zquant_info
            calib = (info.get("calibration") or {}).get("text", DEFAULT_CALIB_TEXT)
            if calib not in PACKAGED_TEXTS and not Path(calib).is_file():
                calib = DEFAULT_CALIB_TEXT         # e.g. "user batches": not reproducible here
            self.log("per-layer SNR of the same scheme without LKD")
            plain = quantize(copy.deepcopy(self.fp_model), QuantConfig.from_dict(info["scheme"]),
                             tokenizer=self.tokenizer, calib_text=calib)
            self._plain[key] = I.layer_snr(self.fp_model, plain, self.input_ids)
            del plain
        return self._plain[key]


# ---------------------------------------------------------------------------------------------
# Plots of one inspection
# ---------------------------------------------------------------------------------------------

@dataclass
class Plot:
    id: str            # file stem and HTML anchor
    section: str       # "ranges", "snr", "lkd", "sizes"
    title: str
    figure: Figure

    @property
    def pixels(self) -> tuple[int, int]:
        return plots.pixels(self.figure)


def range_plots(ranges_json: dict, cap: Caption) -> list[Plot]:
    """The across-block summary, then activations and weights of each detailed block."""
    out = [Plot("range_summary", "ranges", "Range spread across blocks", plots.range_summary(ranges_json, cap))]
    for b in ranges_json["blocks"]:
        if b["detail"]:
            i = b["block"]
            out.append(Plot(f"block{i:02d}_activations", "ranges", f"Block {i}: per-token input ranges",
                            plots.activation_block(b, cap)))
            out.append(Plot(f"block{i:02d}_weights", "ranges", f"Block {i}: per-row weight ranges",
                            plots.weight_block(b, cap)))
    return out


def snr_plots(snrs: dict[str, dict], cap: Caption) -> list[Plot]:
    """Overview across schemes (when more than one), per-scheme SNR, and LKD where present."""
    out = []
    if len(snrs) > 1:
        out.append(Plot("snr_overview", "snr", "Weakest layer per block, every scheme", plots.snr_overview(snrs, cap)))
    for name, snr in snrs.items():
        scap = Caption(cap.model, cap.text, cap.tokens, name)
        out.append(Plot(f"snr_{file_stem(name)}", "snr", f"Per-layer SNR: {name}", plots.layer_snr(snr, scap)))
        if "lkd" in snr:
            out.append(Plot(f"lkd_{file_stem(name)}", "lkd", f"LKD: {name}",
                            plots.lkd(snr["lkd"]["blocks"], snr["lkd"]["before"], snr, scap)))
    return out


def inspect_to_dir(out_dir: str | Path, fp_model: nn.Module, input_ids: Tensor, cap: Caption,
                   blocks: str = "auto", quantized: dict[str, Callable[[], nn.Module]] | None = None,
                   tokenizer=None, log: Callable[[str], None] = lambda s: None) -> dict:
    """``zquant inspect``: ranges of ``fp_model`` and per-layer SNR of each quantized model
    (``quantized[name]()`` builds it; each is freed after measuring), written to ``out_dir`` as
    PNGs plus ``ranges.json``, ``snr.json`` and a manifest ``inspect.json``, which is returned."""
    out_dir = Path(out_dir)
    start = time.perf_counter()
    log("activation and weight ranges")
    measured = I.ranges(fp_model, input_ids)
    detail = I.select_blocks(blocks, len(measured["blocks"]))
    ranges_json = I.to_json(measured, detail)
    collector = SnrCollector(fp_model, input_ids, tokenizer, log)
    for name, build in (quantized or {}).items():
        log(f"quantizing with {name}")
        qmodel = build()
        collector(name, qmodel)
        del qmodel
    all_plots = range_plots(ranges_json, cap) + snr_plots(collector.results, cap)
    meta = {"model": cap.model, "text": cap.text, "tokens": cap.tokens, "blocks": detail}
    _write_json(out_dir / "ranges.json", {**meta, **ranges_json})
    files = ["ranges.json"]
    if collector.results:
        _write_json(out_dir / "snr.json", {**meta, "schemes": collector.results})
        files.append("snr.json")
    entries = []
    for p in all_plots:
        log(f"plot {p.id}.png")
        plots.save_png(p.figure, out_dir / f"{p.id}.png")
        w, h = p.pixels
        entries.append({"file": f"{p.id}.png", "section": p.section, "title": p.title, "width": w, "height": h})
    manifest = {**meta, "plots": entries, "json": files, "seconds": round(time.perf_counter() - start, 2)}
    _write_json(out_dir / "inspect.json", manifest, indent=1)
    return manifest


def _finite(data):
    """``data`` with NaN and infinities as None, so the file is strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _write_json(path: Path, data, indent: int | None = None) -> None:
    """Strict JSON; compact by default, since the per-token and per-row arrays dominate the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(data), indent=indent, allow_nan=False,
                      separators=(",", ": ") if indent else (",", ":"))
    path.write_text(text + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The HTML report
# ---------------------------------------------------------------------------------------------

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
    from . import __version__
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
    _write_json(directory / "report.json", {
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
