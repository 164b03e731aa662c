"""The frozen DINOv2-with-registers (or DINOv3) encoder: timm model creation, weights, feature extraction.

(Over 450 lines: creation, the three weight sources and both position encodings share their checks here.)

See docs/design.md#model-encoder.

Weights come from one of three sources (`model.weights`):

- ``random``: timm's own initialisation (tests, the offline demo);
- ``hub``: timm's pretrained weights from the Hugging Face hub (cached after the first download);
- a local file: the original ``dinov2_vit{s,b,l}14_reg4_pretrain.pth`` (original key names) or a
  ``.safetensors``/``.pth`` with timm or original key names.

Position embeddings (`model.pos_embed`, docs/design.md#model-encoder): ``original`` keeps the
pretrained 37×37 grid and resizes it for each input size as the original Dinomaly's DINOv2 code does
(bicubic through a scale factor with a +0.1 offset, no antialias; cached per input size); ``timm``
resamples it once at load time to the model's grid (timm's bicubic with antialias); ``auto`` is
``original`` for the three DINOv2 encoders and ``timm`` for any other timm model.

Local files go through timm's own ``checkpoint_filter_fn`` — the conversion timm applies when a
file is given as ``pretrained_cfg_overlay=dict(file=...)`` (original DINOv2 keys -> timm keys, the
class token's position embedding folded into the class token, the 37×37 position grid resampled to
the model's grid) — and are then loaded strictly, so a file for another architecture fails loudly
instead of leaving half the encoder random.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdmap_ad.core.config import encoder_patch_size
from hdmap_ad.core.errors import HdmapError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

ENCODER_NAMES: dict[str, str] = {
    "small": "vit_small_patch14_reg4_dinov2",
    "base": "vit_base_patch14_reg4_dinov2",
    "large": "vit_large_patch14_reg4_dinov2",
}
# 0-based indices of the blocks whose outputs Dinomaly reconstructs (the paper's middle blocks).
DEFAULT_TARGET_BLOCKS: dict[str, list[int]] = {
    "small": list(range(2, 10)),
    "base": list(range(2, 10)),
    "large": list(range(4, 19, 2)),
}
# The original checkpoints, named in the message an offline machine gets.
ORIGINAL_FILES: dict[str, str] = {
    "small": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    "base": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
    "large": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
}
MAX_KEYS_SHOWN = 3
POS_EMBED_MODES = ("auto", "original", "timm")
# The original DINOv2 code adds this to the target grid before dividing by the pretrained grid, so the
# floor of (grid · scale factor) is the target grid despite float rounding; it shifts the sampling positions.
ORIGINAL_INTERPOLATE_OFFSET = 0.1
MAX_CACHED_TABLES = 8


def timm_name(encoder: str) -> str:
    """Full timm model name for an alias (small/base/large) or a timm name."""
    return ENCODER_NAMES.get(encoder, encoder)


def encoder_size(encoder: str) -> str | None:
    """The size alias (small/base/large) of an alias or of one of the three timm names, else None."""
    if encoder in ENCODER_NAMES:
        return encoder
    return next((alias for alias, name in ENCODER_NAMES.items() if name == encoder), None)


def default_target_blocks(encoder: str) -> list[int]:
    """Target blocks (docs/design.md#model-encoder); a custom timm name without a size gets the small/base ones."""
    size = encoder_size(encoder) or ("large" if "large" in encoder else "base")
    return list(DEFAULT_TARGET_BLOCKS[size])


def resolve_pos_embed(encoder: str, mode: str) -> str:
    """`model.pos_embed` -> "original" | "timm"; auto: original for the DINOv2 encoders (small/base/large)."""
    if mode not in POS_EMBED_MODES:
        raise HdmapError(f"model.pos_embed: {mode!r} is not one of {', '.join(POS_EMBED_MODES)}")
    if mode == "auto":
        return "original" if encoder_size(encoder) is not None else "timm"
    return mode


def _original_file_hint(name: str) -> str:
    """'<file> from <url>' for the original checkpoint of a timm model, as far as it is known."""
    url = ORIGINAL_FILES.get(encoder_size(name) or "")
    if url is None:
        try:
            from timm.models import get_pretrained_cfg

            url = getattr(get_pretrained_cfg(name), "url", None) or None
        except Exception:  # unknown name or no pretrained config: no hint beyond the hub id
            url = None
    return f"{url.rsplit('/', 1)[-1]} from {url}" if url else f"the weights of {name}"


def create_vit(
    encoder: str,
    weights: str,
    img_size: tuple[int, int],
    overrides: Mapping[str, Any] | None = None,
    pos_embed: str = "timm",
) -> VisionTransformer:
    """A timm VisionTransformer for `encoder` (alias or timm name) at input size `img_size` (H, W).

    pos_embed "timm": the position embedding is made for the (H/p)×(W/p) grid, so pretrained weights
    are resampled once at load time exactly as timm resamples them. "original": the model keeps
    timm's default (pretrained) grid, weights load without resampling, and the patch embedding
    accepts any multiple of the patch size (`FrozenEncoder` resizes the grid per input size).
    `overrides` are extra timm kwargs (e.g. depth/embed_dim/num_heads for tiny test models).
    `weights`: "random" | "hub" | a local path.
    """
    name = timm_name(encoder)
    overrides = dict(overrides or {})
    for key in ("img_size", "num_classes", "pretrained"):
        if key in overrides:
            raise HdmapError(
                f"model.encoder_overrides: {key!r} is set by the pipeline (image size: preprocess.crop); remove it"
            )
    h, w = (int(s) for s in img_size)
    patch = encoder_patch_size(name, overrides)
    if h <= 0 or w <= 0 or h % patch or w % patch:
        raise HdmapError(f"model image size {h}x{w} must be positive multiples of the patch size {patch}")
    mode = resolve_pos_embed(encoder, pos_embed)
    kwargs = {**overrides, "num_classes": 0}
    if mode == "timm":
        kwargs["img_size"] = (h, w)
    vit = _create(encoder, name, weights, kwargs, overrides)
    if mode == "original":
        vit.patch_embed.strict_img_size = False  # any multiple of the patch size; checked in FrozenEncoder
    return vit


def _create(
    encoder: str, name: str, weights: str, kwargs: dict[str, Any], overrides: Mapping[str, Any]
) -> VisionTransformer:
    import timm

    if weights == "hub":
        return _create_from_hub(name, kwargs)
    try:
        vit = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise HdmapError(f"model.encoder: {encoder!r} is not a timm model ({err})") from None
    except (TypeError, ValueError, AssertionError) as err:  # unknown kwarg, embed_dim % num_heads != 0, ...
        raise HdmapError(
            f"model.encoder_overrides: {dict(overrides)} not accepted by {name} ({type(err).__name__}: {err})"
        ) from None
    if weights == "random":
        return vit
    load_weights(vit, Path(weights).expanduser(), name)
    return vit


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_cached_file(repo_id: str) -> Path | None:
    """A weights file of `repo_id` already in the local hub cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(_hf_cache_dir()))
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached now (offline mode, no DNS), or None if worth trying.

    huggingface_hub retries an unreachable host for about a minute per file before failing;
    checking first turns that into an immediate, clear error.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    if any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    ):
        return None  # a proxy may resolve what this machine cannot
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"cannot resolve {host}"
    return None


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> VisionTransformer:
    """timm's pretrained weights from the Hugging Face hub, or from its local cache."""
    import timm
    from timm.models import get_pretrained_cfg

    try:
        repo_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    except Exception:  # unknown model name
        repo_id = None
    if not repo_id:
        raise HdmapError(
            f"model.weights=hub: timm knows no hub weights for {name!r}; set model.weights to a local weights file"
        )

    def fail(why: str) -> HdmapError:
        return HdmapError(
            f"model.weights=hub: cannot get {repo_id} from the Hugging Face hub ({why}) and it is not in the "
            f"cache {_hf_cache_dir()}. Download {_original_file_hint(name)} and set model.weights to its local path"
        )

    cached = _hub_cached_file(repo_id)
    if cached is not None:  # strict local load, same conversion as timm's own hub path
        vit = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(vit, cached, name)
        return vit
    why = _hub_unreachable()
    if why:
        raise fail(why)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # network, proxy, auth, mismatching overrides: all end the same way for the user
        text = str(err).splitlines()[0][:200] if str(err) else ""
        raise fail(f"{type(err).__name__}: {text}".rstrip(": ")) from None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise HdmapError(
            f"model.weights: {path} does not exist (use 'random', 'hub' or the path of a "
            f"dinov2_vit*14_reg4_pretrain.pth / timm .safetensors file)"
        )
    if not path.is_file():
        raise HdmapError(f"model.weights: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a damaged or foreign file
        raise HdmapError(f"model.weights: {path} is not a readable weights file ({type(err).__name__})") from None
    if not isinstance(state, Mapping):
        raise HdmapError(f"model.weights: {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _first(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:MAX_KEYS_SHOWN]) + more


def uses_rope(vit: nn.Module) -> bool:
    """A timm Eva-family model (the DINOv3 encoders): rotary position encoding, blocks take `rope=`."""
    return hasattr(vit, "rope") and hasattr(vit, "_pos_embed")


def load_weights(vit: nn.Module, path: Path, name: str = "the encoder") -> None:
    """Load a local weights file into `vit` strictly, converting original DINOv2 / DINOv3 keys as timm does."""
    if uses_rope(vit):
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

    state = _read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, vit)
    except Exception as err:  # a malformed tensor breaks the conversion arithmetic
        raise HdmapError(
            f"model.weights: {path} cannot be converted for {name} ({type(err).__name__}: {err})"
        ) from None
    expected = vit.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_first(mismatched)}")
    if problems:
        raise HdmapError(
            f"model.weights: {path} does not fit {name} (model.encoder / model.encoder_overrides): "
            + "; ".join(problems)
        )
    vit.load_state_dict(state, strict=True)


class FrozenEncoder(nn.Module):
    """Runs a ViT up to its last target block and returns the raw target-block outputs.

    Frozen: no parameter requires grad, it stays in eval mode whatever `train()` is called with,
    and its forward runs under `no_grad` (not `inference_mode`, whose tensors could not be saved
    for the decoder's backward). Blocks after the last target are dropped, so they never run.
    """

    def __init__(self, vit: nn.Module, target_blocks: Sequence[int], pos_embed: str = "timm") -> None:
        super().__init__()
        if pos_embed not in ("original", "timm"):
            raise ValueError(f"pos_embed must be 'original' or 'timm' (resolved), not {pos_embed!r}")
        if pos_embed == "original" and getattr(vit, "pos_embed", None) is None:
            raise HdmapError("model.pos_embed=original: this encoder has no position embedding table")
        targets = [int(i) for i in target_blocks]
        depth = len(vit.blocks)
        if not targets or any(b <= a for a, b in zip(targets, targets[1:])) or targets[0] < 0 or targets[-1] >= depth:
            raise HdmapError(
                f"model.target_blocks: {targets} must be strictly increasing block indices in "
                f"[0, {depth - 1}] for this {depth}-block encoder"
            )
        vit.blocks = vit.blocks[: targets[-1] + 1]
        # The final norm and any head are never used (features are raw block outputs).
        for attr in ("norm", "fc_norm", "head", "head_drop"):
            if isinstance(getattr(vit, attr, None), nn.Module):
                setattr(vit, attr, nn.Identity())
        self.vit = vit
        self.target_blocks = targets
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        patch = vit.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.pos_embed_mode = pos_embed
        # original mode: resized position tables per grid, valid while the table's
        # storage and version are those they were computed from (a load or a .to() changes either).
        self._pos_tables: dict[tuple, tuple[tuple, Tensor]] = {}
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Always eval: the encoder is frozen (no dropout/drop-path changes between train and test)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        """B×3×H×W -> target-block outputs, each B×T×C with tokens [CLS, registers, patches]."""
        vit = self.vit
        size = tuple(images.shape[-2:])
        if self.pos_embed_mode == "original":
            if size[0] % self.patch_size or size[1] % self.patch_size:
                raise ValueError(
                    f"encoder input is {size[0]}x{size[1]}, not a multiple of the patch size {self.patch_size}"
                )
            x = vit.patch_embed(images)
            x = self._add_original_pos_embed(x, self.grid(size))
        elif uses_rope(vit):  # DINOv3: rotary position encoding for this grid, passed to every block
            x, rope = vit._pos_embed(vit.patch_embed(images))
            x = vit.norm_pre(x)
            outputs, wanted = [], set(self.target_blocks)
            for i, block in enumerate(vit.blocks):
                x = block(x, rope=rope)
                if i in wanted:
                    outputs.append(x)
            return outputs
        else:
            if not getattr(vit, "dynamic_img_size", False) and size != tuple(vit.patch_embed.img_size):
                # The position grid was built (and pretrained weights resampled) for one input size.
                raise ValueError(
                    f"encoder input is {size[0]}x{size[1]} but the model was built for "
                    f"{vit.patch_embed.img_size[0]}x{vit.patch_embed.img_size[1]} (model image_size)"
                )
            x = vit.patch_embed(images)
            x = vit._pos_embed(x)  # timm: add position embedding, prepend CLS and register tokens
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        outputs, wanted = [], set(self.target_blocks)
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i in wanted:
                outputs.append(x)
        return outputs

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) for an input of `image_size`."""
        return image_size[0] // self.patch_size, image_size[1] // self.patch_size

    def _prefix_rows(self) -> int:
        """Rows of the position table that belong to prefix tokens (0 when only patches have one)."""
        return 0 if getattr(self.vit, "no_embed_class", False) else self.num_prefix_tokens

    def _add_original_pos_embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """B×N×C patch tokens -> [CLS, registers, patches] with the position table resized for `grid`
        (timm's token order and prefix handling, the original's resize)."""
        vit = self.vit
        table = self.position_table(grid)  # the parameter's dtype: the sum promotes as timm's does
        prefix = [
            t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None
        ]
        if self._prefix_rows() == 0:
            x = torch.cat([*prefix, x + table], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + table
        return vit.pos_drop(x)

    def position_table(self, grid: tuple[int, int]) -> Tensor:
        """The position table for a (h, w) patch grid, as the original Dinomaly's DINOv2 resizes it,
        on the table's device in its dtype (cached: computed once per grid)."""
        pos = self.vit.pos_embed
        key = (int(grid[0]), int(grid[1]))
        if torch.compiler.is_exporting():  # traced by torch.export (ONNX export): no storage to stamp, no cache
            return original_resize(pos.detach(), self.vit.patch_embed.grid_size, grid, self._prefix_rows()).to(
                pos.dtype
            )
        stamp = (pos.device, pos.dtype, pos.data_ptr(), pos._version)
        hit = self._pos_tables.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        # Outside inference mode and autocast: the table is reused by later training steps (an inference
        # tensor could not be) and is computed in float32 as the original computes it.
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(pos.device.type, enabled=False):
            table = original_resize(pos.detach(), self.vit.patch_embed.grid_size, grid, self._prefix_rows())
            table = table.to(pos.dtype)
        if len(self._pos_tables) >= MAX_CACHED_TABLES:
            self._pos_tables.clear()
        self._pos_tables[key] = (stamp, table)
        return table


