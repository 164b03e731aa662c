"""Dinomaly (CVPR 2025) in plain PyTorch, as docs/design.md#3-model defines it.

    images ──► frozen DINOv2-reg encoder ──► 8 target-block outputs (B×T×C, T = 1 + 4 + N)
                 │ mean of all 8                       │ mean per fuse group, prefix dropped
                 ▼                                     ▼
            bottleneck MLP ──► 8 linear-attention ──► decoder outputs, reversed, mean per group
                               decoder blocks                    │
                                                                 ▼
          loss: global cosine per group (+ hard mining)   maps: 1 − cos per point ──► score

The module holds the network; the functional pieces below it (distances, the hard-mining hook,
the loss, anomaly maps, the image score) are shared by the training methods (docs/design.md#5-methods).
Everything follows the input's device and dtype; nothing is downloaded unless `weights="hub"`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdmap_ad.core.config import ModelParams, PreprocessParams, ScoreParams
from hdmap_ad.core.encoder import FrozenEncoder, create_vit, default_target_blocks, resolve_pos_embed
from hdmap_ad.core.errors import HdmapError

# --------------------------------------------------------------------------------------------------
# configuration and the data passed between stages


class DinomalyConfig(ModelParams):
    """The model's settings: params.yaml's `model` section (every setting, its default and its check are
    defined once, in hdmap_ad.core.config.ModelParams) plus the input size, which is `preprocess.crop`."""

    image_size: tuple[int, int] = PreprocessParams().crop  # (H, W), multiples of the patch size

    @classmethod
    def from_params(cls, model: ModelParams, image_size: tuple[int, int]) -> DinomalyConfig:
        return cls(**model.model_dump(), image_size=tuple(image_size))


@dataclass
class EncoderFeatures:
    """What the frozen encoder yields for a batch; depends only on the image, so it can be cached."""

    bottleneck_in: Tensor  # B×T×C: mean of the target-block outputs, all tokens
    groups: list[Tensor]  # per fuse group B×C×h×w: mean of the group's blocks, patch tokens only

    def to(self, device: torch.device | str) -> EncoderFeatures:
        return EncoderFeatures(self.bottleneck_in.to(device), [g.to(device) for g in self.groups])

    def index(self, idx: Tensor) -> EncoderFeatures:
        """The samples `idx` (a 1-D index tensor on the features' device) of the batch."""
        return EncoderFeatures(self.bottleneck_in[idx], [g[idx] for g in self.groups])

    @staticmethod
    def cat(items: Sequence[EncoderFeatures]) -> EncoderFeatures:
        return EncoderFeatures(
            torch.cat([f.bottleneck_in for f in items]), [torch.cat(gs) for gs in zip(*(f.groups for f in items))]
        )


@dataclass
class Reconstruction:
    enc_groups: list[Tensor]  # per group B×C×h×w, detached targets
    dec_groups: list[Tensor]  # per group B×C×h×w with grad; dec_groups[g] reconstructs enc_groups[g]
    bottleneck_out: Tensor  # B×T×C, the decoder's input (used by the aux method's head)


# --------------------------------------------------------------------------------------------------
# layers


class BottleneckMLP(nn.Module):
    """C → hidden → C with GELU; dropout on the input, after GELU and after the output layer.

    Dropping the *input* features is Dinomaly's "noisy bottleneck": the decoder cannot learn an
    identity mapping, so anomalies are not reconstructed.
    """

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.drop(x))))))


