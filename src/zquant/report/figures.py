"""The plots of a report or an inspection, each with its id, section and title."""
from __future__ import annotations

from dataclasses import dataclass

from matplotlib.figure import Figure

from .. import plots
from ..config import file_stem
from ..plots import Caption


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
