"""LKD on tiny random models: the fake-quant twin, losses fall, the teacher is untouched, resume
is byte-identical, bad options are refused, every family and preset runs."""
import json

import pytest
import torch
from torch import nn

import zquant
from conftest import make_tiny, tiny_tokenizer
from zquant import checkpoint, kernels
from zquant.resume import PROGRESS_FILE
from zquant.algorithms import lkd as L
from zquant.config import ActQuant, ConfigError, LayerQuant, LKDConfig, PRESETS, WeightQuant
from zquant.models import get_adapter
from zquant.modules import FakeQuantLinear, QuantLinear
from zquant.plan import make_plan

# Tiny random models (weights of std 0.02) want a small step; 3e-5 lowers the loss in every family.
FAST = LKDConfig(data="random", samples=8, seq_len=24, steps=16, batch_size=2, lr=3e-5)


def state_bytes(model, tmp_path, name):
    """Bytes of the model's saved weights file."""
    return (checkpoint.save(model, tmp_path / name) / checkpoint.WEIGHTS).read_bytes()


# ------------------------------------------------------------------------------------------------
# FakeQuantLinear
# ------------------------------------------------------------------------------------------------

TWIN_SPECS = [
    LayerQuant(WeightQuant(4, "row_group", 8), ActQuant("dynamic")),
    LayerQuant(WeightQuant(8, "row"), ActQuant("dynamic", symmetric=False)),
    LayerQuant(WeightQuant(4, "input_group", group_size=32), ActQuant("none")),
    LayerQuant(WeightQuant(8, "row_group", 8), ActQuant("static")),
]


@pytest.mark.parametrize("spec", TWIN_SPECS, ids=lambda s: f"w{s.weight.bits}-{s.weight.granularity}-{s.act.mode}")
def test_fake_quant_twin_matches_quantlinear(spec):
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    x = torch.randn(3, 11, 96)
    absmax = x.abs().amax() if spec.act.mode == "static" else None
    fake = FakeQuantLinear.from_float(lin, spec, absmax)
    real = QuantLinear.from_float(lin, spec, absmax)
    with kernels.use_backend("reference"):
        expected = real(x)
        converted = fake.to_quant()(x)
    # Same integers and scales; only float summation order differs from the int32 pipeline.
    torch.testing.assert_close(fake(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted, expected, rtol=0, atol=0)


def test_fake_quant_twin_of_conv1d_and_straight_through_gradient():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(80, 96)                                     # weight stored [K, N] = [96, 80]
    spec = LayerQuant(WeightQuant(4, "row_group", 8), ActQuant("dynamic"))
    fake = FakeQuantLinear.from_float(conv, spec)
    assert fake.weight.shape == (80, 96) and fake.weight.is_contiguous()
    x = torch.randn(4, 96, requires_grad=True)
    fake(x).sum().backward()
    assert fake.weight.grad is not None and fake.weight.grad.abs().sum() > 0
    # Straight through: d(sum y)/dx = sum of the fake-quantized weight's rows.
    torch.testing.assert_close(x.grad, fake.to_quant().dequantized_weight().sum(0).expand(4, 96),
                               rtol=1e-5, atol=1e-5)
    assert fake.weight.data_ptr() != conv.weight.data_ptr()


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    (dict(samples=0), "lkd.samples"), (dict(seq_len=1), "lkd.seq_len"), (dict(steps=-1), "lkd.steps"),
    (dict(lr=0.0), "lkd.lr"), (dict(lr="1e-4"), "lkd.lr"), (dict(batch_size=0), "lkd.batch_size"),
    (dict(samples=4, batch_size=8), "lkd.batch_size"), (dict(seed=-1), "lkd.seed"), (dict(loss="kl"), "lkd.loss"),
    (dict(data=""), "lkd.data"), (dict(steps=True), "lkd.steps"), (dict(schedule="linear"), "lkd.schedule"),
])
def test_bad_options_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        LKDConfig(**changes)


