"""Write what `zquant.analysis` measures: a directory of PNG plots + JSON (``zquant inspect``) and
one self-contained HTML page for a comparison (``zquant compare --report``).

The HTML page has inline CSS and its plots embedded as base64 ``data:`` URIs; it loads nothing
else, so it opens offline and can be mailed as one file. Its numbers are also written next to it
as ``report.json``, which lists every plot the page contains (``plots``).

``snr.py`` collects per-layer SNR, ``figures.py`` assembles the plots, ``inspect_dir.py`` drives
``zquant inspect``, ``html.py`` writes the page.
"""
from ..config import file_stem
from .figures import Plot, range_plots, snr_plots
from .html import compare_report, write_report
from .inspect_dir import inspect_to_dir
from .snr import SnrCollector

__all__ = ["Plot", "SnrCollector", "compare_report", "file_stem", "inspect_to_dir", "range_plots", "snr_plots",
           "write_report"]
