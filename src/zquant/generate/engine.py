"""`generate` and `stream`: prompts in, text out, on the fast path where the model allows it.

A run tokenizes the prompts (through the chat template with ``chat=True``), reserves one cache
slot per prompt, prefills all prompts in one step, then decodes every unfinished sequence one
token per step until each stops on its own (EOS, a stop string, or ``max_new_tokens``).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..config import ConfigError
from . import fast
from .general import GeneralRunner
from .options import GenerationOptions
from .sequence import SequenceState
from .sequence import eos_ids, greedy_choices, is_plain_greedy, seeded_generator

_noted: set[str] = set()
_RUNNER_ATTR = "_zquant_fast_runner"           # in the model's __dict__: not a submodule, never saved


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]                 # the new tokens
    prompt_tokens: int
    finish_reason: str = "length"        # "length", "eos" or "stop"
    prefill_s: float = 0.0               # the batch's prefill (all prompts, one step)
    decode_s: float = 0.0                # from this sequence's first new token to its last
    path: str = "fast"

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "finish_reason": self.finish_reason,
                "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
                "path": self.path}


def runner_for(model: nn.Module, path: str = "auto", shared: bool = True):
    """The fast runner when the model allows it (``path="auto"`` notes once when it does not). A
    model keeps one shared fast runner (packed layers, KV cache) between calls while its weights
    are the same; ``shared=False`` gives a runner of one's own (a chat's cache must not be reused)."""
    if path == "general":
        return GeneralRunner(model)
    kept = model.__dict__.get(_RUNNER_ATTR)
    if shared and kept is not None and kept.current():
        return kept
    reason = fast.unsupported_reason(model)
    if reason is None:
        runner = fast.FastRunner(model)
        if shared:
            model.__dict__[_RUNNER_ATTR] = runner
        return runner
    if path == "fast":
        raise ConfigError(f"the fast decode path cannot run this model: {reason}")
    if reason not in _noted:
        _noted.add(reason)
        warnings.warn(f"zquant: generating on the general (transformers) path, because {reason}", UserWarning,
                      stacklevel=3)
    return GeneralRunner(model)


def encode_prompts(tokenizer, prompts: Sequence[str | Sequence[int]], chat: bool) -> list[list[int]]:
    """Token ids per prompt: a string is tokenized (chat-templated with ``chat``), ids pass through."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings or token-id lists, not a single string")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat needs a chat model: this tokenizer has no chat template")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ConfigError("text prompts need the tokenizer (or pass token-id lists)")
            if chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
            else:
                ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ConfigError(f"prompt {len(out)} is empty")
        out.append(list(ids))
    return out


class Generation:
    """One batch of prompts being generated: iterate `events()` for (index, text piece) as they come."""

    def __init__(self, model: nn.Module, tokenizer, prompts, opts: GenerationOptions, runner=None,
                 cached: Sequence[int] | None = None):
        """``runner`` and ``cached``: continue in a runner whose cache slot i already holds the
        first ``cached[i]`` tokens of prompt i (a chat); otherwise a new runner and cache."""
        self.model, self.tokenizer, self.opts = model, tokenizer, opts
        if tokenizer is None and (opts.stop or opts.chat):
            raise ConfigError("stop strings and chat need the tokenizer")
        ids = encode_prompts(tokenizer, prompts, opts.chat)
        self.runner = runner or runner_for(model, opts.path)
        self.cached = list(cached) if cached is not None else [0] * len(ids)
        context = self.runner.context
        for i, p in enumerate(ids):
            if context and len(p) + opts.max_new_tokens > context:
                raise ConfigError(f"prompt {i}: {len(p)} tokens + {opts.max_new_tokens} new exceed the model's "
                                  f"context of {context}")
        eos = set() if opts.ignore_eos else eos_ids(model, tokenizer)
        self.seqs = [SequenceState(i, p, opts, eos, tokenizer, seeded_generator(opts)) for i, p in enumerate(ids)]
        if runner is None:
            self.runner.reserve(len(ids), max(len(p) for p in ids) + opts.max_new_tokens, opts.kv_cache,
                                opts.attention)
        self.prefill_s = 0.0

    def _accept_all(self, seqs: list[SequenceState], logits: torch.Tensor, now: float) -> Iterator[tuple[int, str]]:
        choices = greedy_choices(logits) if is_plain_greedy(self.opts) else [None] * len(seqs)
        for s, row, tok in zip(seqs, logits, choices):
            yield s.slot, s.accept(row, now, tok)

    def events(self) -> Iterator[tuple[int, str]]:
        """(prompt index, new text) as tokens are produced."""
        t0 = time.perf_counter()
        logits = self.runner.forward([(s.slot, c, s.prompt[c:]) for s, c in zip(self.seqs, self.cached)])
        now = time.perf_counter()
        self.prefill_s = now - t0
        yield from self._accept_all(self.seqs, logits, now)
        while True:
            active = [s for s in self.seqs if s.done is None]
            if not active:
                return
            logits = self.runner.forward([s.next_input() for s in active])
            yield from self._accept_all(active, logits, time.perf_counter())

    def results(self) -> list[GenerationResult]:
        return [GenerationResult(s.text, list(s.new), len(s.prompt), s.done or "length", self.prefill_s,
                                 s.t_last - s.t_first, self.runner.name) for s in self.seqs]


def _options(options: dict) -> GenerationOptions:
    if "stop" in options and isinstance(options["stop"], str):
        options = {**options, "stop": (options["stop"],)}
    elif "stop" in options:
        options = {**options, "stop": tuple(options["stop"])}
    return GenerationOptions(**options)


def generate(model: nn.Module, tokenizer, prompts: Sequence[str | Sequence[int]], **options) -> list[GenerationResult]:
    """Generate for each prompt (generated together as one batch); options: see `GenerationOptions`."""
    gen = Generation(model, tokenizer, prompts, _options(options))
    for _ in gen.events():
        pass
    return gen.results()


def stream(model: nn.Module, tokenizer, prompt: str | Sequence[int], **options) -> Iterator[str]:
    """The text of one prompt's continuation, piece by piece as it is generated."""
    gen = Generation(model, tokenizer, [prompt], _options(options))
    for _, piece in gen.events():
        if piece:
            yield piece
