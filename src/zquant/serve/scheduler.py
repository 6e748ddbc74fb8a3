"""Continuous batching: one thread owns the model and runs one step at a time for every request.

Requests wait in a bounded queue until a cache slot is free; at each step boundary the waiting
ones join the running batch and the finished (or cancelled, or timed out) ones leave it and free
their slot. A step runs, in one ``runner.forward`` call, one new token for every sequence that is
decoding and up to ``prefill_chunk`` prompt tokens of the sequences still being prefilled (oldest
first), so a long prompt delays the others by one chunk's time per step, not by its whole prefill.

Memory: the KV cache is allocated once, at start, as ``max_batch`` slots of ``slot_len`` tokens
(the ``kv_budget`` in tokens split equally, as llama-server splits ``-c`` across ``-np`` slots);
it never grows. A request must fit in one slot (prompt + ``max_tokens``).

Each request's tokens depend only on its own prompt and options: every row of a step is computed
independently of the others (zquant's step runner and head kernel are batch-invariant, and a
prompt prefilled in chunks attends exactly as one prefilled at once), and sampling draws from the
request's own seeded generator. The scheduler talks to the asyncio side through `Handle`: the
thread posts events with ``loop.call_soon_threadsafe``, the server cancels with `Handle.cancel`.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..generate import runner_for
from ..generate.options import GenerationOptions
from ..generate.sequence import SequenceState, eos_ids, greedy_choices, is_plain_greedy, seeded_generator

RATE_WINDOW_S = 10.0          # the tokens/s gauge counts the tokens of the last this many seconds


class ServerBusy(Exception):
    """The queue is full or the server is shutting down: answer 503 with Retry-After."""


@dataclass
class Event:
    kind: str                     # "text", "end" or "error"
    text: str = ""
    finish_reason: str | None = None   # "stop" or "length" (OpenAI's names), with "end"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 0               # with "error": the HTTP status it stands for
    message: str = ""


@dataclass
class Handle:
    """A submitted request, as the asyncio side sees it: an event queue and a way to cancel."""
    prompt: list[int]
    opts: GenerationOptions
    deadline: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    first_token_s: float | None = None      # time to first token, once there is one

    def cancel(self) -> None:
        """Stop generating (the client went away): the slot is freed at the next step boundary."""
        self.cancelled = True

    def post(self, event: Event) -> None:
        """Called on the scheduler thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Running:
    handle: Handle
    seq: SequenceState
    prefilled: int = 0            # prompt tokens in the cache so far


