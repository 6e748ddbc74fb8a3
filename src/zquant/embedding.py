"""The token embedding table as INT8 (`QuantEmbedding`), and an output head tied to it (`TiedHead`).

`QuantEmbedding` stores the table as symmetric INT8 with one float32 scale per row (the
primitives' ``row`` weight granularity) and dequantizes only the rows it looks up. When the output
head shares the table (SmolLM2, GPT-2, OPT tie them), `TiedHead` runs the head from the same int8
rows as a W8A8 linear (per-row weight scales, token-wise INT8 input) through the kernel dispatch
point, so the model keeps no float copy of the table, in memory or on disk.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels
from . import primitives as P
from .config import ActQuant, LayerQuant, WeightQuant

ROW_INT8 = WeightQuant(bits=8, granularity="row")


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` whose table is stored as INT8 rows.

    Buffers (saved): ``qweight`` int8 [V, H] and ``scale`` float32 [V]; row v of the table is
    ``qweight[v] * scale[v]``. The forward returns float32 [..., H] for int64 ids [...].
    """

    scale_buffers = ("scale",)        # quantization scales stay float32 (see `zquant.float_parts`)

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=torch.float32))
        self.kernel_cache: dict = {}   # a tied head's prepacked weight (never saved)

    @classmethod
    def from_float(cls, module: nn.Module, name: str = "embedding") -> "QuantEmbedding":
        """Quantize a plain ``nn.Embedding`` (never mutated); ``name`` is for the error message."""
        if type(module) is not nn.Embedding or module.max_norm is not None:
            # A subclass (scaled embeddings) or max_norm changes what a lookup returns: refuse, not guess.
            raise ValueError(f"embeddings=int8 needs a plain nn.Embedding without max_norm; {name} is a "
                             f"{type(module).__name__}")
        w = module.weight.detach()
        layer = cls(*w.shape, module.padding_idx).to(w.device)
        scales = P.weight_scales(w, ROW_INT8)                       # float32 [V]
        layer.qweight.copy_(P.quantize_weight(w, scales, ROW_INT8))
        layer.scale.copy_(scales)
        return layer

    def forward(self, input_ids: Tensor) -> Tensor:
        # Only the looked-up rows become float: [..., H] int8 -> float32, times their row scales.
        return self.qweight[input_ids].float() * self.scale[input_ids].unsqueeze(-1)

    def dequantized_weight(self) -> Tensor:
        """The float32 table [V, H] this module represents."""
        return P.dequantize_weight(self.qweight, self.scale, ROW_INT8)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.kernel_cache.clear()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


class TiedHead(nn.Module):
    """An output head tied to a `QuantEmbedding`: logits [..., V] = x [..., H] @ table^T, as W8A8.

    It has no tensors of its own: ``qweight`` / ``wscale`` are the table's, so a checkpoint stores
    them once, under the embedding's name. To the kernels it looks like a `QuantLinear` with
    ``row`` weight scales, dynamic symmetric INT8 activations and no bias.
    """

    spec = LayerQuant(ROW_INT8, ActQuant(mode="dynamic"))
    bias = None
    act_scale = None

    def __init__(self, table: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "table", table)   # not a submodule: its tensors belong to the embedding
        self.in_features, self.out_features = table.embedding_dim, table.num_embeddings

    # -- the `QuantLinear` views the kernels read --------------------------------------------
    qweight = property(lambda self: self.table.qweight)
    wscale = property(lambda self: self.table.scale)
    kernel_cache = property(lambda self: self.table.kernel_cache)   # cleared when the table is loaded
    weight_spec = property(lambda self: self.spec.weight)
    act_spec = property(lambda self: self.spec.act)

    def int_weight(self) -> Tensor:
        return self.table.qweight

    def row_scale(self) -> Tensor:
        return self.table.scale

    def dequantized_weight(self) -> Tensor:
        return self.table.dequantized_weight()

    def forward(self, x: Tensor) -> Tensor:
        return kernels.qlinear(self, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W8 per-row from the int8 embedding table, act=int8"
