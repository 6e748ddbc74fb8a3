import json

import pytest

from zquant.config import (PRESETS, ActQuant, ConfigError, LayerQuant, Override, QuantConfig, WeightQuant,
                           get_scheme)


def test_presets_exist_and_round_trip_through_json():
    assert {"w8a8", "w8a8-static", "w8a16", "w4/8a16", "w4/8a8"} <= set(PRESETS)
    for config in PRESETS.values():
        assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_w4_8_means_int4_mlp_int8_attention():
    c = get_scheme("w4/8a8")
    assert c.mlp.weight.bits == 4 and c.attention.weight.bits == 8
    assert c.mlp.act.mode == c.attention.act.mode == "dynamic"
    assert get_scheme("w4/8a16").mlp.act.mode == "none"
    assert get_scheme("w8a8-static").attention.act.mode == "static"


@pytest.mark.parametrize("make,field", [
    (lambda: WeightQuant(bits=3), "weight.bits"),
    (lambda: WeightQuant(granularity="column"), "weight.granularity"),
    (lambda: WeightQuant(groups=0), "weight.groups"),
    (lambda: ActQuant(mode="per-channel"), "act.mode"),
    (lambda: ActQuant(bits=4), "act.bits"),
    (lambda: ActQuant(mode="static", symmetric=False), "act.symmetric"),
    (lambda: get_scheme("w3a8"), "unknown scheme"),
    (lambda: QuantConfig.from_dict({"name": "x", "bogus": 1}), "bogus"),
    (lambda: QuantConfig.from_dict({"name": "x", "mlp": {"weight": {"bits": 5}}}), "weight.bits"),
    (lambda: Override(pattern="re:(", bits=8), "regular expression"),
    (lambda: Override.parse("*.fc1:bits=x"), "bits must be an integer"),
    (lambda: Override.parse("*.fc1:colour=red"), "bad item"),
])
def test_bad_values_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
        make()


def test_overrides_by_pattern_later_wins():
    c = get_scheme("w8a8").with_overrides(
        Override.parse("*.mlp.*:bits=4,groups=16"),
        Override.parse("re:.*\\.layers\\.0\\..*=fp"),
        Override.parse("*.down_proj:act=none"),
    )
    assert c.layer("model.layers.1.mlp.up_proj", "mlp").weight == WeightQuant(bits=4, groups=16)
    assert c.layer("model.layers.1.mlp.down_proj", "mlp").act.mode == "none"
    assert c.layer("model.layers.1.self_attn.q_proj", "attention") == c.attention
    assert c.layer("model.layers.0.mlp.up_proj", "mlp").weight is None
    # A later override can bring a floating-point layer back.
    assert c.layer("model.layers.0.mlp.down_proj", "mlp").weight is not None
    assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_layerquant_from_dict_keeps_float():
    assert LayerQuant.from_dict({"weight": None, "act": {"mode": "none"}}).weight is None
