"""Incremental detokenization: the text of a growing token sequence, a few tokens' decode per step.

Decoding the whole sequence after every new token costs O(n) per token, O(n^2) per reply. Like
vLLM's incremental detokenizer (and tokenizers' ``DecodeStream``), `TextStream` decodes only a
short window: the tokens of the last released piece (left context, so that a SentencePiece
``▁word`` or a byte-level BPE space decodes as it does mid-sequence) plus the tokens since. The new
text is the window's text past its left context's. Text ending in U+FFFD (the bytes of a
multi-byte character split across tokens, not all there yet) is held back until the character is
complete, or until `flush` at the end of the sequence. So is a SentencePiece byte-fallback token
(``<0xNN>``): its decoder turns a whole run of byte tokens into U+FFFDs when the run is not valid
UTF-8, so a byte that completes a character now can still be rewritten by the next byte token
(skipped special tokens between them included).

The pieces concatenate to ``tokenizer.decode(ids, skip_special_tokens=...)`` for the byte-level
BPE and SentencePiece (byte-fallback) decoders (tested). A tokenizer that rewrites text across
token boundaries (``clean_up_tokenization_spaces=True``, off by default in transformers) can
differ from a whole decode at a boundary.
"""
from __future__ import annotations

import re

_INCOMPLETE = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TextStream:
    """Feed token ids one at a time with `push`; each call returns the text they complete."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0              # the window starts here: ids[prefix:read] is its left context
        self.read = 0                # ids[:read] are released as text
        self.prefix_text = ""        # decode(ids[prefix:read])
        self._piece = getattr(tokenizer, "convert_ids_to_tokens", None)
        self._skipped = frozenset(getattr(tokenizer, "all_special_ids", ()) if skip_special_tokens else ())

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """Add one token; returns the text it (with held-back tokens before it) completes, maybe ""."""
        token = int(token)
        self.ids.append(token)
        if token in self._skipped or (self._piece and _BYTE_TOKEN.fullmatch(str(self._piece(token)))):
            return ""                # no text of its own, or a byte-fallback run that may go on
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the sequence included)."""
        return self._release(final=True) if self.read < len(self.ids) else ""

    def _release(self, final: bool) -> str:
        text = self._decode(self.ids[self.prefix:])
        if not final and (len(text) <= len(self.prefix_text) or text.endswith(_INCOMPLETE)):
            return ""                # nothing new yet, or a character still incomplete
        # (A decoder that rewrote the left context, see the module docstring, cannot take back what
        # was released: the new text is what follows the context's length.)
        piece = text[len(self.prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = self._decode(self.ids[self.prefix:self.read])
        return piece
