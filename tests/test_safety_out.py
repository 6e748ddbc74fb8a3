"""Writing results never destroys data (issue: trustworthy by default): targets that are not
zquant's own are refused before the slow work, the replacement is atomic, stale temporary
siblings are cleaned without touching a live writer's, and LKD resume blocks are verified."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import zquant
from conftest import make_tiny
from zquant import fsutil
from zquant.cli import main
from zquant.config import LKDConfig
from zquant.outdir import OutputError, check_target

SRC = str(Path(zquant.__file__).resolve().parents[1])


def _one_line_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("zquant: error: "), err
    return err


@pytest.fixture
def no_slow_work(monkeypatch):
    """Fail the test if the CLI gets as far as loading the model."""
    import zquant.api

    def forbidden(*a, **k):
        raise AssertionError("the target was not checked before the model was loaded")
    monkeypatch.setattr(zquant.api, "load", forbidden)
    monkeypatch.setattr(zquant.api, "load_tokenizer", forbidden)


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def _quantized():
    return zquant.quantize(make_tiny("llama", vocab_size=300), "w8a8")


# ------------------------------------------------------------------------------------------------
# What may be replaced
# ------------------------------------------------------------------------------------------------

def test_quantize_refuses_a_directory_of_user_files(tiny_model_dir, tmp_path, capsys, no_slow_work):
    out = _user_dir(tmp_path / "mine")
    err = _one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8", "--out", out)
    assert "not empty" in err and "--force" in err
    assert (out / "thesis.tex").read_text() == "years of work"


def test_quantize_refuses_a_regular_file(tiny_model_dir, tmp_path, capsys, no_slow_work):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    assert "is a file" in _one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8", "--out", out)
    assert out.read_text() == "keep me"


def test_force_replaces_and_a_checkpoint_or_empty_dir_is_replaced_without_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()                                                  # empty: fine
    args = ["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert main(args) == 0, capsys.readouterr().err             # a checkpoint: replaced
    _user_dir(tmp_path / "mine")
    assert main([*args[:-3], "--out", str(tmp_path / "mine"), "--force", "--quiet"]) == 0
    assert not (tmp_path / "mine" / "thesis.tex").exists() and zquant.load(tmp_path / "mine") is not None
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["model", "inside", "contains"])
def test_out_never_overlaps_the_model_even_forced(tiny_model_dir, tmp_path, capsys, no_slow_work, where):
    out = {"model": tiny_model_dir, "inside": tiny_model_dir / "q", "contains": tmp_path}[where]
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    err = _one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8", "--out", out, "--force")
    assert "model being read" in err
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before


def test_out_next_to_a_gguf_is_fine_but_not_the_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert check_target(tmp_path / "m-w8a8", "zquant.json", "checkpoint", [gguf]) == tmp_path / "m-w8a8"
    with pytest.raises(OutputError, match="is the model being read"):
        check_target(gguf, "zquant.json", "checkpoint", [gguf], force=True)


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_dot_targets_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch, no_slow_work, out):
    monkeypatch.chdir(_user_dir(tmp_path / "work"))
    err = _one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8", "--out", out)
    assert "not '.' or '..'" in err


def test_home_cwd_and_root_are_never_replaced(tiny_model_dir, tmp_path, capsys, monkeypatch, no_slow_work):
    monkeypatch.setenv("HOME", str(_user_dir(tmp_path / "home")))
    assert "home directory" in _one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8",
                                               "--out", "~", "--force")
    monkeypatch.chdir(_user_dir(tmp_path / "a" / "b"))
    assert "current directory" in _one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8",
                                                  "--out", tmp_path / "a", "--force")
    with pytest.raises(OutputError, match="filesystem root"):
        check_target(Path("/"), "zquant.json", "checkpoint", force=True)


def test_unwritable_parent_fails_before_the_slow_work(tiny_model_dir, tmp_path, capsys, no_slow_work):
    (tmp_path / "file").write_text("x")
    err = _one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8", "--out", tmp_path / "file" / "q")
    assert "cannot write in" in err


def test_missing_parent_is_created_before_the_slow_work(tiny_model_dir, tmp_path, capsys, no_slow_work):
    with pytest.raises(AssertionError, match="before the model was loaded"):
        main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--out", str(tmp_path / "new" / "deep" / "q")])
    assert (tmp_path / "new" / "deep").is_dir() and not list((tmp_path / "new" / "deep").iterdir())


def test_compare_save_checks_each_scheme_folder(tiny_model_dir, tmp_path, capsys, no_slow_work):
    _user_dir(tmp_path / "runs" / "w4-8a8")
    err = _one_line_error(capsys, "compare", tiny_model_dir, "--schemes", "w8a8,w4/8a8", "--save", tmp_path / "runs")
    assert "w4-8a8" in err and "not empty" in err


def test_inspect_refuses_user_files_and_replaces_its_own_output(tiny_model_dir, tmp_path, capsys, no_slow_work):
    out = _user_dir(tmp_path / "plots")
    err = _one_line_error(capsys, "inspect", tiny_model_dir, "--out", out)
    assert "inspect output" in err and (out / "thesis.tex").exists()
    from zquant.report.inspect_dir import MANIFEST, check_target as inspect_target
    (out / MANIFEST).write_text(json.dumps({"plots": [], "json": []}))
    assert inspect_target(out) == out


def test_default_lkd_resume_folder_must_be_ours(tiny_model_dir, tmp_path, capsys, no_slow_work):
    _user_dir(tmp_path / "q.lkd-resume")                         # removed after the save: refuse it
    err = _one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8", "--lkd", "--out", tmp_path / "q")
    assert "q.lkd-resume" in err and "LKD resume" in err


def test_library_save_refuses_unless_forced_and_never_into_its_source(tiny_model_dir, tmp_path):
    out = _user_dir(tmp_path / "mine")
    model = _quantized()
    with pytest.raises(OutputError, match="force=True"):
        zquant.save(model, out)
    assert (out / "thesis.tex").exists()
    zquant.save(model, out, force=True)
    zquant.load(out)
    import dataclasses
    model.zquant_info = dataclasses.replace(model.zquant_info, source=str(tiny_model_dir))
    with pytest.raises(OutputError, match="inside the model"):
        zquant.save(model, tiny_model_dir / "q", force=True)


def test_a_symbolic_link_is_refused_and_forced_replaces_only_the_link(tmp_path):
    target = _user_dir(tmp_path / "elsewhere")
    (tmp_path / "q").symlink_to(target)
    model = _quantized()
    with pytest.raises(OutputError, match="symbolic link"):
        zquant.save(model, tmp_path / "q")
    zquant.save(model, tmp_path / "q", force=True)
    assert not (tmp_path / "q").is_symlink() and zquant.load(tmp_path / "q") is not None
    assert (target / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------------------------
# Atomic replacement
# ------------------------------------------------------------------------------------------------

KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {src!r}); sys.path.insert(0, {tests!r})
import zquant
from zquant import fsutil
from conftest import make_tiny
out = {out!r}
model = zquant.quantize(make_tiny("llama", seed=1), "w8a8")
def killed_after(fn):
    def call(*args):
        result = fn(*args)
        if any(os.fspath(a) == out for a in args if isinstance(a, (str, os.PathLike))):
            os.kill(os.getpid(), signal.SIGKILL)  # dies right after the first step that touches OUT
        return result
    return call
if {fallback}:
    fsutil._renameat2 = lambda *a: 22          # EINVAL: this filesystem cannot exchange
elif hasattr(fsutil, "_renameat2"):
    fsutil._renameat2 = killed_after(fsutil._renameat2)
os.replace, os.rename = killed_after(os.replace), killed_after(os.rename)
zquant.save(model, out)
"""


