"""Evaluation: decoder perplexity, encoder embeddings (cosine, sentiment probe), model sizes,
one model (`evaluate`) or floating point beside every scheme (`compare`)."""
from .perplexity import perplexity
from .encoder import embed, cosine_to_reference, SentimentProbe
from .sizes import model_bytes, layer_bytes
from .run import EncoderReference, EvalOptions, evaluate, sizes
from .compare import compare, format_table

__all__ = ["perplexity", "embed", "cosine_to_reference", "SentimentProbe", "model_bytes", "layer_bytes",
           "EncoderReference", "EvalOptions", "evaluate", "sizes", "compare", "format_table"]
