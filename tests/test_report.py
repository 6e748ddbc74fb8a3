"""Plots, the inspect directory and the HTML report: valid PNGs of the promised size, and a page
that embeds every plot it lists and nothing from outside."""
import base64
import copy
import io
import json
import struct
from html.parser import HTMLParser

import pytest
import torch

import zquant
from zquant import analysis as I
from zquant import plots, report
from zquant.cli import main
from zquant.eval import sizes

from conftest import make_tiny, sample_ids

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature; Pillow then decodes
    the whole image (checking every chunk's CRC)."""
    from PIL import Image
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.size == (width, height)
    return width, height


@pytest.fixture(scope="module")
def measured():
    fp = make_tiny("llama")
    ids = sample_ids()
    q = zquant.quantize(copy.deepcopy(fp), "w4/8a8")
    return fp, ids, I.to_json(I.ranges(fp, ids)), {"w4/8a8": I.layer_snr(fp, q, ids)}


CAP = plots.Caption("tiny-llama", "random ids", 48, "w4/8a8")


def test_block_figures_are_valid_pngs_of_the_planned_size(measured, tmp_path):
    _, _, ranges_json, _ = measured
    block = ranges_json["blocks"][0]
    # 4 input groups -> 2 rows of panels; 7 weight matrices -> 4 rows; at 100 dpi, 10 in wide.
    for fig, rows in ((plots.activation_block(block, CAP), 2), (plots.weight_block(block, CAP), 4)):
        path = plots.save_png(fig, tmp_path / "f.png")
        assert png_size(path.read_bytes()) == plots.pixels(fig) == (1000, round(100 * (0.8 + 2.5 * rows)))


def test_every_plot_kind_renders(measured):
    fp, _, ranges_json, snrs = measured
    lkd_blocks = [{"block": i, "loss_before": 1.0 / (i + 1), "loss_after": 0.4 / (i + 1), "seconds": 1} for i in (0, 1)]
    rows = [{"scheme": "fp32", "bytes": 4000}, {"scheme": "w4/8a8", "bytes": 1000}]
    figures = [plots.range_summary(ranges_json, CAP), plots.layer_snr(snrs["w4/8a8"], CAP),
               plots.snr_overview({**snrs, "again": snrs["w4/8a8"]}, CAP),
               plots.lkd(lkd_blocks, snrs["w4/8a8"], snrs["w4/8a8"], CAP), plots.sizes(rows, CAP)]
    for fig in figures:
        data = plots.png_bytes(fig)
        assert png_size(data) == plots.pixels(fig)
        assert len(data) < 150_000            # small PNGs (palette-quantized)
        assert CAP.model in fig.get_suptitle() and CAP.text in fig.get_suptitle()


def test_short_names_are_unique_suffixes():
    names = ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]
    assert plots.short_names(names) == {"attention.self.query": "query", "attention.output.dense": "attention.output.dense",
                                        "intermediate.dense": "intermediate.dense", "output.dense": "output.dense"}


def test_inspect_dir_writes_what_its_manifest_lists(measured, tmp_path):
    fp, ids, _, _ = measured
    quantized = {"w8a8": lambda: zquant.quantize(copy.deepcopy(fp), "w8a8")}
    manifest = report.inspect_to_dir(tmp_path, fp, ids, plots.Caption("tiny", "random ids", ids.numel()), "1",
                                     quantized)
    assert json.loads((tmp_path / "inspect.json").read_text()) == manifest
    files = {p["file"] for p in manifest["plots"]}
    assert files == {"range_summary.png", "block01_activations.png", "block01_weights.png", "snr_w8a8.png"}
    assert files | set(manifest["json"]) | {"inspect.json"} == {p.name for p in tmp_path.iterdir()}
    for p in manifest["plots"]:
        assert png_size((tmp_path / p["file"]).read_bytes()) == (p["width"], p["height"])
    snr = json.loads((tmp_path / "snr.json").read_text())
    assert snr["tokens"] == ids.numel() and len(snr["schemes"]["w8a8"]["layers"]) == 14


class _Page(HTMLParser):
    """Collects the links of the plot list, the figures, the images and any external reference."""

    def __init__(self):
        super().__init__()
        self.links, self.figures, self.images, self.external = [], [], [], []
        self._figure = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            value = a.get(key) or ""
            if value and not value.startswith(("#", "data:")):
                self.external.append(value)
        if tag in ("link", "script", "iframe", "object"):
            self.external.append(tag)
        if tag == "a":
            self.links.append(a["href"])
        if tag == "figure":
            self._figure = a["id"]
            self.figures.append(a["id"])
        if tag == "img":
            self.images.append((self._figure, a))


def _check_page(directory):
    page = _Page()
    page.feed((directory / "index.html").read_text(encoding="utf-8"))
    claimed = json.loads((directory / "report.json").read_text())["plots"]
    assert not page.external                                        # opens offline
    assert page.links == [f"#plot-{p['id']}" for p in claimed]       # the plot list = report.json's list
    assert page.figures == sorted(page.figures, key=[f"plot-{p['id']}" for p in claimed].index)
    assert sorted(page.figures) == sorted(f"plot-{p['id']}" for p in claimed)
    assert len(page.images) == len(claimed)
    for figure_id, img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        claim = next(p for p in claimed if f"plot-{p['id']}" == figure_id)
        assert png_size(data) == (int(img["width"]), int(img["height"])) == (claim["width"], claim["height"])
    return claimed


