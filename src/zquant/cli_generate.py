"""`zquant generate` and `zquant chat`: the command-line face of `zquant.generate`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parsers(sub) -> None:
    g = sub.add_parser("generate", help="generate text (one prompt streams; several are one batch)")
    g.add_argument("model", help="MODEL (floating point) or a directory written by 'zquant quantize'")
    g.add_argument("--prompt", action="append", default=[], help="a prompt, repeatable (one batch)")
    g.add_argument("--prompt-file", default=None, help="a UTF-8 file with one prompt per line")
    g.add_argument("--json", action="store_true",
                   help="one JSON object per prompt, one per line, in input order")
    _sampling_options(g)
    c = sub.add_parser("chat", help="an interactive chat (the conversation stays in the cache); /reset, /exit")
    c.add_argument("model", help="a chat model: MODEL or a directory written by 'zquant quantize'")
    _sampling_options(c, chat=True)


def _sampling_options(p: argparse.ArgumentParser, chat: bool = False) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256 if chat else 128,
                   help=f"new tokens at most per {'reply' if chat else 'prompt'} (default {256 if chat else 128})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed that makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string, repeatable")
    p.add_argument("--kv-cache", choices=["fp", "int8"], default="fp",
                   help="KV cache storage: fp (default) or int8, one scale per token per head (a quarter of the "
                        "memory; fast path only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--path", choices=["auto", "fast", "general"], default="auto",
                   help="decode path: zquant's own step (fast), transformers (general), or auto (default)")
    if not chat:
        p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
        p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens (benchmarks)")
    p.add_argument("--quiet", action="store_true", help="no progress or speed lines on stderr")


def _options(args, chat: bool) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
                kv_cache=args.kv_cache, path=args.path, chat=chat,
                ignore_eos=getattr(args, "ignore_eos", False))


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError("give a prompt: --prompt TEXT or --prompt-file FILE")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty")
    return prompts


def _setup(args):
    import torch
    from .api import load, load_tokenizer
    from .generate import GenerationOptions
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    opts = _options(args, chat=getattr(args, "chat", False) or args.command == "chat")
    GenerationOptions(**opts)                  # validate before the slow load
    return load(args.model), load_tokenizer(args.model), opts


def _speed_line(results, prefill_s: float) -> str:
    prompt = sum(r.prompt_tokens for r in results)
    new = sum(r.new_tokens for r in results)
    decode_s = max(r.decode_s for r in results)
    rate = (new - len(results)) / decode_s if decode_s > 0 else 0.0
    return (f"zquant: {results[0].path} path: prefill {prompt} tokens at {prompt / prefill_s:.1f} tok/s, "
            f"decode {new} tokens at {rate:.1f} tok/s ({len(results)} sequence{'s' if len(results) > 1 else ''})")


def cmd_generate(args) -> int:
    from .generate import Generation, GenerationOptions
    prompts = _prompts(args)
    model, tokenizer, opts = _setup(args)
    gen = Generation(model, tokenizer, prompts, GenerationOptions(**opts))
    streaming = len(prompts) == 1 and not args.json
    for _, piece in gen.events():
        if streaming and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    results = gen.results()
    if streaming:
        sys.stdout.write("\n")
    elif args.json:
        for r in results:
            print(json.dumps(r.to_dict(), allow_nan=False))
    else:
        for i, r in enumerate(results):
            print(f"[{i}] {r.text}")
    if not args.quiet:
        print(_speed_line(results, gen.prefill_s), file=sys.stderr)
    return 0


def line_editing() -> bool:
    """Turn on line editing and history for input() (the readline module), where Python has it."""
    try:
        import readline  # noqa: F401  -- importing it is what makes input() use it
    except ImportError:
        return False
    return True


def _chat_turn(session, line: str, quiet: bool) -> None:
    """Stream the reply to ``line``. Ctrl-C cuts the reply short and the chat goes on; so does a
    conversation that has outgrown the context (the message says to /reset)."""
    from contextlib import closing
    from .config import ConfigError
    t0 = time.perf_counter()
    try:
        with closing(session.reply(line)) as pieces:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("(reply interrupted)", file=sys.stderr)
        return
    except ConfigError as e:
        print(f"zquant: error: {e}", file=sys.stderr)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not quiet:
        print(f"zquant: {session.last_new_tokens} tokens in {time.perf_counter() - t0:.2f} s", file=sys.stderr)


def cmd_chat(args) -> int:
    from .generate.chat import ChatSession
    model, tokenizer, opts = _setup(args)
    session = ChatSession(model, tokenizer, opts)
    line_editing()
    prompt = "> " if sys.stdin.isatty() else ""      # a piped conversation leaves only the replies on stdout
    print("zquant chat: /reset starts over, /exit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
        elif line:
            _chat_turn(session, line, args.quiet)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat}