def original_resize(
    pos_embed: Tensor, pretrained_grid: Sequence[int], grid: tuple[int, int], prefix_rows: int = 0
) -> Tensor:
    """A 1×(prefix + gh·gw)×C position table resized to `grid` as the original Dinomaly's DINOv2 does.

    The patch rows (a pretrained_grid raster) are resized bicubically by the scale factors
    (g + 0.1) / g0 per axis (a scale factor, not a target size: PyTorch then samples at
    (i + 0.5) / scale − 0.5), without antialias, in float32; prefix rows are kept. At the pretrained
    grid itself the table is returned unchanged, as the original does.
    """
    g0h, g0w = (int(g) for g in pretrained_grid)
    gh, gw = (int(g) for g in grid)
    table = pos_embed.float()
    if (gh, gw) == (g0h, g0w):
        return table
    c = table.shape[-1]
    patches = table[:, prefix_rows:].reshape(1, g0h, g0w, c).permute(0, 3, 1, 2)
    scale = ((gh + ORIGINAL_INTERPOLATE_OFFSET) / g0h, (gw + ORIGINAL_INTERPOLATE_OFFSET) / g0w)
    resized = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(resized.shape[-2:]) != (gh, gw):  # the offset is what makes floor(g0 · scale) == g
        raise ValueError(f"position grid {g0h}x{g0w} resized to {tuple(resized.shape[-2:])}, expected {gh}x{gw}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, gh * gw, c)
    return torch.cat([table[:, :prefix_rows], resized], dim=1)
