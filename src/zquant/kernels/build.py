"""Build (once) and load the C++ extension behind the CPU fast path.

The extension is compiled just in time with PyTorch's own tooling (`torch.utils.cpp_extension`,
which needs a C++ compiler and ``ninja``) into ``$ZQUANT_CACHE/kernels/<key>`` (default
``~/.cache/zquant``), where the key hashes the sources, the compiler flags, and the torch and
Python versions, so a later process (or a second machine sharing the home directory) loads the
cached library in milliseconds and any change rebuilds it. The first build takes ~25 s on 2 cores.

`load()` returns None when the extension (a Python module, `extension()`) is loaded, or the
reason it cannot be: the backend turns that into the one-time fallback warning.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

NAME = "zquant_cpu"
SOURCES = (Path(__file__).parent / "csrc" / "zquant_cpu.cpp",)
# The instruction sets the kernels are written for, as /proc/cpuinfo names them.
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma")
CFLAGS = [
    "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma",
    "-fno-math-errno", "-fno-trapping-math",
    # The epilogue must round like the reference's separate multiply and add: no FMA contraction.
    "-ffp-contract=off",
    # ATen's parallel_for is header code around `#pragma omp parallel` in this torch build.
    "-fopenmp",
]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict[str, str | None] = {}
_modules: dict[str, ModuleType] = {}


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unsupported_reason() -> str | None:
    """Why this machine cannot run the kernels at all, or None."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs Linux on x86-64 with AVX-512 VNNI, this is {sys.platform}/{platform.machine()}"
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)} (needs AVX-512 VNNI)"
    return None


def build_dir() -> Path:
    """``$ZQUANT_CACHE/kernels/<name>-<key>``: one folder per source/flags/torch/Python combination."""
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
    root = Path(os.environ.get("ZQUANT_CACHE", Path.home() / ".cache" / "zquant"))
    return root / "kernels" / f"{NAME}-{h.hexdigest()[:16]}"


def _find_ninja() -> None:
    """Put the ``ninja`` PyPI package's binary on PATH if no ninja is (an unactivated venv)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return            # cpp_extension then says that ninja is required, which becomes the reason
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_and_load() -> str | None:
    reason = unsupported_reason()
    if reason:
        return reason
    out = build_dir()
    library = out / f"{NAME}.so"
    if library.is_file():
        try:
            spec = importlib.util.spec_from_file_location(NAME, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _modules[NAME] = module
            return None
        except (OSError, ImportError):
            library.unlink(missing_ok=True)   # e.g. left half-written by an interrupted build: rebuild it
    try:
        from torch.utils import cpp_extension
        _find_ninja()
        out.mkdir(parents=True, exist_ok=True)
        _modules[NAME] = cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                                            extra_ldflags=LDFLAGS, build_directory=str(out), is_python_module=True,
                                            verbose=False)
        return None
    except Exception as e:  # noqa: BLE001 -- any build or load failure means: use the reference path
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # the compiler's own message ("file:line: error: ...", "c++: fatal error: ...") says most
        key = next((line for line in lines if "error:" in line), lines[-1] if lines else "")
        return f"the C++ extension could not be built or loaded ({type(e).__name__}: {key[:300]})"


def load() -> str | None:
    """Build or load the extension once per process; None on success, else the reason."""
    if NAME not in _state:
        with _lock:
            if NAME not in _state:
                _state[NAME] = _build_and_load()
    return _state[NAME]


def extension() -> ModuleType:
    """The loaded extension module (its functions: ``quantize``, ``norm_quant``, ``linear``)."""
    reason = load()
    if reason is not None:
        raise RuntimeError(f"zquant: the CPU kernels are unavailable: {reason}")
    return _modules[NAME]
