"""The settings of each method (its section of params.yaml), without torch.

Params validation (`hdmap_ad.core.config`) needs only these schemas, so loading params.yaml imports no
torch; each method plug-in (`hdmap_ad.core.methods`) takes its schema from here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


# The methods in the order the experiment plan lists them (error messages list them so too).
METHOD_PARAMS: dict[str, type[BaseModel]] = {
    "baseline": NoParams,
    "gem": GemParams,
    "focal": FocalParams,
    "aux": AuxParams,
    "scale": ScaleParams,
    "topk": TopkParams,
}
