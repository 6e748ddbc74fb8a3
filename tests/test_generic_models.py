"""Model types without an adapter run end to end through the generic fallback: quantize, save,
load (runtime prepared), evaluate, from the command line as a user would, on tiny random models.

Block layouts covered: pre-norm (phi, bloom, gemma, phi3, gpt_bigcode, megatron-bert) and
post-norm (distilbert, mpnet) blocks; plain (fc1/fc2, dense_h_to_4h) and gated (gate/up/down,
phi3's fused gate_up_proj) MLPs; separate q/k/v and fused QKV (bloom, phi3, gpt_bigcode);
parallel attention + MLP (phi). The generic adapter declares the fusions it can name (pre-norm
norms feeding q/k/v or the MLP input, Llama-style gated MLPs); the fused models must equal the
reference path bit for bit.
"""
from __future__ import annotations

import json

import pytest
import torch

import zquant
from conftest import tiny_tokenizer
from zquant.cli import main
from zquant.models import REGISTRY, get_adapter
from zquant.modules import QuantLinear

V = 300


def _configs():
    import transformers as T
    small = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    return {
        "phi": lambda: T.PhiConfig(hidden_size=48, intermediate_size=96, **small),
        "bloom": lambda: T.BloomConfig(vocab_size=V, hidden_size=48, n_layer=2, n_head=4),
        "gemma": lambda: T.GemmaConfig(hidden_size=48, intermediate_size=96, num_key_value_heads=2, head_dim=12,
                                       **small),
        "phi3": lambda: T.Phi3Config(hidden_size=48, intermediate_size=96, num_key_value_heads=4, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, **small),
        "gpt_bigcode": lambda: T.GPTBigCodeConfig(vocab_size=V, n_embd=48, n_layer=2, n_head=4, n_positions=128,
                                                  bos_token_id=1, eos_token_id=2),
        "stablelm": lambda: T.StableLmConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=4,
                                             partial_rotary_factor=0.5, **small),
        "distilbert": lambda: T.DistilBertConfig(vocab_size=V, dim=48, hidden_dim=96, n_layers=2, n_heads=4,
                                                 max_position_embeddings=128),
        "megatron-bert": lambda: T.MegatronBertConfig(hidden_size=48, intermediate_size=96, **small),
        "mpnet": lambda: T.MPNetConfig(hidden_size=48, intermediate_size=96, **{**small, "max_position_embeddings": 130}),
    }


DECODERS = ["phi", "bloom", "gemma", "phi3", "gpt_bigcode", "stablelm"]
ENCODERS = ["distilbert", "megatron-bert", "mpnet"]
# (attention layers, MLP layers) per block, as the generic adapter should classify them
LAYERS = {"phi": (4, 2), "bloom": (2, 2), "gemma": (4, 3), "phi3": (2, 2), "gpt_bigcode": (2, 2),
          "stablelm": (4, 3), "distilbert": (4, 2), "megatron-bert": (4, 2), "mpnet": (4, 2)}


def _model_dir(tmp_path, model_type: str):
    from transformers import AutoModel, AutoModelForCausalLM
    torch.manual_seed(0)
    config = _configs()[model_type]()
    cls = AutoModelForCausalLM if model_type in DECODERS else AutoModel
    model = cls.from_config(config).eval()
    path = tmp_path / model_type
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model, path


@pytest.mark.parametrize("model_type", DECODERS + ENCODERS)
def test_model_type_without_adapter_runs_end_to_end(tmp_path, model_type, capsys):
    model, path = _model_dir(tmp_path, model_type)
    assert model_type not in REGISTRY
    adapter = get_adapter(model)
    assert adapter.name == f"generic:{model_type}"
    assert adapter.kind == ("decoder" if model_type in DECODERS else "encoder")
    assert (len(adapter.attention), len(adapter.mlp)) == LAYERS[model_type]

    out = tmp_path / "q"
    assert main(["quantize", str(path), "--scheme", "w4/8a8", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    loaded = zquant.load(out)
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * sum(LAYERS[model_type])
    assert loaded.zquant_info["adapter"] == f"generic:{model_type}"

    capsys.readouterr()
    extra = ["--max-tokens", "96", "--window", "48"] if model_type in DECODERS else ["--max-examples", "60"]
    assert main(["eval", str(out), "--json", "--quiet", *extra]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    if model_type in DECODERS:
        assert result["kind"] == "decoder" and 1 < result["perplexity"] < 10 * V
    else:
        assert result["kind"] == "encoder" and result["cosine"] > 0.9
    assert result["layer_ratio_to_fp16"] < 0.5


def test_plan_is_computed_once_per_quantize_and_per_load(tmp_path, monkeypatch):
    from zquant import plan as plan_module
    import zquant.api
    import zquant.checkpoint
    calls = []
    real = plan_module.make_plan

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for module in (zquant.api, zquant.checkpoint):
        monkeypatch.setattr(module, "make_plan", counting)
    from conftest import make_tiny
    model = zquant.quantize(make_tiny("llama"), "w8a8")
    assert len(calls) == 1
    zquant.save(model, tmp_path / "c")
    zquant.load(tmp_path / "c")
    assert len(calls) == 2
    import zquant.models as models
    adapters = []
    real_get = models.get_adapter
    monkeypatch.setattr(plan_module, "get_adapter", lambda m: adapters.append(1) or real_get(m))
    zquant.load(tmp_path / "c")
    zquant.quantize(make_tiny("gpt2"), "w4/8a8")
    assert len(adapters) == 2


# model type -> the fused module kinds the generic adapter's declarations give
GENERIC_FUSIONS = {"phi": {"FusedNorm"}, "bloom": {"FusedNorm"}, "gpt_bigcode": {"FusedNorm"},
                   "stablelm": {"FusedNorm", "FusedGatedMLP"}}


@pytest.mark.usefixtures("cpu_extension")
@pytest.mark.parametrize("model_type", sorted(GENERIC_FUSIONS))
def test_generic_fusions_match_the_reference_path(tmp_path, model_type):
    from zquant import fusion, kernels
    model, _ = _model_dir(tmp_path, model_type)
    q = zquant.quantize(model, "w8a8")
    assert {type(m).__name__ for m in q.modules() if isinstance(m, fusion._Fused)} == GENERIC_FUSIONS[model_type]
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = q(input_ids=ids).logits
        with kernels.use_backend("reference"):
            assert torch.equal(q(input_ids=ids).logits, fast)


def test_load_prepares_the_runtime_for_the_requested_device(tmp_path):
    from conftest import make_tiny
    from zquant import fusion
    zquant.save(zquant.quantize(make_tiny("llama"), "w8a8"), tmp_path / "c")
    model = zquant.load(tmp_path / "c", device="cpu")
    assert next(model.parameters()).device.type == "cpu"
    assert any(isinstance(m, fusion._Fused) for m in model.modules()) == bool(zquant.kernels.fusions_for("cpu"))
    assert zquant.kernels.fusions_for("meta") == frozenset()       # no backend prepares fusions there
