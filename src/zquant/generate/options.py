"""Generation options: one frozen, self-validating value."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError

KV_CACHES = ("fp", "int8")
ATTENTIONS = ("zquant", "sdpa")
PATHS = ("auto", "fast", "general")


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0            # 0: greedy
    top_k: int = 0                      # 0: no top-k filter
    top_p: float = 1.0                  # 1: no nucleus filter
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()          # stop strings (not included in the text)
    ignore_eos: bool = False            # generate exactly max_new_tokens (benchmarks)
    chat: bool = False                  # wrap each prompt in the tokenizer's chat template
    kv_cache: str = "fp"                # "int8": one scale per token per head (fast path only)
    path: str = "auto"                  # "fast" (zquant's decode step), "general" (transformers), or auto
    attention: str = "zquant"           # fast path: zquant's kernel, or "sdpa" (bit-identical to the model's)

    def __post_init__(self):
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)
        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
              f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        check(math.isfinite(self.temperature) and self.temperature >= 0,
              f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0, got {self.top_k!r}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        check(self.kv_cache in KV_CACHES, f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        check(self.path in PATHS, f"path must be one of {', '.join(PATHS)}, got {self.path!r}")
        check(self.attention in ATTENTIONS,
              f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