def _killed_save(out: Path, fallback: bool = False) -> None:
    script = KILLED_SAVE.format(src=SRC, tests=str(Path(__file__).parent), out=str(out), fallback=fallback)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_kill_during_the_swap_leaves_a_checkpoint_and_the_next_save_cleans_up(tmp_path):
    out = tmp_path / "q"
    model = _quantized()
    zquant.save(model, out)
    _killed_save(out)
    zquant.load(out)                         # the old or the new checkpoint, never none
    assert _siblings(out)                    # the killed writer's leftovers ...
    zquant.save(model, out)
    assert _siblings(out) == []              # ... are gone after the next save
    zquant.load(out)


def test_two_rename_fallback_warns_and_a_kill_between_is_repaired(tmp_path, monkeypatch):
    out = tmp_path / "q"
    model = _quantized()
    zquant.save(model, out)
    _killed_save(out, fallback=True)         # killed between the two renames: OUT is missing
    assert not out.exists() and any(".q.old-" in s for s in _siblings(out))
    assert fsutil.remove_stale_siblings(out) and _siblings(out) == []
    zquant.load(out)                         # the previous copy was put back
    monkeypatch.setattr(fsutil, "_renameat2", lambda *a: errno.EINVAL)
    monkeypatch.setattr(fsutil, "_warned_no_exchange", [])
    with pytest.warns(RuntimeWarning, match="two renames"):
        zquant.save(model, out)
    zquant.load(out)
    assert _siblings(out) == []


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").write_text("file")
    if not fsutil.exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this filesystem cannot exchange")
    assert (tmp_path / "a").read_text() == "file" and (tmp_path / "b").is_dir()


