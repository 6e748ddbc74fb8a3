"""Quantization configs: frozen, self-validating dataclasses with a JSON round trip.

A `QuantConfig` says, for every linear layer inside the transformer blocks, how its weight and its
input activation are quantized. Layers are classified by the model adapter into two roles,
``attention`` and ``mlp`` (ZeroQuant's W4/8 puts INT4 in the MLP and INT8 in attention), and
per-module `Override`s, matched by name pattern, refine or cancel that per layer.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

GRANULARITIES = ("row_group", "row", "input_group")
ACT_MODES = ("dynamic", "static", "none")
ROLES = ("attention", "mlp")
# Storage of the parts that stay floating point (embeddings, norms, biases, an untied head).
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# The token embedding table: in the float dtype, or INT8 with one scale per row.
EMBEDDINGS = ("float", "int8")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _from_mapping(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    _check(not unknown, f"{where}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**data)


@dataclass(frozen=True)
class WeightQuant:
    """Symmetric integer weight quantization.

    granularity:
      ``row_group``   -- ZeroQuant: ``groups`` blocks of consecutive output rows, one scale each
                         (None = the model family's default: 64 for decoders, 48 for encoders).
      ``row``         -- one scale per output row (``row_group`` with one row per group).
      ``input_group`` -- GPTQ-style: one scale per output row and per ``group_size`` input columns.
    """

    bits: int = 8
    granularity: str = "row_group"
    groups: int | None = None
    group_size: int = 128

    def __post_init__(self):
        _check(self.bits in (4, 8), f"weight.bits must be 4 or 8, got {self.bits!r}")
        _check(self.granularity in GRANULARITIES,
               f"weight.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        _check(self.groups is None or (isinstance(self.groups, int) and self.groups >= 1),
               f"weight.groups must be a positive integer or null, got {self.groups!r}")
        _check(isinstance(self.group_size, int) and self.group_size >= 1,
               f"weight.group_size must be a positive integer, got {self.group_size!r}")

    def with_default_groups(self, groups: int) -> "WeightQuant":
        if self.granularity == "row_group" and self.groups is None:
            return dataclasses.replace(self, groups=groups)
        return self


@dataclass(frozen=True)
class ActQuant:
    """INT8 quantization of a linear layer's input.

    mode:
      ``dynamic`` -- ZeroQuant token-wise: one scale per token, computed at run time.
      ``static``  -- one per-tensor scale calibrated on sample text (the paper's baseline).
      ``none``    -- activations stay floating point (A16: weight-only quantization).
    """

    mode: str = "dynamic"
    bits: int = 8
    symmetric: bool = True

    def __post_init__(self):
        _check(self.mode in ACT_MODES, f"act.mode must be one of {ACT_MODES}, got {self.mode!r}")
        _check(self.bits == 8, f"act.bits must be 8, got {self.bits!r}")
        _check(isinstance(self.symmetric, bool), f"act.symmetric must be true or false, got {self.symmetric!r}")
        _check(self.symmetric or self.mode == "dynamic",
               "act.symmetric=false is only supported with act.mode='dynamic'")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class LayerQuant:
    """How one linear layer is quantized. ``weight=None`` keeps the layer in floating point."""

    weight: WeightQuant | None = WeightQuant()
    act: ActQuant = ActQuant()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "layer") -> "LayerQuant":
        data = dict(data)
        w = data.pop("weight", None)
        a = data.pop("act", {})
        _check(not data, f"{where}: unknown field(s) {sorted(data)}; allowed: ['act', 'weight']")
        return cls(weight=None if w is None else _from_mapping(WeightQuant, w, f"{where}.weight"),
                   act=_from_mapping(ActQuant, a, f"{where}.act"))


OVERRIDE_KEYS = ("bits", "granularity", "groups", "group_size", "act", "symmetric", "float")


@dataclass(frozen=True)
class Override:
    """Changes for the layers whose qualified module name matches ``pattern``.

    ``pattern`` is a shell glob (``*.mlp.down_proj``) or, prefixed with ``re:``, a regular
    expression that must match the whole name. ``float=True`` keeps matching layers in floating
    point; the other fields replace the same fields of the layer's role config.
    """

    pattern: str
    bits: int | None = None
    granularity: str | None = None
    groups: int | None = None
    group_size: int | None = None
    act: str | None = None
    symmetric: bool | None = None
    float: bool = False

    def __post_init__(self):
        _check(isinstance(self.pattern, str) and self.pattern != "", "override.pattern must be a non-empty string")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise ConfigError(f"override.pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        # Validate the field values by building the configs they would produce.
        self.apply(LayerQuant())

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    def apply(self, layer: LayerQuant) -> LayerQuant:
        if self.float:
            return LayerQuant(weight=None, act=ActQuant(mode="none"))
        weight = layer.weight or WeightQuant()
        wchanges = {k: getattr(self, k) for k in ("bits", "granularity", "groups", "group_size")
                    if getattr(self, k) is not None}
        achanges = {}
        if self.act is not None:
            achanges["mode"] = self.act
        if self.symmetric is not None:
            achanges["symmetric"] = self.symmetric
        return LayerQuant(weight=dataclasses.replace(weight, **wchanges),
                          act=dataclasses.replace(layer.act, **achanges))

    @classmethod
    def parse(cls, text: str) -> "Override":
        """Parse the command-line form ``PATTERN=fp`` or ``PATTERN:key=value,key=value``,
        e.g. ``*.down_proj:bits=8,act=none`` or ``*.layers.0.*=fp``."""
        if text.endswith("=fp"):
            return cls(pattern=text[:-3], float=True)
        pattern, sep, rest = text.rpartition(":")
        _check(bool(sep) and bool(pattern),
               f"override {text!r}: expected 'PATTERN=fp' or 'PATTERN:key=value[,key=value]'")
        values: dict[str, Any] = {}
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            _check(bool(eq) and key in OVERRIDE_KEYS,
                   f"override {text!r}: bad item {item!r}; keys are {OVERRIDE_KEYS}")
            value = value.strip()
            if key in ("bits", "groups", "group_size"):
                try:
                    values[key] = int(value)
                except ValueError:
                    raise ConfigError(f"override {text!r}: {key} must be an integer, got {value!r}") from None
            elif key in ("symmetric", "float"):
                _check(value.lower() in ("true", "false"), f"override {text!r}: {key} must be true or false")
                values[key] = value.lower() == "true"
            else:
                values[key] = value
        return cls(pattern=pattern, **values)


@dataclass(frozen=True)
class QuantConfig:
    """A complete scheme: one `LayerQuant` per role plus ordered overrides (later ones win), and
    how the rest of the model is stored.

    float_dtype: the dtype the floating-point parts (embeddings, norms, biases, float layers, an
                 untied output head) are rounded to and stored in; compute stays float32.
    embeddings:  ``float`` (the table is a float part) or ``int8`` (symmetric INT8, one scale per
                 row; a head tied to the table then runs from it as a W8A8 linear).
    """

    name: str
    attention: LayerQuant = LayerQuant()
    mlp: LayerQuant = LayerQuant()
    overrides: tuple[Override, ...] = field(default_factory=tuple)
    float_dtype: str = "bfloat16"        # the paper keeps the non-quantized parts in 16-bit floats
    embeddings: str = "float"

    def __post_init__(self):
        _check(isinstance(self.name, str) and self.name != "", "config.name must be a non-empty string")
        _check(self.float_dtype in FLOAT_DTYPES,
               f"config.float_dtype must be one of {FLOAT_DTYPES}, got {self.float_dtype!r}")
        _check(self.embeddings in EMBEDDINGS, f"config.embeddings must be one of {EMBEDDINGS}, got {self.embeddings!r}")
        object.__setattr__(self, "overrides", tuple(self.overrides))

    def layer(self, name: str, role: str) -> LayerQuant:
        """The effective config of the linear layer called ``name`` whose role is ``role``."""
        _check(role in ROLES, f"role must be one of {ROLES}, got {role!r}")
        spec = self.attention if role == "attention" else self.mlp
        for override in self.overrides:
            if override.matches(name):
                spec = override.apply(spec)
        return spec

    def with_overrides(self, *overrides: Override) -> "QuantConfig":
        return dataclasses.replace(self, overrides=self.overrides + tuple(overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"config: expected an object, got {type(data).__name__}")
        data = dict(data)
        allowed = ["attention", "embeddings", "float_dtype", "mlp", "name", "overrides"]
        unknown = sorted(set(data) - set(allowed))
        _check(not unknown, f"config: unknown field(s) {unknown}; allowed: {allowed}")
        _check("name" in data, "config: missing field 'name'")
        overrides = data.get("overrides", [])
        _check(isinstance(overrides, (list, tuple)), "config.overrides must be a list")
        return cls(
            name=data["name"],
            attention=LayerQuant.from_dict(data.get("attention", {}), "config.attention"),
            mlp=LayerQuant.from_dict(data.get("mlp", {}), "config.mlp"),
            overrides=tuple(_from_mapping(Override, o, f"config.overrides[{i}]") for i, o in enumerate(overrides)),
            float_dtype=data.get("float_dtype", "bfloat16"),
            embeddings=data.get("embeddings", "float"),
        )


def _preset(name: str, attn_bits: int, mlp_bits: int, act: str) -> QuantConfig:
    a = ActQuant(mode=act)
    return QuantConfig(name=name,
                       attention=LayerQuant(WeightQuant(bits=attn_bits), a),
                       mlp=LayerQuant(WeightQuant(bits=mlp_bits), a))


PRESETS: dict[str, QuantConfig] = {
    p.name: p
    for p in (
        _preset("w8a8", 8, 8, "dynamic"),          # ZeroQuant
        _preset("w8a8-static", 8, 8, "static"),    # the per-tensor static baseline
        _preset("w8a16", 8, 8, "none"),
        _preset("w4/8a16", 8, 4, "none"),          # INT4 MLP, INT8 attention, FP activations
        _preset("w4/8a8", 8, 4, "dynamic"),        # INT4 MLP, INT8 attention, token-wise INT8 activations
    )
}


def get_scheme(scheme: "str | QuantConfig") -> QuantConfig:
    """Look up a preset by name (or pass a `QuantConfig` through)."""
    if isinstance(scheme, QuantConfig):
        return scheme
    if scheme not in PRESETS:
        raise ConfigError(f"unknown scheme {scheme!r}; presets are: {', '.join(PRESETS)}")
    return PRESETS[scheme]


LKD_LOSSES = ("mse", "rel_mse")
LKD_SCHEDULES = ("constant", "cosine")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LKDConfig:
    """Layer-by-layer knowledge distillation settings (see `zquant.algorithms.lkd`).

    data:       distillation text: a packaged name (``technical``, ``tiny``, ...), a UTF-8 file path,
                or ``random`` for uniformly random token ids (no text at all).
    samples:    number of sequences of ``seq_len`` tokens that every block is distilled on.
    steps:      optimizer steps per block, each on one batch of ``batch_size`` sequences.
    lr:         AdamW learning rate (the peak one with the cosine schedule).
    schedule:   ``constant`` (the paper's) or ``cosine`` (decays the rate to 0 over ``steps``).
    seed:       seeds the batch order (and the random tokens); same seed, same bytes.
    loss:       ``mse`` (the paper's) or ``rel_mse`` (each token's squared error divided by the
                teacher token's mean square, so tokens with huge activations do not dominate).
    """

    # Defaults chosen on SmolLM2 by the held-out (c4) block loss, within a 20-minute CPU budget
    # (docs/benchmarks.md, LKD section).
    data: str = "technical"
    samples: int = 256
    seq_len: int = 256
    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 2
    seed: int = 0
    loss: str = "mse"
    schedule: str = "cosine"

    def __post_init__(self):
        _check(isinstance(self.data, str) and self.data.strip() != "",
               f"lkd.data must be a packaged text name, a file path or 'random', got {self.data!r}")
        _check(_is_int(self.samples) and self.samples >= 1, f"lkd.samples must be an integer >= 1, got {self.samples!r}")
        _check(_is_int(self.seq_len) and self.seq_len >= 2, f"lkd.seq_len must be an integer >= 2, got {self.seq_len!r}")
        _check(_is_int(self.steps) and self.steps >= 0,
               f"lkd.steps must be an integer >= 0 (0 = no training), got {self.steps!r}")
        _check(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and 0 < self.lr < 1,
               f"lkd.lr must be a number in (0, 1), got {self.lr!r}")
        _check(_is_int(self.batch_size) and 1 <= self.batch_size,
               f"lkd.batch_size must be an integer >= 1, got {self.batch_size!r}")
        _check(self.batch_size <= self.samples,
               f"lkd.batch_size ({self.batch_size}) must not exceed lkd.samples ({self.samples})")
        _check(_is_int(self.seed) and self.seed >= 0, f"lkd.seed must be an integer >= 0, got {self.seed!r}")
        _check(self.loss in LKD_LOSSES, f"lkd.loss must be one of {LKD_LOSSES}, got {self.loss!r}")
        _check(self.schedule in LKD_SCHEDULES,
               f"lkd.schedule must be one of {LKD_SCHEDULES}, got {self.schedule!r}")
        object.__setattr__(self, "lr", float(self.lr))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LKDConfig":
        return _from_mapping(cls, data, "lkd")


def file_stem(name: str) -> str:
    """A scheme name usable in a file or folder name (``w4/8a8`` -> ``w4-8a8``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