class LinearAttention(nn.Module):
    """Multi-head linear attention: φ(u) = ELU(u) + 1 on q and k, no softmax, no 1/√d scaling.

    out_s = φ(q_s)ᵀ (Σ_t φ(k_t) v_tᵀ) / φ(q_s)ᵀ Σ_t φ(k_t), computed in O(N·d²) through the d×d
    key-value summary instead of the N×N attention matrix. Its inability to focus is what keeps
    the decoder from copying anomalous tokens (the paper's "loose" attention).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise HdmapError(f"decoder: embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0  # B×H×N×d, positive
        kv = k.transpose(-2, -1) @ v  # B×H×d×d: Σ_t φ(k_t) v_tᵀ
        norm = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # B×H×N×1: φ(q_s)ᵀ Σ_t φ(k_t)
        out = (q @ kv) / norm  # no eps, as in the original
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _GeluLinear(torch.autograd.Function):
    """y = gelu(a)·Wᵀ + b that keeps `a` for backward instead of gelu(a).

    Autograd would keep both the fc1 output (for GELU's backward) and the GELU output (for fc2's
    weight gradient): two 4C-wide activations, the largest in a decoder block. Here only the first
    is kept and GELU is recomputed in backward (an elementwise op, ~1% of the block's work), which
    cuts the decoder's saved activations by about a fifth. dtypes are explicit so the backward is
    right under CUDA autocast, where `a`, `grad` and the forward's GEMM are half precision and W, b
    are float32 master weights."""

    @staticmethod
    def forward(ctx, a: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(a, weight)
        return F.linear(F.gelu(a), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, weight = ctx.saved_tensors
        h = F.gelu(a).to(grad.dtype)
        grad_2d, h_2d = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
        grad_weight = (grad_2d.t() @ h_2d).to(weight.dtype)
        grad_bias = grad_2d.sum(0, dtype=torch.float32).to(weight.dtype)
        grad_h = (grad @ weight.to(grad.dtype)).to(a.dtype)
        return torch.ops.aten.gelu_backward(grad_h, a), grad_weight, grad_bias


def gelu_linear(a: Tensor, linear: nn.Linear) -> Tensor:
    """`linear(gelu(a))`, saving less for backward when a gradient is needed (see _GeluLinear)."""
    if torch.is_grad_enabled() and (a.requires_grad or linear.weight.requires_grad):
        return _GeluLinear.apply(a, linear.weight, linear.bias)
    return linear(F.gelu(a))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block with linear attention; no LayerScale, no drop-path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ln_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = LinearAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        mlp = self.mlp  # fc1 -> GELU -> fc2 (the Sequential keeps the original state-dict keys)
        return x + gelu_linear(mlp.fc1(self.norm2(x)), mlp.fc2)


class Decoder(nn.ModuleList):
    """The decoder blocks; calling it returns every block's output (so `torch.compile` can wrap it)."""

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for block in self:
            x = block(x)
            outputs.append(x)
        return outputs


def build_trainable(embed_dim: int, num_heads: int, cfg: DinomalyConfig) -> tuple[nn.Sequential, Decoder]:
    """Bottleneck and decoder for an encoder of `embed_dim` / `num_heads` (no encoder needed).

    The layout (bottleneck.0.fc1, decoder.N.attn.qkv, ...) matches the original Dinomaly's
    state-dict keys, so its trained bottleneck/decoder weights load without renaming.
    """
    bottleneck = nn.Sequential(BottleneckMLP(embed_dim, int(embed_dim * cfg.mlp_ratio), cfg.bottleneck_dropout))
    decoder = Decoder([DecoderBlock(embed_dim, num_heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.decoder_depth)])
    return bottleneck, decoder


def init_trainable_(modules: nn.Module, std: float = 0.01, cutoff: float = 0.03) -> None:
    """Linear weights ~ N(0, std) truncated at ±cutoff, biases 0; LayerNorm weight 1, bias 0.

    See docs/design.md#model-init.
    """
    for m in modules.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-cutoff, b=cutoff)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _tokens_to_map(tokens: Tensor, prefix: int, grid: tuple[int, int]) -> Tensor:
    """B×T×C with `prefix` leading non-patch tokens -> B×C×h×w (patches are row-major)."""
    patches = tokens[:, prefix:, :]
    b, n, c = patches.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return patches.permute(0, 2, 1).reshape(b, c, grid[0], grid[1]).contiguous()


def _fuse(features: Sequence[Tensor], indices: Sequence[int]) -> Tensor:
    """Mean of the selected features (Dinomaly's fusion of several blocks into one group)."""
    return torch.stack([features[i] for i in indices], dim=1).mean(dim=1)


# --------------------------------------------------------------------------------------------------
# the model


