"""Each family's adapter on a tiny random model: the right layers, the right roles, a working model."""
import copy

import pytest
from torch import nn

from conftest import make_tiny, sample_ids, snr_db
from zquant import kernels, quantize
from zquant.config import get_scheme
from zquant.models import REGISTRY, UnsupportedModelError, generic_adapter, get_adapter
from zquant.modules import QuantLinear
from zquant.plan import make_plan

EXPECTED = {  # family -> (layers per block, of which MLP)
    "llama": (7, 3), "bert": (6, 2), "gpt2": (4, 2), "opt": (6, 2), "gpt_neox": (4, 2), "gptj": (6, 2),
}


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_adapter_finds_every_block_linear(tiny_family):
    model = make_tiny(tiny_family)
    adapter = get_adapter(model)
    assert not adapter.name.startswith("generic")
    targets = make_plan(model, get_scheme("w4/8a8")).layers
    per_block, mlp = EXPECTED[tiny_family]
    assert len(targets) == 2 * per_block
    assert sum(t.role == "mlp" for t in targets) == 2 * mlp
    assert all(t.spec.weight.bits == (4 if t.role == "mlp" else 8) for t in targets)
    assert all(t.spec.weight.groups == adapter.default_groups for t in targets)


@pytest.mark.parametrize("scheme,floor", [("w8a8", 25.0), ("w8a16", 25.0), ("w4/8a8", 8.0), ("w4/8a16", 8.0)])
def test_quantized_family_output_snr(tiny_family, scheme, floor):
    model = make_tiny(tiny_family)
    ids = sample_ids()
    ref = _out(model, ids)
    q = quantize(copy.deepcopy(model), scheme)
    with kernels.use_backend("reference"):
        out = _out(q, ids)
    assert snr_db(ref, out) > floor
    # Embeddings, norms and the head stay floating point.
    assert not any(isinstance(m, QuantLinear) for n, m in q.named_modules() if "lm_head" in n or "embed" in n)
    assert any(isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__ for m in q.modules())


def test_quantize_leaves_lm_head_float_and_refuses_double_quantization(tiny_llama):
    q = quantize(tiny_llama, "w8a8")
    assert isinstance(q.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, "w8a8")


def test_static_scheme_needs_calibration(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        quantize(tiny_llama, "w8a8-static")
    q = quantize(tiny_llama, "w8a8-static", calibration=[{"input_ids": sample_ids(seed=5)}])
    scales = [m.act_scale for m in q.modules() if isinstance(m, QuantLinear)]
    assert scales and all(s.item() > 0 for s in scales)


def test_generic_fallback_finds_blocks_of_an_unknown_family():
    model = make_tiny("llama")
    model.config.model_type = "my-llama-fork"
    adapter = get_adapter(model)
    assert adapter.name == "generic:my-llama-fork" and adapter.kind == "decoder"
    roles = {t.relative: t.role for t in make_plan(model, get_scheme("w4/8a8"), adapter).layers}
    assert roles["mlp.down_proj"] == "mlp" and roles["self_attn.q_proj"] == "attention"


def test_unknown_architecture_without_blocks_is_a_clear_error():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
    with pytest.raises(UnsupportedModelError, match="supported families: .*llama"):
        generic_adapter(Tiny())


def test_registry_covers_required_families():
    assert {"bert", "gpt2", "opt", "gpt_neox", "gptj", "llama"} <= set(REGISTRY)
