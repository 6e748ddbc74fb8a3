"""Evaluation: decoder perplexity, encoder embeddings (cosine, sentiment probe), model sizes."""
from .perplexity import perplexity
from .encoder import embed, cosine_to_reference, SentimentProbe
from .sizes import model_bytes, layer_bytes

__all__ = ["perplexity", "embed", "cosine_to_reference", "SentimentProbe", "model_bytes", "layer_bytes"]
