"""`zquant.analysis`: every number equals a direct computation on a tiny random model."""
import copy
import dataclasses
import json
import math

import pytest
import torch

import zquant
from zquant import analysis as I
from zquant.config import get_scheme
from zquant.modules import QuantLinear

from conftest import make_tiny, sample_ids


def _raw_inputs(model, names):
    """Each named layer's input tensor, captured with a plain forward pre-hook."""
    seen = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, args[0].detach().clone())) for n in names]
    with torch.no_grad():
        model(input_ids=sample_ids())
    for h in handles:
        h.remove()
    return seen


def _json_roundtrip(data):
    return json.loads(json.dumps(data))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_activation_ranges_equal_direct_min_max(family):
    model = make_tiny(family)
    result = I.ranges(model, sample_ids())
    data = _json_roundtrip(I.to_json(result))               # the numbers as written to ranges.json
    names = [n for b in result["blocks"] for g in b["inputs"] for n in g["names"]]
    raw = _raw_inputs(model, names)
    assert data["tokens"] == sample_ids().numel()
    for block in data["blocks"]:
        for group in block["inputs"]:
            for name in group["names"]:               # every layer of the group really read this input
                x = raw[name].reshape(-1, raw[name].shape[-1])           # [B*T, K]
                assert group["width"] == x.shape[1]
                assert torch.equal(torch.tensor(group["token_min"], dtype=torch.float32), x.amin(1))
                assert torch.equal(torch.tensor(group["token_max"], dtype=torch.float32), x.amax(1))


