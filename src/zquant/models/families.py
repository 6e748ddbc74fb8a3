"""The built-in model families: one `Adapter` each, naming blocks, roles and fusions."""
from __future__ import annotations

from . import ActMLP, Adapter, DecodeLayout, GatedMLP, NormFeed, register

_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

register(Adapter(
    "llama", ("llama", "mistral", "qwen2", "qwen3"), "decoder", "layers", _LLAMA_ATTN, _LLAMA_MLP,
    fusions=(NormFeed("input_layernorm", _LLAMA_ATTN[:3]), NormFeed("post_attention_layernorm", _LLAMA_MLP[:2]),
             GatedMLP("mlp", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")),
    embeddings="embed_tokens", head="lm_head",
    decode=DecodeLayout("input_layernorm", _LLAMA_ATTN[:3], _LLAMA_ATTN[3], "post_attention_layernorm",
                        _LLAMA_MLP[:2], "mlp.act_fn", _LLAMA_MLP[2], final_norm="model.norm",
                        rotary="model.rotary_emb")))
register(Adapter(
    "bert", ("bert", "roberta", "xlm-roberta", "electra"), "encoder", "encoder.layer",
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    ("intermediate.dense", "output.dense"),
    fusions=(NormFeed("attention.output.LayerNorm", ("intermediate.dense",)),
             NormFeed("output.LayerNorm", ("next.attention.self.query", "next.attention.self.key",
                                           "next.attention.self.value")),
             ActMLP("intermediate", first="dense", act="intermediate_act_fn", second="", reader="output.dense")),
    embeddings="embeddings.word_embeddings"))   # heads differ by task class: the model's get_output_embeddings()
register(Adapter(
    "gpt2", ("gpt2",), "decoder", "h", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"),
    fusions=(NormFeed("ln_1", ("attn.c_attn",)), NormFeed("ln_2", ("mlp.c_fc",)),
             ActMLP("mlp", first="c_fc", act="act", second="c_proj", reader="mlp.c_proj")),
    embeddings="wte", head="lm_head",
    decode=DecodeLayout("ln_1", ("attn.c_attn",), "attn.c_proj", "ln_2", ("mlp.c_fc",), "mlp.act", "mlp.c_proj",
                        final_norm="transformer.ln_f", positions="transformer.wpe")))
register(Adapter(
    "opt", ("opt",), "decoder", "layers",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), ("fc1", "fc2"),
    fusions=(NormFeed("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             NormFeed("final_layer_norm", ("fc1",))),
    embeddings="embed_tokens", head="lm_head"))
register(Adapter(
    "gpt_neox", ("gpt_neox",), "decoder", "layers", ("attention.query_key_value", "attention.dense"),
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    fusions=(NormFeed("input_layernorm", ("attention.query_key_value",)),
             NormFeed("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
             ActMLP("mlp", first="dense_h_to_4h", act="act", second="dense_4h_to_h", reader="mlp.dense_4h_to_h")),
    embeddings="embed_in", head="lm_head"))
register(Adapter(
    "gptj", ("gptj",), "decoder", "h",
    ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"), ("mlp.fc_in", "mlp.fc_out"),
    fusions=(NormFeed("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),
             ActMLP("mlp", first="fc_in", act="act", second="fc_out", reader="mlp.fc_out")),
    embeddings="wte", head="lm_head"))
