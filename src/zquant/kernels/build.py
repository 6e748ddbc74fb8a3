"""Build (once) and load the C++ extension behind the CPU fast path.

The extension is compiled just in time with PyTorch's own tooling (`torch.utils.cpp_extension`,
which needs a C++ compiler and ``ninja``) into ``$ZQUANT_CACHE/kernels/<key>`` (default
``~/.cache/zquant``), where the key hashes the sources, the compiler flags, and the torch and
Python versions, so a later process (or a second machine sharing the home directory) loads the
cached library in milliseconds and any change rebuilds it. The first build takes ~25 s on 2 cores.

Processes sharing the cache serialize the build and the load with an ``flock`` on
``<build dir>/build.lock``, which the OS releases however its holder ends (torch's own lock file,
``<build dir>/lock``, stays behind when a build is killed, and every later process would wait
for it forever: holding the flock, we remove it). The wait is bounded, ``$ZQUANT_BUILD_TIMEOUT``
seconds (default 120); past it the backend falls back to the reference path, saying which lock
it waited for. The compiler runs in a child process that dies with this one (see
`_run_in_child`), so a killed or interrupted process leaves no compiler running behind it.

`load()` returns None when the extension (a Python module, `extension()`) is loaded, or the
reason it cannot be: the backend turns that into the one-time fallback warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import select
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from ..fsutil import cache_root

NAME = "zquant_cpu"
_CSRC = Path(__file__).parent / "csrc"
SOURCES = (_CSRC / "zquant_cpu.cpp", _CSRC / "decode.cpp", _CSRC / "attention.cpp", _CSRC / "head.cpp")
HEADERS = (_CSRC / "zquant_cpu.h",)
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
LOCK_NAME = "build.lock"
TIMEOUT_ENV = "ZQUANT_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
# A build still running after this long is stopped and reported (a hung compiler): ~25 s is normal.
BUILD_LIMIT_S = 900.0

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
    for src in (*SOURCES, *HEADERS):
        h.update(src.read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
    # Not shared with a zquant that locked only with torch's lock file, whose lock we remove.
    h.update(b"flock build.lock")
    root = cache_root()
    return root / "kernels" / f"{NAME}-{h.hexdigest()[:16]}"


def _find_ninja() -> None:
    """Put the ``ninja`` PyPI package's binary on PATH if no ninja is (an unactivated venv)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return            # cpp_extension then says that ninja is required, which becomes the reason
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_timeout() -> float:
    """Seconds to wait for another process's build: ``$ZQUANT_BUILD_TIMEOUT``, default 120."""
    try:
        return max(0.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _acquire_lock(path: Path, timeout: float) -> int | None:
    """An open descriptor of ``path`` holding an exclusive flock, or None after ``timeout`` s of
    another process holding it. (Polled: a blocking flock could not be given a deadline.)"""
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline, delay = time.monotonic() + timeout, 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                os.close(fd)
                return None
            time.sleep(min(delay, left))
            delay = min(2 * delay, 0.1)
        except BaseException:
            os.close(fd)
            raise


def _clear_stale_torch_lock(out: Path) -> None:
    """Remove torch's lock file, left by a build that was killed: with our flock held, nobody else
    is building here, and torch would wait for that file without end."""
    (out / "lock").unlink(missing_ok=True)


def _import(library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _failure(kind: str, text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # the compiler's own message ("file:line: error: ...", "c++: fatal error: ...") says most
    key = next((line for line in lines if "error:" in line), lines[-1] if lines else "")
    return f"the C++ extension could not be built or loaded ({kind}: {key[:300]})"


_PR_SET_PDEATHSIG = 1     # linux/prctl.h
_libc = None


def _die_with(parent: int, sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent (thread) ends, or end now if
    it already has. Called in forked children only."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(1)


def _spawned_children_die_with_this_process() -> None:
    """In the build child only: every subprocess it starts gets SIGTERM when the child ends. For
    ninja that is enough: on SIGTERM it stops the compilers it runs (each in a process group of
    its own, out of reach of a signal to ours) and removes their partial outputs."""
    import subprocess
    me, popen = os.getpid(), subprocess.Popen

    class Popen(popen):
        def __init__(self, *args, **kwargs):
            if kwargs.get("preexec_fn") is None:
                kwargs["preexec_fn"] = lambda: _die_with(me, signal.SIGTERM)
            super().__init__(*args, **kwargs)

    subprocess.Popen = Popen


def _child(fn: Callable[[], object], parent: int, w: int) -> None:
    """The build child's life: run ``fn()``, write what it raised (type, newline, message) to ``w``."""
    status = 1
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with(parent, signal.SIGKILL)
        _spawned_children_die_with_this_process()
        try:
            fn()
            status = 0
        except BaseException as e:  # noqa: BLE001 -- reported to the parent
            os.write(w, f"{type(e).__name__}\n{e}".encode(errors="replace")[:60000])
    finally:
        os._exit(status)           # no atexit handlers, no flushing of the parent's buffers


def _stop(pid: int) -> None:
    """SIGTERM to the build child's process group (the child and ninja, which passes it on to the
    compilers), SIGKILL 5 s later if the child is still there; then reap the child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in (-pid, pid):     # the group, and the child should it not lead one yet
            try:
                os.kill(target, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:      # reaped already (SIGCHLD ignored)
                return
            time.sleep(0.01)


def _run_in_child(fn: Callable[[], object], close_fds: tuple[int, ...] = ()) -> str | None:
    """Run ``fn()`` in a forked child process; None when it returned, else what went wrong.

    Forked, not a fresh interpreter: the child runs this process's own `cpp_extension.load` (as
    configured, or replaced in the tests) for the cost of a fork. It leads a process group of its
    own (Ctrl-C reaches only this process, which then stops it), the kernel kills it if this
    process dies (PR_SET_PDEATHSIG), and the processes it starts get SIGTERM when it dies. An
    exception here (KeyboardInterrupt) or a build longer than BUILD_LIMIT_S stops it and its group.
    ``close_fds`` are closed in the child (the parent's flock stays the parent's alone).
    """
    parent = os.getpid()
    sys.stdout.flush()            # else what is buffered would be written twice, once by the child
    sys.stderr.flush()
    r, w = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    if pid == 0:
        os.close(r)
        for fd in close_fds:
            os.close(fd)
        _child(fn, parent, w)     # never returns
    os.close(w)
    message, status = b"", 0
    try:
        try:
            os.setpgid(pid, pid)  # here too, so that _stop finds the group however early it runs
        except OSError:
            pass
        deadline = time.monotonic() + BUILD_LIMIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _stop(pid)
                return f"the C++ extension build took over {BUILD_LIMIT_S:g} s and was stopped"
            if select.select([r], [], [], left)[0]:
                chunk = os.read(r, 65536)
                if not chunk:     # the child has ended (only it holds the pipe's other end)
                    break
                message += chunk
        try:
            status = os.waitpid(pid, 0)[1]
        except ChildProcessError:  # reaped already (SIGCHLD ignored): its message says it all
            pass
    except BaseException:
        _stop(pid)
        raise
    finally:
        os.close(r)
    if message:
        kind, _, text = message.decode(errors="replace").partition("\n")
        return _failure(kind, text)
    if os.WIFSIGNALED(status):
        return f"the C++ extension build was killed by signal {os.WTERMSIG(status)}"
    if status != 0:
        return f"the C++ extension build exited with status {os.waitstatus_to_exitcode(status)}"
    return None


def _load_or_build(out: Path, lock_fd: int) -> str | None:
    """With the build lock held: load the cached library, or build it (in a child) and load it."""
    library = out / f"{NAME}.so"
    if library.is_file():
        try:
            _modules[NAME] = _import(library)
            return None
        except (OSError, ImportError):
            library.unlink(missing_ok=True)   # e.g. left half-written by an interrupted build: rebuild it
    try:
        from torch.utils import cpp_extension
        _find_ninja()

        def build():
            _clear_stale_torch_lock(out)
            # copies of the flag lists: cpp_extension appends to the ones it is given
            return cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=list(CFLAGS),
                                      extra_ldflags=list(LDFLAGS), build_directory=str(out), is_python_module=True,
                                      verbose=False)

        failure = _run_in_child(build, close_fds=(lock_fd,))
        if failure is not None:
            return failure
        _modules[NAME] = build()          # built: this checks that it is up to date, and imports it
        return None
    except Exception as e:  # noqa: BLE001 -- any build or load failure means: use the reference path
        return _failure(type(e).__name__, str(e))


def _build_and_load() -> str | None:
    reason = unsupported_reason()
    if reason:
        return reason
    out = build_dir()
    lock, timeout = out / LOCK_NAME, build_timeout()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _acquire_lock(lock, timeout)
    except OSError as e:
        # e.g. a read-only cache: nothing can be built there, but a library built before still loads
        try:
            _modules[NAME] = _import(out / f"{NAME}.so")
            return None
        except (OSError, ImportError):
            return f"the kernel build lock {lock} cannot be taken ({e})"
    if fd is None:
        return f"another process holds the kernel build lock {lock} for over {timeout:g} s"
    try:
        return _load_or_build(out, fd)
    finally:
        os.close(fd)                      # releases the flock


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
