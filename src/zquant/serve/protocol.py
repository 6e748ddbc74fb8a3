"""OpenAI's request and response shapes: a request body in, a validated `Job` out; objects back.

Parsing is strict where the API is: a field of the wrong type, a value out of range or an option
zquant does not implement (``n`` > 1, logprobs, penalties, tools...) is an `APIError` naming the
field, never silently ignored. Fields the API does not define are ignored, as OpenAI-compatible
servers do (clients send vendor extensions). ``ignore_eos`` is accepted as vLLM and llama-server
accept it (generate exactly ``max_tokens``; benchmarks use it).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..generate.options import GenerationOptions

MAX_STOPS = 4                         # OpenAI's limit on stop strings
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
CHAT_ROLES = ("system", "developer", "user", "assistant")
# options zquant does not implement, with the values that mean "not used"
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty":
                (None, 0), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                "function_call": (None, "none")}


class APIError(Exception):
    """An error answered with an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """A validated completion request."""
    chat: bool
    prompt: list[int]
    opts: GenerationOptions
    stream: bool
    include_usage: bool
    model: str


def _field(body: dict, name: str, types: tuple, default=None):
    """body[name] when it has one of ``types`` (bool is not a number here), ``default`` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    numeric = any(t in (int, float) for t in types)
    if not isinstance(value, types) or (numeric and isinstance(value, bool) and bool not in types):
        names = " or ".join("number" if t is float else {int: "integer", str: "string", bool: "boolean", list: "array",
                                                          dict: "object"}[t] for t in types)
        raise APIError(400, f"{name} must be {'an' if names[0] in 'aeiou' else 'a'} {names}, got "
                            f"{type(value).__name__} {value!r}"[:300], param=name, code="invalid_type")
    return value


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise APIError(400, message, param=name, code="invalid_value")


def _stops(body: dict) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list), ())
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    _check(len(stops) <= MAX_STOPS, "stop", f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    _check(all(isinstance(s, str) and s for s in stops), "stop", "stop must be a non-empty string or a list of them")
    return stops


def _refuse_unsupported(body: dict) -> None:
    for name, unused in _UNSUPPORTED.items():
        if name in body and body[name] not in unused:
            raise APIError(400, f"{name} is not supported by zquant serve", param=name, code="unsupported")
    n = _field(body, "n", (int,), 1)
    _check(n == 1, "n", f"n must be 1 (zquant serve returns one choice per request), got {n}")
    fmt = _field(body, "response_format", (dict,), {"type": "text"})
    _check(fmt.get("type") == "text", "response_format", "response_format other than text is not supported")


def _sampling(body: dict) -> dict:
    temperature = _field(body, "temperature", (int, float), 1.0)
    _check(0 <= temperature <= 2, "temperature", f"temperature must be in [0, 2], got {temperature}")
    top_p = _field(body, "top_p", (int, float), 1.0)
    _check(0 < top_p <= 1, "top_p", f"top_p must be in (0, 1], got {top_p}")
    seed = _field(body, "seed", (int,))
    return dict(temperature=float(temperature), top_p=float(top_p), seed=seed, stop=_stops(body),
                ignore_eos=_field(body, "ignore_eos", (bool,), False))


def _stream_options(body: dict, stream: bool) -> bool:
    options = _field(body, "stream_options", (dict,))
    if options is None:
        return False
    _check(stream, "stream_options", "stream_options is only allowed with stream: true")
    return _field(options, "include_usage", (bool,), False)


def _max_tokens(body: dict, chat: bool, prompt_len: int, context: int) -> int:
    """The request's max_tokens, within the slot's context (chat's default: the rest of it)."""
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = _field(body, name, (int,))
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this server's context is {context} tokens per "
                            "request", param="messages" if chat else "prompt", code="context_length_exceeded")
    if value is None:
        return room if chat else min(16, room)
    _check(value >= 1, name, f"{name} must be at least 1, got {value}")
    if value > room:
        raise APIError(400, f"this server's context is {context} tokens per request; you asked for {value + prompt_len}"
                            f" ({prompt_len} in the prompt, {value} in the completion)", param=name,
                       code="context_length_exceeded")
    return value


def _completion_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                                    # a batch of one
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        _check(all(0 <= t < vocab for t in prompt), "prompt", f"token ids must be in [0, {vocab})")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "one prompt per request (a list of prompts is not supported)", param="prompt",
                       code="unsupported")
    else:
        raise APIError(400, "prompt must be a string or a list of token ids", param="prompt", code="invalid_type")
    _check(bool(ids), "prompt", "prompt is empty")
    return ids


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(
            p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}]",
                   code="invalid_type")


def _chat_prompt(body: dict, tokenizer) -> list[int]:
    messages = _field(body, "messages", (list,))
    _check(bool(messages), "messages", "messages must be a non-empty array")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise APIError(400, f"messages[{i}] must be an object with role one of {', '.join(CHAT_ROLES)}",
                           param=f"messages[{i}]", code="invalid_value")
        role = "system" if m["role"] == "developer" else m["role"]
        rendered.append({"role": role, "content": _content(m, i)})
    try:
        ids = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:                       # a template's own check (roles must alternate, ...)
        raise APIError(400, f"the chat template refused these messages: {e}"[:500], param="messages") from None
    return list(ids)


def parse(body, chat: bool, model_name: str, tokenizer, context: int) -> Job:
    """Validate a decoded JSON body of /v1/completions (``chat`` False) or /v1/chat/completions."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    model = _field(body, "model", (str,))
    if model is None:
        raise APIError(400, "model is required", param="model", code="missing")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", param="model",
                       code="model_not_found")
    _refuse_unsupported(body)
    stream = _field(body, "stream", (bool,), False)
    include_usage = _stream_options(body, stream)
    sampling = _sampling(body)
    prompt = _chat_prompt(body, tokenizer) if chat else _completion_prompt(body, tokenizer)
    max_tokens = _max_tokens(body, chat, len(prompt), context)
    return Job(chat, prompt, GenerationOptions(max_new_tokens=max_tokens, **sampling), stream, include_usage, model)


# -- responses ---------------------------------------------------------------------------------------


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(job: Job, rid: str, created: int, chunk: bool) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.chat else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": job.model}


def response(job: Job, rid: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The whole (non-streaming) response."""
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if job.chat
              else {"index": 0, "text": text})
    choice.update(logprobs=None, finish_reason=finish)
    return {**_envelope(job, rid, int(time.time()), False), "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(job: Job, rid: str, created: int, text: str | None = None, finish: str | None = None,
          role: bool = False) -> dict:
    """One streamed chunk: a piece of text, the assistant role (chat's first chunk) or the finish."""
    if job.chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice.update(logprobs=None, finish_reason=finish)
    return {**_envelope(job, rid, created, True), "choices": [choice]}


def usage_chunk(job: Job, rid: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
    return {**_envelope(job, rid, created, True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def model_list(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "zquant"}]}
