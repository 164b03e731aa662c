"""The list of methods: each one's settings (its section of params.yaml) and the hooks it changes, without torch.

`METHODS` below is the one definition of which methods exist (docs/design.md#5-methods). Params
validation (`hdmap_ad.core.config`) needs only this table, so loading params.yaml imports no torch;
each plug-in (`hdmap_ad.core.methods`) registers under a name from it and takes its schema from it,
and params.yaml has one section per entry (tests/test_architecture.py checks all three agree).

Methods combine: `topk+hseg` is topk's loss with hseg's bottleneck dropout. A combination is a
method of its own (its own MLflow tag, run names, grid entry and compare row); its parts are
written in the order of `METHODS`, so one combination has one name, and two parts that change the
same hook (two losses, two map reductions) cannot combine.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class NoParams(BaseModel):
    """A method section with no settings (`baseline: {}`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GemParams(BaseModel):
    """`gem:` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p: float = Field(3.0, gt=0, description="GeM exponent; 1 = mean, larger leans towards the max over groups")
    factor: float = Field(0.3, ge=0, le=1, description="gradient multiplier for easy points in hard mining")


class FocalParams(BaseModel):
    """`focal:` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gamma: float = Field(2.0, ge=0, description="focusing exponent; 0 = plain point-wise cosine loss")


class AuxParams(BaseModel):
    """`aux:` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(0.1, ge=0, description="λ: weight of the domain cross-entropy added to the baseline loss")


class ScaleParams(BaseModel):
    """`scale:` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learnable: bool = Field(True, description="learn α = softmax(w); false: α = the fixed `weights`")
    lr_mult: float = Field(10.0, gt=0, description="learning-rate multiplier of the logits w")
    weights: list[float] = Field(
        default_factory=lambda: [0.5, 0.5],
        description="fixed per-group weights (learnable: false); normalised to sum 1",
    )

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs one weight per fuse group")
        if any(not (x >= 0) or x == float("inf") for x in v):  # `not >=` also catches NaN
            raise ValueError(f"weights must be finite and non-negative, got {v}")
        if sum(v) <= 0:
            raise ValueError(f"weights must not all be 0, got {v}")
        return v


class TopkParams(BaseModel):
    """`topk:` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    q: float = Field(2.0, gt=0, le=100, description="final percentage of points kept")
    warmup: int = Field(200, ge=0, description="steps over which q_t falls linearly from 100 to q")
    min_k: int = Field(100, ge=1, description="lower bound on the number of points kept")


class HsegParams(BaseModel):
    """`hseg:` section of params.yaml (docs/design.md#m-hseg)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    row_p: float = Field(0.2, ge=0, le=1, description="probability that a token-grid row gets a segment")
    seg_len: int = Field(2, ge=1, description="consecutive tokens in a segment (at most the grid width)")
    seg_drop_p: float = Field(0.6, ge=0, le=1, description="probability that each token of a segment is zeroed")
    elem_p: float = Field(0.1, ge=0, lt=1, description="the bottleneck MLP's element dropout while hseg is on")


class VdropParams(BaseModel):
    """`vdrop:` section of params.yaml (docs/design.md#m-vdrop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    row_p: float = Field(0.1, ge=0, le=1, description="probability that a token-grid row of a chosen head gets a band")
    band_width: int = Field(2, ge=1, description="consecutive tokens in a band (at most the grid width)")
    seg_drop_p: float = Field(0.8, ge=0, le=1, description="probability that each value row of a band is zeroed")
    head_ratio: float = Field(0.5, gt=0, le=1, description="fraction of heads (rounded up) chosen per sample")
    apply_layers: list[int] = Field(
        default_factory=lambda: [4, 5, 6, 7], description="decoder blocks (0-based) whose attention values are dropped"
    )
    warmup_steps: int = Field(200, ge=0, description="row_p ramps linearly from 0 over these steps")

    @model_validator(mode="after")
    def _layers(self) -> VdropParams:
        if not self.apply_layers or any(i < 0 for i in self.apply_layers):
            raise ValueError(f"apply_layers must be non-empty decoder block indices >= 0, got {self.apply_layers}")
        if len(set(self.apply_layers)) != len(self.apply_layers):
            raise ValueError(f"apply_layers lists a block twice: {self.apply_layers}")
        return self


# What a method may change. A combination takes at most one part per hook; what is not listed here
# (diagnostics, extra optimiser groups, evaluation extras) adds up across parts.
HOOKS: dict[str, str] = {
    "loss": "the training loss",
    "map": "how the group maps combine into the anomaly map",
    "bottleneck_input": "the bottleneck's input tokens in training",
    "decoder_values": "the decoder attention's values in training",
}


@dataclass(frozen=True)
class MethodSpec:
    params: type[BaseModel]  # the schema of the method's section of params.yaml
    hooks: frozenset[str]  # keys of HOOKS: what it changes relative to the baseline
    summary: str  # one line for `hdmap-ad grid --help` and error messages
    label: str  # the name compare's report gives it (the experiment plan's names)


# Every method, in the order of docs/design.md#5-methods (error messages, grid and compare list them so).
METHODS: dict[str, MethodSpec] = {
    "baseline": MethodSpec(NoParams, frozenset(), "Dinomaly as published", "Baseline"),
    "gem": MethodSpec(
        GemParams, frozenset({"loss", "map"}), "generalised mean over groups (loss and map)", "Method 1 (GEM)"
    ),
    "focal": MethodSpec(FocalParams, frozenset({"loss"}), "focal-weighted point-wise cosine loss", "Method 3 (Focal)"),
    "aux": MethodSpec(
        AuxParams, frozenset({"loss"}), "+ auxiliary domain classifier on the bottleneck", "Method 5-A (Aux)"
    ),
    "scale": MethodSpec(
        ScaleParams, frozenset({"loss", "map"}), "softmax weights over groups (loss and map)", "Method 6-A (Scale)"
    ),
    "topk": MethodSpec(TopkParams, frozenset({"loss"}), "loss on the hardest q % of points", "TopK"),
    "hseg": MethodSpec(
        HsegParams, frozenset({"bottleneck_input"}), "horizontal segment dropout, bottleneck input", "HSeg (v3)"
    ),
    "vdrop": MethodSpec(
        VdropParams,
        frozenset({"decoder_values"}),
        "row-segment dropout of decoder attention values",
        "VDrop (v4)",
    ),
}
BASELINE = "baseline"
JOIN = "+"


def method_parts(method: str) -> list[str]:
    """The parts of a method name (`topk+hseg` -> [topk, hseg]); ValueError, one line, for a name that is
    not a method: an unknown part, the baseline inside a combination, a part twice, parts out of order, or
    two parts that change the same hook."""
    parts = str(method).split(JOIN)
    unknown = [p for p in parts if p not in METHODS]
    if unknown:
        raise ValueError(
            f"unknown method {unknown[0]!r} (known: {', '.join(METHODS)}; combine them with {JOIN}, e.g. topk{JOIN}hseg)"
        )
    if len(parts) == 1:
        return parts
    if BASELINE in parts:
        rest = JOIN.join(p for p in parts if p != BASELINE) or BASELINE
        raise ValueError(f"method {method!r}: every method starts from the baseline; write {rest!r}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"method {method!r}: a part is listed twice")
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            shared = sorted(METHODS[a].hooks & METHODS[b].hooks)
            if shared:
                raise ValueError(
                    f"method {method!r}: {a} and {b} both change {HOOKS[shared[0]]} ({shared[0]}); "
                    "a combination takes one part per hook"
                )
    canonical = sorted(parts, key=list(METHODS).index)
    if parts != canonical:
        raise ValueError(
            f"method {method!r}: write the parts in the order of the method list, {JOIN.join(canonical)!r}"
        )
    return parts


def method_label(method: str) -> str:
    """The name a report gives `method`: its label, a combination's parts' labels joined by ` + `, an
    unknown name as it is (runs of a method since removed)."""
    parts = str(method).split(JOIN)
    if all(p in METHODS for p in parts):
        return " + ".join(METHODS[p].label for p in parts)
    return str(method)


def metric_safe(method: str) -> str:
    """The method's name as MLflow metric names allow it (no `+`): topk+hseg -> topk_plus_hseg."""
    return method.replace(JOIN, "_plus_")


# The schemas alone, for the plug-ins and the tests that only need those.
METHOD_PARAMS: dict[str, type[BaseModel]] = {name: spec.params for name, spec in METHODS.items()}
