"""Dinomaly network and its functional pieces (docs/design.md#3-model): linear attention against the quadratic
formula, fusion and decoder/encoder pairing, hard mining on gradients only, the loss, anomaly maps
and the image score by hand, shapes for non-square inputs, the ViT-B parameter count, and a CPU
training step. Tiny encoders (embed_dim 32) keep the file fast."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from hdmap_ad.core.config import ScoreParams
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.model import (
    BottleneckMLP,
    DecoderBlock,
    Dinomaly,
    DinomalyConfig,
    EncoderFeatures,
    LinearAttention,
    Reconstruction,
    anomaly_map,
    build_trainable,
    gaussian_kernel,
    global_cosine_hm_loss,
    group_distances,
    hard_mining_ratio,
    image_score,
    point_distance,
    scale_easy_gradients,
)
from hdmap_ad.core.optim import StableAdamW
from tiny import ENCODER as TINY_ENCODER
from tiny import model_config as tiny_model_config

PREFIX = 5


def tiny(**kw) -> Dinomaly:
    torch.manual_seed(0)
    return Dinomaly(tiny_model_config(**kw))


@pytest.fixture(scope="module")
def model() -> Dinomaly:
    return tiny()


def images(b: int = 2, size=(28, 42), seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


# --- linear attention ------------------------------------------------------------------------------


def test_linear_attention_equals_the_quadratic_formula():
    torch.manual_seed(0)
    dim, heads, n, b = 12, 3, 7, 2
    attn = LinearAttention(dim, heads).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(b, n, dim, dtype=torch.float64)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    d = dim // heads
    heads_out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        phi_q, phi_k = F.elu(q[..., sl]) + 1, F.elu(k[..., sl]) + 1
        a = torch.einsum("bsd,btd->bst", phi_q, phi_k)  # N×N, no softmax, no 1/sqrt(d)
        a = a / a.sum(dim=-1, keepdim=True)  # rows normalised
        heads_out.append(torch.einsum("bst,btd->bsd", a, v[..., sl]))
    expected = torch.cat(heads_out, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(attn(x), expected, rtol=1e-10, atol=1e-12)


def test_decoder_block_is_pre_norm_without_layerscale():
    torch.manual_seed(0)
    block = DecoderBlock(16, 2, mlp_ratio=4.0, ln_eps=1e-8)
    assert block.norm1.eps == block.norm2.eps == 1e-8
    assert block.mlp.fc1.out_features == 64 and block.attn.qkv.bias is not None
    assert not any("ls" in name or "gamma" in name for name, _ in block.named_parameters())
    x = torch.randn(2, 5, 16)
    y = x + block.attn(block.norm1(x))
    expected = y + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(y))))
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_bottleneck_drops_input_hidden_and_output():
    torch.manual_seed(0)
    mlp = BottleneckMLP(64, 256, dropout=0.2)
    seen = {}
    mlp.fc1.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc1_in", a[0]))
    mlp.fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc2_in", a[0]))
    x = torch.rand(8, 50, 64) + 1.0  # never 0 by itself
    mlp.train()
    out = mlp(x)
    zero_in = (seen["fc1_in"] == 0).float().mean().item()
    assert 0.15 < zero_in < 0.25  # dropout on the input
    kept = seen["fc1_in"] != 0
    assert torch.allclose(seen["fc1_in"][kept], (x / 0.8)[kept])
    hidden = F.gelu(mlp.fc1(seen["fc1_in"]))
    assert ((seen["fc2_in"] == 0) & (hidden != 0)).float().mean().item() > 0.15  # after GELU
    assert (out == 0).float().mean().item() > 0.15  # after the output layer
    mlp.eval()
    assert torch.allclose(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))


def test_trainable_parameter_count_of_vit_base_equals_the_original():
    with torch.device("meta"):  # shapes only: the whole ViT-B model, no memory, no time
        model = Dinomaly(DinomalyConfig(encoder="base", image_size=(392, 392)))
    assert sum(p.numel() for p in model.trainable_parameters()) == 61_425_408
    assert len(model.encoder.vit.blocks) == 10  # blocks 10 and 11 of ViT-B are never needed
    bottleneck, decoder = build_trainable(768, 12, DinomalyConfig())
    assert sum(p.numel() for m in (bottleneck, decoder) for p in m.parameters()) == 61_425_408
    # the original Dinomaly's state-dict layout, so its trained weights load as they are
    keys = set(bottleneck.state_dict()) | {f"decoder.{k}" for k in decoder.state_dict()}
    assert {"0.fc1.weight", "0.fc2.bias", "decoder.7.attn.qkv.bias", "decoder.0.mlp.fc2.weight"} <= keys


def test_large_defaults_to_its_target_blocks():
    with torch.device("meta"):
        model = Dinomaly(DinomalyConfig(encoder="large", image_size=(392, 392)))
    assert model.config.target_blocks == [4, 6, 8, 10, 12, 14, 16, 18]
    assert len(model.encoder.vit.blocks) == 19 and model.encoder.embed_dim == 1024


def test_init_follows_the_spec():
    torch.manual_seed(0)
    model = Dinomaly(tiny_model_config(encoder_overrides={**TINY_ENCODER, "embed_dim": 64}))
    weights = []
    for m in [*model.bottleneck.modules(), *model.decoder.modules()]:
        if isinstance(m, torch.nn.Linear):
            assert m.weight.abs().max() <= 0.03 and torch.all(m.bias == 0)
            weights.append(m.weight.flatten())
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    std = torch.cat(weights).std().item()
    assert 0.0095 < std < 0.0102  # N(0, 0.01) cut at ±3σ has std 0.00986


# --- fusion, pairing, shapes ----------------------------------------------------------------------


def test_encoder_fusion_and_prefix_dropping(model):
    x = images()
    blocks = model.encoder(x)
    feats = model.encode(x)
    assert torch.allclose(feats.bottleneck_in, torch.stack(blocks).mean(0), atol=1e-6)
    h, w = 2, 3
    for g, idx in enumerate(model.config.fuse_groups):
        fused = torch.stack([blocks[i] for i in idx]).mean(0)  # B×T×C
        assert feats.groups[g].shape == (2, 32, h, w)
        for i in range(h):
            for j in range(w):  # patch token (i, j) is token PREFIX + i*w + j
                assert torch.allclose(feats.groups[g][:, :, i, j], fused[:, PREFIX + i * w + j], atol=1e-6)


def test_last_decoder_blocks_pair_with_the_shallowest_encoder_group(model):
    model.eval()
    outs = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.decoder]
    try:
        recon = model(images())
    finally:
        for hd in handles:
            hd.remove()
    assert len(outs) == 8

    def as_map(tokens):
        return tokens[:, PREFIX:].permute(0, 2, 1).reshape(2, 32, 2, 3)

    # group 0 = encoder target blocks 0..3 (shallowest) <-> decoder blocks 7, 6, 5, 4 (last)
    assert torch.allclose(recon.dec_groups[0], as_map(torch.stack(outs[4:]).mean(0)), atol=1e-6)
    assert torch.allclose(recon.dec_groups[1], as_map(torch.stack(outs[:4]).mean(0)), atol=1e-6)
    blocks = model.encoder(images())
    assert torch.allclose(recon.enc_groups[0], as_map(torch.stack(blocks[:4]).mean(0)), atol=1e-6)
    assert not recon.enc_groups[0].requires_grad and recon.dec_groups[0].requires_grad


@pytest.mark.parametrize("size", [(28, 70), (42, 126), (42, 28)])
def test_shapes_for_non_square_inputs(size):
    model = tiny(image_size=size)
    h, w = size[0] // 14, size[1] // 14
    recon = model(images(3, size))
    for t in (*recon.enc_groups, *recon.dec_groups):
        assert t.shape == (3, 32, h, w)
    assert recon.bottleneck_out.shape == (3, PREFIX + h * w, 32)
    scores, maps = model.predict(images(3, size))
    assert scores.shape == (3,) and maps.shape == (3, 1, *size) and torch.isfinite(scores).all()


def test_encoder_features_cache_roundtrip(model):
    model.eval()
    x = images(4)
    feats = model.encode(x)
    parts = EncoderFeatures.cat([feats.index(torch.tensor([0, 1])), feats.index(torch.tensor([2, 3]))]).to("cpu")
    assert torch.equal(parts.bottleneck_in, feats.bottleneck_in)
    picked = feats.index(torch.tensor([3, 1]))
    assert torch.equal(picked.groups[1], feats.groups[1][[3, 1]])
    direct, cached = model(x), model.decode(parts)
    for a, b in zip(direct.dec_groups, cached.dec_groups):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_fuse_groups_are_user_errors():
    with pytest.raises(HdmapError, match="fuse_groups"):
        tiny(fuse_groups=[[0, 1], [8]])
    with pytest.raises(HdmapError, match="fuse_groups"):
        tiny(fuse_groups=[[0, 1, 2, 3], [4, 5, 6, 7]], decoder_depth=6)


# --- hard mining and loss -------------------------------------------------------------------------


def test_hard_mining_ratio_schedule():
    assert hard_mining_ratio(0) == 0.0
    assert hard_mining_ratio(500) == pytest.approx(0.45)
    assert hard_mining_ratio(1000) == pytest.approx(0.9)
    assert hard_mining_ratio(5000) == pytest.approx(0.9)
    assert hard_mining_ratio(100, max_ratio=0.5, ramp_steps=200) == pytest.approx(0.25)


def test_hook_scales_exactly_the_easy_points_gradients():
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 5, 3, 4
    enc = torch.randn(b, c, h, w, generator=g)
    dec = torch.randn(b, c, h, w, generator=g, requires_grad=True)
    weight = torch.randn(b, c, h, w, generator=g)  # d(loss)/d(dec) without the hook
    dist = point_distance(enc, dec).detach()
    ratio, factor = 0.7, 0.1  # (1 - ρ)·24 = 7.2: k is floored to 7

    t = dec * 1.0  # a non-leaf, like a decoder group
    tau = scale_easy_gradients(t, dist, ratio, factor)
    (t * weight).sum().backward()

    k = max(1, math.floor((1 - ratio) * dist.numel()))
    assert k == 7
    assert tau == pytest.approx(dist.flatten().sort(descending=True).values[k - 1].item())
    easy = (dist < tau).unsqueeze(1).expand(b, c, h, w)
    assert (~easy[:, 0]).sum().item() == k
    assert torch.equal(dec.grad[easy], weight[easy] * factor)
    assert torch.equal(dec.grad[~easy], weight[~easy])


def test_threshold_keeps_at_least_one_hard_point():
    dist = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])
    t = torch.ones(1, 2, 2, requires_grad=True) * 1.0
    assert scale_easy_gradients(t, dist, ratio=0.99, factor=0.0) == pytest.approx(0.4)  # k = max(1, 0)
    assert scale_easy_gradients(t.detach(), dist, ratio=0.0, factor=0.0) == pytest.approx(0.1)  # no grad: no hook


def fake_recon(seed: int = 0, b: int = 3) -> tuple[Reconstruction, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    enc = [torch.randn(b, 6, 3, 4, generator=g) for _ in range(2)]
    leaves = [(e + torch.randn(b, 6, 3, 4, generator=g)).requires_grad_() for e in enc]
    dec = [leaf * 1.0 for leaf in leaves]
    return Reconstruction(enc, dec, torch.zeros(b, PREFIX + 12, 6)), leaves


def plain_loss(recon: Reconstruction) -> torch.Tensor:
    """The loss written out: per group, mean over the batch of 1 − cos of the flattened maps."""
    per_group = []
    for e, d in zip(recon.enc_groups, recon.dec_groups):
        e, d = e.flatten(1), d.flatten(1)
        cos = (e * d).sum(1) / (e.norm(dim=1) * d.norm(dim=1))
        per_group.append((1 - cos).mean())
    return sum(per_group) / len(per_group)


def test_global_cosine_loss_value_and_hard_mined_gradient():
    recon, leaves = fake_recon()
    ref_recon, ref_leaves = fake_recon()
    loss, info = global_cosine_hm_loss(recon, ratio=0.5, factor=0.1)
    ref = plain_loss(ref_recon)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert info["per_group"].shape == (2,) and info["per_group"].requires_grad
    assert info["per_group"].mean().item() == pytest.approx(loss.item())
    loss.backward()
    ref.backward()
    taus = []
    for leaf, ref_leaf, e in zip(leaves, ref_leaves, recon.enc_groups):
        dist = point_distance(e, ref_leaf.detach())
        tau = dist.flatten().sort(descending=True).values[max(1, math.floor(0.5 * dist.numel())) - 1]
        taus.append(tau.item())
        scale = torch.where(dist < tau, 0.1, 1.0).unsqueeze(1)
        assert torch.allclose(leaf.grad, ref_leaf.grad * scale, rtol=1e-5, atol=1e-9)
    assert info["threshold"] == pytest.approx(sum(taus) / 2)


def test_ratio_zero_leaves_gradients_untouched():
    recon, leaves = fake_recon(1)
    ref_recon, ref_leaves = fake_recon(1)
    global_cosine_hm_loss(recon, ratio=0.0)[0].backward()
    plain_loss(ref_recon).backward()
    for a, b in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)


def test_group_distances_shape_and_value():
    recon, _ = fake_recon()
    d = group_distances(recon)
    assert d.shape == (3, 2, 3, 4)
    e, dd = recon.enc_groups[1][1, :, 2, 3], recon.dec_groups[1][1, :, 2, 3]
    assert d[1, 1, 2, 3].item() == pytest.approx(1 - (e @ dd / (e.norm() * dd.norm())).item(), rel=1e-5)


# --- anomaly maps and score -----------------------------------------------------------------------


def test_anomaly_map_align_corners_and_group_mean_by_hand():
    g0 = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    g1 = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    maps = anomaly_map(torch.stack([g0, g1])[None], (3, 3))
    # align_corners=True: corners are kept, the middle is the average of the neighbours
    g0_up = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]])
    assert maps.shape == (1, 1, 3, 3)
    assert torch.allclose(maps[0, 0], (g0_up + 1.0) / 2)
    per_group = anomaly_map(torch.stack([g0, g1])[None], (3, 3), reduce="none")
    assert per_group.shape == (1, 2, 3, 3) and torch.allclose(per_group[0, 0], g0_up)
    assert torch.allclose(
        anomaly_map(torch.stack([g0, g1])[None], (3, 3), reduce=lambda m: m.amax(1, keepdim=True))[0, 0],
        torch.maximum(g0_up, torch.ones(3, 3)),
    )


def test_image_score_of_a_constant_map_is_the_constant():
    amap = torch.full((2, 1, 40, 60), 0.37)
    amap[1] = 1.5
    assert torch.allclose(image_score(amap), torch.tensor([0.37, 1.5]), rtol=1e-6)


def test_image_score_blur_and_top_k_by_hand():
    cfg = ScoreParams(size=(8, 8), blur_kernel=3, blur_sigma=1.0, top_ratio=3.6 / 64)  # k = ⌊3.6⌋ = 3
    a = math.exp(-0.5)
    center, edge, corner = 1 / (1 + 2 * a) ** 2, a / (1 + 2 * a) ** 2, a * a / (1 + 2 * a) ** 2
    assert torch.allclose(
        gaussian_kernel(3, 1.0).double(),
        torch.tensor([[corner, edge, corner], [edge, center, edge], [corner, edge, corner]], dtype=torch.float64),
        atol=1e-7,
    )
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[0, 0, 4, 4] = 1.0
    # top 3 of the blurred impulse: the centre and two of its four edge neighbours
    assert image_score(impulse, cfg).item() == pytest.approx((center + 2 * edge) / 3, rel=1e-6)
    corner_impulse = torch.zeros(1, 1, 8, 8)
    corner_impulse[0, 0, 0, 0] = 1.0
    # zero padding: nothing is reflected back from outside the border
    assert image_score(
        corner_impulse, ScoreParams(size=(8, 8), blur_kernel=3, blur_sigma=1.0, top_ratio=1 / 64)
    ).item() == pytest.approx(center, rel=1e-6)


def test_image_score_resizes_bilinearly_without_align_corners():
    amap = torch.tensor([[0.0, 1.0], [0.0, 1.0]])[None, None]
    # to 4 columns with align_corners=False: 0, 0.25, 0.75, 1 (align_corners=True would give thirds)
    score = image_score(amap, ScoreParams(size=(4, 4), blur_kernel=1, blur_sigma=1.0, top_ratio=0.5))
    assert score.item() == pytest.approx((1.0 + 0.75) / 2)


def test_image_score_default_top_count_is_655_pixels():
    amap = torch.zeros(1, 1, 256, 256)
    flat = amap.view(-1)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:655]] = 10.0
    no_blur = ScoreParams(blur_kernel=1)
    assert image_score(amap, no_blur).item() == pytest.approx(10.0)
    flat[flat == 10.0] = 0.0
    flat[:654] = 10.0  # one fewer high pixel: the 655th is a zero
    assert image_score(amap, no_blur).item() == pytest.approx(10.0 * 654 / 655)
    assert image_score(amap, ScoreParams(blur_kernel=1, top_ratio=1e-9)).item() == pytest.approx(10.0)  # k >= 1


# --- training and inference on CPU ----------------------------------------------------------------


def test_training_step_moves_only_the_trainable_part():
    model = tiny()
    model.train()
    assert not model.encoder.training and model.bottleneck.training
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    trainable_before = [p.detach().clone() for p in model.trainable_parameters()]
    opt = StableAdamW(model.trainable_parameters(), lr=2e-3, eps=1e-10, weight_decay=1e-4, amsgrad=True)
    x = images(4)
    t0 = time.perf_counter()
    recon = model(x)
    loss, info = global_cosine_hm_loss(recon, hard_mining_ratio(500))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 0.1)
    opt.step()
    elapsed = time.perf_counter() - t0
    assert torch.isfinite(loss) and elapsed < 10
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert all(not torch.equal(a, b) for a, b in zip(trainable_before, model.trainable_parameters()))


def test_predict_is_deterministic_and_restores_the_mode(model):
    model.train()
    x = images(3)
    s1, m1 = model.predict(x)
    s2, m2 = model.predict(x)
    assert model.training and model.bottleneck.training and not model.encoder.training
    assert torch.equal(s1, s2) and torch.equal(m1, m2)  # dropout off during predict
    model.eval()
    recon = model(x)
    expected = anomaly_map(group_distances(recon), (28, 42))
    assert torch.allclose(m1, expected, atol=1e-6)
    assert torch.allclose(s1, image_score(expected), atol=1e-6)
    custom = model.predict(x, reduce=lambda m: m.amax(1, keepdim=True), score=ScoreParams(size=(28, 42)))[0]
    assert custom.shape == (3,) and not torch.allclose(custom, s1)


def _block_grads(block, x, plain: bool):
    from hdmap_ad.core.model import gelu_linear

    block.zero_grad()
    x = x.clone().requires_grad_()
    if plain:  # what autograd does with the modules as they are
        h = block.norm2(x)
        out = x + block.mlp(h)
    else:
        out = x + gelu_linear(block.mlp.fc1(block.norm2(x)), block.mlp.fc2)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [x.grad, *(p.grad.clone() for p in block.mlp.parameters())]


def test_gelu_linear_gives_autograds_gradients_and_saves_less():
    from hdmap_ad.core.model import DecoderBlock, gelu_linear

    torch.manual_seed(0)
    block = DecoderBlock(32, 4, 4.0, 1e-8)
    x = torch.randn(3, 7, 32)
    out_plain, grads_plain = _block_grads(block, x, plain=True)
    out_ours, grads_ours = _block_grads(block, x, plain=False)
    assert torch.equal(out_plain, out_ours)
    for a, b in zip(grads_plain, grads_ours):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)

    def saved_bytes(fn) -> int:
        storages = {}
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
            lambda t: t,
        ):
            fn()
        return sum(storages.values())

    xg = x.clone().requires_grad_()
    full = saved_bytes(lambda: block.mlp(block.norm2(xg)))
    lean = saved_bytes(lambda: gelu_linear(block.mlp.fc1(block.norm2(xg)), block.mlp.fc2))
    hidden = x.numel() * 4 * 4  # one 4C-wide float32 activation
    assert full - lean == hidden


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gelu_linear_under_cuda_autocast_matches_autograd():
    from hdmap_ad.core.model import DecoderBlock

    torch.manual_seed(0)
    block = DecoderBlock(64, 4, 4.0, 1e-8).cuda()
    x = torch.randn(2, 9, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_plain, grads_plain = _block_grads(block, x, plain=True)
        out_ours, grads_ours = _block_grads(block, x, plain=False)
    assert out_plain.dtype == out_ours.dtype
    for a, b in zip(grads_plain, grads_ours):
        assert a.dtype == b.dtype and torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-3)
