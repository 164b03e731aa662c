"""The method plug-in contract and its registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from hdmap_ad.core.method_params import NoParams
from hdmap_ad.core.model import Reconstruction


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run it plugs into."""

    embed_dim: int
    num_groups: int
    domains: tuple[str, ...]
    total_steps: int
    hard_mining_factor: float = 0.1
    hard_mining_max_ratio: float = 0.9
    hard_mining_ramp_steps: int = 1000


class Method(nn.Module):
    """Base class: the baseline's behaviour unless a subclass overrides it.

    A method is an `nn.Module` so that any learnable extras (an auxiliary head, scale logits) are
    saved in checkpoints with the model and can get their own optimiser group.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, ctx: MethodContext) -> None:
        super().__init__()
        self.params = params
        self.ctx = ctx

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """Training loss for one batch and scalar diagnostics to log."""
        raise NotImplementedError

    def reduce_maps(self, maps: Tensor) -> Tensor:
        """Combine per-group anomaly maps B×G×H×W into one map B×1×H×W."""
        return maps.mean(dim=1, keepdim=True)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser groups for the method's own learnable parameters (none by default)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "name": self.name}] if params else []

    def diagnostics(self) -> dict[str, float]:
        """Method state worth logging at every logging step (e.g. scale weights)."""
        return {}

    @torch.no_grad()
    def eval_batch(self, recon: Reconstruction, domain_ids: Tensor) -> dict[str, Tensor]:
        """Per-sample extras computed during evaluation (e.g. the aux head's prediction)."""
        return {}


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable by `method: <cls.name>` in params.yaml."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def build(name: str, section: dict[str, Any], ctx: MethodContext) -> Method:
    """Instantiate a registered method from its params.yaml section."""
    cls = REGISTRY[name]
    return cls(cls.Params.model_validate(section), ctx)
