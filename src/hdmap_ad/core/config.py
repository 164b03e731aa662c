"""params.yaml: load, apply the profile, validate, and hand out typed sections.

`params.yaml` is the single source of tunable settings. Loading resolves the active profile
(`profiles.<profile>` is deep-merged over the base sections), picks the active method's own
section, and validates everything; any problem is one HdmapError naming the key.

(Over 450 lines: every section's schema sits here, so each setting is defined once beside its siblings;
tests/test_architecture.py refuses a copy of a section's defaults anywhere else.)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.method_params import METHODS, method_parts

DEFAULT_PARAMS = Path("params.yaml")
# The four HDMAP domains (the default of data.domains; the synthetic generator models these four).
HDMAP_DOMAINS: tuple[str, ...] = ("domain_A", "domain_B", "domain_C", "domain_D")
# What people compare across runs: eval.json and each run's MLflow metrics hold these and nothing else.
HEADLINE_METRICS: tuple[str, ...] = ("auroc", "ap", "f1_max", "tpr_at_fpr_1", "tpr_at_fpr_5", "pixel_auroc")
# compare.rope's default, in points: about one seed-to-seed SD of each metric (docs/design.md#stats-margins).
DEFAULT_ROPE: dict[str, float] = {"auroc": 0.1, "tpr_at_fpr_1": 1.0, "tpr_at_fpr_5": 0.5}
# The settings that make runs comparable are the training config without these (defined here only;
# tests/test_architecture.py fails on a second list): the sections of other stages and run-time
# settings, which never change a trained model ...
NOT_TRAINING_SECTIONS: tuple[str, ...] = ("runtime", "evaluate", "mlflow", "compare", "synth", "profile")
# ... and what runs of one comparison group differ in (besides the method's own section): the method,
# the seed and where the data lies (its identity is its content digest).
NOT_COMPARED_KEYS: tuple[str, ...] = ("method", "seed", "data.root", "data.prepared")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    # The folder `prepare` reads; dvc.yaml lists it as the prepare stage's dependency, so an edit of any
    # map in it (inside or outside the repository) reruns prepare.
    root: str = "data/raw/synthetic"
    domains: list[str] = Field(default_factory=lambda: list(HDMAP_DOMAINS), min_length=1)
    prepared: str = "data/prepared"
    val_ratio: float = Field(0.1, gt=0, lt=1)

    @field_validator("domains")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"domains listed twice: {v}")
        return v


class SynthParams(Section):
    out: str = "data/raw/synthetic"
    n_train: int = Field(200, gt=0)
    n_test_good: int = Field(100, gt=1)
    n_test_fault: int = Field(100, gt=1)
    height: int = Field(31, ge=8)
    width: int = Field(95, ge=8)
    seed: int = 0


class PreprocessParams(Section):
    resize: tuple[int, int] = (448, 448)
    crop: tuple[int, int] = (392, 392)

    @model_validator(mode="after")
    def _crop_fits(self) -> PreprocessParams:
        if any(s <= 0 for s in (*self.resize, *self.crop)):
            raise ValueError(f"sizes must be positive, got resize={self.resize} crop={self.crop}")
        if self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self


def encoder_patch_size(encoder: str, overrides: dict[str, Any] | None = None) -> int:
    """The patch size of `model.encoder`: `patch_size` in its overrides, else the `patchNN` of its timm name
    (16 for the DINOv3 encoders), else 14 (the small/base/large DINOv2 aliases)."""
    if overrides and "patch_size" in overrides:
        return int(overrides["patch_size"])
    found = re.search(r"patch(\d+)", encoder)
    return int(found.group(1)) if found else 14


class ModelParams(Section):
    encoder: str = "base"
    weights: str = "random"
    target_blocks: list[int] | None = None
    fuse_groups: list[list[int]] = Field(default_factory=lambda: [[0, 1, 2, 3], [4, 5, 6, 7]])
    decoder_depth: int = Field(8, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    bottleneck_dropout: float = Field(0.2, ge=0, lt=1)
    ln_eps: float = Field(1e-8, gt=0)
    init_std: float = Field(0.01, gt=0)
    init_cutoff: float = Field(0.03, gt=0)
    encoder_overrides: dict[str, Any] = Field(default_factory=dict)
    # auto: original for the DINOv2 encoders (small/base/large), timm otherwise (docs/design.md#model-encoder)
    pos_embed: Literal["auto", "original", "timm"] = "auto"
    # Dinomaly2's context-aware recentering: each target block's class token is subtracted from its patch
    # tokens, and the prefix tokens leave the model (docs/design.md#model-recenter)
    recenter: bool = False


class ScoreParams(Section):
    size: tuple[int, int] = (256, 256)
    blur_kernel: int = Field(5, gt=0)
    blur_sigma: float = Field(4.0, gt=0)
    top_ratio: float = Field(0.01, gt=0, le=1)

    @field_validator("blur_kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 != 1:
            raise ValueError(f"blur kernel size must be odd, got {v}")
        return v


class HardMiningParams(Section):
    factor: float = Field(0.1, ge=0, le=1)
    max_ratio: float = Field(0.9, ge=0, lt=1)
    ramp_steps: int = Field(1000, gt=0)


class TrainParams(Section):
    steps: int = Field(3000, gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(2e-3, gt=0)
    final_lr: float = Field(2e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-10, gt=0)
    grad_clip: float = Field(0.1, gt=0)
    hard_mining: HardMiningParams = HardMiningParams()
    # auto: bf16 where the device multiplies bf16 natively (CUDA with bf16, CPUs with AVX512-BF16/AMX),
    # float32 elsewhere; resolved per machine, and the resolved value is recorded (docs/design.md#dev-precision)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    compile: bool = False
    val_every: int = Field(100, gt=0)
    max_bad_steps: int = Field(5, gt=0)

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_bools(cls, v: Any) -> Any:
        return _yaml_switch(v)


def _yaml_switch(v: Any) -> Any:
    # `dvc exp run -S train.amp=off` writes an unquoted off, which YAML reads back as False.
    return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v


class RuntimeParams(Section):
    """How and where a stage runs: never part of what a trained model is, so a change never retrains."""

    device: str = "auto"
    num_threads: int = Field(0, ge=0)
    feature_cache: Literal["auto", "on", "off"] = "auto"
    feature_cache_max_gb: float = Field(4.0, ge=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    resume: Literal["auto", "never"] = "auto"

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _yaml_bools(cls, v: Any) -> Any:
        return _yaml_switch(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")


class EvaluateParams(Section):
    batch_size: int = Field(32, gt=0)
    n_examples: int = Field(8, ge=0)
    # Inference precision (evaluate, predict, serving), values as train.amp. float32 by default: bf16 scores of
    # a float32 quick-profile model differed by up to 1.007e-2 relative (docs/design.md#dev-precision).
    amp: Literal["auto", "bf16", "fp16", "off"] = "off"

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_bools(cls, v: Any) -> Any:
        return _yaml_switch(v)


class MlflowParams(Section):
    experiment: str = "hdmap-dinomaly"
    tracking_uri: str | None = None


class ServeParams(Section):
    """`hdmap-ad serve`: where it listens and what it refuses before parsing (docs/design.md#pipe-serve)."""

    host: str = "127.0.0.1"
    port: int = Field(5001, ge=1, le=65535)
    # A body over max_request_mb is refused with 413 while it streams in, before any parsing; one that
    # holds more maps, or more numbers than max_maps maps of the model's H×W, gets 413 before JSON parsing.
    max_request_mb: float = Field(16.0, gt=0, le=1024)
    max_maps: int = Field(256, ge=1)
    # Requests read and scored at once; others wait unread (their bodies stay in the kernel's buffers).
    concurrency: int = Field(1, ge=1, le=64)
    max_connections: int = Field(32, ge=1)  # open connections beyond this are answered 503
    read_timeout_s: float = Field(30.0, gt=0)  # a body that arrives slower than this is answered 408
    request_timeout_s: float = Field(60.0, gt=0)  # scoring stops between batches after this (504)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)


class CompareParams(Section):
    baseline: str = "baseline"
    methods: list[str] | None = None  # None: every method found in MLflow
    metrics: list[str] = Field(default_factory=lambda: ["auroc", "tpr_at_fpr_1", "tpr_at_fpr_5"])
    # Uncertainty of each Δ (docs/design.md#stats-intervals): interval level, bootstrap size and seed
    # (seeded: the same runs give the same intervals), and the α and power behind "seeds needed".
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_resamples: int = Field(10000, ge=1)
    bootstrap_seed: int = Field(0, ge=0)
    alpha: float = Field(0.05, gt=0, lt=0.5)
    power: float = Field(0.8, gt=0, lt=1)
    # The practical margin per metric in points (percent metrics), the verdict's "equivalent" zone
    # (docs/design.md#stats-margins).
    rope: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_ROPE))

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        # runs log only the headline metrics to MLflow: any other could only be "no data"
        unknown = [m for m in v if m not in HEADLINE_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown} (known: {', '.join(HEADLINE_METRICS)})")
        return v

    @field_validator("rope")
    @classmethod
    def _margins(cls, v: dict[str, float]) -> dict[str, float]:
        for metric, margin in v.items():
            if metric not in HEADLINE_METRICS:
                raise ValueError(
                    f"margin for {metric!r}, a metric runs do not log (known: {', '.join(HEADLINE_METRICS)})"
                )
            if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
                raise ValueError(f"margin for {metric} must be a positive number of points, got {margin!r}")
        return v

    @model_validator(mode="after")
    def _every_metric_has_a_margin(self) -> CompareParams:
        missing = [m for m in self.metrics if m not in self.rope]
        if missing:
            raise ValueError(f"no margin in compare.rope for {', '.join(missing)} (every compared metric needs one)")
        return self


