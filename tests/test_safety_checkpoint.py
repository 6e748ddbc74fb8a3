"""Checkpoint descriptions are checked before they drive anything (issue: trustworthy by default).

Hostile or inconsistent ``zquant.json`` values fail fast with one line and allocate nothing; the
description is checksummed and its scheme bound to the tensors' dtypes and scales; malformed
fields, model classes, configs and tokenizer files get one line; a reference model loaded from the
recorded source must be the model the checkpoint was quantized from.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zquant
from conftest import FAMILIES, make_tiny, sample_ids, tiny_tokenizer
from zquant.checkpoint import META, CheckpointError
from zquant.checkpoint.integrity import stamped
from zquant.cli import main
from zquant.fsutil import sha256


def _one_line_error(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("zquant: error: "), err
    return err


def _saved(tmp_path, family="llama", scheme="w8a8", name="q"):
    calibration = [{"input_ids": sample_ids(vocab=300, seed=3)}] if scheme.endswith("static") else None
    model = zquant.quantize(make_tiny(family, vocab_size=300), scheme, calibration=calibration)
    return zquant.save(model, tmp_path / name, tiny_tokenizer())


def _edit_meta(path: Path, change, restamp: bool = True) -> None:
    """Apply ``change`` to zquant.json; with ``restamp`` the checksum is recomputed, as a forger or a
    buggy writer would: the structural checks must then catch the inconsistency on their own."""
    meta = json.loads((path / META).read_text())
    change(meta)
    (path / META).write_text(json.dumps(stamped(meta) if restamp else meta))


def _edit_tensors(path: Path, change) -> None:
    """Apply ``change`` to the weights' state dict and record the new file consistently (size, SHA-256, checksum)."""
    from safetensors.torch import load_file, save_file
    f = path / "model.safetensors"
    state = load_file(str(f))
    change(state)
    save_file(state, str(f))
    _edit_meta(path, lambda meta: meta["weights"].update(sha256=sha256(f), bytes=f.stat().st_size))


def _load_error(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        zquant.load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


# -- 1. zquant.json is compared with the safetensors header before it drives any allocation ------

HOSTILE = [("intermediate_size", 2_000_000, "mlp.gate_proj.qweight is I8 \\[96, 64\\]"),
           ("intermediate_size", 10**12, "mlp.gate_proj.qweight is I8 \\[96, 64\\]"),
           ("num_hidden_layers", 10**6, "holds 2 blocks.*num_hidden_layers 1000000")]


@pytest.mark.parametrize("key, value, message", HOSTILE)
def test_hostile_config_fails_fast_with_one_line(tmp_path, key, value, message):
    path = _saved(tmp_path)
    _edit_meta(path, lambda meta: meta["source_config"].update({key: value}))
    start = time.perf_counter()
    _load_error(path, message)
    assert time.perf_counter() - start < 5


def test_building_the_skeleton_is_bounded_whatever_the_config_multiplies():
    # Layers are compared with the file's blocks before building; anything else a config multiplies
    # (experts, sub-model layers) is stopped by the construction's call budget.
    from transformers import LlamaConfig, LlamaForCausalLM
    from zquant.checkpoint.skeleton import build_skeleton
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=10**6, num_attention_heads=4)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="building LlamaForCausalLM .* more than 5000 tensor operations"):
        build_skeleton(LlamaForCausalLM, config, budget=5000)
    assert time.perf_counter() - start < 5