def test_config_round_trip_and_unknown_fields():
    cfg = LKDConfig(data="tiny", samples=32, lr=5e-5, loss="rel_mse")
    assert LKDConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        LKDConfig.from_dict({"epochs": 3})


def test_bad_runtime_options_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="seq_len"):
        zquant.quantize(make_tiny("llama"), "w8a8", lkd=LKDConfig(data="random", seq_len=4096), quiet=True)
    with pytest.raises(ValueError, match="tokenizer"):
        zquant.quantize(make_tiny("llama"), "w8a8", lkd=LKDConfig(samples=2, seq_len=16, batch_size=2), quiet=True)
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    with pytest.raises(ConfigError, match="lkd.data"):
        zquant.quantize(make_tiny("llama", vocab_size=300), "w8a8", tokenizer=tiny_tokenizer(),
                        lkd=LKDConfig(data=str(short), samples=4, seq_len=16), quiet=True)
    with pytest.raises(ConfigError, match="lkd must be"):
        zquant.quantize(make_tiny("llama"), "w8a8", lkd={"steps": 3})


# ------------------------------------------------------------------------------------------------
# The distillation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loss_falls_in_every_block(family):
    model = make_tiny(family)
    zquant.quantize(model, "w4/8a8", lkd=FAST, quiet=True)
    info = model.zquant_info["lkd"]
    assert info["settings"] == FAST.to_dict()
    assert [b["block"] for b in info["blocks"]] == [0, 1]
    for b in info["blocks"]:
        assert set(b) == {"block", "loss_before", "loss_after", "seconds"}
        assert b["loss_after"] < 0.9 * b["loss_before"], b


def test_distilled_model_is_closer_to_float_than_plain_quantization():
    fp = make_tiny("llama")
    ids = L.distillation_ids(FAST, vocab_size=211)[:4]
    ref = fp(input_ids=ids).logits
    plain = zquant.quantize(make_tiny("llama"), "w4/8a8")
    distilled = zquant.quantize(make_tiny("llama"), "w4/8a8", lkd=FAST, quiet=True)
    err = {name: (m(input_ids=ids).logits - ref).pow(2).mean().item()
           for name, m in (("plain", plain), ("lkd", distilled))}
    assert err["lkd"] < err["plain"], err


def test_original_parameters_are_never_written():
    model = make_tiny("llama")
    originals = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    _, blocks = get_adapter(model).find_blocks(model)
    old_blocks = list(blocks)
    zquant.quantize(model, "w4/8a8", lkd=FAST, quiet=True)
    for name, (tensor, value) in originals.items():
        assert torch.equal(tensor, value), name               # the teacher's tensors are untouched
    assert all(new is not old for new, old in zip(blocks, old_blocks))   # blocks were replaced by trained copies
    assert not any(isinstance(m, QuantLinear) for b in old_blocks for m in b.modules())


def test_zero_steps_equals_plain_quantization(tmp_path):
    plain = zquant.quantize(make_tiny("gpt2"), "w4/8a16")
    lkd0 = zquant.quantize(make_tiny("gpt2"), "w4/8a16", lkd=LKDConfig(data="random", samples=4, seq_len=16,
                                                                        steps=0, batch_size=2), quiet=True)
    assert state_bytes(plain, tmp_path, "plain") == state_bytes(lkd0, tmp_path, "lkd0")


def test_same_seed_same_bytes_and_seed_matters(tmp_path):
    a = state_bytes(zquant.quantize(make_tiny("opt"), "w4/8a8", lkd=FAST, quiet=True), tmp_path, "a")
    b = state_bytes(zquant.quantize(make_tiny("opt"), "w4/8a8", lkd=FAST, quiet=True), tmp_path, "b")
    other = LKDConfig(**{**FAST.to_dict(), "seed": 1})
    c = state_bytes(zquant.quantize(make_tiny("opt"), "w4/8a8", lkd=other, quiet=True), tmp_path, "c")
    assert a == b and a != c


