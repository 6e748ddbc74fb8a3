"""zquant.generate: the fast decode step against the model's own forward, sampling, stopping, CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import zquant
from conftest import make_tiny, tiny_tokenizer
from zquant.cli import main
from zquant.config import ConfigError
from zquant.generate import GenerationOptions, fast
from zquant.generate.sampling import filter_top_k, filter_top_p, apply_repetition_penalty

SCHEMES = ["w8a8", "w4/8a8", "w8a8-static"]
_CACHE_ARG = "cache" if "cache" in __import__("inspect").signature(
    __import__("transformers").LlamaModel.forward).parameters else "past_key_values"


def _quantized(scheme: str, seed: int = 0, family: str = "llama"):
    model = make_tiny(family, seed=seed, vocab_size=300)
    kw = {"calibration": [{"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))}]} \
        if scheme.endswith("static") else {}
    return zquant.quantize(model, scheme, **kw)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


FAST_FAMILIES = ["llama", "gpt2"]


def _step(runner, ids: list[int], slot: int, start: int):
    seqs = [(slot, start, ids)]
    x = runner.embed_tokens(torch.tensor(ids), seqs)
    return runner.decoder.step(x, torch.tensor([[slot, start, len(ids)]]), True)


@pytest.mark.parametrize("family", FAST_FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sdpa_attention_is_bit_identical_to_the_model_forward(cpu_extension, scheme, family):
    """With attention="sdpa" every hidden state of prefill and decode steps is exactly the model's."""
    q = _quantized(scheme, family=family)
    base = q.get_submodule(q.base_model_prefix)
    runner = fast.FastRunner(q)
    runner.reserve(1, 64, attention="sdpa")
    prompt = _ids(12, 1)
    rows = _step(runner, prompt, 0, 0)
    with torch.no_grad():
        out = base(torch.tensor([prompt]), use_cache=True)
    assert torch.equal(rows, out.last_hidden_state[0])
    cache, n = out.past_key_values, len(prompt)
    for t in (5, 77, 123):
        row = _step(runner, [t], 0, n)
        with torch.no_grad():
            out = base(torch.tensor([[t]]), use_cache=True, **{_CACHE_ARG: cache})
        cache, n = out.past_key_values, n + 1
        assert torch.equal(row[0], out.last_hidden_state[0, -1])


