"""One sequence being generated: its tokens, its text so far, and when it stops.

A `SequenceState` takes the logits after its last token, chooses the next one (with its own options
and random generator), and turns the tokens into text incrementally, holding back a tail that
could be the start of a stop string. It knows nothing of batches or caches: `Generation` (a batch
of prompts) and the server's scheduler (requests joining and leaving a running batch) both drive
sequences through a runner's ``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .detokenize import TextStream
from .options import GenerationOptions
from .sampling import next_token


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """The end-of-sequence token ids of the model's generation config and of the tokenizer."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


def seeded_generator(opts: GenerationOptions) -> torch.Generator | None:
    """The sequence's own random generator (None for greedy decoding)."""
    if opts.temperature == 0:
        return None
    g = torch.Generator()
    g.manual_seed(opts.seed if opts.seed is not None else torch.seed())
    return g


def greedy_choices(logits: torch.Tensor) -> list[int]:
    """Every row's argmax in one op (first index on ties, as a row's own argmax)."""
    return logits.argmax(-1).tolist()


def is_plain_greedy(opts: GenerationOptions) -> bool:
    """Whether the next token is the argmax of the logits as they are."""
    return opts.temperature == 0 and opts.repetition_penalty == 1


@dataclass
class SequenceState:
    slot: int
    prompt: list[int]
    opts: GenerationOptions
    eos: set[int]
    tokenizer: object = None
    generator: torch.Generator | None = None
    new: list[int] = field(default_factory=list)
    stream: TextStream | None = None     # the new tokens' text, decoded incrementally
    text: str = ""                       # the text so far (cut at a stop string)
    printed: int = 0                     # characters of text already handed out
    done: str | None = None              # "eos", "stop" or "length" once finished
    t_first: float = 0.0
    t_last: float = 0.0

    def __post_init__(self):
        if self.stream is None and self.tokenizer is not None:
            self.stream = TextStream(self.tokenizer)

    @property
    def length(self) -> int:
        """Tokens in the context: the prompt and the new tokens."""
        return len(self.prompt) + len(self.new)

    def next_input(self) -> tuple[int, int, list[int]]:
        """The decode step's entry for this sequence: (slot, position, [its last new token])."""
        return self.slot, self.length - 1, [self.new[-1]]

    def accept(self, logits: torch.Tensor, now: float, tok: int | None = None) -> str:
        """Choose (unless ``tok`` is given) and record the next token from float32 logits [V];
        returns the text it adds (maybe "")."""
        if tok is None:
            seen = torch.tensor(self.prompt + self.new, dtype=torch.long) if self.opts.repetition_penalty != 1 else None
            tok = next_token(logits, seen, self.opts, self.generator)
        self.t_first = self.t_first or now
        self.t_last = now
        if tok in self.eos:
            self.done = "eos"
            return self._text("")
        self.new.append(tok)
        if len(self.new) >= self.opts.max_new_tokens:
            self.done = "length"
        if self.tokenizer is None:                 # token ids in, token ids out
            return ""
        return self._text(self.stream.push(tok))

    def _text(self, piece: str) -> str:
        """Add ``piece`` (decoded text) to the text, stop at a stop string, and return what is
        ready to hand out: all of it once done, else all but a tail that could be the start of a
        stop string."""
        if self.done is not None and self.stream is not None:
            piece += self.stream.flush()
        searched = len(self.text)
        self.text += piece
        stops = [(at, stop) for stop in self.opts.stop
                 if (at := self.text.find(stop, max(0, searched - len(stop) + 1))) >= 0]
        if stops:                                  # a match ends in the new piece: the earliest wins
            self.text, self.done = self.text[:min(stops)[0]], "stop"
        ready = len(self.text)
        if self.done is None:
            ready = max(self.printed, ready - max((len(s) - 1 for s in self.opts.stop), default=0))
        out, self.printed = self.text[self.printed:ready], max(self.printed, ready)
        return out