def test_text_data_and_static_scheme_and_saved_record(tmp_path):
    tok = tiny_tokenizer()
    model = make_tiny("llama", vocab_size=300)
    text = tmp_path / "distill.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    cfg = LKDConfig(data=str(text), samples=4, seq_len=32, steps=6, batch_size=2, lr=3e-5)
    calibration = [{"input_ids": torch.randint(0, 300, (2, 32))}]
    zquant.quantize(model, "w8a8-static", calibration=calibration, tokenizer=tok, lkd=cfg, quiet=True)
    assert model.zquant_info["calibration"] == {"text": "user batches"}
    out = zquant.save(model, tmp_path / "q", tok)
    meta = json.loads((out / checkpoint.META).read_text())
    assert meta["lkd"]["settings"] == cfg.to_dict() and len(meta["lkd"]["blocks"]) == 2
    loaded = zquant.load(out)
    ids = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


CASES = [("llama", s) for s in PRESETS] + [("bert", s) for s in PRESETS] + \
        [(f, "w4/8a8") for f in ("gpt2", "opt", "gpt_neox", "gptj")]


@pytest.mark.parametrize("family, scheme", CASES)
def test_every_family_and_preset_runs(family, scheme):
    """Every preset on a decoder and an encoder, and every other family with W4/8A8."""
    model = make_tiny(family)
    calibration = [{"input_ids": torch.randint(0, 211, (2, 16))}]
    cfg = LKDConfig(data="random", samples=2, seq_len=12, steps=2, batch_size=2, lr=1e-3)
    zquant.quantize(model, scheme, calibration=calibration, lkd=cfg, quiet=True)
    assert all(isinstance(model.get_submodule(t.name), QuantLinear)
               for t in make_plan(model, PRESETS[scheme]).layers if t.spec.weight is not None)
    out = model(input_ids=torch.randint(0, 211, (1, 10)))
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(hidden).all()


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------

