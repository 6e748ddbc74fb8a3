"""Runtime fusions (`zquant.fusion`) on tiny models of every family, against the reference path.

Needs the C++ extension (built on first use, ~25 s once per machine; skipped on CPUs without
AVX-512 VNNI). Fused models are compared with the same model on the reference backend, where the
fused modules run their original PyTorch modules: the outputs must be bit-identical, fused or
not (the fused ops reproduce torch's own float computations; see test_kernels_cpu.py).
"""
from __future__ import annotations

import pytest
import torch

import zquant
from conftest import FAMILIES, make_tiny, sample_ids
from zquant import fusion, kernels
from zquant.kernels import cpu


pytestmark = pytest.mark.usefixtures("cpu_extension")


def forward(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("scheme", ["w8a8", "w4/8a8"])
def test_fused_models_match_reference(tiny_family, scheme):
    model = zquant.quantize(make_tiny(tiny_family), scheme)
    fused = [m for m in model.modules() if isinstance(m, fusion._Fused)]
    assert fused, "the adapter declares fusions for every family"
    ids = sample_ids()
    before = dict(cpu.stats)
    y = forward(model, ids)
    assert cpu.stats["reused"] > before["reused"]          # the attached quantizations are consumed
    with kernels.use_backend("reference"):
        ref = forward(model, ids)                          # fused modules run their originals
    assert torch.equal(y, ref)
    assert fusion.unfuse(model) == len(fused)
    assert torch.equal(forward(model, ids), ref)


def test_every_fusion_kind_is_taken_where_declared():
    llama = zquant.quantize(make_tiny("llama"), "w8a8")
    kinds = {type(m).__name__ for m in llama.modules() if isinstance(m, fusion._Fused)}
    assert kinds == {"FusedNorm", "FusedGatedMLP"}
    bert = zquant.quantize(make_tiny("bert"), "w8a8")
    kinds = {type(m).__name__ for m in bert.modules() if isinstance(m, fusion._Fused)}
    assert kinds == {"FusedNorm", "FusedActMLP"}


def test_fusion_keeps_the_state_dict_and_checkpoints(tmp_path):
    plain = zquant.quantize(make_tiny("llama"), "w8a8")
    fusion.unfuse(plain)
    fused = zquant.quantize(make_tiny("llama"), "w8a8")
    a, b = plain.state_dict(), fused.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    zquant.save(fused, tmp_path / "ckpt")
    loaded = zquant.load(tmp_path / "ckpt")
    assert any(isinstance(m, fusion._Fused) for m in loaded.modules())      # load fuses too
    c = loaded.state_dict()
    assert list(c) == list(b) and all(torch.equal(c[k], b[k]) for k in b)
    ids = sample_ids()
    assert torch.equal(forward(loaded, ids), forward(fused, ids))


def test_fused_modules_fall_back_to_the_originals():
    model = zquant.quantize(make_tiny("llama"), "w8a8")
    ids = sample_ids()
    fused_out = forward(model, ids)
    with kernels.use_backend("reference"):
        ref = forward(model, ids)
    # A forward hook on a fused layer must see the standard module calls: the block falls back.
    seen = []
    handle = model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        hooked = forward(model, ids)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 24, 96])]
    assert torch.equal(hooked, ref) and torch.equal(fused_out, ref)
    # Gradients through a fused norm need autograd: the original module runs.
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 5, 64, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None


def test_generate_matches_reference():
    model = zquant.quantize(make_tiny("llama"), "w8a8")
    ids = sample_ids(batch=1, seq=8)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    fast = model.generate(ids, **kwargs)
    with kernels.use_backend("reference"):
        ref = model.generate(ids, **kwargs)
    assert torch.equal(fast, ref)


def test_static_scheme_fuses_only_activations():
    from zquant.config import ActQuant, LayerQuant, QuantConfig, WeightQuant
    static = QuantConfig(name="static", attention=LayerQuant(WeightQuant(), ActQuant(mode="static")),
                         mlp=LayerQuant(WeightQuant(), ActQuant(mode="static")))
    model = make_tiny("bert")
    ids = sample_ids()
    zquant.quantize(model, static, calibration=[{"input_ids": ids}])
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, fusion._Fused)}
    assert kinds == {"FusedActMLP"}          # no dynamic consumers: norms stay as they are
    y = forward(model, ids)
    with kernels.use_backend("reference"):
        assert torch.equal(forward(model, ids), y)


def test_fusion_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ZQUANT_FUSION", "0")
    model = zquant.quantize(make_tiny("gpt2"), "w8a8")
    assert not any(isinstance(m, fusion._Fused) for m in model.modules())
    assert fusion.fuse(model) > 0          # an explicit call still fuses


@pytest.mark.parametrize("family", FAMILIES)
def test_fuse_is_idempotent(family):
    model = zquant.quantize(make_tiny(family), "w8a8")
    n = sum(isinstance(m, fusion._Fused) for m in model.modules())
    fusion.fuse(model)
    assert sum(isinstance(m, fusion._Fused) for m in model.modules()) == n
