"""The method plug-in contract, its registry, and combinations of methods (docs/design.md#5-methods)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from hdmap_ad.core.method_params import METHODS, NoParams, method_parts
from hdmap_ad.core.model import Dinomaly, Reconstruction


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


def spec_hooks(method: Method) -> frozenset[str]:
    """The hooks (hdmap_ad.core.method_params.HOOKS) a registered method changes."""
    return METHODS[method.name].hooks


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

    def attach(self, model: Dinomaly) -> None:
        """Plug into the model once it is built (hooks on its modules); nothing by default. Whatever is
        attached must be the identity in eval mode, so evaluation and prediction see the plain model."""

    def begin_step(self, step: int) -> None:
        """Called before each training step's forward pass (step-dependent schedules); nothing by default."""

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        """Training loss for one batch and scalar diagnostics to log: only values that change during
        training (a schedule while it runs, a statistic of the batch); a setting is an MLflow param
        already (the run's params are the resolved configuration), never a metric curve."""
        raise NotImplementedError

    def reduce_maps(self, maps: Tensor) -> Tensor:
        """Combine per-group anomaly maps B×G×H×W into one map B×1×H×W."""
        return maps.mean(dim=1, keepdim=True)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser groups for the method's own learnable parameters (none by default)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "name": self.name}] if params else []

    def diagnostics(self) -> dict[str, float]:
        """Method state worth logging at every logging step (e.g. learnable scale weights); as for
        `loss`'s diagnostics, only what can change during training."""
        return {}

    def constants(self) -> dict[str, float]:
        """Values the method derives from its settings and keeps fixed (e.g. normalised fixed scale
        weights): logged once, as MLflow params named `<method>.<name>`, never as metric curves."""
        return {}

    @torch.no_grad()
    def eval_batch(self, recon: Reconstruction, domain_ids: Tensor) -> dict[str, Tensor]:
        """Per-sample extras computed during evaluation (e.g. the aux head's prediction)."""
        return {}


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: the plug-in of the method `cls.name` of hdmap_ad.core.method_params.METHODS, whose
    settings schema it takes from there (a name not in that list cannot be registered)."""
    if cls.name not in METHODS:
        raise ValueError(f"method {cls.name!r} is not in hdmap_ad.core.method_params.METHODS; add it there first")
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    cls.Params = METHODS[cls.name].params
    REGISTRY[cls.name] = cls
    return cls


class Combination(Method):
    """Methods applied together (`topk+hseg`): each hook goes to the part that changes it, else to the
    baseline; diagnostics, optimiser groups and evaluation extras of all parts add up. The parts are
    submodules, so their learnable extras and state are saved under `parts.<name>.`."""

    def __init__(self, name: str, parts: list[Method], ctx: MethodContext) -> None:
        super().__init__(NoParams(), ctx)
        self.name = name  # the combination's own name: MLflow tag, run names, compare row
        self.parts = nn.ModuleDict({p.name: p for p in parts})
        self.default = REGISTRY["baseline"](NoParams(), ctx)
        self._owner = {hook: p for p in parts for hook in spec_hooks(p)}

    def _for(self, hook: str) -> Method:
        return self._owner.get(hook, self.default)

    def attach(self, model: Dinomaly) -> None:
        for p in self.parts.values():
            p.attach(model)

    def begin_step(self, step: int) -> None:
        for p in self.parts.values():
            p.begin_step(step)

    def loss(self, recon: Reconstruction, domain_ids: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        return self._for("loss").loss(recon, domain_ids, step)

    def reduce_maps(self, maps: Tensor) -> Tensor:
        return self._for("map").reduce_maps(maps)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [g for p in self.parts.values() for g in p.param_groups(lr)]

    def diagnostics(self) -> dict[str, float]:
        return {k: v for p in self.parts.values() for k, v in p.diagnostics().items()}

    def constants(self) -> dict[str, float]:
        return {k: v for p in self.parts.values() for k, v in p.constants().items()}

    @torch.no_grad()
    def eval_batch(self, recon: Reconstruction, domain_ids: Tensor) -> dict[str, Tensor]:
        return {k: v for p in self.parts.values() for k, v in p.eval_batch(recon, domain_ids).items()}


def build(name: str, section: dict[str, Any], ctx: MethodContext) -> Method:
    """Instantiate a registered (single) method from its params.yaml section."""
    cls = REGISTRY[name]
    return cls(cls.Params.model_validate(section), ctx)


def build_method(method: str, sections: dict[str, dict[str, Any]], ctx: MethodContext) -> Method:
    """The method `method` (one name or a combination like `topk+hseg`) from its parts' sections
    {part: section} (Params.method_sections). A single method is its plug-in itself, so its
    checkpoints keep their layout; a combination is a `Combination` of its parts."""
    parts = method_parts(method)
    if len(parts) == 1:
        return build(method, sections.get(method) or {}, ctx)
    return Combination(method, [build(p, sections.get(p) or {}, ctx) for p in parts], ctx)