class Scheduler:
    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 kv_budget: int = 16384, prefill_chunk: int = 256, kv_cache: str = "fp", threads: int | None = None,
                 on_first_token=None):
        self.model, self.tokenizer = model, tokenizer
        self.runner = runner_for(model, "auto", shared=False)
        context = self.runner.context or kv_budget
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.slot_len = min(context, kv_budget // max_batch)
        if self.slot_len < 2:
            raise ValueError(f"--kv-budget {kv_budget} gives {max_batch} slots of {self.slot_len} tokens: too small")
        self.kv_cache = kv_cache
        self.runner.reserve(max_batch, self.slot_len, kv_cache)
        self.eos = eos_ids(model, tokenizer)
        self.threads, self.on_first_token = threads, on_first_token
        self._cond = threading.Condition()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._running: list[_Running] = []
        self._free = list(range(max_batch))[::-1]
        self._accepting = True
        self._stop = False
        self._recent: collections.deque[tuple[float, int]] = collections.deque()   # (time, tokens) per step
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self._thread = threading.Thread(target=self._loop, name="zquant-scheduler", daemon=True)

    def kv_cache_bytes(self, kv_cache: str) -> int:
        """The KV cache's size: every slot's keys and values, each layer."""
        c = self.model.config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        per_token = 2 * c.num_hidden_layers * heads * (head_dim + 4 if kv_cache == "int8" else 4 * head_dim)
        return self.max_batch * self.slot_len * per_token

    def describe(self) -> str:
        return (f"{self.max_batch} slots x {self.slot_len:,} tokens, KV cache "
                f"{self.kv_cache_bytes(self.kv_cache) / 2**20:,.1f} MiB {self.kv_cache}")

    # -- the asyncio side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt: list[int], opts: GenerationOptions, timeout_s: float) -> Handle:
        handle = Handle(prompt, opts, time.perf_counter() + timeout_s, asyncio.get_running_loop())
        with self._cond:
            if not self._accepting:
                raise ServerBusy("the server is shutting down")
            if len(self._waiting) - len(self._free) >= self.max_queue:
                raise ServerBusy(f"the server is full ({self.max_batch} running, {len(self._waiting)} waiting)")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel everything still waiting or running and end the thread."""
        with self._cond:
            self._accepting, self._stop = False, True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._running)

    @property
    def tokens_in_cache(self) -> int:
        return sum(r.prefilled + len(r.seq.new) for r in list(self._running))

    def tokens_per_second(self) -> float:
        now = time.perf_counter()
        recent = [n for t, n in list(self._recent) if now - t <= RATE_WINDOW_S]
        return sum(recent) / RATE_WINDOW_S

    # -- the scheduler thread --------------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
                self._admit()
            self._retire_cancelled()
            if self._running:
                try:
                    self._step()
                except Exception as e:                   # a failed step fails its requests, not the server
                    for r in list(self._running):
                        self._finish(r, Event("error", status=500, message=f"generation failed: {e}"))
        self._cancel_all()

    def _admit(self) -> None:
        """Waiting requests take free slots, oldest first (called holding the lock)."""
        while self._waiting and self._free:
            handle = self._waiting.popleft()
            if handle.cancelled:
                continue
            seq = SequenceState(self._free.pop(), handle.prompt, handle.opts,
                                set() if handle.opts.ignore_eos else self.eos, self.tokenizer,
                                seeded_generator(handle.opts))
            self._running.append(_Running(handle, seq))

    def _retire_cancelled(self) -> None:
        now = time.perf_counter()
        with self._cond:
            for h in [h for h in self._waiting if h.cancelled or now > h.deadline]:
                self._waiting.remove(h)
                if not h.cancelled:
                    h.post(Event("error", status=504, message="the request timed out waiting for a slot"))
        for r in list(self._running):
            if r.handle.cancelled:
                self._finish(r, None)
            elif now > r.handle.deadline:
                self._finish(r, Event("error", status=504, message="the request timed out"))

    def _plan(self) -> tuple[list[tuple[int, int, list[int]]], list[_Running]]:
        """This step's entries, and the running requests whose next token it yields."""
        entries, choosing, budget = [], [], self.prefill_chunk
        for r in self._running:
            if r.prefilled == len(r.seq.prompt):
                entries.append(r.seq.next_input())
                choosing.append(r)
        for r in self._running:
            remaining = len(r.seq.prompt) - r.prefilled
            if remaining and budget > 0:
                n = min(remaining, budget)
                entries.append((r.seq.slot, r.prefilled, r.seq.prompt[r.prefilled:r.prefilled + n]))
                choosing.append(r if n == remaining else None)
                r.prefilled += n
                self.prompt_tokens += n
                budget -= n
        return entries, choosing

    def _step(self) -> None:
        entries, choosing = self._plan()
        logits = self.runner.forward(entries)
        now = time.perf_counter()
        greedy = greedy_choices(logits)
        produced = 0
        for r, row, tok in zip(choosing, logits, greedy):
            if r is None:                                # a prompt chunk that is not the prompt's last
                continue
            piece = r.seq.accept(row, now, tok if is_plain_greedy(r.seq.opts) else None)
            produced += 1
            if r.handle.first_token_s is None:
                r.handle.first_token_s = now - r.handle.arrived
                if self.on_first_token:
                    self.on_first_token(r.handle.first_token_s)
            if piece:
                r.handle.post(Event("text", piece))
            if r.seq.done is not None:
                reason = "length" if r.seq.done == "length" else "stop"
                self._finish(r, Event("end", finish_reason=reason, prompt_tokens=len(r.seq.prompt),
                                      completion_tokens=len(r.seq.new)))
        self.generated_tokens += produced
        self._recent.append((now, produced))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()

    def _finish(self, r: _Running, event: Event | None) -> None:
        """Take ``r`` out of the batch and free its slot (its cache rows are simply overwritten later)."""
        self._running.remove(r)
        with self._cond:
            self._free.append(r.seq.slot)
        if event is not None:
            r.handle.post(event)

    def _cancel_all(self) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for h in waiting:
            h.post(Event("error", status=503, message="the server is shutting down"))
        for r in list(self._running):
            self._finish(r, Event("error", status=503, message="the server is shutting down"))
