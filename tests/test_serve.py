"""`zquant serve` for real: a live server on a random localhost port, the official `openai` client.

The server runs as its own process (`python -m zquant serve`), as users run it, on a tiny
quantized Llama with a chat template; SmolLM2 is served in the slow test.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

import zquant  # noqa: E402
from conftest import make_tiny, tiny_tokenizer  # noqa: E402
from zquant.cli import main  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}[SEP]{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
KEY = "sekrit-key"


class Server:
    """`zquant serve DIR --port 0 ...` in a subprocess; the URL from its first line."""

    def __init__(self, model_dir, *options: str, name: str = "tiny"):
        self.proc = subprocess.Popen([sys.executable, "-m", "zquant", "serve", str(model_dir), "--port", "0",
                                      "--model-name", name, "--threads", "1", *options],
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"server exited: {''.join(self.lines)}")
            self.lines.append(line)
            m = re.search(r"serving \S+ at http://([\d.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                break
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        for _ in range(200):
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server never became healthy")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def client(self, key: str = KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def request(self, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None):
        """(status, headers, body bytes) of one plain HTTP request."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        r = conn.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        conn.close()
        return out

    def metric(self, name: str) -> float:
        text = self.request("GET", "/metrics")[2].decode()
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.lines += self.proc.stderr.readlines()
        return code


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cpu_extension):
    root = tmp_path_factory.mktemp("serve")
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    model = make_tiny("llama", vocab_size=300)
    model.config.max_position_embeddings = 4096          # room for generations long enough to interrupt
    model.save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    assert main(["quantize", str(root / "src"), "--scheme", "w8a8", "--out", str(root / "q"), "--quiet"]) == 0
    return root / "q"


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--api-key", KEY, "--max-batch", "4", "--kv-budget", "16384", "--max-queue", "16",
               "--prefill-chunk", "8")
    yield s
    s.stop()


def _expected(model_dir, prompt_ids: list[int], n: int) -> str:
    """The text `zquant.generate` gives alone (greedy, EOS ignored as the requests below ask)."""
    model, tok = zquant.load(model_dir), zquant.load_tokenizer(model_dir)
    return zquant.generate(model, tok, [prompt_ids], max_new_tokens=n, ignore_eos=True)[0].text


def test_completions_and_chat_match_generate(server, model_dir):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    tok = zquant.load_tokenizer(model_dir)
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = tok(prompt)["input_ids"]
    assert r.choices[0].text == _expected(model_dir, ids, 10)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    messages = [{"role": "user", "content": "jumps over"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    c = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == _expected(model_dir, chat_ids, 7)
    assert c.usage.prompt_tokens == len(chat_ids) and c.usage.completion_tokens == 7


def test_streaming_pieces_add_up_to_the_whole_answer(server):
    client = server.client()
    kw = dict(model="tiny", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(messages=[{"role": "user", "content": "The lazy dog"}], **kw)
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "The lazy dog"}], stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    pieces = list(client.completions.create(prompt="The lazy dog", stream=True, **kw))
    assert len(pieces) > 2 and pieces[-1].choices[0].finish_reason == "length"


def test_stop_string_and_sampling_seed(server):
    client = server.client()
    base = client.completions.create(model="tiny", prompt="The quick", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[3:5]
    assert stop and base.find(stop) == 3
    cut = client.completions.create(model="tiny", prompt="The quick", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == base[:3] and cut.finish_reason == "stop"
    sampled = [client.completions.create(model="tiny", prompt="The quick", max_tokens=12, temperature=1.0, top_p=0.9,
                                         seed=s, extra_body={"ignore_eos": True}).choices[0].text for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_eight_concurrent_streams_each_equal_to_alone(server, model_dir):
    """Requests of different lengths join and leave a running batch (4 slots, so 4 also wait in
    the queue; prompts are prefilled in chunks of 8): each one's text is its text alone."""
    prompts = ["The quick brown fox jumps over the lazy dog. " * k for k in (1, 2, 3)] + ["dog", "fox", "The", "lazy",
                                                                                      "quick quick quick"]
    lengths = [5, 9, 13, 17, 21, 25, 29, 33]
    tok = zquant.load_tokenizer(model_dir)

    def one(i: int) -> str:
        stream = server.client().completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream if c.choices)
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    for i, text in enumerate(texts):
        assert text == _expected(model_dir, tok(prompts[i])["input_ids"], lengths[i]), i


def test_disconnect_mid_stream_frees_the_slot(server):
    before = server.metric("zquant_generated_tokens_total")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = {"model": "tiny", "prompt": "The quick", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    assert server.metric("zquant_batch_size") == 1
    conn.sock.shutdown(2)
    conn.close()
    for _ in range(200):
        if server.metric("zquant_batch_size") == 0:
            break
        time.sleep(0.02)
    assert server.metric("zquant_batch_size") == 0 and server.metric("zquant_queue_depth") == 0
    # stopped when the client left, far from its 4,000 tokens
    assert server.metric("zquant_generated_tokens_total") - before < 2000
    r = server.client().completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


BAD = [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe{}", "invalid_encoding"),
    ({"model": "tiny", "prompt": 5}, "invalid_type"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "8"}, "invalid_type"),
    ({"model": "tiny", "prompt": "x", "max_tokens": True}, "invalid_type"),
    ({"model": "gpt-4", "prompt": "x"}, "model_not_found"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "invalid_value"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, "context_length_exceeded"),
    ({"model": "tiny", "prompt": "fox " * 5000}, "context_length_exceeded"),
    ({"model": "tiny", "prompt": "x", "temperature": -0.5}, "invalid_value"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "invalid_value"),
    ({"model": "tiny", "prompt": "x", "top_p": 1.5}, "invalid_value"),
    ({"model": "tiny", "prompt": "x", "n": 2}, "invalid_value"),
    ({"model": "tiny", "prompt": "x", "logprobs": 2}, "unsupported"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "unsupported"),
    ({"prompt": "x"}, "missing"),
    ([1, 2], "invalid_type"),
]


@pytest.mark.parametrize("body,code", BAD, ids=[c + str(i) for i, (_, c) in enumerate(BAD)])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, body, code):
    status, _, data = server.request("POST", "/v1/completions", body)
    err = json.loads(data)["error"]
    assert 400 <= status < 500 and err["code"] == code and err["message"]
    chat = {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}
    assert server.request("POST", "/v1/chat/completions", chat)[0] == 400
    assert server.request("GET", "/health")[0] == 200


def test_limits_auth_and_unknown_paths(server):
    big = json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)}).encode()
    assert server.request("POST", "/v1/completions", big)[0] == 413
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        status, _, data = server.request("GET", "/v1/models", headers=headers)
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="nope").models.list()
    assert server.request("GET", "/health", headers={"Authorization": ""})[0] == 200   # outside /v1: open
    assert server.request("GET", "/v1/nothing")[0] == 404
    assert server.request("GET", "/v1/completions")[0] == 405
    assert "zquant_requests_total" in server.request("GET", "/metrics")[2].decode()


