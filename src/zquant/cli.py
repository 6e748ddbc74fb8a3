"""Command line: parse into configs, call the library, print. Errors are one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .cli_options import (add_force, add_lkd_options, add_scheme_options, check_out, eval_options,
                          eval_opts, json_text, lkd_configs, scheme_config, schemes)

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zquant", description="ZeroQuant post-training quantization for "
                                     "Hugging Face transformers.")
    parser.add_argument("--version", action="version", version=f"zquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="model directory, .gguf file, or built-in name (smollm2-135m, minilm-l6)")
    q.add_argument("--scheme", required=True, help="preset: w8a8, w8a8-static, w8a16, w4/8a16, w4/8a8")
    q.add_argument("--out", default=None, help="output directory (default: out/MODEL-SCHEME)")
    add_force(q, "OUT")
    q.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_scheme_options(q)
    add_lkd_options(q)

    e = sub.add_parser("eval", help="evaluate a floating-point model or a quantized directory")
    e.add_argument("model", help="MODEL (floating point) or a directory written by 'zquant quantize'")
    e.add_argument("--reference", default=None,
                   help="encoders: the floating-point model to compare with (default: the checkpoint's source)")
    eval_options(e)

    c = sub.add_parser("compare", help="floating point and each scheme, evaluated in one run")
    c.add_argument("model")
    c.add_argument("--schemes", type=schemes, default=["w8a8-static", "w8a8", "w8a16", "w4/8a16", "w4/8a8"],
                   help="comma-separated presets (default: all)")
    c.add_argument("--save", metavar="DIR", default=None, help="also save each quantized model under DIR")
    add_force(c, "a DIR/SCHEME folder")
    c.add_argument("--report", metavar="DIR", default=None,
                   help="also write DIR/index.html: one self-contained page with the table, sizes, range plots and "
                        "per-layer SNR (measured on the --ppl text)")
    c.add_argument("--report-tokens", type=int, default=256, help="tokens of text the report measures (default 256)")
    add_scheme_options(c)
    eval_options(c)
    add_lkd_options(c, compare=True)

    i = sub.add_parser("inspect", help="activation / weight ranges and per-layer quantization error, as PNG + JSON")
    i.add_argument("model", help="MODEL (floating point), or a directory written by 'zquant quantize' (its per-layer "
                                 "error, and LKD before / after when it was distilled)")
    i.add_argument("--text", default=None, help="sample text: a UTF-8 file or a packaged name (default: wiki)")
    i.add_argument("--tokens", type=int, default=256, help="tokens of sample text (default 256)")
    i.add_argument("--out", default=None, help="output directory (default: out/inspect-MODEL)")
    add_force(i, "OUT")
    i.add_argument("--schemes", type=schemes, default=["w8a8"],
                   help="comma-separated presets whose per-layer SNR to measure (default w8a8; 'none' for none)")
    i.add_argument("--blocks", default="auto",
                   help="blocks to plot in detail: 'auto' (first, middle, last), 'all', or e.g. 0,5,11")
    i.add_argument("--reference", default=None,
                   help="for a quantized directory: its floating-point model (default: the recorded source)")
    i.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_scheme_options(i)
    from . import cli_generate, cli_serve
    cli_generate.add_parsers(sub)
    cli_serve.add_parser(sub)
    return parser


def _log(args):
    return (lambda s: None) if args.quiet else (lambda s: print(f"zquant: {s}", file=sys.stderr, flush=True))


def _quantize_fn(args, tokenizer, lkd_resume=lambda name: None):
    """``fn(model, name)`` quantizing with ``name``: a scheme, or a scheme plus an LKD suffix from
    `lkd_configs` (``w4/8a8+lkd``); ``lkd_resume(name)`` gives the LKD resume directory or None."""
    from .api import quantize
    from .data import DEFAULT_CALIB_TEXT
    calib = args.calib_text or DEFAULT_CALIB_TEXT
    variants = lkd_configs(args)

    def run(model, name):
        scheme, plus, suffix = name.partition("+")
        lkd = variants[plus + suffix] if plus else None
        return quantize(model, scheme_config(args, scheme), tokenizer=tokenizer, calib_text=calib, lkd=lkd,
                        lkd_resume=lkd_resume(name) if lkd else None, quiet=args.quiet)
    return run


def _with_source(model, source: str, sha: str):
    """``model`` with the MODEL argument it came from and that float model's fingerprint in its record."""
    import dataclasses
    if Path(source).expanduser().exists():    # a path, recorded absolute: it must not depend on the cwd
        source = str(Path(source).expanduser().resolve())
    model.zquant_info = dataclasses.replace(model.zquant_info, source=source, source_sha256=sha)
    return model


