"""The command line's option groups and their conversion to configs (used by `zquant.cli`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

def schemes(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def add_scheme_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--override", action="append", default=[], metavar="RULE",
                   help="per-module override by name pattern, repeatable: 'PATTERN=fp' keeps layers in floating "
                        "point, 'PATTERN:bits=4,groups=32,act=none' changes them (keys: bits, granularity, groups, "
                        "group_size, act, symmetric)")
    p.add_argument("--groups", type=int, help="number of output-row groups (default: 64 decoders, 48 encoders)")
    p.add_argument("--granularity", choices=["row_group", "row", "input_group"],
                   help="weight scale layout (default row_group, ZeroQuant's)")
    p.add_argument("--group-size", type=int, help="input-column group size for --granularity input_group")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric token-wise activations")
    p.add_argument("--float-dtype", metavar="DTYPE", default=None,
                   help="dtype the floating-point parts (embeddings, norms, biases, float layers) are rounded to "
                        "and stored in: float32, bfloat16 or float16 (default bfloat16; compute stays float32)")
    p.add_argument("--embeddings", metavar="KIND", default=None,
                   help="token embedding table: float (stored in --float-dtype, the default) or int8 (one scale "
                        "per row; a head tied to the table runs from it as a W8A8 linear)")
    p.add_argument("--calib-text", default=None, help="calibration text for static schemes (default: technical)")


def eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ppl", metavar="FILE", default=None,
                   help="decoders: perplexity text, a UTF-8 file or a packaged name (default: wiki)")
    p.add_argument("--max-tokens", type=int, default=32768, help="decoders: token budget (default 32768; 0 = all)")
    p.add_argument("--window", type=int, default=1024, help="decoders: perplexity window (default 1024)")
    p.add_argument("--sentiment", action="store_true",
                   help="encoders: sentiment accuracy and cosine (always on for encoders; accepted for clarity)")
    p.add_argument("--max-examples", type=int, default=None, help="encoders: use a subset of the sentiment data")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def add_lkd_options(p: argparse.ArgumentParser, compare: bool = False) -> None:
    from .config import LKD_LOSSES, LKD_SCHEDULES, LKDConfig
    d = LKDConfig()
    p.add_argument("--lkd", action="store_true",
                   help="layer-by-layer knowledge distillation of every block" +
                        (" (adds a SCHEME+lkd row per scheme)" if compare else ""))
    p.add_argument("--lkd-data", default=None, metavar="TEXT",
                   help=f"distillation data: a packaged text, a UTF-8 file, or 'random' token ids (default {d.data})" +
                        ("; comma-separated for one SCHEME+lkd(TEXT) row each" if compare else ""))
    p.add_argument("--lkd-samples", type=int, help=f"sequences to distill on (default {d.samples})")
    p.add_argument("--lkd-seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--lkd-steps", type=int, help=f"optimizer steps per block (default {d.steps})")
    p.add_argument("--lkd-lr", type=float, help=f"AdamW learning rate (default {d.lr:g})")
    p.add_argument("--lkd-batch-size", type=int, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--lkd-seed", type=int, help=f"seed of the batch order and random data (default {d.seed})")
    p.add_argument("--lkd-loss", choices=LKD_LOSSES, help=f"distillation loss (default {d.loss})")
    p.add_argument("--lkd-schedule", choices=LKD_SCHEDULES, help=f"learning-rate schedule (default {d.schedule})")
    p.add_argument("--lkd-resume", metavar="DIR", default=None,
                   help="keep finished blocks in DIR and resume an interrupted run from there" +
                        (" (one subfolder per row)" if compare else " (default: OUT.lkd-resume, removed after "
                                                                    "the model is saved)"))


def lkd_configs(args) -> dict:
    """``{row suffix: LKDConfig}`` from the --lkd options: ``{"+lkd": ...}``, one ``+lkd(DATA)`` per
    comma-separated --lkd-data, or ``{}`` without --lkd."""
    from .config import ConfigError, LKDConfig
    names = ("samples", "seq_len", "steps", "lr", "batch_size", "seed", "loss", "schedule")
    given = {k: getattr(args, f"lkd_{k}", None) for k in names}
    given = {k: v for k, v in given.items() if v is not None}
    if not getattr(args, "lkd", False):
        if given or getattr(args, "lkd_data", None) or getattr(args, "lkd_resume", None):
            raise ConfigError("the --lkd-* options need --lkd")
        return {}
    datas = schemes(args.lkd_data) if args.lkd_data else [LKDConfig().data]
    if len(datas) == 1:
        return {"+lkd": LKDConfig(data=datas[0], **given)}
    return {f"+lkd({d})": LKDConfig(data=d, **given) for d in datas}


def add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true",
                   help=f"replace {what} even when it holds other files or is a file (never the model read)")


def check_out(args, path: Path, check) -> Path:
    """``path`` once ``check`` (a `zquant.outdir.check_target` wrapper) allows writing it: called
    before the slow work. The MODEL (and --reference) read are never written."""
    from .sources import resolve
    read = [resolve(m) for m in (args.model, getattr(args, "reference", None)) if m]
    return check(path, read, args.force, "pass --force")


def storage(args) -> dict:
    """The scheme fields --float-dtype and --embeddings set (validated here, so the error names the flag)."""
    from .config import EMBEDDINGS, FLOAT_DTYPES, ConfigError
    stored = {}
    for flag, key, allowed in (("--float-dtype", "float_dtype", FLOAT_DTYPES), ("--embeddings", "embeddings",
                                                                                 EMBEDDINGS)):
        value = getattr(args, key, None)
        if value is not None:
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
            stored[key] = value
    return stored


def scheme_config(args, scheme: str):
    import dataclasses
    from .config import ConfigError, Override, get_scheme
    config = get_scheme(scheme)
    stored = storage(args)
    if args.group_size is not None and args.granularity != "input_group":
        raise ConfigError("--group-size applies only with --granularity input_group")
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
    return dataclasses.replace(config, overrides=config.overrides + tuple(overrides), **stored)


def json_text(data) -> str:
    """Strict JSON (no NaN or infinity, which JSON does not have): a non-finite result is an error."""
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError:
        raise ValueError("a result is not finite (NaN or infinity); the model's outputs overflowed") from None


def eval_opts(args):
    from .data import DEFAULT_EVAL_TEXT, MIN_SENTIMENT_EXAMPLES
    if args.max_examples is not None and args.max_examples < MIN_SENTIMENT_EXAMPLES:
        raise ValueError(f"--max-examples must be at least {MIN_SENTIMENT_EXAMPLES} (a train and a test example), "
                         f"got {args.max_examples}")
    from .eval import EvalOptions
    return EvalOptions(text=args.ppl or DEFAULT_EVAL_TEXT, max_tokens=args.max_tokens or None, window=args.window,
                       max_examples=args.max_examples, quiet=args.quiet)
