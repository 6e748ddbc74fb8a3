"""zquant: ZeroQuant post-training quantization for Hugging Face transformers.

    import zquant
    model = zquant.load("smollm2-135m")              # floating point (a built-in packaged model)
    zquant.quantize(model, "w8a8")                   # group-wise INT8 weights, token-wise INT8 activations
    zquant.save(model, "out/smollm2-w8a8", tokenizer=zquant.load_tokenizer("smollm2-135m"))
    model = zquant.load("out/smollm2-w8a8")          # runnable, without the float weights
    zquant.generate(model, tokenizer, ["The capital of France is"], max_new_tokens=32)[0].text
"""
import os as _os

# zquant never downloads: make sure transformers does not try either.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

from .config import (ActQuant, ConfigError, LayerQuant, LKDConfig, Override, PRESETS, QuantConfig,  # noqa: E402
                     WeightQuant, get_scheme)
from .modules import QuantLinear  # noqa: E402
from .api import load, load_tokenizer, quantize, save  # noqa: E402
from .record import QuantRecord  # noqa: E402
from .generate import GenerationOptions, generate, stream  # noqa: E402

__all__ = [
    "ActQuant", "ConfigError", "LayerQuant", "LKDConfig", "Override", "PRESETS", "QuantConfig", "QuantLinear", "QuantRecord",
    "WeightQuant", "GenerationOptions", "generate", "get_scheme", "load", "load_tokenizer", "quantize", "save", "stream",
    "__version__",
]