def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    cfg = LKDConfig(data="random", samples=4, seq_len=16, steps=5, batch_size=2, lr=2e-3)
    uninterrupted = state_bytes(zquant.quantize(make_tiny("gptj"), "w4/8a8", lkd=cfg, quiet=True), tmp_path, "u")

    resume = tmp_path / "resume"
    calls, interrupt = [], [True]
    real_train = L.train_block

    def interrupted_train(student, inputs, targets, lkd, k):
        calls.append(k)
        if k == 1 and interrupt[0]:
            raise KeyboardInterrupt
        real_train(student, inputs, targets, lkd, k)

    monkeypatch.setattr(L, "train_block", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        zquant.quantize(make_tiny("gptj"), "w4/8a8", lkd=cfg, lkd_resume=resume, quiet=True)
    progress = json.loads((resume / PROGRESS_FILE).read_text())
    assert [b["block"] for b in progress["blocks"]] == [0] and (resume / "block-0000.safetensors").is_file()

    calls.clear()
    interrupt[0] = False
    resumed = zquant.quantize(make_tiny("gptj"), "w4/8a8", lkd=cfg, lkd_resume=resume, quiet=True)
    assert calls == [1]                                        # block 0 was loaded, not trained again
    assert [b["block"] for b in resumed.zquant_info["lkd"]["blocks"]] == [0, 1]
    assert state_bytes(resumed, tmp_path, "r") == uninterrupted

    # Everything finished: a third run only loads.
    calls.clear()
    again = zquant.quantize(make_tiny("gptj"), "w4/8a8", lkd=cfg, lkd_resume=resume, quiet=True)
    assert calls == [] and state_bytes(again, tmp_path, "a") == uninterrupted


def test_resume_refuses_other_settings_or_model(tmp_path):
    cfg = LKDConfig(data="random", samples=2, seq_len=8, steps=1, batch_size=2)
    zquant.quantize(make_tiny("llama"), "w8a8", lkd=cfg, lkd_resume=tmp_path / "r", quiet=True)
    with pytest.raises(ValueError, match="different lkd"):
        zquant.quantize(make_tiny("llama"), "w8a8", lkd=LKDConfig(**{**cfg.to_dict(), "steps": 2}),
                        lkd_resume=tmp_path / "r", quiet=True)
    with pytest.raises(ValueError, match="different model"):
        zquant.quantize(make_tiny("llama", seed=1), "w8a8", lkd=cfg, lkd_resume=tmp_path / "r", quiet=True)
    with pytest.raises(ValueError, match="different scheme"):
        zquant.quantize(make_tiny("llama"), "w4/8a8", lkd=cfg, lkd_resume=tmp_path / "r", quiet=True)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def test_cli_quantize_with_lkd_and_bad_options(tiny_model_dir, tmp_path, capsys):
    from zquant.cli import main
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_model_dir), "--scheme", "w4/8a8", "--out", str(out), "--lkd",
                 "--lkd-data", "random", "--lkd-samples", "4", "--lkd-seq-len", "16", "--lkd-steps", "3",
                 "--lkd-batch-size", "2", "--lkd-lr", "3e-5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "lkd block 2/2: loss" in captured.err and "left" in captured.err and "peak RSS" in captured.err
    meta = json.loads((out / checkpoint.META).read_text())
    assert meta["lkd"]["settings"]["steps"] == 3 and meta["lkd"]["settings"]["data"] == "random"
    assert not (tmp_path / "q.lkd-resume").exists()          # the default resume folder goes once saved

    for args, message in ((["--lkd", "--lkd-lr", "-1"], "lkd.lr"), (["--lkd-steps", "3"], "need --lkd"),
                          (["--lkd", "--lkd-data", "tiny,random"], "one --lkd-data")):
        code = main(["quantize", str(tiny_model_dir), "--scheme", "w8a8", "--out", str(tmp_path / "x"), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_fake_quantizers_equal_quantize_then_dequantize():
    """The in-place fake quantizers give exactly the reference integers times the scales."""
    from zquant import primitives as P
    from zquant.config import WeightQuant
    torch.manual_seed(0)
    w = torch.randn(40, 24) * torch.linspace(0.1, 3, 40)[:, None]
    w[3] = 0.0                                                # an all-zero group
    for bits, gran, groups in ((4, "row_group", 6), (8, "row", None), (4, "input_group", None)):
        spec = WeightQuant(bits, gran, groups, 8)
        s = P.weight_scales(w, spec)
        ref = P.dequantize_weight(P.quantize_weight(w, s, spec), s, spec)
        assert torch.equal(P.fake_quantize_weight(w, spec), ref)
    x = torch.randn(2, 5, 24) * 3
    x[0, 1] = 0.0
    q, s, _ = P.quantize_per_token(x.reshape(-1, 24))
    assert torch.equal(P.fake_quantize_per_token(x), (q.float() * s[:, None]).view(2, 5, 24))
    scale = P.static_scale(torch.tensor(4.0))
    assert torch.equal(P.fake_quantize_per_tensor(x, scale), P.quantize_per_tensor(x, scale).float() * scale)


def test_a_block_that_training_makes_worse_is_kept_untrained(tmp_path):
    """A rate far too high raises every block's loss; LKD then keeps the plainly quantized blocks."""
    plain = zquant.quantize(make_tiny("llama"), "w4/8a8")
    wild = zquant.quantize(make_tiny("llama"), "w4/8a8", lkd=LKDConfig(**{**FAST.to_dict(), "lr": 0.5}), quiet=True)
    assert all(b["loss_after"] == b["loss_before"] for b in wild.zquant_info["lkd"]["blocks"])
    assert state_bytes(plain, tmp_path, "plain") == state_bytes(wild, tmp_path, "wild")
