"""Compact float parts: the storage dtype of what stays floating point, and the INT8 embedding table."""
import dataclasses
import json

import pytest
import torch
from torch import nn

import zquant
from conftest import assert_same_state, make_tiny, sample_ids
from zquant import kernels
from zquant.checkpoint import CheckpointError
from zquant.cli import main
from zquant.config import ConfigError, QuantConfig, get_scheme
from zquant.embedding import ROW_INT8, QuantEmbedding, TiedHead
from zquant.eval import model_bytes
from zquant.float_parts import float_part_names
from zquant.modules import QuantLinear
from zquant.plan import ALL_LAYERS, make_plan
from zquant.record import QuantRecord


def scheme(name="w8a8", **fields):
    return dataclasses.replace(get_scheme(name), **fields)


def tied_llama():
    model = make_tiny("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def file_dtypes(path):
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def logits(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# -- the scheme fields -----------------------------------------------------------------------------

def test_scheme_fields_default_validate_and_round_trip():
    assert get_scheme("w8a8").float_dtype == "bfloat16" and get_scheme("w8a8").embeddings == "float"
    c = scheme("w4/8a8", float_dtype="float16", embeddings="int8")
    assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ConfigError, match="float_dtype"):
        scheme(float_dtype="fp8")
    with pytest.raises(ConfigError, match="embeddings"):
        QuantConfig.from_dict({"name": "x", "embeddings": "int4"})


def test_a_record_without_the_field_means_float32():
    data = QuantRecord(scheme(), "llama").to_dict()
    del data["scheme"]["float_dtype"], data["scheme"]["embeddings"]
    record = QuantRecord.from_dict(data)
    assert record.scheme.float_dtype == "float32" and record.scheme.embeddings == "float"


# -- float dtypes: quantize rounds, save stores, load gives back the same model --------------------

@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("float_dtype,stored", [("float32", "F32"), ("bfloat16", "BF16"), ("float16", "F16")])
def test_round_trip_of_each_float_dtype(tmp_path, family, float_dtype, stored):
    fp = make_tiny(family)
    norm = next(n for n in fp.state_dict() if "norm" in n.lower() and n.endswith("weight"))
    tensor = fp.state_dict(keep_vars=True)[norm]
    original = tensor.detach().clone()
    model = zquant.quantize(fp, scheme(float_dtype=float_dtype))
    assert torch.equal(tensor, original)                 # rounded copies replace it; it is not written
    # the in-memory model already holds the stored values (float32 tensors, compute stays float32)
    value = model.state_dict()[norm]
    assert value.dtype == torch.float32
    assert torch.equal(value, original.to(getattr(torch, float_dtype)).float())
    assert torch.equal(value, original) == (float_dtype == "float32")

    zquant.save(model, tmp_path / "q")
    dtypes = file_dtypes(tmp_path / "q")
    floats = float_part_names(model)
    assert {dtypes[n] for n in floats if n in dtypes} == {stored}
    assert {d for n, d in dtypes.items() if n.endswith("wscale")} == {"F32"}       # scales stay float32
    assert {d for n, d in dtypes.items() if n.endswith("qweight")} == {"I8"}

    loaded = zquant.load(tmp_path / "q")
    assert_same_state(model, loaded)
    ids = sample_ids()
    with kernels.use_backend("reference"):
        assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert torch.equal(logits(model, ids), logits(loaded, ids))      # whichever backend runs here
    assert loaded.zquant_info.scheme.float_dtype == float_dtype


def _restamped(meta: dict) -> dict:
    """An edited zquant.json with a valid checksum again (to reach the checks behind it)."""
    from zquant.checkpoint.integrity import CHECKSUM, stamped
    return stamped({k: v for k, v in meta.items() if k != CHECKSUM})


def test_old_checkpoint_without_the_field_loads_its_float32_tensors(tmp_path):
    model = zquant.quantize(make_tiny("llama"), scheme(float_dtype="float32"))
    path = zquant.save(model, tmp_path / "q")
    meta = json.loads((path / "zquant.json").read_text())
    del meta["scheme"]["float_dtype"], meta["scheme"]["embeddings"]    # as zquant wrote it before the field
    (path / "zquant.json").write_text(json.dumps(_restamped(meta)))
    loaded = zquant.load(path)
    assert loaded.zquant_info.scheme.float_dtype == "float32"
    with kernels.use_backend("reference"):
        assert torch.equal(logits(model, sample_ids()), logits(loaded, sample_ids()))


def test_float_parts_of_another_dtype_than_recorded_are_refused(tmp_path):
    path = zquant.save(zquant.quantize(make_tiny("llama"), scheme()), tmp_path / "q")      # bfloat16 in the file
    meta = json.loads((path / "zquant.json").read_text())
    meta["scheme"]["float_dtype"] = "float32"
    (path / "zquant.json").write_text(json.dumps(_restamped(meta)))    # past the checksum: the dtype check
    # the header check (before anything is allocated) names the first float part in another dtype
    with pytest.raises(CheckpointError, match=r"is BF16 \[211, 64\], but the recorded model and scheme expect F32"):
        zquant.load(path)


def test_float16_overflow_is_refused_with_the_tensor_name():
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = 1e5
    with pytest.raises(ConfigError, match=r"model\.norm\.weight.*overflow float16"):
        zquant.quantize(model, scheme(float_dtype="float16"))


# -- INT8 embeddings ---------------------------------------------------------------------------------

def test_int8_lookup_equals_the_dequantized_table():
    torch.manual_seed(0)
    table = nn.Embedding(97, 40)
    with torch.no_grad():
        table.weight[3] = 0                                       # an all-zero row keeps a usable scale
        table.weight[5] *= 50                                     # rows have their own scales
    q = QuantEmbedding.from_float(table)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (97,)
    ids = torch.tensor([[0, 3, 5, 96], [5, 5, 1, 2]])
    reference = nn.functional.embedding(ids, q.dequantized_weight())
    assert torch.equal(q(ids), reference)
    err = (q.dequantized_weight() - table.weight).abs().amax(dim=1)
    assert torch.all(err <= q.scale / 2 + 1e-7) and q(ids)[0, 1].abs().sum() == 0
    assert q.scale[5] > 20 * q.scale[0]


def test_int8_refuses_tables_that_are_not_plain_embeddings():
    class Scaled(nn.Embedding):
        pass
    with pytest.raises(ValueError, match="plain nn.Embedding.*Scaled"):
        QuantEmbedding.from_float(Scaled(10, 4), "model.embed_tokens")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_tied_head_runs_w8a8_from_the_int8_table(tmp_path, backend, request):
    if backend == "cpu":
        request.getfixturevalue("cpu_extension")
    fp = tied_llama()
    table = fp.model.embed_tokens.weight.detach().clone()
    model = zquant.quantize(fp, scheme(embeddings="int8"))
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, TiedHead)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    # no float copy of the table in memory or on disk
    assert not any(t.shape == table.shape and t.is_floating_point() for t in model.state_dict().values())
    path = zquant.save(model, tmp_path / "q")
    assert not [n for n in file_dtypes(path) if n.startswith("lm_head")]
    # the head is the W8A8 row-scaled linear of the same table
    x = torch.randn(2, 7, table.shape[1])
    linear = nn.Linear(table.shape[1], table.shape[0], bias=False)
    linear.weight.data.copy_(table)
    expected = QuantLinear.from_float(linear, model.lm_head.spec)
    assert expected.spec.weight == ROW_INT8 and expected.spec.act.mode == "dynamic"
    with kernels.use_backend(backend):
        assert torch.equal(model.lm_head(x), expected(x))
        loaded = zquant.load(path)
        assert isinstance(loaded.lm_head, TiedHead) and loaded.lm_head.table is loaded.model.embed_tokens
        assert torch.equal(logits(model, sample_ids()), logits(loaded, sample_ids()))