def test_first_input_equals_manual_layer_math():
    """Block 0's q/k/v input is the input norm of the token embeddings: computed by hand."""
    model = make_tiny("llama")
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(sample_ids()))
    group = I.ranges(model, sample_ids())["blocks"][0]["inputs"][0]
    assert group["relative"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    torch.testing.assert_close(group["token_min"], x.reshape(-1, 64).amin(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(group["token_max"], x.reshape(-1, 64).amax(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,groups", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
    # GPT-J's parallel block: one norm feeds attention and the MLP; fc_in reads it after out_proj.
    ("gptj", [["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"], ["attn.out_proj"], ["mlp.fc_out"]]),
])
def test_layers_reading_one_tensor_share_a_group(family, groups):
    blocks = I.activation_ranges(make_tiny(family), sample_ids())
    assert all([g["relative"] for g in b] == groups for b in blocks)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_weight_ranges_equal_rows_of_the_weight(family):
    model = make_tiny(family)
    data = _json_roundtrip(I.to_json(I.ranges(model, sample_ids())))
    for block in data["blocks"]:
        for mat in block["weights"]:
            module = model.get_submodule(mat["name"])
            # GPT-2's Conv1D stores [K, N]: its output rows are the columns.
            w = module.weight.t() if family == "gpt2" else module.weight
            assert mat["shape"] == list(w.shape)
            assert torch.equal(torch.tensor(mat["row_min"], dtype=torch.float32), w.detach().amin(1))
            assert torch.equal(torch.tensor(mat["row_max"], dtype=torch.float32), w.detach().amax(1))


def test_weight_ranges_of_a_quantized_model_are_the_dequantized_weights():
    q = zquant.quantize(make_tiny("llama"), "w4/8a16")
    mat = I.weight_ranges(q)[1][6]
    layer = q.get_submodule(mat["name"])
    assert isinstance(layer, QuantLinear) and layer.spec.weight.bits == 4
    assert torch.equal(mat["row_max"], layer.dequantized_weight().amax(1))


def test_spread_summary_equals_direct_computation():
    mins, maxs = torch.tensor([-1.0, -0.5, -4.0, -0.25]), torch.tensor([2.0, 0.5, 1.0, 0.5])
    s = I.spread(mins, maxs)
    # absmax per token: 2, 0.5, 4, 0.5 (median of 4 values: torch takes the lower middle, 0.5)
    assert s["absmax_max"] == 4 and s["absmax_min"] == 0.5 and s["absmax_median"] == 0.5
    assert s["absmax_max_over_median"] == 8
    assert s["range_max_over_min"] == pytest.approx(5.0 / 0.75)


def test_json_keeps_detail_only_for_chosen_blocks_and_is_strict_json():
    result = I.ranges(make_tiny("llama"), sample_ids())
    data = I.to_json(result, [1])
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert [b["detail"] for b in back["blocks"]] == [False, True]
    assert "token_min" not in back["blocks"][0]["inputs"][0] and "row_max" not in back["blocks"][0]["weights"][0]
    assert "absmax_max_over_median" in back["blocks"][0]["inputs"][0]
    assert len(back["blocks"][1]["inputs"][0]["token_min"]) == sample_ids().numel()


def test_float32_list_round_trips_exactly():
    t = torch.randn(1000) * 1e3
    assert torch.equal(torch.tensor(I.float32_list(t), dtype=torch.float32), t)


def _snr(ref, approx):
    ref, approx = ref.double(), approx.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - approx).pow(2).sum().item())


@pytest.mark.parametrize("family,scheme", [("llama", "w4/8a8"), ("bert", "w8a8"), ("gpt2", "w8a8")])
def test_layer_snr_equals_direct_outputs(family, scheme):
    fp = make_tiny(family)
    # FP32 float parts: nothing before the first quantized layer differs (checked at the end)
    q = zquant.quantize(copy.deepcopy(fp), dataclasses.replace(get_scheme(scheme), float_dtype="float32"))
    result = I.layer_snr(fp, q, sample_ids())
    names = [l["name"] for l in result["layers"]]
    assert names and all(isinstance(q.get_submodule(n), QuantLinear) for n in names)

    # Direct: each layer's input and output in the FP model, and its output in the quantized model.
    fp_in, fp_out, q_out = {}, {}, {}

    def keep(n, inputs=None, outputs=None):
        def hook(_module, args, out):       # returns None: the output is not replaced
            if inputs is not None:
                inputs[n] = args[0].detach()
            outputs[n] = out.detach()
        return hook

    hooks = []
    for n in names:
        hooks.append(fp.get_submodule(n).register_forward_hook(keep(n, fp_in, fp_out)))
        hooks.append(q.get_submodule(n).register_forward_hook(keep(n, outputs=q_out)))
    with torch.no_grad():
        fp(input_ids=sample_ids())
        q(input_ids=sample_ids())
        for h in hooks:
            h.remove()
        for layer in result["layers"]:
            n = layer["name"]
            isolated = _snr(fp_out[n], q.get_submodule(n)(fp_in[n]))
            assert layer["isolated_db"] == pytest.approx(isolated, abs=1e-6)
            assert layer["end_to_end_db"] == pytest.approx(_snr(fp_out[n], q_out[n]), abs=1e-6)
    first = result["layers"][0]
    assert first["block"] == 0 and first["isolated_db"] == pytest.approx(first["end_to_end_db"])
    assert 15 < result["output_db"] < 80


def test_layer_snr_skips_floating_point_layers():
    fp = make_tiny("llama")
    q = zquant.quantize(copy.deepcopy(fp), zquant.get_scheme("w8a8").with_overrides(
        zquant.Override(pattern="*.mlp.*", float=True)))
    layers = I.layer_snr(fp, q, sample_ids())["layers"]
    assert layers and all(l["role"] == "attention" for l in layers)


def test_lkd_blocks_reads_the_recorded_losses():
    model = make_tiny("llama")
    assert I.lkd_blocks(model) is None
    model.zquant_info = {"lkd": {"blocks": [{"block": 1, "loss_before": 2.0, "loss_after": 1.0, "seconds": 0.1},
                                            {"block": 0, "loss_before": 3.0, "loss_after": 1.5, "seconds": 0.1}]}}
    assert [b["block"] for b in I.lkd_blocks(model)] == [0, 1]


def test_select_blocks():
    assert I.select_blocks("auto", 30) == [0, 15, 29]
    assert I.select_blocks("auto", 1) == [0]
    assert I.select_blocks("all", 3) == [0, 1, 2]
    assert I.select_blocks("5, 2", 6) == [2, 5]
    for bad in ("7", "x", ""):
        with pytest.raises(ValueError, match="blocks"):
            I.select_blocks(bad, 6)


def test_sample_input_errors_name_the_problem():
    with pytest.raises(FileNotFoundError, match="not found"):
        I.sample_input(None, "/no/such/text.txt")
    with pytest.raises(ValueError, match="at least 2"):
        I.sample_input(None, "wiki", tokens=1)
