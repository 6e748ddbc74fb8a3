"""`zquant chat` end to end on a tiny quantized chat model: turns, /reset, /exit, EOF, streaming, line editing."""
from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time

import pytest

import zquant
from conftest import make_tiny, tiny_tokenizer
from zquant import cli_generate
from zquant.cli import main
from zquant.generate.sequence import SequenceState
from zquant.generate.chat import ChatSession

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}[SEP]{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TURNS = ["The quick brown fox", "jumps over"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, cpu_extension):
    """A tiny Llama with a chat template, quantized w8a8 by `zquant quantize`."""
    root = tmp_path_factory.mktemp("chat")
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    make_tiny("llama", vocab_size=300).save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    assert main(["quantize", str(root / "src"), "--scheme", "w8a8", "--out", str(root / "q"), "--quiet"]) == 0
    return root / "q"


def _expected(chat_dir, turns: list[str], n: int = 12) -> list[str]:
    """The replies a ChatSession gives on the same checkpoint."""
    session = ChatSession(zquant.load(chat_dir), zquant.load_tokenizer(chat_dir), dict(max_new_tokens=n))
    return ["".join(session.reply(t)) for t in turns]


class _Log(io.StringIO):
    """stdout that records each write, in order with the engine's token choices (see `_chat`)."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def write(self, s: str) -> int:
        self.events.append(("out", s))
        return super().write(s)


def _chat(monkeypatch, capsys, chat_dir, stdin: str, *options):
    events: list = []
    accept = SequenceState.accept                # called once per chosen token
    monkeypatch.setattr(SequenceState, "accept", lambda *a: events.append(("token",)) or accept(*a))
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    out = _Log(events)
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["chat", str(chat_dir), "--max-new-tokens", "12", *options])
    return code, out.getvalue(), capsys.readouterr().err, events


def test_chat_turns_reset_and_exit(chat_dir, monkeypatch, capsys):
    first, second = _expected(chat_dir, TURNS)
    stdin = f"{TURNS[0]}\n\n{TURNS[1]}\n/reset\n{TURNS[0]}\n/exit\nnever read\n"
    code, out, err, events = _chat(monkeypatch, capsys, chat_dir, stdin)
    assert code == 0
    # piped stdin: no prompts on stdout, only the replies; /reset started the conversation over
    assert out == f"{first}\n{second}\n{first}\n"
    assert err.count("tokens in") == 3 and "(conversation reset)" in err
    # streamed: the first reply's text is written piece by piece while its tokens are still being chosen
    first_reply = events[:events.index(("out", "\n"))]
    writes = [i for i, e in enumerate(first_reply) if e[0] == "out" and e[1]]
    assert len(writes) > 1 and writes[0] < max(i for i, e in enumerate(first_reply) if e == ("token",))


def test_chat_eof_exits_cleanly(chat_dir, monkeypatch, capsys):
    code, out, err, _ = _chat(monkeypatch, capsys, chat_dir, TURNS[0], "--quiet")     # no newline, then EOF
    assert code == 0 and out == _expected(chat_dir, TURNS[:1])[0] + "\n"
    assert "Traceback" not in err and err.endswith("\n")


def test_chat_without_readline_still_works(chat_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "readline", None)          # `import readline` raises ImportError
    assert cli_generate.line_editing() is False
    code, out, _, _ = _chat(monkeypatch, capsys, chat_dir, f"{TURNS[0]}\n/exit\n", "--quiet")
    assert code == 0 and out == _expected(chat_dir, TURNS[:1])[0] + "\n"


def test_chat_goes_on_after_the_context_is_full(chat_dir, monkeypatch, capsys):
    """A conversation that outgrows the context is one line; the chat goes on, and /reset works."""
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)      # > 128 tokens
    code, out, err, _ = _chat(monkeypatch, capsys, chat_dir, f"{long}\n/reset\n{TURNS[0]}\n", "--quiet")
    assert code == 0 and "context" in err and err.count("zquant: error:") == 1
    assert out == _expected(chat_dir, TURNS[:1])[0] + "\n"


def test_ctrl_c_cuts_a_reply_short_and_the_chat_goes_on(chat_dir, monkeypatch, capsys):
    calls = []
    accept = SequenceState.accept

    def interrupt_once(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return accept(*a)
    monkeypatch.setattr(SequenceState, "accept", interrupt_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{TURNS[0]}\n{TURNS[1]}\n"))
    code = main(["chat", str(chat_dir), "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert code == 0 and "(reply interrupted)" in err and err.count("tokens in") == 1
    assert out.count("\n") == 2


def test_an_interrupted_reply_keeps_the_conversation_consistent(chat_dir):
    session = ChatSession(zquant.load(chat_dir), zquant.load_tokenizer(chat_dir), dict(max_new_tokens=12))
    pieces = session.reply(TURNS[0])
    shown = next(pieces)
    pieces.close()                                   # what Ctrl-C in the middle of a reply does
    assert session.messages == [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": shown}]
    second = "".join(session.reply(TURNS[1]))
    ids = session.tokenizer.apply_chat_template(session.messages[:3], add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    assert second == zquant.generate(session.model, session.tokenizer, [ids], max_new_tokens=12)[0].text


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    """What the terminal shows until ``marker``, the child closing it, or ``timeout`` seconds."""
    seen, end = b"", time.monotonic() + timeout
    while marker not in seen and time.monotonic() < end:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:                          # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_chat_line_editing_on_a_terminal(chat_dir):
    """On a terminal, input goes through readline: Ctrl-A moves to the start of the line, so typing
    "xit", Ctrl-A, "/e" sends "/exit" (without readline it would be a message to the model)."""
    pytest.importorskip("readline")
    pty = pytest.importorskip("pty")
    try:
        master, slave = pty.openpty()
    except OSError as e:                             # a sandbox without pseudo-terminals
        pytest.skip(f"no pseudo-terminal: {e}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "zquant.cli", "chat", str(chat_dir), "--max-new-tokens", "4"],
                            stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    try:
        shown = _read_until(master, b"> ", timeout=120)
        assert b"> " in shown, shown
        os.write(master, b"xit\x01/e\r")
        shown = _read_until(master, b"tokens in", timeout=60)   # a reply, if the line went to the model
        if proc.poll() is None:
            os.write(master, b"\x04")                # leave with EOF
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert code == 0 and b"tokens in" not in shown, shown
