"""`zquant serve`: an OpenAI-compatible HTTP server for a zquant (or floating-point) model."""
from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path

EXTRA_HINT = "zquant serve needs the serve extra: pip install 'zquant[serve]'"


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP with OpenAI's API (continuous batching)")
    s.add_argument("model", help="a directory written by 'zquant quantize' (or a floating-point MODEL)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    s.add_argument("--model-name", default=None, help="the model's name in the API (default: the directory's name)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together, one cache slot each (8)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond that the answer is 503 (default 64)")
    s.add_argument("--kv-budget", type=int, default=16384,
                   help="KV cache tokens in all, split equally across the slots (default 16384); allocated at start")
    s.add_argument("--kv-cache", choices=["fp", "int8"], default="fp", help="KV cache storage (default fp)")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per step while others decode (default 256)")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    s.add_argument("--shutdown-timeout", type=int, default=10,
                   help="on SIGTERM, seconds to let running requests finish before cancelling them (default 10)")
    s.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")


def _check(args) -> None:
    positive = {"--max-batch": args.max_batch, "--kv-budget": args.kv_budget, "--prefill-chunk": args.prefill_chunk,
                "--max-body": args.max_body, "--request-timeout": args.request_timeout}
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if args.max_queue < 0 or args.shutdown_timeout < 0 or not 0 <= args.port <= 65535:
        raise ValueError("--max-queue and --shutdown-timeout must be >= 0 and --port in [0, 65535]")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("zquant: %(message)s"))
    for name in ("zquant.serve", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def cmd_serve(args) -> int:
    _check(args)
    try:
        import uvicorn
        from .serve import ServerConfig, create_app
        from .serve.scheduler import Scheduler
    except ImportError as e:
        raise ValueError(f"{EXTRA_HINT} ({e})") from None
    import torch
    from .api import load, load_tokenizer
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sock = _bind(args.host, args.port)                 # a busy port fails before the slow load
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    scheduler = Scheduler(model, tokenizer, args.max_batch, args.max_queue, args.kv_budget, args.prefill_chunk,
                          args.kv_cache, args.threads)
    name = args.model_name or Path(str(args.model).rstrip("/")).name
    config = ServerConfig(name, args.api_key, args.max_body, args.request_timeout)
    app = create_app(scheduler, tokenizer, config)
    _logging()
    host, port = sock.getsockname()[:2]
    print(f"zquant: serving {name} at http://{host if ':' not in host else f'[{host}]'}:{port} "
          f"({scheduler.runner.name} path, {scheduler.describe()})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    # uvicorn re-raises the signal that stopped it once it has shut down (so that a default handler
    # would kill the process): with these, a SIGTERM or Ctrl-C ends in a clean exit 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    server.run(sockets=[sock])
    print("zquant: server stopped", file=sys.stderr, flush=True)
    return 0


COMMANDS = {"serve": cmd_serve}
