"""The kernel build lock (`zquant.kernels.build`): bounded, released by the OS, no orphaned compilers.

Fast: every test but the last builds into a temporary ``$ZQUANT_CACHE`` with `cpp_extension.load`
replaced (the build runs in a forked child, which sees the replacement too); the last one loads the
real extension from the normal cache. Linux only, like the kernels.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from zquant import kernels
from zquant.kernels import build, reference

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the kernels (and their build lock) are Linux only")

SRC = str(Path(build.__file__).resolve().parents[2])


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A fresh $ZQUANT_CACHE, a supported CPU, and no extension loaded in this process yet."""
    monkeypatch.setenv("ZQUANT_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(build, "_modules", {})
    monkeypatch.setattr(build, "unsupported_reason", lambda: None)
    out = build.build_dir()
    out.mkdir(parents=True)
    return out


def fake_load(monkeypatch, fn):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", fn)


HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(120)
""")


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the flock on ``path`` (until it is killed)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_wait_for_the_lock_is_bounded_and_names_it(cache, monkeypatch):
    monkeypatch.setenv(build.TIMEOUT_ENV, "0.5")
    fake_load(monkeypatch, lambda **kw: pytest.fail("built without the lock"))
    holder = hold_lock(cache / build.LOCK_NAME)
    try:
        t = time.monotonic()
        reason = build.load()
        waited = time.monotonic() - t
    finally:
        holder.kill()
        holder.wait()
    assert 0.5 <= waited < 3, waited
    assert reason == f"another process holds the kernel build lock {cache / build.LOCK_NAME} for over 0.5 s"


def test_the_fallback_warning_names_the_lock(cache, monkeypatch):
    monkeypatch.setenv(build.TIMEOUT_ENV, "0.2")
    monkeypatch.setattr(kernels, "_warned", set())
    from zquant.config import ActQuant, LayerQuant, WeightQuant
    from zquant.modules import QuantLinear
    layer = QuantLinear.from_float(torch.nn.Linear(32, 16), LayerQuant(WeightQuant(bits=8, groups=4), ActQuant()))
    x = torch.randn(3, 32)
    holder = hold_lock(cache / build.LOCK_NAME)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(x)
    finally:
        holder.kill()
        holder.wait()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and str(cache / build.LOCK_NAME) in messages[0] and "reference" in messages[0]
    assert torch.equal(y, reference.linear(layer, x))


def test_a_holder_that_is_killed_releases_the_lock(cache, monkeypatch):
    monkeypatch.setenv(build.TIMEOUT_ENV, "30")
    module = object()
    fake_load(monkeypatch, lambda **kw: module)
    holder = hold_lock(cache / build.LOCK_NAME)
    threading.Timer(0.5, holder.kill).start()     # killed while this process waits for it
    t = time.monotonic()
    try:
        assert build.load() is None
    finally:
        holder.kill()
        holder.wait()
    assert time.monotonic() - t < 10
    assert build.extension() is module


def test_a_stale_torch_lock_is_removed_before_building(cache, monkeypatch):
    stale = cache / "lock"               # what torch's FileBaton leaves when a build is killed
    stale.write_text("")
    module = object()

    def load(**kw):
        if stale.exists():               # torch would wait for it forever
            raise RuntimeError("error: the stale lock is still there")
        return module

    fake_load(monkeypatch, load)
    assert build.load() is None and build.extension() is module
    assert not stale.exists()


def test_the_lock_is_released_after_a_build(cache, monkeypatch):
    import fcntl
    fake_load(monkeypatch, lambda **kw: object())
    assert build.load() is None
    fd = os.open(cache / build.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)    # raises if anyone still held it
    finally:
        os.close(fd)


def test_a_build_failure_in_the_child_is_reported(cache, monkeypatch):
    def load(**kw):
        raise RuntimeError("Error building extension\nzquant_cpu.cpp:7:1: error: simulated failure")

    fake_load(monkeypatch, load)
    reason = build.load()
    assert reason == "the C++ extension could not be built or loaded (RuntimeError: " \
                     "zquant_cpu.cpp:7:1: error: simulated failure)"


def test_a_build_over_the_limit_is_stopped(cache, monkeypatch):
    monkeypatch.setattr(build, "BUILD_LIMIT_S", 0.5)
    fake_load(monkeypatch, lambda **kw: time.sleep(60))
    t = time.monotonic()
    reason = build.load()
    assert time.monotonic() - t < 8
    assert reason == "the C++ extension build took over 0.5 s and was stopped"


def test_build_timeout_setting(monkeypatch):
    monkeypatch.delenv(build.TIMEOUT_ENV, raising=False)
    assert build.build_timeout() == build.DEFAULT_TIMEOUT_S == 120
    monkeypatch.setenv(build.TIMEOUT_ENV, "7.5")
    assert build.build_timeout() == 7.5
    monkeypatch.setenv(build.TIMEOUT_ENV, "soon")
    assert build.build_timeout() == build.DEFAULT_TIMEOUT_S


# A process that "builds" with a real ninja whose one command records its pid and sleeps: what a
# compiler does for 25 s. The test then kills (or interrupts) that process.
BUILDER = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from torch.utils import cpp_extension
    from zquant.kernels import build
    work = Path(sys.argv[1])

    def load(**kw):
        (work / "child.pid").write_text(str(os.getpid()))
        subprocess.run(["ninja"], cwd=work, check=True, capture_output=True)

    build.unsupported_reason = lambda: None
    cpp_extension.load = load
    print(build.load(), flush=True)
""")

NINJA_FILE = "rule slow\n  command = sh -c 'echo $$$$ > compiler.pid; exec sleep 60'\nbuild out.txt: slow\n"


@pytest.mark.parametrize("how", ["killed", "interrupted"])
def test_the_compiler_dies_with_its_process(tmp_path, how):
    build._find_ninja()
    if shutil.which("ninja") is None:
        pytest.skip("no ninja")
    (tmp_path / "build.ninja").write_text(NINJA_FILE)
    env = {**os.environ, "ZQUANT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    compiler_pid = tmp_path / "compiler.pid"
    try:
        assert wait_until(lambda: compiler_pid.is_file() and compiler_pid.read_text().strip(), 60), proc.stderr
        compiler, child = int(compiler_pid.read_text()), int((tmp_path / "child.pid").read_text())
        assert alive(compiler) and alive(child)
        proc.send_signal(signal.SIGKILL if how == "killed" else signal.SIGINT)
        proc.wait(timeout=15)
        assert wait_until(lambda: not alive(compiler) and not alive(child), 10), "an orphan is still running"
        if how == "interrupted":
            assert "KeyboardInterrupt" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    # the lock died with its holder: a new process takes it at once
    import fcntl
    fd = os.open(tmp_path / "cache" / "kernels" / build.build_dir().name / build.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_the_real_extension_loads_under_the_lock(cpu_extension):
    """The normal cache (built there once): loaded, and the lock released afterwards."""
    import fcntl
    assert build.load() is None
    fd = os.open(build.build_dir() / build.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
