"""Command line: parse into configs, call the library, print. Errors are one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

EXIT_ERROR = 2


def _schemes(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_scheme_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--override", action="append", default=[], metavar="RULE",
                   help="per-module override by name pattern, repeatable: 'PATTERN=fp' keeps layers in floating "
                        "point, 'PATTERN:bits=4,groups=32,act=none' changes them (keys: bits, granularity, groups, "
                        "group_size, act, symmetric)")
    p.add_argument("--groups", type=int, help="number of output-row groups (default: 64 decoders, 48 encoders)")
    p.add_argument("--granularity", choices=["row_group", "row", "input_group"],
                   help="weight scale layout (default row_group, ZeroQuant's)")
    p.add_argument("--group-size", type=int, help="input-column group size for --granularity input_group")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric token-wise activations")
    p.add_argument("--calib-text", default=None, help="calibration text for static schemes (default: technical)")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ppl", metavar="FILE", default=None,
                   help="decoders: perplexity text, a UTF-8 file or a packaged name (default: wiki)")
    p.add_argument("--max-tokens", type=int, default=32768, help="decoders: token budget (default 32768; 0 = all)")
    p.add_argument("--window", type=int, default=1024, help="decoders: perplexity window (default 1024)")
    p.add_argument("--sentiment", action="store_true",
                   help="encoders: sentiment accuracy and cosine (always on for encoders; accepted for clarity)")
    p.add_argument("--max-examples", type=int, default=None, help="encoders: use a subset of the sentiment data")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zquant", description="ZeroQuant post-training quantization for "
                                     "Hugging Face transformers.")
    parser.add_argument("--version", action="version", version=f"zquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="model directory, .gguf file, or built-in name (smollm2-135m, minilm-l6)")
    q.add_argument("--scheme", required=True, help="preset: w8a8, w8a8-static, w8a16, w4/8a16, w4/8a8")
    q.add_argument("--out", default=None, help="output directory (default: out/MODEL-SCHEME)")
    q.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _add_scheme_options(q)

    e = sub.add_parser("eval", help="evaluate a floating-point model or a quantized directory")
    e.add_argument("model", help="MODEL (floating point) or a directory written by 'zquant quantize'")
    e.add_argument("--reference", default=None,
                   help="encoders: the floating-point model to compare with (default: the checkpoint's source)")
    _eval_options(e)

    c = sub.add_parser("compare", help="floating point and each scheme, evaluated in one run")
    c.add_argument("model")
    c.add_argument("--schemes", type=_schemes, default=["w8a8-static", "w8a8", "w8a16", "w4/8a16", "w4/8a8"],
                   help="comma-separated presets (default: all)")
    c.add_argument("--save", metavar="DIR", default=None, help="also save each quantized model under DIR")
    _add_scheme_options(c)
    _eval_options(c)
    return parser


def _config(args, scheme: str):
    import dataclasses
    from .config import Override, get_scheme
    config = get_scheme(scheme)
    changes = {}
    if args.groups is not None:
        changes["groups"] = args.groups
    if args.granularity is not None:
        changes["granularity"] = args.granularity
    if args.group_size is not None:
        changes["group_size"] = args.group_size
    if args.asymmetric:
        changes["symmetric"] = False
    overrides = [Override(pattern="*", **changes)] if changes else []
    overrides += [Override.parse(o) for o in args.override]
    return dataclasses.replace(config, overrides=config.overrides + tuple(overrides))


def _eval_opts(args):
    from .data import DEFAULT_EVAL_TEXT
    from .evaluate import EvalOptions
    return EvalOptions(text=args.ppl or DEFAULT_EVAL_TEXT, max_tokens=args.max_tokens or None, window=args.window,
                       max_examples=args.max_examples, quiet=args.quiet)


def _log(args):
    return (lambda s: None) if args.quiet else (lambda s: print(f"zquant: {s}", file=sys.stderr, flush=True))


def _quantize_fn(args, tokenizer):
    from .api import quantize
    from .data import DEFAULT_CALIB_TEXT
    calib = args.calib_text or DEFAULT_CALIB_TEXT
    return lambda model, scheme: quantize(model, _config(args, scheme), tokenizer=tokenizer, calib_text=calib)


def cmd_quantize(args) -> int:
    from .api import load, load_tokenizer, save
    config = _config(args, args.scheme)        # validate before the slow load
    log = _log(args)
    log(f"loading {args.model}")
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    log(f"quantizing with {config.name}")
    model = _quantize_fn(args, tokenizer)(model, args.scheme)
    model.zquant_info["source"] = str(args.model)
    out = Path(args.out or f"out/{Path(str(args.model)).stem}-{config.name.replace('/', '_')}")
    save(model, out, tokenizer)
    print(out)
    return 0


def _reference_model(args, path: str):
    """The floating-point model an encoder checkpoint is compared with."""
    from .api import load
    from . import io
    if args.reference:
        return load(args.reference)
    if io.is_checkpoint(path):
        source = io.read_meta(path).get("source")
        if not source:
            raise ValueError(f"{path} does not record its floating-point source: pass --reference MODEL")
        return load(source)
    return None


def cmd_eval(args) -> int:
    from .api import load, load_tokenizer
    from .evaluate import EncoderReference, evaluate
    from .models import get_adapter
    opts = _eval_opts(args)
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    reference = None
    if get_adapter(model).kind == "encoder":
        fp = _reference_model(args, args.model) or model
        reference = EncoderReference.build(fp, tokenizer, opts)
    result = evaluate(model, tokenizer, opts, reference, label=Path(str(args.model)).name)
    result["model"] = str(args.model)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")
    return 0


def cmd_compare(args) -> int:
    from .api import load, load_tokenizer
    from .evaluate import compare, format_table
    for scheme in args.schemes:
        _config(args, scheme)                  # validate every scheme before the slow work
    log = _log(args)
    log(f"loading {args.model}")
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    quantize_fn = _quantize_fn(args, tokenizer)

    def quantize_and_record(m, scheme):
        m = quantize_fn(m, scheme)
        m.zquant_info["source"] = str(args.model)
        return m

    rows = compare(model, tokenizer, args.schemes, _eval_opts(args), quantize_and_record, args.save, log)
    if args.json:
        print(json.dumps({"model": str(args.model), "rows": rows}))
    else:
        print(format_table(rows))
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("zquant: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, KeyError) as e:
        # One clear line: every error zquant raises on bad input is a ValueError/OSError subclass
        # with a message that names the problem. Set ZQUANT_DEBUG=1 for the traceback.
        import os
        if os.environ.get("ZQUANT_DEBUG"):
            raise
        print(f"zquant: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