def cmd_quantize(args) -> int:
    from . import checkpoint
    from .api import load, load_tokenizer, save
    from .config import file_stem
    from .resume import check_target as resume_check_target
    from .sources import fingerprint
    config = scheme_config(args, args.scheme)        # validate before the slow load
    lkd = lkd_configs(args)
    if len(lkd) > 1:
        raise ValueError("quantize takes one --lkd-data")
    suffix = next(iter(lkd), "")
    out = Path(args.out or f"out/{Path(str(args.model)).stem}-{file_stem(config.name)}{'-lkd' if lkd else ''}")
    # By default an LKD run keeps its finished blocks next to OUT until the model is saved, so
    # running the same command again after an interruption resumes it.
    out = check_out(args, out, checkpoint.check_target)
    resume = Path(args.lkd_resume) if args.lkd_resume else out.with_name(out.name + ".lkd-resume")
    if lkd and not args.lkd_resume:            # removed once saved: it must be ours to remove
        check_out(args, resume, resume_check_target)
    log = _log(args)
    log(f"loading {args.model}")
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    sha = fingerprint(model)
    log(f"quantizing with {config.name}{' and LKD' if lkd else ''}")
    model = _with_source(_quantize_fn(args, tokenizer, lambda name: resume)(model, args.scheme + suffix),
                         str(args.model), sha)
    save(model, out, tokenizer, force=args.force)
    if lkd and not args.lkd_resume:
        import shutil
        shutil.rmtree(resume, ignore_errors=True)
    print(out)
    return 0


def _reference_model(args, path: str):
    """The floating-point model a checkpoint is compared with: ``--reference``, else its recorded
    source, which must still be the model it was quantized from (its recorded fingerprint)."""
    from .api import load
    from . import checkpoint
    from .sources import source_mismatch
    if args.reference:
        return load(args.reference)
    if checkpoint.is_checkpoint(path):
        meta = checkpoint.read_meta(path)
        record = checkpoint.read_record(path, meta)
        if not record.source:
            raise ValueError(f"{path} does not record its floating-point source: pass --reference MODEL")
        fp = load(record.source)
        differs = record.source_sha256 and source_mismatch(fp, record.source_sha256, meta["source_config"])
        if differs:
            raise ValueError(f"{record.source} is not the model {path} was quantized from: {differs}; "
                             "pass --reference MODEL to compare with a model of your choice")
        return fp
    return None


