"""Training-method plug-ins (docs/design.md#5-methods): degenerate cases reduce to known ones, schedules, param
validation, the aux head's gradient path, and a smoke test of every method on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from pydantic import ValidationError

import shipped
import tiny
from hdmap_ad.core.config import parse_params
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.methods import REGISTRY, MethodContext, build
from hdmap_ad.core.methods.topk import k_at, q_at
from hdmap_ad.core.model import Dinomaly, Reconstruction, group_distances, point_distance
from hdmap_ad.core.optim import StableAdamW

REPO_PARAMS = shipped.params_file()
DOMAINS = ("domain_A", "domain_B", "domain_C", "domain_D")
G, B, C, H, W = 2, 3, 8, 4, 5
PREFIX = 5  # CLS + 4 registers


def ctx(num_groups: int = G, embed_dim: int = C, **kw) -> MethodContext:
    return MethodContext(embed_dim=embed_dim, num_groups=num_groups, domains=DOMAINS, total_steps=100, **kw)


def make(name: str, embed_dim: int = C, num_groups: int = G, **section) -> torch.nn.Module:
    return build(name, section, ctx(num_groups=num_groups, embed_dim=embed_dim))


def fake_recon(seed: int = 0, b: int = B, groups: int = G) -> tuple[Reconstruction, list[torch.Tensor]]:
    """A Reconstruction from random tensors; the decoder maps are leaves so their grads can be read."""
    gen = torch.Generator().manual_seed(seed)
    enc = [torch.randn(b, C, H, W, generator=gen) for _ in range(groups)]
    dec = [(e + 0.8 * torch.randn(b, C, H, W, generator=gen)).requires_grad_() for e in enc]
    bottleneck = torch.randn(b, PREFIX + H * W, C, generator=gen).requires_grad_()
    return Reconstruction(enc_groups=enc, dec_groups=dec, bottleneck_out=bottleneck), dec


def dec_grads(name: str, step: int = 0, seed: int = 0, **section) -> tuple[torch.Tensor, list[torch.Tensor]]:
    recon, dec = fake_recon(seed)
    loss, _ = make(name, **section).loss(recon, torch.zeros(B, dtype=torch.long), step)
    loss.backward()
    return loss.detach(), [d.grad for d in dec]


# --- registry and params ---------------------------------------------------------------------------


def test_registry_lists_every_method():
    assert list(REGISTRY) == ["baseline", "gem", "focal", "aux", "scale", "topk", "hseg", "vdrop"]


def test_params_yaml_sections_validate_to_the_spec_defaults():
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    for name in REGISTRY:
        schema = REGISTRY[name].Params
        assert schema.model_validate(raw[name]) == schema.model_validate({}), name  # yaml = schema defaults
    assert REGISTRY["gem"].Params().p == 3.0 and REGISTRY["gem"].Params().factor == 0.3
    assert REGISTRY["focal"].Params().gamma == 2.0
    assert REGISTRY["aux"].Params().weight == 0.1
    assert REGISTRY["scale"].Params().lr_mult == 10.0
    assert REGISTRY["topk"].Params().q == 2.0 and REGISTRY["topk"].Params().warmup == 200


BAD = [
    ("gem", {"p": 0}),
    ("gem", {"p": -1.0}),
    ("gem", {"factor": -0.1}),
    ("gem", {"factor": 1.5}),
    ("focal", {"gamma": -0.5}),
    ("aux", {"weight": -0.1}),
    ("scale", {"lr_mult": 0}),
    ("scale", {"weights": [-0.5, 1.5]}),
    ("scale", {"weights": [0, 0]}),
    ("scale", {"weights": []}),
    ("scale", {"weights": [float("nan"), 1.0]}),
    ("topk", {"q": 0}),
    ("topk", {"q": 100.5}),
    ("topk", {"warmup": -1}),
    ("topk", {"min_k": 0}),
] + [(name, {"no_such_key": 1}) for name in ("baseline", "gem", "focal", "aux", "scale", "topk")]


@pytest.mark.parametrize(("name", "section"), BAD, ids=[f"{n}-{next(iter(s))}" for n, s in BAD])
def test_params_reject_bad_values(name, section):
    with pytest.raises(ValidationError):
        REGISTRY[name].Params.model_validate(section)


@pytest.mark.parametrize("name", ["gem", "focal", "aux", "scale", "topk"])
def test_bad_method_value_is_reported_under_its_section(name):
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["method"] = name
    raw[name] = {"no_such_key": 1}
    with pytest.raises(HdmapError, match=f"section `{name}`"):
        parse_params(raw)


# --- gem -------------------------------------------------------------------------------------------


def test_gem_with_p1_is_the_mean_loss_and_map():
    recon, _ = fake_recon()
    loss, info = make("gem", p=1.0).loss(recon, torch.zeros(B, dtype=torch.long), 0)
    assert torch.allclose(loss, group_distances(recon).mean(), atol=1e-6)
    assert "gem/p" not in info  # a setting (the param gem.p), not a curve
    maps = torch.rand(B, G, 11, 13) + 0.01
    assert torch.allclose(make("gem", p=1.0).reduce_maps(maps), maps.mean(dim=1, keepdim=True), atol=1e-6)


def test_gem_large_p_leans_to_the_max_and_matches_the_formula():
    maps = torch.rand(B, G, 6, 7) + 0.01
    out = make("gem", p=3.0).reduce_maps(maps)
    assert out.shape == (B, 1, 6, 7)
    assert torch.allclose(out, maps.pow(3).mean(1, keepdim=True).pow(1 / 3), atol=1e-6)
    assert bool((out >= maps.mean(1, keepdim=True) - 1e-6).all() and (out <= maps.amax(1, keepdim=True) + 1e-6).all())
    # the 1e-6 floor keeps a fractional power finite at d <= 0 (1 - cos rounds below 0 sometimes)
    assert torch.isfinite(make("gem", p=2.5).reduce_maps(torch.full((1, G, 2, 2), -1e-7))).all()


def test_gem_hard_mining_scales_easy_points_gradients_by_factor():
    factor, step = 0.3, 500  # ρ = 0.45 under the default schedule
    _, plain = dec_grads("gem", step=0, factor=factor)  # ρ = 0: no point is easy
    recon, dec = fake_recon()
    loss, info = make("gem", factor=factor).loss(recon, torch.zeros(B, dtype=torch.long), step)
    loss.backward()
    assert info["hard_mining/ratio"] == pytest.approx(0.45)
    per_point = (
        (1 - torch.stack([torch.cosine_similarity(e, d.detach(), dim=1) for e, d in zip(recon.enc_groups, dec)], 1))
        .clamp_min(1e-6)
        .pow(3)
        .mean(1)
        .pow(1 / 3)
    )
    easy = per_point < info["hard_mining/threshold"]  # B×h×w
    n_points = per_point.numel()
    assert int(easy.sum()) == n_points - max(1, math.floor((1 - 0.45) * n_points))
    easy_c = easy.unsqueeze(1).expand(-1, C, -1, -1)
    for g in range(G):
        assert torch.allclose(dec[g].grad[easy_c], factor * plain[g][easy_c], atol=1e-9)
        assert torch.allclose(dec[g].grad[~easy_c], plain[g][~easy_c], atol=1e-9)


# --- focal -----------------------------------------------------------------------------------------


def test_focal_with_gamma0_is_the_mean_pointwise_cosine_distance():
    recon, _ = fake_recon()
    loss, _ = make("focal", gamma=0.0).loss(recon, torch.zeros(B, dtype=torch.long), 0)
    expected = torch.stack([point_distance(e, d) for e, d in zip(recon.enc_groups, recon.dec_groups)]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_focal_weights_are_detached_distance_powers():
    gamma = 2.0
    loss, grads = dec_grads("focal", gamma=gamma)
    recon, dec = fake_recon()
    d = torch.stack([point_distance(e, x) for e, x in zip(recon.enc_groups, dec)])  # G×B×h×w
    w = d.detach().pow(gamma)
    by_hand = ((w * d).flatten(1).sum(1) / w.flatten(1).sum(1)).mean()
    by_hand.backward()
    assert torch.allclose(loss, by_hand.detach(), atol=1e-6)
    for g in range(G):  # the gradient treats w as a constant: d/dd = w / Σw / G
        assert torch.allclose(grads[g], dec[g].grad, atol=1e-8)


# --- topk ------------------------------------------------------------------------------------------


def test_topk_q_schedule():
    assert q_at(0, 2.0, 200) == 100.0
    assert q_at(100, 2.0, 200) == pytest.approx(51.0)
    assert q_at(200, 2.0, 200) == 2.0 and q_at(10_000, 2.0, 200) == 2.0
    assert q_at(0, 5.0, 0) == 5.0  # no warmup: q from the first step
    assert k_at(1000, 2.0, 100) == 100  # min_k wins
    assert k_at(100_000, 2.0, 100) == 2000  # ⌊N·q/100⌋
    assert k_at(50, 2.0, 100) == 50  # capped at N
    assert k_at(1000, 100.0, 100) == 1000


def test_topk_with_q100_is_the_mean_of_group_averaged_distances():
    recon, _ = fake_recon()
    loss, info = make("topk", q=100.0, warmup=0, min_k=1).loss(recon, torch.zeros(B, dtype=torch.long), 0)
    assert torch.allclose(loss, group_distances(recon).mean(), atol=1e-6)
    assert info == {}  # no warmup: q_t and k are fixed by the settings, not curves


def test_topk_keeps_the_k_largest_points():
    recon, _ = fake_recon()
    n = B * H * W
    loss, info = make("topk", q=10.0, warmup=2, min_k=7).loss(recon, torch.zeros(B, dtype=torch.long), 3)
    k = max(7, math.floor(n * 10 / 100))
    assert info["topk/k"] == k
    expected = group_distances(recon).mean(1).flatten().sort(descending=True).values[:k].mean()
    assert torch.allclose(loss, expected, atol=1e-6)


# --- scale -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section",
    [{"learnable": False, "weights": [0.5, 0.5]}, {"learnable": False, "weights": [2, 2]}, {"learnable": True}],
    ids=["fixed-half", "fixed-unnormalised", "learnable-init"],
)
def test_scale_with_equal_weights_equals_baseline(section):
    step = 600  # hard mining active, so the hook is part of what must match
    base_loss, base_grads = dec_grads("baseline", step=step)
    loss, grads = dec_grads("scale", step=step, **section)
    assert torch.allclose(loss, base_loss, atol=1e-7)
    for a, b in zip(grads, base_grads):
        assert torch.allclose(a, b, atol=1e-9)
    maps = torch.rand(B, G, 6, 7)
    assert torch.allclose(make("scale", **section).reduce_maps(maps), maps.mean(1, keepdim=True), atol=1e-6)


def test_scale_alpha_diagnostics_and_lr_mult_group():
    method = make("scale", lr_mult=10.0)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.3, -1.2]))
    diag = method.diagnostics()
    assert set(diag) == {"scale/alpha_0", "scale/alpha_1"}
    assert sum(diag.values()) == pytest.approx(1.0)
    assert diag["scale/alpha_0"] == pytest.approx(torch.softmax(torch.tensor([0.3, -1.2]), 0)[0].item())
    groups = method.param_groups(2e-3)
    assert len(groups) == 1 and groups[0]["lr_mult"] == 10.0 and groups[0]["params"] == [method.logits]
    # the logits learn: the loss gradient reaches them, and the optimiser built as the training loop
    # builds it (a model group, then the method's groups; lr = schedule × lr_mult) moves them
    recon, _ = fake_recon()
    loss, _ = method.loss(recon, torch.zeros(B, dtype=torch.long), 0)
    loss.backward()
    assert method.logits.grad is not None and bool(method.logits.grad.abs().sum() > 0)
    dummy = torch.nn.Parameter(torch.zeros(1))
    optimizer = StableAdamW(
        [{"params": [dummy], "lr": 2e-3, "lr_mult": 1.0, "name": "model"}, *({"lr_mult": 1.0, **g} for g in groups)],
        lr=2e-3,
        amsgrad=True,
    )
    for g in optimizer.param_groups:
        g["lr"] = 1e-3 * g.get("lr_mult", 1.0)
    before = method.logits.detach().clone()
    optimizer.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-2)
    assert not torch.equal(method.logits.detach(), before)


def test_scale_fixed_weights_are_normalised_and_checked_against_the_groups():
    method = make("scale", learnable=False, weights=[1.0, 3.0])
    assert method.param_groups(1e-3) == [] and list(method.parameters()) == []
    assert method.diagnostics() == {}  # fixed weights are constants: params, not curves
    assert method.constants() == pytest.approx({"scale.alpha_0": 0.25, "scale.alpha_1": 0.75})
    maps = torch.rand(B, G, 6, 7)
    assert torch.allclose(method.reduce_maps(maps), 0.25 * maps[:, :1] + 0.75 * maps[:, 1:], atol=1e-6)
    with pytest.raises(HdmapError, match="weights has 3 entries"):
        make("scale", learnable=False, weights=[0.2, 0.3, 0.5])


# --- aux -------------------------------------------------------------------------------------------


def test_aux_head_drops_prefix_tokens_and_predicts_per_sample():
    method = make("aux")
    recon, _ = fake_recon()
    with torch.no_grad():
        recon.bottleneck_out[:, :PREFIX] = 1e6  # prefix tokens must not reach the head
    from hdmap_ad.core.methods.aux import patch_token_mean

    assert torch.allclose(patch_token_mean(recon), recon.bottleneck_out[:, PREFIX:].mean(1))
    out = method.eval_batch(recon, torch.zeros(B, dtype=torch.long))
    assert set(out) == {"domain_pred"} and out["domain_pred"].shape == (B,) and out["domain_pred"].dtype == torch.long
    maps = torch.rand(B, G, 6, 7)
    assert torch.allclose(method.reduce_maps(maps), maps.mean(1, keepdim=True))


def test_aux_loss_is_baseline_plus_weighted_ce_and_logs_accuracy():
    ids = torch.tensor([0, 2, 3])
    recon, _ = fake_recon()
    method = make("aux", weight=0.5)
    loss, info = method.loss(recon, ids, 0)
    base, _ = make("baseline").loss(recon, ids, 0)
    ce = torch.nn.functional.cross_entropy(method.logits(recon), ids)
    assert torch.allclose(loss, base + 0.5 * ce, atol=1e-6) and info["aux/ce"] == pytest.approx(ce.item(), abs=1e-6)
    acc = (method.logits(recon).argmax(1) == ids).float().mean().item()
    assert method.diagnostics() == {"aux/train_acc": pytest.approx(acc)}
    assert method.diagnostics() == {}  # the window resets at each logging step
    with pytest.raises(HdmapError, match="at least 2 domains"):
        build("aux", {}, MethodContext(embed_dim=C, num_groups=G, domains=("domain_A",), total_steps=1))


# --- tiny model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> Dinomaly:
    torch.manual_seed(0)
    model = Dinomaly(tiny.model_config())
    model.init_trainable()
    return model


def tiny_recon(model: Dinomaly) -> Reconstruction:
    torch.manual_seed(1)
    return model(torch.randn(4, 3, *tiny.model_config().image_size))


def test_aux_gradient_reaches_the_bottleneck_and_not_the_encoder(tiny_model):
    model = tiny_model
    method = make("aux", embed_dim=model.encoder.embed_dim, weight=1.0)
    model.zero_grad(set_to_none=True)
    recon = tiny_recon(model)
    ids = torch.tensor([0, 1, 2, 3])
    ce = torch.nn.functional.cross_entropy(method.logits(recon), ids)
    ce.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(not e.requires_grad for e in recon.enc_groups)
    bottleneck_grads = [p.grad for p in model.bottleneck.parameters()]
    assert all(g is not None for g in bottleneck_grads) and sum(float(g.abs().sum()) for g in bottleneck_grads) > 0
    assert all(p.grad is None for p in model.decoder.parameters())  # the head sits before the decoder
    assert all(p.grad is not None for p in method.head.parameters())


@pytest.mark.parametrize("name", ["baseline", "gem", "focal", "aux", "scale", "topk"])
def test_every_method_trains_on_a_tiny_model(tiny_model, name):
    model = tiny_model
    model.zero_grad(set_to_none=True)
    method = build(
        name,
        {},
        MethodContext(
            embed_dim=model.encoder.embed_dim, num_groups=len(model.config.fuse_groups), domains=DOMAINS, total_steps=10
        ),
    )
    recon = tiny_recon(model)
    loss, info = method.loss(recon, torch.tensor([0, 1, 2, 3]), 400)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(math.isfinite(v) for v in info.values())
    loss.backward()
    trained = [p for p in model.trainable_parameters()] + list(method.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.decoder.parameters())
    assert all(torch.isfinite(p.grad).all() for p in trained if p.grad is not None)
    assert all(math.isfinite(v) for v in method.diagnostics().values())
    maps = method.reduce_maps(torch.rand(4, len(model.config.fuse_groups), 28, 42))
    assert maps.shape == (4, 1, 28, 42) and torch.isfinite(maps).all()


# --- what a method logs ----------------------------------------------------------------------------

CONSTANT_CASES = [
    ("baseline", {}, {}),
    ("baseline", {}, {"hard_mining_ramp_steps": 0}),
    ("gem", {}, {}),
    ("focal", {}, {}),
    ("aux", {}, {}),
    ("scale", {}, {}),
    ("scale", {"learnable": False, "weights": [1.0, 3.0]}, {}),
    ("topk", {"warmup": 4, "min_k": 1}, {}),
    ("topk", {"warmup": 0}, {}),
    ("vdrop", {"warmup_steps": 4}, {}),
    ("vdrop", {"warmup_steps": 0}, {}),
    ("hseg", {}, {}),
]


@pytest.mark.parametrize(
    ("name", "section", "ctx_kw"), CONSTANT_CASES, ids=[f"{n}-{s or k or 'default'}" for n, s, k in CONSTANT_CASES]
)
def test_diagnostics_are_curves_that_move_never_settings(name, section, ctx_kw):
    """What a method logs as metric curves changes during training; a value fixed by the settings (focal's γ,
    gem's p, fixed scale weights, a schedule without a ramp) is not a curve: it is a param already, or one
    of the method's `constants()`. Steps run through the ramps with fresh batches and, for learnable
    extras, optimiser updates."""
    method = build(name, section, ctx(**{"hard_mining_ramp_steps": 4, **ctx_kw}))
    optimizer = torch.optim.SGD(list(method.parameters()) or [torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    seen: dict[str, set[float]] = {}
    for step in range(6):
        recon, _ = fake_recon(seed=step)
        method.begin_step(step)
        optimizer.zero_grad()
        loss, info = method.loss(recon, torch.tensor([0, 1, 2]), step)
        loss.backward()
        optimizer.step()
        for key, value in {**info, **method.diagnostics()}.items():
            seen.setdefault(key, set()).add(round(float(value), 12))
    constant = sorted(k for k, values in seen.items() if len(values) == 1)
    assert not constant, f"{name} logs constants as curves: {constant}"