class Params(Section):
    method: str = "baseline"
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's generators take 0 <= seed < 2**32
    profile: str = "quick"
    data: DataParams = DataParams()
    synth: SynthParams = SynthParams()
    preprocess: PreprocessParams = PreprocessParams()
    model: ModelParams = ModelParams()
    score: ScoreParams = ScoreParams()
    train: TrainParams = TrainParams()
    runtime: RuntimeParams = RuntimeParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    compare: CompareParams = CompareParams()
    serve: ServeParams = ServeParams()
    # The chosen method's sections, {part: section} (one part unless it is a combination like topk+hseg),
    # each validated by its schema (hdmap_ad.core.method_params).
    method_sections: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # All methods' sections as written, so `compare` and docs can show them; never used for training.
    source: str = "params.yaml"

    @model_validator(mode="after")
    def _crop_fits_the_patches(self) -> Params:
        patch = encoder_patch_size(self.model.encoder, self.model.encoder_overrides)
        crop = list(self.preprocess.crop)
        if crop[0] % patch or crop[1] % patch:
            raise ValueError(
                f"preprocess.crop {crop} must be a multiple of the patch size {patch} of model.encoder "
                f"{self.model.encoder} (e.g. {[max(patch, round(c / patch) * patch) for c in crop]})"
            )
        return self

    @property
    def method_parts(self) -> list[str]:
        """The parts of `method` (`topk+hseg` -> [topk, hseg]; a single method is its own one part)."""
        return list(self.method_sections)

    @property
    def method_params(self) -> dict[str, Any]:
        """The section of a single method (a combination has one per part: `method_sections`)."""
        if len(self.method_sections) != 1:
            raise ValueError(f"method {self.method!r} is a combination: read method_sections")
        return next(iter(self.method_sections.values()))

    @property
    def data_root(self) -> Path:
        """The raw HDMAP folder that `prepare` reads."""
        return Path(self.data.root)

    @property
    def synthetic_data(self) -> bool:
        """Whether `prepare` reads the synth stage's output."""
        return Path(self.data.root) == Path(self.synth.out)

    def resolved(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what MLflow and checkpoints record)."""
        # serving settings are the server's, not the model's: left out of model files and MLflow params
        out = self.model_dump(mode="json", exclude={"source", "method_sections", "serve"})
        out.update(self.method_sections)  # each part's section at the top level, as params.yaml has it
        return out

    def training_config(self) -> dict[str, Any]:
        """Everything that changes what training writes (weights, thresholds, validation metrics).

        The `runtime` section (device, threads, logging and checkpoint cadence, resume, feature cache)
        and the sections of other stages are left out. The DVC `configure` stage writes exactly this to
        models/train_config.json and the train stage depends on that file, so DVC reruns training when,
        and only when, this changes.
        """
        keep = self.resolved()
        for key in NOT_TRAINING_SECTIONS:
            keep.pop(key, None)
        return keep

    def training_fingerprint(self) -> str:
        """Hash of everything that changes the trained weights; a checkpoint resumes only on a match.
        Score settings are left out: they change thresholds, not weights, so a finished state can be
        "resumed" at its last step to recompute the thresholds."""
        keep = self.training_config()
        keep.pop("score", None)
        return _digest(keep)

    def comparable_config(self) -> dict[str, Any]:
        """What two runs must share to be compared: the training config without NOT_COMPARED_KEYS and
        the method's own sections (one per part of a combination)."""
        keep = self.training_config()
        for part in self.method_sections:
            keep.pop(part, None)
        for key in NOT_COMPARED_KEYS:
            section, _, sub = key.partition(".")
            if sub:
                keep[section] = {k: v for k, v in keep[section].items() if k != sub}
            else:
                keep.pop(section, None)
        return keep

    def comparison_key(self, data_digest: str | None) -> str:
        """Runs with equal keys differ only in method and seed: the only runs paired by `compare`."""
        return _digest({"config": self.comparable_config(), "data": data_digest})