def test_hostile_config_allocates_nothing(tmp_path):
    # Peak resident memory is per process: measure in a fresh one, after one good load warms it up.
    good = _saved(tmp_path, name="good")
    paths = []
    for i, (key, value, _) in enumerate(HOSTILE):
        paths.append(_saved(tmp_path, name=f"bad{i}"))
        _edit_meta(paths[-1], lambda meta: meta["source_config"].update({key: value}))
    script = ("import json, resource, sys, zquant\n"
              "zquant.load(sys.argv[1])\n"
              "out = []\n"
              "for p in sys.argv[2:]:\n"
              "    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "    try:\n"
              "        zquant.load(p)\n"
              "    except zquant.checkpoint.CheckpointError:\n"
              "        out.append((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
              "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(zquant.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", script, str(good), *map(str, paths)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    growth_mib = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(growth_mib) == len(HOSTILE) and max(growth_mib) < 32, growth_mib


def test_position_buffers_computed_from_a_hostile_config_are_bounded(tmp_path):
    # GPT-J's sinusoidal table is [n_positions, rotary_dim] and in no weights file: 4e6 positions
    # would be 128 MiB for a 100 KB checkpoint.
    path = _saved(tmp_path, family="gptj")
    _edit_meta(path, lambda meta: meta["source_config"].update(n_positions=4_000_000))
    _load_error(path, "compute 122 MiB of buffers \\(largest transformer.rotary_emb.embed_positions")


@pytest.mark.parametrize("family", FAMILIES)
def test_buffers_computed_after_validation_equal_the_models_own(tmp_path, family):
    model = make_tiny(family, vocab_size=300)
    expected = {n: b.clone() for n, b in model.named_buffers()}
    loaded = zquant.load(zquant.save(zquant.quantize(model, "w8a8"), tmp_path / "q", tiny_tokenizer()))
    for name, buf in loaded.named_buffers():
        if name in expected:
            assert buf.dtype == expected[name].dtype and torch.equal(buf, expected[name]), name
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))


# -- 2. the scheme is bound to the tensors ----------------------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda meta: meta["scheme"]["attention"]["act"].update(mode="none"),    # loaded silently before
    lambda meta: meta["source_config"].update(rms_norm_eps=1e-3),
    lambda meta: meta.update(source="/elsewhere"),
])
def test_any_edit_of_the_description_breaks_its_checksum(tmp_path, edit):
    path = _saved(tmp_path)
    _edit_meta(path, edit, restamp=False)
    _load_error(path, "checksum meta_sha256 does not match")


def test_format_version_1_is_refused_with_a_requantize_line(tmp_path):
    path = _saved(tmp_path)
    _edit_meta(path, lambda meta: (meta.update(format_version=1), meta.pop("meta_sha256")), restamp=False)
    _load_error(path, "format version 1.*re-quantize")


@pytest.mark.parametrize("name, dtype, message", [
    ("model.layers.0.self_attn.q_proj.qweight", torch.float32, "q_proj.qweight is F32 \\[64, 64\\].*expect I8"),
    ("model.layers.0.mlp.up_proj.qweight", torch.int8, "up_proj.qweight is I8 \\[96, 32\\].*expect U8"),
    ("model.layers.0.mlp.up_proj.wscale", torch.float16, "up_proj.wscale is F16.*expect F32"),
    ("model.norm.weight", torch.int8, "model.norm.weight is I8 \\[64\\].*expect BF16"),   # float parts: bf16
])
def test_tensors_stored_in_another_dtype_are_refused(tmp_path, name, dtype, message):
    path = _saved(tmp_path, scheme="w4/8a8")       # attention INT8 (int8), MLP INT4 (packed uint8)
    _edit_tensors(path, lambda state: state.update({name: state[name].to(dtype)}))
    _load_error(path, message)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_scales_that_are_not_finite_and_positive_are_refused(tmp_path, value):
    path = _saved(tmp_path, scheme="w8a8-static")
    name = "model.layers.1.self_attn.o_proj." + ("wscale" if value != 0.0 else "act_scale")

    def poison(state):
        state[name] = state[name].clone()
        state[name].view(-1)[0] = value
    _edit_tensors(path, poison)
    _load_error(path, f"{name} holds 1 scale\\(s\\) that are not finite and positive")


# -- 3. one line, never a traceback -----------------------------------------------------------------

@pytest.mark.parametrize("weights", [["model.safetensors"], "model.safetensors", 7, None])
def test_weights_of_the_wrong_json_type(tmp_path, weights, capsys):
    path = _saved(tmp_path)
    _edit_meta(path, lambda meta: meta.update(weights=weights))
    _load_error(path, "field 'weights' must be a JSON object")
    assert "'weights' must be a JSON object" in _one_line_error(capsys, "eval", str(path), "--quiet")


@pytest.mark.parametrize("name", ["AutoModel", "BertModel", "LlamaPreTrainedModel", "PreTrainedModel", "os",
                                  "__class__", "not an identifier"])
def test_model_class_must_be_the_concrete_class_for_the_config(tmp_path, name, capsys):
    path = _saved(tmp_path)
    _edit_meta(path, lambda meta: meta.update(model_class=name))
    _load_error(path, f"model class '{name}', which is not a transformers model class for its LlamaConfig")
    assert "not a transformers model class" in _one_line_error(capsys, "eval", str(path), "--quiet")