def test_int8_keeps_an_untied_head_in_floating_point(tmp_path):
    model = zquant.quantize(make_tiny("llama"), scheme(embeddings="int8"))
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, nn.Linear)
    dtypes = file_dtypes(zquant.save(model, tmp_path / "q"))
    assert dtypes["lm_head.weight"] == "BF16" and dtypes["model.embed_tokens.qweight"] == "I8"


@pytest.mark.parametrize("family,embedding,head", [
    ("llama", "model.embed_tokens", "lm_head"), ("bert", "embeddings.word_embeddings", None),
    ("gpt2", "transformer.wte", "lm_head"), ("opt", "model.decoder.embed_tokens", "lm_head"),
    ("gpt_neox", "gpt_neox.embed_in", "lm_head"), ("gptj", "transformer.wte", "lm_head")])
def test_the_adapter_names_the_embedding_and_the_head(family, embedding, head):
    plan = make_plan(make_tiny(family), ALL_LAYERS)
    assert (plan.embedding, plan.head) == (embedding, head)


def test_file_size_ordering(tmp_path):
    sizes = {}
    for label, fields in [("float32", {"float_dtype": "float32"}), ("bfloat16", {}),
                          ("int8", {"embeddings": "int8"})]:
        model = zquant.quantize(tied_llama(), scheme("w4/8a8", **fields))
        path = zquant.save(model, tmp_path / label)
        sizes[label] = (path / "model.safetensors").stat().st_size
        # the reported size is what the file holds (its JSON header aside)
        assert 0 < sizes[label] - model_bytes(model) < 8192
    assert sizes["float32"] > sizes["bfloat16"] > sizes["int8"]
    v, h = 211, 64
    header = 512                                                      # slack for the JSON headers
    assert sizes["float32"] - sizes["bfloat16"] > 2 * v * h            # the table alone halves
    assert sizes["bfloat16"] - sizes["int8"] > v * h - 4 * v - header  # and halves again, less its scales


# -- the command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--float-dtype", "fp8"), ("--embeddings", "int4")])
def test_bad_flag_values_are_one_line(tiny_model_dir, tmp_path, capsys, flag, value):
    code = main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", flag, value, "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"zquant: error: {flag} must be one of")
    assert not (tmp_path / "q").exists()


def test_cli_flags_reach_the_record(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--float-dtype", "float16",
                 "--embeddings", "int8", "--out", str(out), "--quiet"])
    assert code == 0
    meta = json.loads((out / "zquant.json").read_text())
    assert (meta["scheme"]["float_dtype"], meta["scheme"]["embeddings"]) == ("float16", "int8")
    assert file_dtypes(out)["model.norm.weight"] == "F16"