@pytest.mark.parametrize("family", FAST_FAMILIES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_step_matches_the_model_forward(cpu_extension, scheme, family):
    """Prefill and decode steps give the hidden states of the model's own forward: the same integer
    arithmetic and float ops, but for attention, zquant's kernel (an exact softmax, summed in another
    order than SDPA's), so they agree to float rounding."""
    q = _quantized(scheme, family=family)
    base = q.get_submodule(q.base_model_prefix)
    runner = fast.FastRunner(q)
    runner.reserve(1, 64)
    prompt = _ids(12, 1)
    rows = _step(runner, prompt, 0, 0)
    with torch.no_grad():
        out = base(torch.tensor([prompt]), use_cache=True)
    torch.testing.assert_close(rows, out.last_hidden_state[0], rtol=1e-4, atol=1e-4)
    cache, n = out.past_key_values, len(prompt)
    for t in (5, 77, 123, 9):
        row = _step(runner, [t], 0, n)
        with torch.no_grad():
            out = base(torch.tensor([[t]]), use_cache=True, **{_CACHE_ARG: cache})
        cache, n = out.past_key_values, n + 1
        torch.testing.assert_close(row[0], out.last_hidden_state[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAST_FAMILIES)
@pytest.mark.parametrize("scheme", ["w8a8", "w4/8a8"])
def test_greedy_tokens_match_model_generate(cpu_extension, scheme, family):
    q = _quantized(scheme, seed=2, family=family)
    prompt = _ids(9, 2)
    with torch.no_grad():
        ref = q.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    res = zquant.generate(q, None, [prompt], max_new_tokens=64, ignore_eos=True, path="fast")[0]
    assert res.path == "fast" and res.token_ids == ref[0, len(prompt):].tolist()


def test_a_sequence_does_not_depend_on_its_batch(cpu_extension):
    """Mixed-length prompts generated together give each prompt's tokens alone, and the same logits."""
    q = _quantized("w8a8", seed=4)
    prompts = [_ids(n, 10 + n) for n in (3, 17, 8, 1)]
    together = zquant.generate(q, None, prompts, max_new_tokens=24, ignore_eos=True)
    for p, res in zip(prompts, together):
        alone = zquant.generate(q, None, [p], max_new_tokens=24, ignore_eos=True)[0]
        assert res.token_ids == alone.token_ids
    runner = fast.FastRunner(q)
    runner.reserve(4, 64)
    batch = runner.forward([(i, 0, p) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        runner.reserve(1, 64)
        assert torch.equal(runner.forward([(0, 0, p)])[0], batch[i])


def test_head_kernel_is_batch_invariant_and_matches_linear(cpu_extension):
    from zquant.kernels import cpu
    x = torch.randn(16, 72)
    w = torch.randn(301, 72)
    full = cpu.head(x, w)
    torch.testing.assert_close(full, x @ w.t(), rtol=1e-5, atol=1e-5)   # fp32 sums in another order
    for m in (1, 3, 7):
        assert torch.equal(cpu.head(x[m:m + 1], w), full[m:m + 1])
    wb = w.bfloat16()
    torch.testing.assert_close(cpu.head(x, wb), x @ wb.float().t(), rtol=1e-5, atol=1e-5)


def test_bf16_head_is_used_when_exact(cpu_extension):
    q = _quantized("w8a8")
    with torch.no_grad():
        q.lm_head.weight.copy_(q.lm_head.weight.bfloat16().float())
    assert fast.FastRunner(q)._head_w.dtype == torch.bfloat16
    with torch.no_grad():
        q.lm_head.weight.add_(1e-7)
    assert fast.FastRunner(q)._head_w.dtype == torch.float32


def test_continuation_prefill_matches_one_prefill(cpu_extension):
    """A prompt prefilled in two pieces (a chat turn after cached ones) gives the same logits."""
    q = _quantized("w8a8")
    runner = fast.FastRunner(q)
    runner.reserve(1, 64)
    p = _ids(20, 5)
    whole = runner.forward([(0, 0, p)])
    runner.forward([(0, 0, p[:11])])
    torch.testing.assert_close(runner.forward([(0, 11, p[11:])]), whole, rtol=1e-5, atol=1e-5)


def test_general_path_for_other_families_matches_generate():
    q = _quantized("w8a8", family="opt")
    assert "opt" in fast.unsupported_reason(q)
    prompt = _ids(6, 7)[:6]
    with torch.no_grad():
        ref = q.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with pytest.warns(UserWarning, match="general"):
        res = zquant.generate(q, None, [prompt], max_new_tokens=12, ignore_eos=True)[0]
    assert res.path == "general" and res.token_ids == ref[0, len(prompt):].tolist()
    with pytest.raises(ConfigError, match="fast decode path"):
        zquant.generate(q, None, [prompt], max_new_tokens=2, path="fast")


def test_float_model_generates_on_the_general_path():
    model = make_tiny("llama", vocab_size=300)
    res = zquant.generate(model, None, [[5, 6, 7]], max_new_tokens=5, ignore_eos=True, path="general")[0]
    with torch.no_grad():
        ref = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert res.token_ids == ref[0, 3:].tolist()


def test_sampling_with_a_seed_is_reproducible(cpu_extension):
    q = _quantized("w8a8")
    kw = dict(max_new_tokens=20, ignore_eos=True, temperature=1.3, top_k=50, top_p=0.9, seed=11)
    a = zquant.generate(q, None, [[5, 6, 7], [9, 9]], **kw)
    b = zquant.generate(q, None, [[5, 6, 7], [9, 9]], **kw)
    c = zquant.generate(q, None, [[5, 6, 7], [9, 9]], **{**kw, "seed": 12})
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    alone = zquant.generate(q, None, [[9, 9]], **kw)[0]        # the seed is per sequence
    assert alone.token_ids == a[1].token_ids


def test_logits_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [True, False, False, True]
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isinf(filter_top_p(probs, 0.75)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_top_p(probs, 0.1)).tolist() == [False, True, True, True]
    pen = apply_repetition_penalty(logits, torch.tensor([1, 3, 3]), 2.0)
    assert pen.tolist() == [1.0, 1.5, 2.0, -2.0]


def test_eos_and_stop_strings(cpu_extension):
    q = _quantized("w8a8")
    tok = tiny_tokenizer()
    free = zquant.generate(q, tok, ["The quick brown"], max_new_tokens=30, ignore_eos=True)[0]
    assert free.new_tokens == 30 and free.finish_reason == "length"
    eos = free.token_ids[4]
    q.generation_config.eos_token_id = eos
    stopped = zquant.generate(q, tok, ["The quick brown"], max_new_tokens=30)[0]
    assert stopped.finish_reason == "eos" and stopped.token_ids == free.token_ids[:free.token_ids.index(eos)]
    q.generation_config.eos_token_id = None
    stop = free.text[3:6]
    s = zquant.generate(q, tok, ["The quick brown"], max_new_tokens=30, stop=[stop], ignore_eos=True)[0]
    assert s.finish_reason == "stop" and s.text == free.text[:free.text.find(stop)]
    pieces = "".join(zquant.stream(q, tok, "The quick brown", max_new_tokens=30, ignore_eos=True))
    assert pieces == free.text


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(kv_cache="int4"), "kv_cache"), (dict(path="gpu"), "path"),
    (dict(attention="flash"), "attention"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        GenerationOptions(**bad)


def test_bad_prompts_are_refused(cpu_extension):
    q = _quantized("w8a8")
    with pytest.raises(ConfigError, match="empty"):
        zquant.generate(q, None, [[]])
    with pytest.raises(ConfigError, match="context"):
        zquant.generate(q, None, [list(range(4, 124))], max_new_tokens=20)
    with pytest.raises(ConfigError, match="chat template"):
        zquant.generate(q, tiny_tokenizer(), ["hi"], chat=True)


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_json_and_stream(tiny_model_dir, tmp_path, capsys, cpu_extension):
    out_dir = tmp_path / "q"
    assert _cli(capsys, "quantize", tiny_model_dir, "--scheme", "w8a8", "--out", out_dir, "--quiet")[0] == 0
    code, out, err = _cli(capsys, "generate", out_dir, "--prompt", "The quick", "--prompt", "A lazy dog",
                          "--max-new-tokens", "8", "--ignore-eos", "--json")
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and len(lines) == 2 and all(r["new_tokens"] == 8 and r["path"] == "fast" for r in lines)
    assert {"text", "token_ids", "prompt_tokens", "prefill_tok_s", "decode_tok_s"} <= set(lines[0])
    assert "decode 16 tokens" in err
    code, out, err = _cli(capsys, "generate", out_dir, "--prompt", "A lazy dog", "--max-new-tokens", "8",
                          "--ignore-eos")
    assert code == 0 and out == lines[1]["text"] + "\n"


@pytest.mark.parametrize("argv, match", [
    (["--prompt", ""], "empty"), (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"), (["--prompt", "x", "--top-p", "2"], "top_p"),
    (["--prompt", "x", "--chat"], "chat template"), ([], "give a prompt"),
])
def test_cli_generate_bad_input_is_one_line(tiny_model_dir, capsys, argv, match):
    code, out, err = _cli(capsys, "generate", tiny_model_dir, *argv)
    assert code == 2 and err.count("\n") == 1 and match in err, err


_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}[SEP]{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_keeps_the_conversation_in_the_cache(cpu_extension):
    from zquant.generate.chat import ChatSession
    q = _quantized("w8a8")
    tok = tiny_tokenizer()
    tok.chat_template = _TEMPLATE
    session = ChatSession(q, tok, dict(max_new_tokens=6))
    first = "".join(session.reply("The quick brown fox"))
    turn_one = len(session.in_cache)
    second = "".join(session.reply("jumps over"))
    assert session.messages[1] == {"role": "assistant", "content": first}
    # the second turn reused the cached first turn (up to where the template renders the reply's
    # text differently from the generated ids), and gives what a fresh run of the conversation gives
    assert 0 < session.last_reused <= turn_one
    ids = tok.apply_chat_template(session.messages[:3], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert second == zquant.generate(q, tok, [ids], max_new_tokens=6)[0].text
    session.reset()
    assert "".join(session.reply("The quick brown fox")) == first


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_int8_kv_cache(cpu_extension, family):
    q = _quantized("w8a8", family=family)
    fp, i8 = fast.FastRunner(q), fast.FastRunner(q)
    fp.reserve(1, 64)
    i8.reserve(1, 64, "int8")
    d = q.config.hidden_size // q.config.num_attention_heads       # int8 + one float32 scale per head vector
    assert i8.decoder.cache_bytes * 4 * d == fp.decoder.cache_bytes * (d + 4)
    prompt = _ids(10, 3)
    a, b = fp.forward([(0, 0, prompt)]), i8.forward([(0, 0, prompt)])
    for i, t in enumerate((7, 99, 23, 150, 42)):
        a, b = fp.forward([(0, 10 + i, [t])]), i8.forward([(0, 10 + i, [t])])
        # INT8 keys and values change the logits a little, not the ranking's top
        assert torch.nn.functional.cosine_similarity(a, b).item() > 0.99
    # the stored values: symmetric int8, one scale per token per head, dequantizing to the float cache
    k8, v8, ks, vs = i8.decoder.cache(0)
    kf, vf = fp.decoder.cache(0)
    n = 15
    assert k8.dtype == torch.int8 and k8[..., :n, :].abs().max() == 127
    torch.testing.assert_close(k8[..., :n, :].float() * ks[..., :n, None], kf[..., :n, :],
                               atol=float(ks[..., :n].max()) / 2 + 1e-6, rtol=0)
    # decode attention straight from the int8 rows (every sequence adds one token) equals SDPA over
    # the dequantized cache (taken when some sequence adds more than one)
    runs = []
    for steps in ([(0, n, [3])], [(0, n, [3]), (1, n, [3, 4])]):
        r = fast.FastRunner(q)
        r.reserve(2, 64, "int8")
        r.forward([(0, 0, prompt + [7, 99, 23, 150, 42]), (1, 0, prompt + [7, 99, 23, 150, 42])])
        runs.append(r.forward(steps)[0])
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)


def test_int8_kv_cache_needs_the_fast_path():
    model = make_tiny("llama", vocab_size=300)
    with pytest.raises(ValueError, match="int8"):
        zquant.generate(model, None, [[5, 6]], max_new_tokens=2, kv_cache="int8", path="general")


@pytest.mark.parametrize("kv_cache", ["fp", "int8"])
def test_a_nan_token_propagates_through_the_cache(cpu_extension, kv_cache):
    """A NaN in one token's embedding makes what attends to it NaN, as in floating point."""
    q = _quantized("w8a8")
    with torch.no_grad():
        q.model.embed_tokens.weight[7] = float("nan")
    runner = fast.FastRunner(q)
    runner.reserve(1, 64, kv_cache)
    assert torch.isfinite(runner.forward([(0, 0, [5, 6])])).all()
    assert torch.isnan(runner.forward([(0, 2, [7])])).all()
    assert torch.isnan(runner.forward([(0, 3, [9])])).all()         # a later token still sees it


@pytest.mark.parametrize("head_dim", [16, 24])
@pytest.mark.parametrize("kv_cache", ["fp", "int8"])
def test_attention_kernel_agrees_with_sdpa_over_long_contexts(cpu_extension, head_dim, kv_cache):
    """zquant's attention against torch's SDPA over the same cache (attention="sdpa"), for a prompt and
    decode steps that cross the key cache's 64-position blocks, with a head_dim that is not a multiple of
    16 (masked tails) and GQA; then prefilling in two pieces equals one prefill, bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256, vocab_size=300)
    q = zquant.quantize(LlamaForCausalLM(config).eval(), "w8a8", quiet=True)
    ours, sdpa = fast.FastRunner(q), fast.FastRunner(q)
    ours.reserve(1, 200, kv_cache)
    sdpa.reserve(1, 200, kv_cache, attention="sdpa")
    prompt = _ids(130, 5)
    a, b = _step(ours, prompt, 0, 0), _step(sdpa, prompt, 0, 0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for i, t in enumerate(_ids(5, 6)):
        torch.testing.assert_close(_step(ours, [t], 0, 130 + i), _step(sdpa, [t], 0, 130 + i), rtol=1e-4, atol=1e-4)
    split = fast.FastRunner(q)
    split.reserve(1, 200, kv_cache)
    first, rest = _step(split, prompt[:70], 0, 0), _step(split, prompt[70:], 0, 70)
    assert torch.equal(torch.cat([first, rest]), a)


def test_hugepage_arena_holds_the_decode_weights(cpu_extension):
    """The step runner's weights are copies in one arena (the same bytes), shared with the layers' caches."""
    from zquant.kernels import cpu
    parts = [torch.arange(10, dtype=torch.int8), torch.randn(3, 5), torch.arange(7, dtype=torch.int32)]
    copies = cpu.hugepage_copy(parts)
    assert all(torch.equal(a, b) and a.dtype == b.dtype and a.data_ptr() != b.data_ptr() for a, b in zip(parts, copies))
    assert [c.data_ptr() % 64 for c in copies] == [0, 0, 0]
    q = _quantized("w8a8")
    fast.FastRunner(q)
    block = q.model.layers[0]
    o = block.self_attn.o_proj.kernel_cache["cpu"].wpack
    gated = block.mlp.gate_proj.kernel_cache["cpu_gated"][1].wpack
    down = block.mlp.down_proj.kernel_cache["cpu"].wpack
    r64 = lambda t: -(-t.numel() * t.element_size() // 64) * 64  # noqa: E731
    # in the order a step reads them, one after another: the general path uses the same bytes
    assert gated.data_ptr() == o.data_ptr() + r64(o) and down.data_ptr() == gated.data_ptr() + r64(gated)


def test_a_head_dim_the_step_cannot_take_goes_to_the_general_path(cpu_extension):
    from zquant.kernels import cpu
    from zquant.kernels.decoder import MAX_HEAD_DIM
    assert cpu._ops().MAX_HEAD_DIM == MAX_HEAD_DIM
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=MAX_HEAD_DIM + 16, vocab_size=50)
    q = zquant.quantize(LlamaForCausalLM(config).eval(), "w8a8", quiet=True)
    assert "head_dim" in fast.unsupported_reason(q)
    with pytest.warns(UserWarning, match="head_dim"):
        res = zquant.generate(q, None, [[3, 4, 5]], max_new_tokens=3, ignore_eos=True)[0]
    assert res.path == "general" and len(res.token_ids) == 3