def cmd_eval(args) -> int:
    from .api import load, load_tokenizer
    from .eval import EncoderReference, evaluate
    from .plan import kind_of
    opts = eval_opts(args)
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    reference = None
    if kind_of(model) == "encoder":
        fp = _reference_model(args, args.model) or model
        reference = EncoderReference.build(fp, tokenizer, opts)
    result = evaluate(model, tokenizer, opts, reference, label=Path(str(args.model)).name)
    result["model"] = str(args.model)
    if args.json:
        print(json_text(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value}")
    return 0


def cmd_compare(args) -> int:
    from . import checkpoint
    from .api import load, load_tokenizer, save
    from .config import file_stem
    from .eval import compare, format_table
    from .sources import fingerprint
    for scheme in args.schemes:
        scheme_config(args, scheme)                  # validate every scheme before the slow work
    names = [s + suffix for s in args.schemes for suffix in ("", *lkd_configs(args))]
    if args.save:
        for name in names:
            check_out(args, Path(args.save) / file_stem(name), checkpoint.check_target)
    log = _log(args)
    log(f"loading {args.model}")
    model, tokenizer = load(args.model), load_tokenizer(args.model)
    resume = (lambda name: Path(args.lkd_resume) / file_stem(name)) if args.lkd_resume else (lambda name: None)
    quantize_fn = _quantize_fn(args, tokenizer, resume)

    sha = fingerprint(model)

    def quantize_and_record(m, scheme):
        return _with_source(quantize_fn(m, scheme), str(args.model), sha)

    opts = eval_opts(args)
    collector = None
    if args.report:
        from .analysis import sample_input
        from .report import SnrCollector
        collector = SnrCollector(model, sample_input(tokenizer, opts.text, args.report_tokens), tokenizer, log)

    def on_quantized(name, qmodel):
        if args.save:
            log(f"saved {save(qmodel, Path(args.save) / file_stem(name), tokenizer, force=args.force)}")
        if collector is not None:
            collector(name, qmodel)

    rows = compare(model, tokenizer, names, opts, quantize_and_record, log, on_quantized=on_quantized)
    if args.report:
        from .report import compare_report
        page = compare_report(args.report, model, collector, rows, _model_label(args.model), opts.text,
                              command=getattr(args, "command_line", None))
        log(f"report written to {page}")
    if args.json:
        print(json_text({"model": str(args.model), "rows": rows}))
    else:
        print(format_table(rows))
    return 0


def _model_label(model: str) -> str:
    """How plots name a MODEL argument: a built-in name as is, a path by its file or folder name."""
    return Path(str(model)).stem if str(model).endswith(".gguf") else Path(str(model)).name


def cmd_inspect(args) -> int:
    import copy
    from . import checkpoint
    from .analysis import sample_input
    from .api import load, load_tokenizer
    from .config import file_stem
    from .data import DEFAULT_EVAL_TEXT, read_text
    from .plots import Caption
    from .report import inspect_to_dir
    from .report.inspect_dir import check_target as check_inspect_target
    text = args.text or DEFAULT_EVAL_TEXT
    read_text(text)                            # a bad --text fails before the slow load
    schemes = [s for s in args.schemes if s != "none"]
    for scheme in schemes:
        scheme_config(args, scheme)
    label = _model_label(args.model)
    out = check_out(args, Path(args.out or f"out/inspect-{file_stem(label)}"), check_inspect_target)
    log = _log(args)
    log(f"loading {args.model}")
    tokenizer = load_tokenizer(args.model)
    if checkpoint.is_checkpoint(args.model):
        qmodel = load(args.model)
        fp = _reference_model(args, args.model)
        quantized = {_model_label(args.model): lambda: qmodel}
    else:
        fp = load(args.model)
        quantize_fn = _quantize_fn(args, tokenizer)
        quantized = {s: (lambda s=s: quantize_fn(copy.deepcopy(fp), s)) for s in schemes}
    ids = sample_input(tokenizer, text, args.tokens)
    manifest = inspect_to_dir(out, fp, ids, Caption(label, text, ids.numel()), args.blocks, quantized, tokenizer, log,
                              force=args.force)
    log(f"{len(manifest['plots'])} plots and {len(manifest['json'])} JSON files in {manifest['seconds']} s")
    print(out)
    return 0


def _commands() -> dict:
    from . import cli_generate, cli_serve
    return {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, "inspect": cmd_inspect,
            **cli_generate.COMMANDS, **cli_serve.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import shlex
    args.command_line = shlex.join(["zquant", *(sys.argv[1:] if argv is None else argv)])   # shown in reports
    # zquant prints its own progress; transformers' tqdm bars (GGUF conversion, weight loading)
    # would only add noise to logs.
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        return _commands()[args.command](args)
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
