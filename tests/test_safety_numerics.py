"""Non-finite numbers and edge inputs (issue: trustworthy by default).

* NaN / Inf weights are refused with the layer's name, before any slow work.
* A token whose activations hold a NaN or an infinity gets token scale NaN, so a quantized linear
  layer's output row for it is NaN, as a floating-point layer's would be: the quantized model then
  propagates it as the floating-point model does, and both backends give the same numbers.
  Tolerance between the backends: none, as in test_kernels_cpu.py (bit-identical, NaN where NaN).
* Bad input to the CLI gets one line, never a traceback.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import zquant
from conftest import FAMILIES, make_tiny, sample_ids, tiny_tokenizer
from zquant import kernels
from zquant import primitives as P
from zquant.cli import main
from zquant.config import ActQuant, LayerQuant, WeightQuant
from zquant.kernels import build, reference
from zquant.modules import QuantLinear

NAN, INF = math.nan, math.inf
SYM, ASYM, STATIC = ActQuant(), ActQuant(symmetric=False), ActQuant(mode="static")
ACTS = {"sym": SYM, "asym": ASYM, "static": STATIC}
needs_cpu = pytest.mark.usefixtures("cpu_extension")


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical, NaN where the other is NaN."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def one_line_error(capsys, *argv, progress: bool = False) -> str:
    """Run the CLI; it must fail with exit 2, one line on stderr and nothing on stdout. With
    ``progress``, transformers' GGUF conversion bar (which ignores its progress-bar switch) may
    come before that line."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if progress:
        err = err[err.find("zquant: error: "):]
    assert code == 2 and err.count("\n") == 1 and err.startswith("zquant: error: ") and out == "", (out, err)
    return err


# ---------------------------------------------------------------------------------------------
# NaN / Inf weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,layer", [("llama", "model.layers.1.mlp.down_proj"),
                                          ("gpt2", "transformer.h.0.attn.c_attn")])   # Conv1D: [K, N]
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_weights_are_refused_before_any_work(family, layer, value, monkeypatch):
    model = make_tiny(family)
    with torch.no_grad():
        model.get_submodule(layer).weight[3, 5] = value

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline ran before the weights were checked")
    monkeypatch.setattr(zquant.api, "Pipeline", no_pipeline)
    with pytest.raises(ValueError, match=rf"layer {layer}: 1 of \d+ weights are (NaN|infinite)"):
        zquant.quantize(model, "w8a8-static", calibration=[{"input_ids": sample_ids()}])


