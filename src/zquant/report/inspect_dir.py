"""``zquant inspect``: ranges and per-layer SNR written to a directory of PNGs and JSON."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from torch import Tensor, nn

from .. import analysis as I
from .. import outdir
from .. import plots
from ..fsutil import atomic_directory
from ..plots import Caption
from .figures import range_plots, snr_plots
from .jsonfile import write_json
from .snr import SnrCollector

MANIFEST = "inspect.json"       # also what marks a directory as an inspect output that may be replaced


def check_target(out_dir, sources=(), force: bool = False, force_hint: str = "pass force=True") -> Path:
    """``out_dir`` once an inspect output may replace it (`zquant.outdir.check_target`)."""
    return outdir.check_target(out_dir, MANIFEST, "zquant inspect output", sources, force, force_hint)


def inspect_to_dir(out_dir: str | Path, fp_model: nn.Module, input_ids: Tensor, cap: Caption,
                   blocks: str = "auto", quantized: dict[str, Callable[[], nn.Module]] | None = None,
                   tokenizer=None, log: Callable[[str], None] = lambda s: None, force: bool = False) -> dict:
    """``zquant inspect``: ranges of ``fp_model`` and per-layer SNR of each quantized model
    (``quantized[name]()`` builds it; each is freed after measuring), written to ``out_dir`` as
    PNGs plus ``ranges.json``, ``snr.json`` and a manifest ``inspect.json``, which is returned.
    ``out_dir`` is replaced as a whole, atomically: it must be absent, empty or an earlier inspect
    output (`check_target`), unless ``force``."""
    out_dir = check_target(out_dir, force=force)
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
    with atomic_directory(out_dir) as tmp:
        write_json(tmp / "ranges.json", {**meta, **ranges_json})
        files = ["ranges.json"]
        if collector.results:
            write_json(tmp / "snr.json", {**meta, "schemes": collector.results})
            files.append("snr.json")
        entries = []
        for p in all_plots:
            log(f"plot {p.id}.png")
            plots.save_png(p.figure, tmp / f"{p.id}.png")
            w, h = p.pixels
            entries.append({"file": f"{p.id}.png", "section": p.section, "title": p.title, "width": w, "height": h})
        manifest = {**meta, "plots": entries, "json": files, "seconds": round(time.perf_counter() - start, 2)}
        write_json(tmp / MANIFEST, manifest, indent=1)
    return manifest
