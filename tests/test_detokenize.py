"""Streaming text: incremental detokenization (zquant.generate.detokenize) and the engine's pieces."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_tokenizer
from zquant.generate import Generation, GenerationOptions
from zquant.generate.detokenize import TextStream

TEXT = "naïve café 東京 🙂 — «the quick brown fox»  jumps\n\nover the lazy dog!"


def sentencepiece_tokenizer():
    """A Llama-style SentencePiece BPE: ▁ for spaces, byte-fallback tokens <0xNN> in the vocabulary
    for characters it has no piece for, the first space stripped when decoding."""
    import json
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog."] * 20, trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = {**trained["vocab"]}
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok.model = models.BPE(vocab, [tuple(m) for m in trained["merges"]], unk_token="<unk>", byte_fallback=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TOKENIZERS = {"byte-level": tiny_tokenizer, "sentencepiece": sentencepiece_tokenizer}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


def _streamed(tok, ids: list[int]) -> list[str]:
    stream = TextStream(tok)
    return [stream.push(t) for t in ids] + [stream.flush()]


def test_pieces_concatenate_to_the_whole_decode(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    pieces = _streamed(tok, ids)
    assert "".join(pieces) == TEXT
    # the multi-byte characters are split across tokens (so some tokens complete nothing), and an
    # incomplete character is never handed out
    assert "" in pieces[:-1] and not any("\ufffd" in p for p in pieces)


def test_any_token_sequence_streams_to_its_decode(tok):
    """Random ids: special tokens (skipped), lone bytes of characters, invalid UTF-8 included."""
    for seed in range(60):
        r = random.Random(seed)
        ids = [r.randrange(len(tok)) for _ in range(r.randrange(1, 40))]
        assert "".join(_streamed(tok, ids)) == tok.decode(ids, skip_special_tokens=True), ids


class _Counting:
    """A tokenizer proxy that counts the tokens `decode` is given."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def __len__(self):
        return len(self.tok)

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


def test_decoding_is_incremental(tok):
    """Each new token decodes a short window, not the whole sequence again (which is O(n^2))."""
    ids = tok(TEXT * 20, add_special_tokens=False)["input_ids"]
    counting = _Counting(tok)
    assert "".join(_streamed(counting, ids)) == TEXT * 20
    assert counting.decoded < 8 * len(ids)          # the whole sequence per token: ~len(ids)^2 / 2


class _Scripted:
    """A runner whose logits choose the scripted tokens, in order (per sequence)."""

    name, context = "scripted", None

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab, self.steps = script, vocab, {}

    def reserve(self, slots, max_len, kv_cache="fp", attention="zquant"):
        pass

    def forward(self, seqs):
        rows = torch.zeros(len(seqs), self.vocab)
        for i, (slot, _, _) in enumerate(seqs):
            n = self.steps[slot] = self.steps.get(slot, -1) + 1
            rows[i, self.script[n]] = 1.0
        return rows


def _generate(tok, script: list[int], **options):
    opts = GenerationOptions(**{"max_new_tokens": len(script), "ignore_eos": True, **options})
    gen = Generation(None, tok, [[5]], opts, runner=_Scripted(script, len(tok)), cached=[0])
    pieces = [piece for _, piece in gen.events()]
    return pieces, gen.results()[0]


def test_engine_streams_exactly_the_decoded_text(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    pieces, res = _generate(tok, ids)
    assert res.token_ids == ids and "".join(pieces) == res.text == tok.decode(ids, skip_special_tokens=True)


def test_engine_decodes_incrementally(tok):
    ids = tok(TEXT * 20, add_special_tokens=False)["input_ids"]
    counting = _Counting(tok)
    pieces, res = _generate(counting, ids)
    assert "".join(pieces) == res.text == TEXT * 20
    assert counting.decoded < 8 * len(ids)


@pytest.mark.parametrize("stop", ["東京", "🙂 —", "dog!"])
def test_engine_stops_at_a_stop_string_across_pieces(tok, stop):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    pieces, res = _generate(tok, ids, stop=("zzz", stop))
    assert res.finish_reason == "stop" and "".join(pieces) == res.text == TEXT[:TEXT.index(stop)]