def is_compared_setting(key: str) -> bool:
    """Whether a setting, named as training logs it to MLflow (`train.steps`, `train.hard_mining.factor`),
    is one comparable_config covers: a field of a training section, not listed above. Method sections,
    values training records beside the config (`train.amp_resolved`, `n_train_maps`, `fingerprint`)
    and keys of older layouts are not."""
    parts = key.split(".")
    if (
        parts[0] in NOT_TRAINING_SECTIONS
        or key in NOT_COMPARED_KEYS
        or parts[0] in ("method_params", "method_sections", "source")
    ):
        return False
    field = Params.model_fields.get(parts[0])
    if field is None:
        return False
    model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return len(parts) > 1 and parts[1] in model.model_fields
    return len(parts) == 1


DVC_TEMPLATED_KEYS = (("data", "root"),)

# Run-time keys that lived under `train` before the `runtime` section existed: configs recorded then
# (checkpoints, MLflow runs) are read by moving them; a params file that still has them gets an error.
RUNTIME_TRAIN_KEYS: tuple[str, ...] = tuple(RuntimeParams.model_fields)


def move_legacy_runtime_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with run-time keys under `train` (the layout before `runtime`), moved there."""
    train = raw.get("train")
    if not isinstance(train, dict) or not any(k in train for k in RUNTIME_TRAIN_KEYS):
        return raw
    raw = dict(raw)
    raw["train"] = {k: v for k, v in train.items() if k not in RUNTIME_TRAIN_KEYS}
    raw["runtime"] = {**{k: v for k, v in train.items() if k in RUNTIME_TRAIN_KEYS}, **(raw.get("runtime") or {})}
    return raw


def _check_no_legacy_runtime_keys(tree: dict[str, Any], where: str, source: str) -> None:
    train = tree.get("train")
    stale = [k for k in RUNTIME_TRAIN_KEYS if isinstance(train, dict) and k in train]
    if stale:
        raise HdmapError(
            f"{source}: {where}train.{stale[0]} moved to {where}runtime.{stale[0]} (run-time settings "
            f"have their own section; move {', '.join(stale)} there)"
        )


def _digest(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` merged in recursively (override wins)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (MLflow params are strings anyway)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        if loc:
            parts.append(f"{loc}: {item['msg']}{shown}")
        else:  # a check across sections (model_validator): its message names the keys itself
            parts.append(item["msg"].removeprefix("Value error, "))
    return f"{source}: invalid parameter " + "; ".join(parts)


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Resolve the profile and method section of raw params and validate them."""
    if not isinstance(raw, dict):
        raise HdmapError(f"{source}: expected a mapping at the top level")

    raw = dict(raw)
    profiles = raw.pop("profiles", {}) or {}
    profile = raw.get("profile", "quick")
    if profile not in profiles:
        raise HdmapError(
            f"{source}: profile {profile!r} is not defined under `profiles` (known: {', '.join(profiles) or 'none'})"
        )
    chosen = profiles[profile] or {}
    # dvc.yaml names these keys in stage paths/params (e.g. the prepare stage depends on ${data.root}); DVC
    # reads them from the top level and cannot see a profile's value, so a profile must not set them.
    for section, key in DVC_TEMPLATED_KEYS:
        if isinstance(chosen.get(section), dict) and key in chosen[section]:
            raise HdmapError(
                f"{source}: profiles.{profile}.{section}.{key}: not allowed inside a profile (DVC tracks "
                f"{section}.{key} itself); set it at the top level, e.g. "
                f"`dvc exp run -S profile={profile} -S {section}.{key}=...`"
            )
    _check_no_legacy_runtime_keys(raw, "", source)
    _check_no_legacy_runtime_keys(chosen, f"profiles.{profile}.", source)
    merged = deep_merge(raw, chosen)

    method = merged.get("method", "baseline")
    try:
        parts = method_parts(method)
    except ValueError as err:
        raise HdmapError(f"{source}: {err}") from None
    raw_sections = {name: merged.pop(name, None) or {} for name in METHODS}  # only the chosen parts are kept
    sections = {}
    for part in parts:
        try:
            sections[part] = METHODS[part].params.model_validate(raw_sections[part]).model_dump(mode="json")
        except ValidationError as err:
            raise HdmapError(_format_validation_error(err, f"{source}: section `{part}`")) from None
    try:
        return Params.model_validate({**merged, "method_sections": sections, "source": source})
    except ValidationError as err:
        raise HdmapError(_format_validation_error(err, source)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML), like `dvc exp run -S` does to the file."""
    raw = dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HdmapError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=500")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise HdmapError(f"--set {item!r}: value is not valid YAML") from None
    return raw


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Read and validate `params.yaml` (or another file), with optional `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise HdmapError(f"{path}: parameter file not found (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise HdmapError(f"{path}: not valid YAML{where}") from None
    return parse_params(apply_overrides(raw, overrides or []), str(path))