def test_non_finite_weights_are_one_line_from_the_cli(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    weights = load_file(tiny_model_dir / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] = NAN
    save_file(weights, tiny_model_dir / "model.safetensors", metadata={"format": "pt"})
    err = one_line_error(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8", "--out", tmp_path / "q", "--quiet")
    assert "model.layers.0.self_attn.q_proj" in err and "NaN" in err
    assert not (tmp_path / "q").exists()


def test_lkd_training_that_turns_nan_is_undone(monkeypatch):
    from zquant.algorithms import lkd
    from zquant.modules import FakeQuantLinear

    def diverge(student, *args, **kwargs):             # what a training run that blew up leaves
        with torch.no_grad():
            next(m for m in student.modules() if isinstance(m, FakeQuantLinear)).weight.fill_(NAN)
    monkeypatch.setattr(lkd, "train_block", diverge)
    model = zquant.quantize(make_tiny("llama"), "w4/8a8", lkd=zquant.LKDConfig(
        data="random", samples=2, seq_len=8, steps=1, batch_size=2), quiet=True)
    blocks = model.zquant_info.steps["lkd"]["blocks"]
    assert all(b["loss_after"] == b["loss_before"] for b in blocks)     # the untrained blocks were kept
    assert all(torch.isfinite(m.wscale).all() for m in model.modules() if isinstance(m, QuantLinear))
    assert torch.isfinite(model(input_ids=sample_ids()).logits).all()


# ---------------------------------------------------------------------------------------------
# Non-finite activations: primitives and the reference path
# ---------------------------------------------------------------------------------------------

def poisoned(m: int, k: int, dtype=torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [m, k], bad [m] bool): rows with a NaN in the first / last 16-value vector or the tail,
    +inf, -inf, an all-NaN row, among finite rows (one all zero, one large)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[2], x[5] = 0.0, x[5] * 1e4
    cells = [(1, 0, NAN), (3, k - 1, NAN), (4, max(0, k // 16 * 16 - 1), NAN), (6, k // 2, INF), (7, k // 3, -INF)]
    for r, c, v in cells:
        x[r, c] = v
    x[8] = NAN
    bad = torch.zeros(m, dtype=torch.bool)
    bad[[1, 3, 4, 6, 7, 8]] = True
    return x.to(dtype), bad


@pytest.mark.parametrize("symmetric", [True, False])
def test_non_finite_tokens_get_a_nan_scale(symmetric):
    x, bad = poisoned(11, 40)
    q, scale, zero = P.quantize_per_token(x, symmetric)
    assert torch.equal(scale.isnan(), bad) and (q[bad] == 0).all()
    assert zero is None or (zero[bad] == 0).all()
    q2, scale2, zero2 = P.quantize_per_token(x[~bad], symmetric)      # the finite tokens on their own
    assert torch.equal(q[~bad], q2) and torch.equal(scale[~bad], scale2)
    assert zero is None or torch.equal(zero[~bad], zero2)


def test_an_asymmetric_range_wider_than_float32_is_not_finite():
    x = torch.tensor([[3e38, -3e38, 1.0], [3e38, 1.0, 0.0]])         # hi - lo overflows in the first
    scale = P.quantize_per_token(x, symmetric=False)[1]
    assert scale[0].isnan() and scale[1].isfinite()


def test_static_quantization_marks_non_finite_tokens():
    x, bad = poisoned(11, 40)
    q, token_scale = P.quantize_per_tensor(x, torch.tensor(0.02)), P.static_token_scales(x, torch.tensor(0.02))
    assert torch.equal(token_scale.isnan(), bad) and (q[bad] == 0).all() and (token_scale[~bad] == 0.02).all()


def make_layer(k: int, n: int, bits: int, act: ActQuant, dtype=torch.float32, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n).to(dtype)
    return QuantLinear.from_float(lin, LayerQuant(WeightQuant(bits=bits, groups=7), act), act_absmax=torch.tensor(2.5))


@pytest.mark.parametrize("act", ACTS)
def test_reference_linear_gives_nan_rows_and_leaves_the_others(act):
    layer = make_layer(40, 24, 8, ACTS[act])
    x, bad = poisoned(11, 40)
    y = reference.linear(layer, x)
    assert torch.equal(y.isnan().all(dim=1), bad) and not y[~bad].isnan().any()
    assert torch.equal(y[~bad], reference.linear(layer, x[~bad]))


# ---------------------------------------------------------------------------------------------
# The C++ path: the same numbers as the reference, NaN rows included
# ---------------------------------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("k", [1, 17, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_cpu_quantize_equals_primitives_on_non_finite_rows(k, dtype, act):
    from zquant.kernels import cpu
    x, bad = poisoned(13, k, dtype)
    spec = ACTS[act]
    if act == "static":
        s = torch.tensor(0.02)
        q, scale, zero = P.quantize_per_tensor(x, s), P.static_token_scales(x, s), None
    else:
        q, scale, zero = P.quantize_per_token(x, spec.symmetric)
    q2, scale2, zero2 = cpu.quantize(x, spec, 0.02).as_reference(k)
    assert torch.equal(q, q2) and (zero is None or torch.equal(zero, zero2))
    same(scale, scale2)
    assert torch.equal(scale2.isnan(), bad)


@needs_cpu
@pytest.mark.parametrize("m,k,n", [(13, 17, 5), (13, 576, 40), (40, 576, 1536)])   # one thread / columns / rows
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_equals_reference_on_non_finite_rows(m, k, n, bits, dtype):
    from zquant.kernels import cpu
    x, bad = poisoned(m, k, dtype)
    for act in ACTS.values():
        layer = make_layer(k, n, bits, act, dtype)
        y = cpu.linear(layer, x)
        same(y, reference.linear(layer, x))
        assert torch.equal(y.isnan().all(dim=1), bad) and not y[~bad].isnan().any(), act


@needs_cpu
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_fused_norm_propagates_and_quantizes_nan_rows(kind):
    from zquant.kernels import cpu
    x, bad = poisoned(13, 64)
    w, b = torch.rand(64) + 0.5, (torch.randn(64) if kind == "layer" else None)
    y = cpu.norm(x, w, b, 1e-5, kind, SYM)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    same(y, w * h if kind == "rms" else F.layer_norm(x, (64,), w, b, 1e-5))
    qa = getattr(y, cpu.ATTR)
    q, scale, _ = P.quantize_per_token(y)
    assert torch.equal(qa.as_reference(64)[0], q) and torch.equal(qa.scale.isnan(), bad)
    same(qa.scale, scale)


@needs_cpu
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_activation_epilogue_propagates_nan_rows(act):
    from zquant.kernels import cpu
    layer = make_layer(200, 48, 8, SYM)
    x, bad = poisoned(13, 200)
    y = cpu.linear_act(layer, x, act, ASYM)
    expected = getattr(F, act)(reference.linear(layer, x))
    same(y, expected)
    qa = getattr(y, cpu.ATTR)
    q, scale, zero = P.quantize_per_token(expected, symmetric=False)
    assert torch.equal(qa.as_reference(48)[0], q) and torch.equal(qa.as_reference(48)[2], zero)
    same(qa.scale, scale)


@needs_cpu
def test_gated_epilogue_propagates_nan_rows():
    from zquant.kernels import cpu
    gate, up = make_layer(64, 96, 4, SYM, seed=1), make_layer(64, 96, 4, SYM, seed=2)
    x, bad = poisoned(13, 64)
    y = cpu.gated(gate, up, x, "silu", SYM)
    same(y, F.silu(reference.linear(gate, x)) * reference.linear(up, x))
    assert torch.equal(y.isnan().all(dim=1), bad) and torch.equal(getattr(y, cpu.ATTR).scale.isnan(), bad)


# ---------------------------------------------------------------------------------------------
# Whole models: a NaN / Inf / overflowing token spreads as in floating point, the same on both paths
# ---------------------------------------------------------------------------------------------

def _poison(model, value: float):
    """Set the hidden state entering block 0 of token 5 of sequence 0 to ``value`` (its embedding)."""
    def hook(_module, _args, out):
        out = out.clone()
        out[0, 5] = value
        return out
    return model.get_input_embeddings().register_forward_hook(hook)


def _outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state      # [B, T, V or H]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("value", [NAN, INF, 1e38])
def test_quantized_models_propagate_non_finite_tokens_like_floating_point(family, value):
    ids = sample_ids(seq=12)
    model = make_tiny(family)
    _poison(model, value)
    fp = _outputs(model, ids)
    zquant.quantize(model, "w8a8")
    with kernels.use_backend("reference"):
        ref = _outputs(model, ids)
    nan_tokens = fp.isnan().any(dim=-1)                                # [B, T]
    assert torch.equal(ref.isnan().any(dim=-1), nan_tokens)
    assert not nan_tokens[1].any()                                     # the other sequence is untouched
    if value != 1e38:
        assert nan_tokens[0, 5:].all()                                 # attention spreads it, as in fp
    if build.unsupported_reason() is None and build.load() is None:
        fast = _outputs(model, ids)                                    # the fused C++ path
        same(fast, ref)


# ---------------------------------------------------------------------------------------------
# One line, never a traceback
# ---------------------------------------------------------------------------------------------

def _write_tiny_gguf(path):
    """A tiny Llama as a GGUF file (float32 tensors, a byte-level BPE tokenizer) that transformers loads."""
    gguf = pytest.importorskip("gguf")
    model, tok = make_tiny("llama", vocab_size=300), tiny_tokenizer()
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_context_length, c.max_position_embeddings), (w.add_embedding_length, c.hidden_size),
                       (w.add_block_count, c.num_hidden_layers), (w.add_feed_forward_length, c.intermediate_size),
                       (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps), (w.add_vocab_size, c.vocab_size)]:
        add(value)
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [f"[unused{i}]" for i in range(c.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_truncated_gguf_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZQUANT_CACHE", str(tmp_path / "cache"))
    full = _write_tiny_gguf(tmp_path / "tiny.gguf")
    assert isinstance(zquant.load(full), torch.nn.Module)               # the whole file loads
    data = full.read_bytes()
    for size in (len(data) - 1000, 2000, 10):                          # in the tensors, the metadata, the header
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        err = one_line_error(capsys, "eval", cut, "--quiet", progress=True)
        assert str(cut) in err and "truncated" in err


@pytest.mark.parametrize("family", ["gpt2", "opt"])                    # position tables of 128 rows
def test_window_longer_than_absolute_positions_is_refused(family, tmp_path, capsys):
    path = tmp_path / family
    make_tiny(family, vocab_size=300).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    err = one_line_error(capsys, "eval", path, "--window", "129", "--max-tokens", "300", "--quiet")
    assert "128 positions" in err and "--window 128" in err
    for window in ("128", "1024"):                                     # 1024: the text is shorter than 128
        assert main(["eval", str(path), "--window", window, "--max-tokens", "100" if window == "1024" else "300",
                     "--quiet", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_encoder_max_examples_that_leave_a_split_empty(tmp_path, capsys):
    path = tmp_path / "bert"
    make_tiny("bert", vocab_size=300).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    assert "at least 2" in one_line_error(capsys, "eval", path, "--max-examples", "1", "--quiet")
    assert main(["eval", str(path), "--max-examples", "2", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_examples"] == 1 and result["test_examples"] == 1
    from zquant import data
    with pytest.raises(ValueError, match="at least 2"):
        data.sentiment_split(data.sentiment_data(), 1)


@pytest.mark.parametrize("changes", [{"model_type": "vit", "is_decoder": True},      # no causal-LM class
                                     {"model_type": "no_such_type"}])                # unknown to transformers
def test_unknown_architecture_is_one_short_line(tiny_model_dir, capsys, changes):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(changes)
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    err = one_line_error(capsys, "eval", tiny_model_dir, "--quiet")
    assert len(err) < 300 and changes["model_type"] in err and "supported families: bert, gpt2" in err


def test_generic_fallback_error_names_families_not_model_types():
    from zquant.models import UnsupportedModelError
    message = str(UnsupportedModelError("foo"))
    assert len(message) < 300 and "llama" in message and "qwen2" not in message


@pytest.mark.parametrize("command", [["eval"], ["compare", "--schemes", "w8a8"]])
def test_json_with_a_non_finite_result_is_one_line_and_no_output(tmp_path, capsys, command):
    model = make_tiny("llama", vocab_size=300)
    with torch.no_grad():
        model.lm_head.weight.fill_(NAN)                                # float head: quantization keeps it
    model.save_pretrained(tmp_path / "nan")
    tiny_tokenizer().save_pretrained(tmp_path / "nan")
    err = one_line_error(capsys, *command, tmp_path / "nan", "--json", "--quiet", "--max-tokens", "64",
                         "--window", "32")
    assert "not finite" in err