def _float_dir_with_heads(tmp_path, family: str, heads: int) -> Path:
    path = tmp_path / family
    make_tiny(family, vocab_size=300).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_attention_heads"] = heads
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "bert"])
def test_heads_that_do_not_divide_the_hidden_size_in_a_model_directory(tmp_path, family, capsys):
    path = _float_dir_with_heads(tmp_path, family, heads=5)
    for argv in (["eval", str(path), "--quiet"],
                 ["quantize", str(path), "--scheme", "w8a8", "--out", str(tmp_path / "q"), "--quiet"]):
        assert "number of attention heads" in _one_line_error(capsys, *argv)


@pytest.mark.parametrize("family, message", [("llama", "cannot build: The hidden size \\(64\\) is not a multiple"),
                                             ("bert", "cannot build BertModel.*hidden size \\(48\\) is not a mult")])
def test_heads_that_do_not_divide_the_hidden_size_in_a_checkpoint(tmp_path, family, message):
    path = _saved(tmp_path, family=family)
    _edit_meta(path, lambda meta: meta["source_config"].update(num_attention_heads=5))
    _load_error(path, message)


def test_a_checkpoint_saved_without_a_tokenizer(tmp_path, capsys):
    model = zquant.quantize(make_tiny("llama", vocab_size=300), "w8a8")
    with pytest.warns(UserWarning, match="no tokenizer given"):
        path = zquant.save(model, tmp_path / "q")
    zquant.load(path)                                # the model itself is fine
    err = _one_line_error(capsys, "eval", str(path), "--quiet")
    assert "saved without a tokenizer" in err


@pytest.mark.parametrize("target, message", [("outside", "a symbolic link that leaves the checkpoint directory"),
                                             ("model.safetensors", "tokenizer.json: not a JSON file")])
def test_tokenizer_file_that_is_a_symlink(tmp_path, target, message, capsys):
    path = _saved(tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.json").symlink_to(outside if target == "outside" else path / target)
    assert message in _one_line_error(capsys, "eval", str(path), "--quiet")


def test_a_tokenizer_file_that_is_not_a_regular_file_is_refused(tmp_path, capsys):
    path = _saved(tmp_path)
    (path / "tokenizer_config.json").unlink()
    os.mkfifo(path / "tokenizer_config.json")       # transformers skipped it silently; reading it would block
    assert "tokenizer_config.json: not a JSON file" in _one_line_error(capsys, "eval", str(path), "--quiet")


# -- 4. the recorded source is fingerprinted --------------------------------------------------------

def _bert_dir(path: Path, seed: int, eps: float | None = None) -> Path:
    model = make_tiny("bert", seed=seed, vocab_size=300)
    if eps is not None:
        model.config.layer_norm_eps = eps
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_the_fingerprint_names_the_model_not_its_files(tmp_path):
    from zquant.sources import fingerprint
    a = fingerprint(zquant.load(_bert_dir(tmp_path / "a", seed=0)))
    assert a == fingerprint(make_tiny("bert", seed=0, vocab_size=300))
    assert a != fingerprint(make_tiny("bert", seed=1, vocab_size=300))


def test_a_recorded_source_that_changed_is_refused_at_eval(tmp_path, capsys):
    source, out = _bert_dir(tmp_path / "src", seed=0), tmp_path / "q"
    assert main(["quantize", str(source), "--scheme", "w8a8", "--out", str(out), "--quiet"]) == 0
    assert len(zquant.checkpoint.read_record(out).source_sha256) == 64
    evaluate = ["eval", str(out), "--json", "--quiet", "--max-examples", "60"]
    assert main(evaluate) == 0                        # the unchanged source is accepted
    capsys.readouterr()
    for change, message in (({"seed": 1}, "its weights differ"),
                            ({"seed": 0, "eps": 1e-3}, "its config differs (layer_norm_eps: 0.001, recorded 1e-12)")):
        _bert_dir(source, **change)                   # another model now has the recorded name
        err = _one_line_error(capsys, *evaluate)
        assert f"{source} is not the model {out} was quantized from: {message}" in err and "--reference" in err
    assert main([*evaluate, "--reference", str(source)]) == 0    # the user's explicit choice is taken
