"""model.recenter (Dinomaly2's context-aware recentering, docs/design.md#model-recenter) against an
independent direct computation on copied weights, and the DINOv3 encoders (docs/design.md#model-encoder):
patch 16, rotary positions, timm's own features, local weight files, one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny
from hdmap_ad.core.encoder import create_vit, default_target_blocks
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.model import Dinomaly

DINOV3 = "vit_small_patch16_dinov3"
SIZE16 = (32, 96)  # 2×6 patches of 16


def fresh_timm(name: str, size: tuple[int, int], state: dict) -> torch.nn.Module:
    """A timm model made independently of hdmap_ad, with the given (copied) weights."""
    import timm

    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **tiny.ENCODER).eval()
    missing, unexpected = vit.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("blocks.", "norm.", "fc_norm.", "head")) for k in missing)
    return vit


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def reference_decoder_block(x: torch.Tensor, block) -> torch.Tensor:
    """One decoder block written out: pre-norm, linear attention in its quadratic form (N×N weights
    φ(q_s)ᵀφ(k_t), each row normalised by its sum), MLP with GELU."""
    b, n, c = x.shape
    heads = block.attn.num_heads
    h = layer_norm(x, block.norm1)
    qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
    q, k, v = (qkv[..., i * c : (i + 1) * c].reshape(b, n, heads, c // heads).transpose(1, 2) for i in range(3))
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    weights = phi_q @ phi_k.transpose(-1, -2)  # B×H×N×N
    att = (weights @ v) / weights.sum(-1, keepdim=True)
    x = x + att.transpose(1, 2).reshape(b, n, c) @ block.attn.proj.weight.T + block.attn.proj.bias
    h = layer_norm(x, block.norm2)
    hidden = F.gelu(h @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    return x + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def reference_recentered(model: Dinomaly, vit, images: torch.Tensor):
    """Dinomaly2's recentering as published: per target block, patch tokens minus that block's class token
    (registers dropped); the bottleneck reads their mean, the decoder runs on patch tokens only."""
    cfg = model.config
    prefix = vit.num_prefix_tokens
    with torch.no_grad():
        outs = vit.forward_intermediates(images, indices=cfg.target_blocks, norm=False, intermediates_only=True,
                                         output_fmt="NLC", return_prefix_tokens=True)  # fmt: skip
        blocks = []
        for patches, prefix_tokens in outs:
            assert prefix_tokens.shape[1] == prefix
            blocks.append(patches - prefix_tokens[:, :1])  # CLS is the first prefix token
        x = torch.stack(blocks).mean(0)
        mlp = model.bottleneck[0]
        x = F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
        dec = []
        for block in model.decoder:
            x = reference_decoder_block(x, block)
            dec.append(x)
        dec = dec[::-1]
        h, w = model.grid

        def as_map(t):
            return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)

        enc_groups = [as_map(torch.stack([blocks[i] for i in g]).mean(0)) for g in cfg.fuse_groups]
        dec_groups = [as_map(torch.stack([dec[i] for i in g]).mean(0)) for g in cfg.fuse_groups]
    return enc_groups, dec_groups


@pytest.mark.parametrize(("encoder", "size"), [("small", (28, 84)), (DINOV3, SIZE16)])
def test_recenter_equals_the_published_definition_on_copied_weights(encoder, size):
    torch.manual_seed(0)
    model = Dinomaly(tiny.model_config(encoder=encoder, image_size=size, recenter=True, pos_embed="timm")).eval()
    name = {"small": "vit_small_patch14_reg4_dinov2"}.get(encoder, encoder)
    vit = fresh_timm(name, size, model.encoder.vit.state_dict())
    # trainable weights of realistic size (the init's 0.01 would make every output ~0)
    with torch.no_grad():
        for p in [*model.bottleneck.parameters(), *model.decoder.parameters()]:
            p.normal_(0, 0.3)
    images = torch.rand(2, 3, *size)
    recon = model(images)
    enc_ref, dec_ref = reference_recentered(model, vit, images)
    assert recon.bottleneck_out.shape[1] == size[0] * size[1] // model.encoder.patch_size**2  # no prefix tokens
    for ours, ref in zip([*recon.enc_groups, *recon.dec_groups], [*enc_ref, *dec_ref]):
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), float((ours - ref).abs().max())
    plain = Dinomaly(tiny.model_config(encoder=encoder, image_size=size, pos_embed="timm")).eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(images).enc_groups[0], recon.enc_groups[0])  # the option does something


def test_dinov3_encoder_gives_timm_s_own_block_outputs():
    torch.manual_seed(0)
    model = Dinomaly(tiny.model_config(encoder=DINOV3, image_size=SIZE16)).eval()
    enc = model.encoder
    assert enc.patch_size == 16 and enc.num_prefix_tokens == 5 and model.grid == (2, 6)
    assert model.config.pos_embed == "timm"  # rotary positions: no table to resample
    vit = fresh_timm(DINOV3, SIZE16, enc.vit.state_dict())
    images = torch.rand(2, 3, *SIZE16)
    ours = enc(images)
    ref = vit.forward_intermediates(images, indices=enc.target_blocks, norm=False, intermediates_only=True,
                                    output_fmt="NLC", return_prefix_tokens=True)  # fmt: skip
    for o, (patches, prefix) in zip(ours, ref):
        assert torch.allclose(o, torch.cat([prefix, patches], 1), atol=1e-6)


def test_dinov3_target_blocks_follow_the_original_readme():
    assert default_target_blocks("vit_base_patch16_dinov3") == list(range(2, 10))
    assert default_target_blocks("vit_large_patch16_dinov3") == list(range(4, 19, 2))


def test_dinov3_crop_must_be_a_multiple_of_16_in_one_line():
    with pytest.raises(HdmapError) as err:
        tiny.params(f"model.encoder={DINOV3}")  # 28×84: multiples of 14, not of 16
    msg = str(err.value)
    assert "preprocess.crop [28, 84] must be a multiple of the patch size 16" in msg and "\n" not in msg
    tiny.params(f"model.encoder={DINOV3}", "preprocess.resize=[32, 96]", "preprocess.crop=[32, 96]")
    with pytest.raises(HdmapError, match="no position embedding table"):
        Dinomaly(tiny.model_config(encoder=DINOV3, image_size=SIZE16, pos_embed="original"))


def test_dinov3_local_weight_file_loads_strictly(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_vit(DINOV3, "random", SIZE16, tiny.ENCODER)
    path = tmp_path / "dinov3_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_vit(DINOV3, str(path), SIZE16, tiny.ENCODER)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(HdmapError, match="does not fit"):
        create_vit(DINOV3, str(path), SIZE16, {**tiny.ENCODER, "depth": 4})
