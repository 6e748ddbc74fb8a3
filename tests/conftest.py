"""Shared fixtures: tiny random models of every supported family, built from configs (nothing downloads)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def _tiny_configs(vocab_size: int = 211):
    from transformers import BertConfig, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, OPTConfig
    common = dict(vocab_size=vocab_size)
    return {
        "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=128, **common),
        "bert": lambda: BertConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=128, **common),
        "gpt2": lambda: GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=128, **common),
        "opt": lambda: OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=128, word_embed_proj_dim=48, **common),
        "gpt_neox": lambda: GPTNeoXConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=128, **common),
        "gptj": lambda: GPTJConfig(n_embd=48, n_layer=2, n_head=4, n_positions=128, rotary_dim=8, **common),
    }


FAMILIES = ["llama", "bert", "gpt2", "opt", "gpt_neox", "gptj"]


def make_tiny(family: str, seed: int = 0, vocab_size: int = 211):
    """A tiny random model of ``family`` in eval mode: a causal LM, or a BertModel for ``bert``."""
    from transformers import AutoModel, AutoModelForCausalLM
    torch.manual_seed(seed)
    config = _tiny_configs(vocab_size)[family]()
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    model = cls.from_config(config).eval()
    # Random init leaves biases at zero and LayerNorms at identity; perturb them so tests see real values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(params=FAMILIES)
def tiny_family(request):
    return request.param


@pytest.fixture
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture
def tiny_bert():
    return make_tiny("bert")


def sample_ids(vocab: int = 211, batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a_model, b_model) -> None:
    """The two models' state dicts have the same names, dtypes and values."""
    a, b = a_model.state_dict(), b_model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``approx`` against ``reference`` in dB."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise.clamp(min=1e-30)))


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory on a few sentences (nothing downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face directory, with its tokenizer."""
    path = tmp_path / "tiny-llama"
    tok = tiny_tokenizer()
    model = make_tiny("llama", vocab_size=300)
    assert len(tok) <= model.config.vocab_size
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cpu_extension():
    """Skip on machines the CPU fast path does not support; elsewhere the extension must load."""
    from zquant.kernels import build
    reason = build.unsupported_reason()
    if reason:
        pytest.skip(f"CPU fast path not supported here: {reason}")
    assert build.load() is None, build.load()
