"""Hostile or careless input (issue: trustworthy by default): each case is refused with one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import zquant
from conftest import make_tiny, tiny_tokenizer
from zquant.checkpoint import META, CheckpointError
from zquant.cli import main


def _one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_model_directory_with_custom_code_is_refused(tiny_model_dir, capsys):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    (tiny_model_dir / "evil.py").write_text("raise SystemExit('executed')\n")
    err = _one_line_error(capsys, "eval", str(tiny_model_dir), "--json", "--quiet")
    assert "auto_map" in err and "never runs code" in err


def test_checkpoint_tokenizer_with_custom_code_is_refused(tmp_path, capsys):
    out = zquant.save(zquant.quantize(make_tiny("llama", vocab_size=300), "w8a8"), tmp_path / "q", tiny_tokenizer())
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(auto_map={"AutoTokenizer": ["evil.Tok", None]}, tokenizer_class="Tok")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    err = _one_line_error(capsys, "eval", str(out), "--json", "--quiet")
    assert "auto_map" in err


@pytest.mark.parametrize("name", ["/etc/passwd", "../other/model.safetensors", "sub/model.safetensors", ".", 7])
def test_weights_file_must_be_a_plain_name_inside(tmp_path, name):
    out = zquant.save(zquant.quantize(make_tiny("llama"), "w8a8"), tmp_path / "q")
    meta = json.loads((out / META).read_text())
    meta["weights"]["file"] = name
    (out / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="plain file name"):
        zquant.load(out)


def test_weights_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    out = zquant.save(zquant.quantize(make_tiny("llama"), "w8a8"), tmp_path / "q")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(out / "model.safetensors", outside)
    (out / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link"):
        zquant.load(out)


def test_pickle_only_model_directory_gets_one_line(tmp_path, capsys):
    path = tmp_path / "pickled"
    model = make_tiny("llama")
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")      # the old pickle format
    err = _one_line_error(capsys, "eval", str(path), "--quiet")
    assert "safetensors" in err and "pytorch_model.bin" in err


def test_json_never_prints_nan(tmp_path, capsys):
    model = make_tiny("llama", vocab_size=300)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    tiny_tokenizer().save_pretrained(tmp_path / "nan")
    err = _one_line_error(capsys, "eval", str(tmp_path / "nan"), "--json", "--quiet", "--max-tokens", "64",
                          "--window", "32")
    assert "not finite" in err


@pytest.mark.parametrize("args,message", [(["--max-examples", "-12800"], "--max-examples"),
                                          (["--max-examples", "0"], "--max-examples")])
def test_bad_eval_options(tiny_model_dir, capsys, args, message):
    assert message in _one_line_error(capsys, "eval", str(tiny_model_dir), "--quiet", *args)


def test_group_size_needs_input_groups(tiny_model_dir, tmp_path, capsys):
    err = _one_line_error(capsys, "quantize", str(tiny_model_dir), "--scheme", "w8a8", "--group-size", "32",
                          "--out", str(tmp_path / "q"))
    assert "--granularity input_group" in err


def test_override_that_matches_nothing_is_said(tiny_llama):
    config = zquant.get_scheme("w8a8").with_overrides(zquant.Override(pattern="*.layer.0.*", float=True))
    with pytest.warns(UserWarning, match="matches no layer"):
        zquant.quantize(tiny_llama, config)


def test_checkpoints_respect_the_umask(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        out = zquant.save(zquant.quantize(make_tiny("llama"), "w8a8"), tmp_path / "q")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o644


def test_a_path_source_is_recorded_absolute(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tiny_model_dir.parent)
    assert main(["quantize", tiny_model_dir.name, "--scheme", "w8a8", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    from zquant.checkpoint import read_record
    assert read_record(tmp_path / "q").source == str(tiny_model_dir.resolve())