def test_full_server_answers_503_with_retry_after(model_dir):
    s = Server(model_dir, "--max-batch", "1", "--max-queue", "0", "--kv-budget", "4096")
    try:
        conn = http.client.HTTPConnection(s.host, s.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 4000,
                                                            "stream": True, "ignore_eos": True}))
        assert conn.getresponse().status == 200
        status, headers, data = s.request("POST", "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 503 and headers.get("retry-after") == "1"
        assert json.loads(data)["error"]["code"] == "server_busy"
        conn.close()
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_running_requests_and_exits_0(model_dir):
    s = Server(model_dir, "--shutdown-timeout", "20", "--max-batch", "1", "--kv-budget", "4096")
    try:
        _sigterm_while_generating(s)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def _sigterm_while_generating(s: Server) -> None:
    conn = http.client.HTTPConnection(s.host, s.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 3000,
                                                        "stream": True, "ignore_eos": True}))
    r = conn.getresponse()
    assert r.status == 200
    t0 = time.time()
    s.proc.send_signal(signal.SIGTERM)
    data = r.read().decode()                       # the running request still ends in full
    assert data.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in data
    assert s.stop(timeout=30) == 0 and time.time() - t0 < 30
    assert any("server stopped" in line for line in s.lines)
    assert any(re.search(r"POST /v1/completions 200 \d+\+3000 tokens", line) for line in s.lines)


@pytest.mark.slow
def test_smollm2_chat_over_http(tmp_path):
    q = tmp_path / "smollm2-w8a8"
    assert main(["quantize", "smollm2-135m", "--scheme", "w8a8", "--out", str(q), "--quiet"]) == 0
    s = Server(q, "--max-batch", "2", "--kv-budget", "2048", name="smollm2")
    try:
        client = s.client()
        question = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2", messages=question, max_tokens=24, temperature=0)
        alone = zquant.generate(zquant.load(q), zquant.load_tokenizer(q), [question[0]["content"]], chat=True,
                                max_new_tokens=24)[0]
        assert r.choices[0].message.content == alone.text and "France" in alone.text
        assert r.usage.completion_tokens == alone.new_tokens
        pieces = client.chat.completions.create(model="smollm2", messages=question, max_tokens=24, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == r.choices[0].message.content
    finally:
        assert s.stop() == 0