def test_stale_siblings_go_but_a_live_writers_stay(tmp_path):
    out = tmp_path / "q"
    for stale in (".q.tmp-dead1", ".q.old-dead2"):
        (tmp_path / stale / "d").mkdir(parents=True)
    (tmp_path / ".qq.tmp-other").mkdir()                     # another target's: not ours to touch
    live = fsutil.atomic_directory(out)
    tmp = live.__enter__()                                   # a writer still writing (its lock held)
    (tmp / "partial").write_text("half")
    zquant.save(_quantized(), out)                           # cleans up before it writes
    assert tmp.is_dir() and (tmp / "partial").exists()
    assert _siblings(out) == [tmp.name] and (tmp_path / ".qq.tmp-other").is_dir()
    live.__exit__(None, None, None)                          # the live writer finishes: its directory wins
    assert (out / "partial").read_text() == "half" and _siblings(out) == []


def test_concurrent_saves_stay_consistent(tmp_path):
    out, errors = tmp_path / "q", []
    models = [zquant.quantize(make_tiny("llama", seed=s), "w8a8") for s in (0, 1)]

    def writer(model):
        try:
            for _ in range(3):
                zquant.save(model, out)
        except BaseException as e:           # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    zquant.load(out)
    assert _siblings(out) == []


# ------------------------------------------------------------------------------------------------
# LKD resume integrity
# ------------------------------------------------------------------------------------------------

RESUME_LKD = LKDConfig(data="random", samples=2, seq_len=8, steps=1, batch_size=2)


@pytest.fixture
def finished_resume(tmp_path):
    resume = tmp_path / "r"
    zquant.quantize(make_tiny("llama"), "w8a8", lkd=RESUME_LKD, lkd_resume=resume, quiet=True)
    return resume


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01                         # one bit of the last tensor's data
    path.write_bytes(bytes(data))


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_suffix(".swap")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)


@pytest.mark.parametrize("damage,message", [
    (lambda r: _flip(r / "block-0001.safetensors"), "block 1's saved file: SHA-256 does not match"),
    (lambda r: _swap(r / "block-0000.safetensors", r / "block-0001.safetensors"), "block 0's saved file: SHA-256"),
    (lambda r: (r / "block-0000.safetensors").write_bytes((r / "block-0000.safetensors").read_bytes()[:100]),
     "block 0's saved file: 100 bytes, expected"),
], ids=["flipped-bit", "swapped", "truncated"])
def test_damaged_resume_blocks_are_refused(finished_resume, damage, message):
    damage(finished_resume)
    with pytest.raises(ValueError, match=message) as info:
        zquant.quantize(make_tiny("llama"), "w8a8", lkd=RESUME_LKD, lkd_resume=finished_resume, quiet=True)
    assert f"delete {finished_resume}" in str(info.value)


def test_damaged_resume_block_is_one_cli_line(tiny_model_dir, tmp_path, capsys):
    args = ["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--lkd", "--lkd-data", "random", "--lkd-samples",
            "2", "--lkd-seq-len", "8", "--lkd-steps", "1", "--lkd-resume", str(tmp_path / "r"), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "q")]) == 0
    block = tmp_path / "r" / "block-0000.safetensors"
    block.write_bytes(block.read_bytes()[:-7])
    err = _one_line_error(capsys, *args, "--out", tmp_path / "q2")
    assert "block 0" in err and "truncated" in err and "delete" in err


def test_intact_resume_still_loads(finished_resume):
    progress = json.loads((finished_resume / "progress.json").read_text())
    assert [set(f) for f in progress["files"]] == [{"sha256", "bytes"}] * 2
    zquant.quantize(make_tiny("llama"), "w8a8", lkd=RESUME_LKD, lkd_resume=finished_resume, quiet=True)
