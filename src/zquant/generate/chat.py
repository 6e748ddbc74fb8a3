"""A chat session: the conversation stays in the KV cache between turns.

Each turn renders the whole conversation with the tokenizer's chat template; the tokens that
match what the cache already holds are kept, and only the rest (the new user message, and any
tail the template renders differently) is prefilled.
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

from ..config import ConfigError
from .engine import Generation, runner_for
from .options import GenerationOptions


class ChatSession:
    def __init__(self, model: nn.Module, tokenizer, options: dict):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat needs a chat model: this tokenizer has no chat template")
        self.model, self.tokenizer = model, tokenizer
        self.opts = GenerationOptions(**{**options, "chat": False})
        self.runner = runner_for(model, self.opts.path, shared=False)
        self.context = self.runner.context or 4096
        self.runner.reserve(1, self.context, self.opts.kv_cache, self.opts.attention)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        self.in_cache: list[int] = []          # the token ids the cache holds, in order
        self.last_new_tokens = 0
        self.last_reused = 0                   # prompt tokens of the last turn that the cache already held

    def _render(self) -> list[int]:
        return list(self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to the user's ``text``."""
        self.messages.append({"role": "user", "content": text})
        ids = self._render()
        keep = 0
        while keep < min(len(ids) - 1, len(self.in_cache)) and ids[keep] == self.in_cache[keep]:
            keep += 1
        if len(ids) + self.opts.max_new_tokens > self.context:
            self.messages.pop()
            raise ConfigError(f"the conversation ({len(ids)} tokens) would outgrow the model's context of "
                              f"{self.context}: /reset to start over")
        self.last_reused = keep
        gen = Generation(self.model, self.tokenizer, [ids], self.opts, runner=self.runner, cached=[keep])
        finished = False
        try:
            for _, piece in gen.events():
                if piece:
                    yield piece
            finished = True
        finally:                               # also when the reply is cut short (Ctrl-C, close())
            self._record(gen.seqs[0], ids, keep, finished)

    def _record(self, seq, ids: list[int], keep: int, finished: bool) -> None:
        """Add the assistant's reply to the conversation, and note what the cache now holds."""
        self.last_new_tokens = len(seq.new)
        if not finished:                       # the text handed out; the cache surely holds what was kept
            self.messages.append({"role": "assistant", "content": seq.text[:seq.printed]})
            self.in_cache = ids[:keep]
            return
        self.messages.append({"role": "assistant", "content": seq.text})
        # every new token but the last was fed back, and the last too when it was followed by EOS
        self.in_cache = ids + (seq.new if seq.done == "eos" else seq.new[:-1])