class Dinomaly(nn.Module):
    """Frozen encoder + trainable bottleneck and decoder.

    Forward contract: ``forward(images)`` = ``decode(encode(images))`` returns a `Reconstruction`
    (encoder targets and decoder outputs per fuse group); training turns it into a loss with a
    method's loss (e.g. `global_cosine_hm_loss`), inference uses `predict` (scores and maps).
    `encode` is separate so a training loop can cache the frozen encoder's features.
    """

    def __init__(self, cfg: DinomalyConfig) -> None:
        super().__init__()
        targets = list(cfg.target_blocks) if cfg.target_blocks is not None else default_target_blocks(cfg.encoder)
        self.config = cfg = cfg.model_copy(
            update={"target_blocks": targets, "pos_embed": resolve_pos_embed(cfg.encoder, cfg.pos_embed)}
        )
        if cfg.decoder_depth < 1:
            raise HdmapError(f"model.decoder_depth: {cfg.decoder_depth} must be at least 1")
        for g in cfg.fuse_groups or [[]]:
            if not g or any(not 0 <= i < min(len(targets), cfg.decoder_depth) for i in g):
                raise HdmapError(
                    f"model.fuse_groups: {cfg.fuse_groups} must be non-empty lists of indices into the "
                    f"{len(targets)} target blocks and the {cfg.decoder_depth} decoder blocks"
                )
        vit = create_vit(cfg.encoder, cfg.weights, cfg.image_size, cfg.encoder_overrides, cfg.pos_embed)
        self.encoder = FrozenEncoder(vit, targets, cfg.pos_embed)
        self.bottleneck, self.decoder = build_trainable(self.encoder.embed_dim, self.encoder.num_heads, cfg)
        self.init_trainable()

    @property
    def token_prefix(self) -> int:
        """Non-patch tokens at the start of the bottleneck's and decoder's token sequence: the encoder's
        CLS + registers, or none with `recenter` (they are used up by the recentering)."""
        return 0 if self.config.recenter else self.encoder.num_prefix_tokens

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) of the configured image size."""
        return self.encoder.grid(self.config.image_size)

    def init_trainable(self) -> None:
        """(Re-)initialise bottleneck and decoder from the current RNG state (docs/design.md#model-init)."""
        init_trainable_(self.bottleneck, self.config.init_std, self.config.init_cutoff)
        init_trainable_(self.decoder, self.config.init_std, self.config.init_cutoff)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Bottleneck + decoder parameters: the one optimiser group (docs/design.md#opt-adamw)."""
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]

    def encode(self, images: Tensor) -> EncoderFeatures:
        """Frozen encoder features of preprocessed images B×3×H×W (no grad)."""
        blocks = self.encoder(images)
        grid = self.encoder.grid(tuple(images.shape[-2:]))
        prefix = self.encoder.num_prefix_tokens
        with torch.no_grad():
            if self.config.recenter:
                # Dinomaly2 (docs/design.md#model-recenter): per target block, patch tokens minus that block's
                # class token (token 0); registers and CLS then leave the sequence.
                blocks = [b[:, prefix:, :] - b[:, :1, :] for b in blocks]
                prefix = 0
            bottleneck_in = _fuse(blocks, range(len(blocks)))
            # Prefix tokens are dropped after fusing (same per token; the order of docs/design.md#model-fuse).
            groups = [_tokens_to_map(_fuse(blocks, g), prefix, grid) for g in self.config.fuse_groups]
        return EncoderFeatures(bottleneck_in, groups)

    def decode(self, feats: EncoderFeatures) -> Reconstruction:
        """Bottleneck and decoder on encoder features; decoder groups paired with encoder groups."""
        x = self.bottleneck(feats.bottleneck_in)
        # Reversed: the last decoder block pairs with the first (shallowest) encoder target block.
        outputs = self.decoder(x)[::-1]
        grid = tuple(feats.groups[0].shape[-2:])
        prefix = self.token_prefix
        dec = [_tokens_to_map(_fuse(outputs, g), prefix, grid) for g in self.config.fuse_groups]
        return Reconstruction(enc_groups=[g.detach() for g in feats.groups], dec_groups=dec, bottleneck_out=x)

    def forward(self, images: Tensor) -> Reconstruction:
        """decode(encode(images)); see the class docstring for the contract."""
        return self.decode(self.encode(images))

    @torch.no_grad()
    def predict(
        self, images: Tensor, reduce: str | Callable[[Tensor], Tensor] = "mean", score: ScoreParams | None = None
    ) -> tuple[Tensor, Tensor]:
        """Image scores (B) and anomaly maps (B×1×H×W at the input size), in eval mode."""
        was_training = self.training
        self.eval()  # bottleneck dropout off; restored below so a training loop is not surprised
        try:
            amap = anomaly_map(group_distances(self(images)), tuple(images.shape[-2:]), reduce)
            return image_score(amap, score or ScoreParams()), amap
        finally:
            self.train(was_training)


# --------------------------------------------------------------------------------------------------
# distances, hard mining, loss


def point_distance(enc: Tensor, dec: Tensor) -> Tensor:
    """1 − cos over channels at every point: B×C×h×w, B×C×h×w -> B×h×w (float32)."""
    return 1.0 - F.cosine_similarity(enc.float(), dec.float(), dim=1)


def group_distances(recon: Reconstruction) -> Tensor:
    """Point distances of every group, B×G×h×w (with grad through the decoder)."""
    return torch.stack([point_distance(e, d) for e, d in zip(recon.enc_groups, recon.dec_groups)], dim=1)


def hard_mining_ratio(step: int, max_ratio: float = 0.9, ramp_steps: int = 1000) -> float:
    """ρ = min(max_ratio·step/ramp_steps, max_ratio): the fraction of easy points whose gradient is damped."""
    if ramp_steps <= 0:
        return float(max_ratio)
    return float(min(max_ratio * step / ramp_steps, max_ratio))


def hard_mining_threshold(point_dist: Tensor, ratio: float) -> Tensor:
    """τ = the k-th largest distance, k = max(1, ⌊(1−ρ)·numel⌋) (0-d tensor, no sync)."""
    flat = point_dist.detach().reshape(-1)
    k = max(1, int(math.floor((1.0 - ratio) * flat.numel())))
    return flat.topk(k, sorted=False).values.min()


def scale_easy_gradients(t: Tensor, point_dist: Tensor, ratio: float, factor: float) -> float:
    """Hard mining: gradients reaching `t` at points with distance < τ are multiplied by `factor`.

    `t` is B×C×h×w (or B×h×w, like `point_dist`); the hook changes only the backward pass, so the
    loss value is untouched. Returns τ. A `t` without grad gets no hook.
    """
    tau = hard_mining_threshold(point_dist, ratio)
    easy = point_dist.detach() < tau  # B×h×w
    if t.dim() == easy.dim() + 1:
        easy = easy.unsqueeze(1)  # broadcast over channels
    if t.requires_grad:
        t.register_hook(lambda grad: torch.where(easy, grad * factor, grad))
    return float(tau)


def global_cosine_hm_loss(recon: Reconstruction, ratio: float, factor: float = 0.1) -> tuple[Tensor, dict]:
    """Dinomaly's loss: per group L_g = mean_b (1 − cos(vec E_g[b], vec D_g[b])), L = mean_g L_g,
    with the hard-mining hook (per group τ) on each decoder group.

    Returns (L, {"per_group": tensor G with grad, "threshold": mean τ over groups}). Call once per
    Reconstruction: each call registers another hook.
    """
    per_group, taus = [], []
    for enc, dec in zip(recon.enc_groups, recon.dec_groups):
        enc = enc.detach()
        with torch.no_grad():
            dist = point_distance(enc, dec)
        taus.append(scale_easy_gradients(dec, dist, ratio, factor))
        cos = F.cosine_similarity(enc.float().flatten(1), dec.float().flatten(1), dim=1)
        per_group.append((1.0 - cos).mean())
    per_group_t = torch.stack(per_group)
    return per_group_t.mean(), {"per_group": per_group_t, "threshold": sum(taus) / len(taus)}


# --------------------------------------------------------------------------------------------------
# anomaly maps and image score


def anomaly_map(
    dist_maps: Tensor, out_size: tuple[int, int], reduce: str | Callable[[Tensor], Tensor] = "mean"
) -> Tensor:
    """Group distance maps B×G×h×w -> bilinear (align_corners=True) to `out_size` -> reduced map.

    reduce: "mean" (docs/design.md#model-score) -> B×1×H×W; "none" -> B×G×H×W; or a callable
    B×G×H×W -> B×1×H×W (a method's GeM or weighted sum).
    """
    maps = F.interpolate(dist_maps, size=tuple(out_size), mode="bilinear", align_corners=True)
    if reduce == "mean":
        return maps.mean(dim=1, keepdim=True)
    if reduce == "none":
        return maps
    if callable(reduce):
        return reduce(maps)
    raise ValueError(f"reduce must be 'mean', 'none' or a callable, not {reduce!r}")


def gaussian_kernel(
    size: int, sigma: float, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Normalised size×size Gaussian centred on the middle pixel."""
    x = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype)


def gaussian_blur(maps: Tensor, size: int, sigma: float) -> Tensor:
    """Blur B×1×H×W maps with a normalised Gaussian, zero padding, same output size (in the maps' dtype,
    also under autocast, which would otherwise run the convolution in half precision)."""
    if size % 2 != 1:
        raise ValueError(f"blur kernel size must be odd, got {size}")
    kernel = gaussian_kernel(size, sigma, maps.device, maps.dtype)
    b, c, h, w = maps.shape
    with torch.autocast(maps.device.type, enabled=False):
        out = F.conv2d(maps.reshape(b * c, 1, h, w), kernel[None, None], padding=size // 2)
    return out.reshape(b, c, h, w)


def image_score(amap: Tensor, cfg: ScoreParams | None = None) -> Tensor:
    """Anomaly map B×1×H×W -> score B: resize to cfg.size (bilinear, align_corners=False, as the
    original evaluation), Gaussian blur, mean of the top ⌊top_ratio·H·W⌋ pixels (at least 1)."""
    cfg = cfg or ScoreParams()
    maps = amap.float()
    if tuple(maps.shape[-2:]) != tuple(cfg.size):
        maps = F.interpolate(maps, size=tuple(cfg.size), mode="bilinear", align_corners=False)
    maps = gaussian_blur(maps, cfg.blur_kernel, cfg.blur_sigma)
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * cfg.top_ratio))
    return flat.topk(k, dim=1).values.mean(dim=1)
