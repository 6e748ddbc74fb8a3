"""Save / load: bit-exact round trips, atomic writes, clear errors on bad checkpoints."""
import json

import pytest
import torch

import zquant
from conftest import assert_same_state, make_tiny, sample_ids
from zquant import checkpoint, kernels
from zquant.checkpoint import CheckpointError
from zquant.checkpoint.integrity import stamped
from zquant.fsutil import sha256
from zquant.modules import QuantLinear


@pytest.fixture
def saved(tmp_path):
    model = zquant.quantize(make_tiny("llama"), "w4/8a8")
    path = zquant.save(model, tmp_path / "ckpt")
    return model, path


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("scheme", ["w8a8", "w4/8a16", "w8a8-static"])
def test_round_trip_is_bit_exact(tmp_path, family, scheme):
    model = zquant.quantize(make_tiny(family), scheme, calibration=[{"input_ids": sample_ids(seed=3)}])
    zquant.save(model, tmp_path / "q")
    loaded = zquant.load(tmp_path / "q")
    assert_same_state(model, loaded)
    ids = sample_ids()
    with kernels.use_backend("reference"):
        assert torch.equal(_out(model, ids), _out(loaded, ids))
    assert loaded.zquant_info["scheme"]["name"] == scheme
    assert not loaded.training


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_keeps_tied_weights_tied_and_never_builds_the_float_layers(tmp_path, family, monkeypatch):
    model = make_tiny(family)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    zquant.save(zquant.quantize(model, "w8a8"), tmp_path / "q")
    created = []
    original = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: (created.append(self.weight.device.type), original(self)))
    loaded = zquant.load(tmp_path / "q")
    # every float Linear of the skeleton (later replaced by QuantLinear) was created without memory
    assert created and set(created) == {"meta"}
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    ids = sample_ids()
    with kernels.use_backend("reference"):
        assert torch.equal(_out(model, ids), _out(loaded, ids))


def test_checkpoint_is_really_small(saved):
    model, path = saved
    meta = json.loads((path / "zquant.json").read_text())
    assert meta["adapter"] == "llama" and meta["zquant_version"] == zquant.__version__
    q4 = [m for m in model.modules() if isinstance(m, QuantLinear) and m.spec.weight.bits == 4]
    assert q4 and all(m.qweight.dtype == torch.uint8 for m in q4)
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.mlp.up_proj.qweight"] == "U8"
    assert dtypes["model.layers.0.self_attn.q_proj.qweight"] == "I8"


def test_truncated_weights(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        zquant.load(path)


def test_tampered_weights(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        zquant.load(path)


def test_missing_and_broken_metadata(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="not a directory"):
        checkpoint.load(tmp_path / "nope")
    (path / "zquant.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        zquant.load(path)
    (path / "zquant.json").unlink()
    with pytest.raises((CheckpointError, ValueError), match="zquant.json|config.json"):
        zquant.load(path)


def test_mismatched_scheme_is_detected(saved):
    _, path = saved
    meta = json.loads((path / "zquant.json").read_text())
    meta["scheme"]["mlp"]["weight"]["bits"] = 8        # says INT8, file holds packed INT4
    (path / "zquant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match"):
        zquant.load(path)


@pytest.mark.parametrize("change, message", [("drop", "tensor .*up_proj.* is missing"),
                                              ("add", "tensor extra is not part")])
def test_a_weights_file_with_missing_or_extra_tensors_is_refused(saved, change, message):
    # A consistent file (its size and SHA-256 recorded) that still does not fit the model.
    from safetensors.torch import load_file, save_file
    _, path = saved
    f = path / "model.safetensors"
    state = load_file(str(f))
    if change == "drop":
        del state[next(k for k in state if "up_proj" in k)]
    else:
        state["extra"] = torch.zeros(3)
    save_file(state, str(f))
    meta = json.loads((path / "zquant.json").read_text())
    meta["weights"].update(sha256=sha256(f), bytes=f.stat().st_size)
    (path / "zquant.json").write_text(json.dumps(stamped(meta)))    # a consistent description
    with pytest.raises(CheckpointError, match=message):
        zquant.load(path)


def test_bad_scheme_in_metadata(saved):
    _, path = saved
    meta = json.loads((path / "zquant.json").read_text())
    meta["scheme"]["mlp"]["weight"]["bits"] = 5
    (path / "zquant.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weight.bits"):
        zquant.load(path)


def test_interrupted_save_leaves_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    import safetensors.torch

    def crash(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        zquant.save(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".ckpt.tmp")]
    zquant.load(path)


def test_save_requires_a_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="quantized"):
        zquant.save(make_tiny("llama"), tmp_path / "x")