def _rows(fp, q):
    fp_row = {"scheme": "fp32", "kind": "decoder", "perplexity": 10.0, "ppl_vs_fp32": 1.0, **sizes(fp)}
    q_row = {"scheme": "w4/8a8", "kind": "decoder", "perplexity": 11.0, "ppl_vs_fp32": 1.1, "quantize_seconds": 0.1,
             **sizes(q)}
    for r in (fp_row, q_row):
        r["bytes_vs_fp32"] = r["bytes"] / fp_row["bytes"]
    return [fp_row, q_row]


def test_report_embeds_every_plot_it_lists(measured, tmp_path):
    fp, ids, _, _ = measured
    q = zquant.quantize(copy.deepcopy(fp), "w4/8a8")
    collector = report.SnrCollector(fp, ids)
    collector("w4/8a8", q)
    page = report.compare_report(tmp_path, fp, collector, _rows(fp, q), "tiny-llama", "random ids",
                                 command="zquant compare tiny --report out")
    assert page == tmp_path / "index.html"
    claimed = _check_page(tmp_path)
    assert {p["id"] for p in claimed} == {"snr_w4-8a8", "range_summary", "block00_activations", "block00_weights",
                                          "block01_activations", "block01_weights", "sizes"}
    text = page.read_text(encoding="utf-8")
    assert "tiny-llama" in text and "zquant compare tiny --report out" in text and "w4/8a8" in text


def test_lkd_model_gets_before_and_after(measured, tmp_path):
    """A synthetic LKD record (the format `zquant.algorithms.lkd` writes): 'before' is the same scheme
    without LKD, reused when the collector has already measured it."""
    fp, ids, _, _ = measured
    collector = report.SnrCollector(fp, ids)
    lkd = zquant.quantize(copy.deepcopy(fp), "w8a8")
    lkd.zquant_info = lkd.zquant_info.with_step("lkd", {"blocks": [
        {"block": 0, "loss_before": 0.02, "loss_after": 0.01, "seconds": 1.0},
        {"block": 1, "loss_before": 0.03, "loss_after": 0.012, "seconds": 1.0}]})
    result = collector("w8a8+lkd", lkd)                 # no plain w8a8 seen yet: quantized here
    plain = I.layer_snr(fp, zquant.quantize(copy.deepcopy(fp), "w8a8"), ids)
    assert result["lkd"]["before"] == plain
    assert result["lkd"]["blocks"] == lkd.zquant_info["lkd"]["blocks"]

    collector2 = report.SnrCollector(fp, ids)
    first = collector2("w8a8", zquant.quantize(copy.deepcopy(fp), "w8a8"))
    assert collector2("w8a8+lkd", lkd)["lkd"]["before"] is first

    rows = _rows(fp, lkd)
    rows[1].update(scheme="w8a8+lkd", lkd=True)
    report.write_report(tmp_path, rows, I.to_json(I.ranges(fp, ids), [0]), collector.results,
                        plots.Caption("tiny", "random ids", ids.numel()))
    ids_claimed = {p["id"] for p in _check_page(tmp_path)}
    assert {"lkd_w8a8-lkd", "snr_w8a8-lkd"} <= ids_claimed


def test_cli_inspect_and_compare_report(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "sample.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30, encoding="utf-8")
    out = tmp_path / "inspect"
    code = main(["inspect", str(tiny_model_dir), "--text", str(text), "--tokens", "40", "--out", str(out),
                 "--schemes", "w8a8,w4/8a8", "--quiet"])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    manifest = json.loads((out / "inspect.json").read_text())
    assert manifest["model"] == "tiny-llama" and manifest["tokens"] == 40
    assert {p["file"] for p in manifest["plots"]} >= {"snr_overview.png", "snr_w8a8.png", "snr_w4-8a8.png"}

    # A saved checkpoint: its per-layer SNR against the recorded floating-point source.
    ckpt = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--out", str(ckpt), "--quiet"]) == 0
    assert main(["inspect", str(ckpt), "--text", str(text), "--tokens", "40", "--out", str(tmp_path / "i2"),
                 "--quiet"]) == 0
    assert "ckpt" in json.loads((tmp_path / "i2" / "snr.json").read_text())["schemes"]

    rep = tmp_path / "report"
    code = main(["compare", str(tiny_model_dir), "--schemes", "w8a8", "--ppl", str(text), "--max-tokens", "200",
                 "--window", "64", "--report", str(rep), "--report-tokens", "40", "--quiet"])
    capsys.readouterr()
    assert code == 0
    assert {p["id"] for p in _check_page(rep)} >= {"snr_w8a8", "range_summary", "sizes"}


@pytest.mark.parametrize("args,message", [
    (["inspect", "/no/such/model"], "not found"),
    (["inspect", "TINY", "--text", "/no/such/text.txt"], "text '/no/such/text.txt' not found"),
    (["inspect", "TINY", "--schemes", "w3a8"], "unknown scheme 'w3a8'"),
    (["inspect", "TINY", "--blocks", "9", "--schemes", "none"], "the model has blocks 0..1"),
])
def test_cli_inspect_errors_are_one_line(tiny_model_dir, tmp_path, args, message, capsys):
    args = [str(tiny_model_dir) if a == "TINY" else a for a in args] + ["--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zquant: error:") and message in err and "\n" not in err
