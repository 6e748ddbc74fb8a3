"""Text generation: zquant's own decode path (`fast`) and the general transformers one (`general`).

`generate(model, tokenizer, prompts, **options)` returns one `GenerationResult` per prompt;
`stream(model, tokenizer, prompt, **options)` yields the text as it is produced. Options are the
fields of `GenerationOptions`. `model.generate` keeps working on every zquant model.
"""
from .engine import Generation, GenerationResult, generate, runner_for, stream
from .options import GenerationOptions

__all__ = ["Generation", "GenerationOptions", "GenerationResult", "generate", "runner_for", "stream"]
