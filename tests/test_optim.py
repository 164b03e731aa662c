"""StableAdamW (AMSGrad, update-RMS clip, decoupled weight decay) by hand, against torch's AdamW
where they must agree, and the warm-cosine schedule at its landmarks (docs/design.md#opt-schedule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hdmap_ad.core.optim import StableAdamW, warm_cosine_lr


def reference_steps(p, grads, lr, betas, eps, wd, clip, amsgrad=True):
    """StableAdamW written out element by element in float64 Python arithmetic."""
    b1, b2 = betas
    p = list(p)
    m, v, vmax = [0.0] * len(p), [0.0] * len(p), [0.0] * len(p)
    shrinks = []
    for t, g in enumerate(grads, start=1):
        p = [x * (1 - lr * wd) for x in p]
        m = [b1 * a + (1 - b1) * gi for a, gi in zip(m, g)]
        v = [b2 * a + (1 - b2) * gi * gi for a, gi in zip(v, g)]
        vmax = [max(a, b) for a, b in zip(vmax, v)]
        second = vmax if amsgrad else v
        denom = [math.sqrt(s) / math.sqrt(1 - b2**t) + eps for s in second]
        rms = math.sqrt(sum((gi / d) ** 2 for gi, d in zip(g, denom)) / len(g))
        shrink = max(1.0, rms / clip)
        shrinks.append(shrink)
        p = [x - lr / (1 - b1**t) / shrink * mi / d for x, mi, d in zip(p, m, denom)]
    return p, shrinks


@pytest.mark.parametrize("amsgrad", [True, False])
def test_three_steps_by_hand_with_a_clipped_spike(amsgrad):
    p0 = [1.0, -2.0, 0.5]
    grads = [
        [0.1, -0.2, 0.3],  # step 1: update ratio ±1, RMS just under 1: not clipped
        [5.0, -10.0, 3.0],  # step 2: a spike, RMS ≈ 1.41: clipped
        [0.01, 0.01, -0.01],
    ]  # step 3: small; AMSGrad keeps the spike's second moment
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, wd=0.1, clip=1.0)
    expected, shrinks = reference_steps(p0, grads, amsgrad=amsgrad, **kw)
    assert shrinks[0] == 1.0 and shrinks[1] > 1.3

    p = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = StableAdamW([p], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, clip_threshold=1.0)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert p.detach().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if amsgrad:
        without, _ = reference_steps(p0, grads, amsgrad=False, **kw)
        assert abs(without[0] - expected[0]) > 1e-6  # the AMSGrad max matters in step 3


def test_equals_torch_adamw_amsgrad_when_the_clip_never_binds():
    torch.manual_seed(0)
    shapes = [(4, 3), (5,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [x.detach().clone().requires_grad_() for x in ours]
    kw = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=1e-4, amsgrad=True)
    a = StableAdamW(ours, clip_threshold=1e9, **kw)
    b = torch.optim.AdamW(theirs, **kw)
    for _ in range(6):
        for x, y in zip(ours, theirs):
            g = torch.randn(x.shape)
            x.grad, y.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for x, y in zip(ours, theirs):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-8)


def test_clip_scales_the_step_by_the_update_rms():
    torch.manual_seed(1)
    p1 = torch.randn(10, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_()
    start = p1.detach().clone()
    g = torch.randn(10)
    loose = StableAdamW([p1], lr=0.1, weight_decay=0.0, amsgrad=True, clip_threshold=1e9)
    tight = StableAdamW([p2], lr=0.1, weight_decay=0.0, amsgrad=True, clip_threshold=0.25)
    p1.grad, p2.grad = g.clone(), g.clone()
    loose.step()
    tight.step()
    ratio = g / (g.abs() + 1e-8)  # first step: update ratio g / (|g| + eps)
    rms = ratio.square().mean().sqrt()
    assert torch.allclose(p2 - start, (p1 - start) * 0.25 / rms, rtol=1e-5, atol=1e-9)


def test_weight_decay_is_decoupled_and_skips_parameters_without_grad():
    a = torch.tensor([1.0, -3.0], requires_grad=True)
    b = torch.tensor([2.0, 2.0], requires_grad=True)
    opt = StableAdamW([a, b], lr=0.5, weight_decay=0.1, amsgrad=True)
    a.grad = torch.zeros(2)  # zero gradient: only the decay moves it
    opt.step()
    assert a.detach().tolist() == pytest.approx([0.95, -2.85], rel=1e-7)
    assert b.detach().tolist() == [2.0, 2.0] and b not in opt.state


def test_state_dict_resume_continues_identically():
    torch.manual_seed(2)
    grads = [torch.randn(6) for _ in range(5)]
    p = torch.zeros(6, requires_grad=True)
    opt = StableAdamW([p], lr=0.01, amsgrad=True, clip_threshold=0.5)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    q = torch.zeros(6, requires_grad=True)
    first = StableAdamW([q], lr=0.01, amsgrad=True, clip_threshold=0.5)
    for g in grads[:2]:
        q.grad = g.clone()
        first.step()
    resumed = StableAdamW([q], lr=0.01, amsgrad=True, clip_threshold=0.5)
    resumed.load_state_dict(first.state_dict())
    for g in grads[2:]:
        q.grad = g.clone()
        resumed.step()
    assert torch.equal(p, q)


def test_bad_hyperparameters_are_rejected():
    for kw in ({"lr": -1.0}, {"betas": (1.0, 0.9)}, {"eps": -1.0}, {"weight_decay": -0.1}, {"clip_threshold": 0.0}):
        with pytest.raises(ValueError):
            StableAdamW([torch.zeros(1, requires_grad=True)], **kw)


# --- warm-cosine ----------------------------------------------------------------------------------

BASE, FINAL = 2e-3, 2e-4


def test_warm_cosine_landmarks():
    total, warm = 201, 100  # cosine over steps 100..200: 100 intervals
    assert warm_cosine_lr(0, BASE, FINAL, total, warm) == 0.0
    assert warm_cosine_lr(33, BASE, FINAL, total, warm) == pytest.approx(BASE * 33 / 99)
    assert warm_cosine_lr(99, BASE, FINAL, total, warm) == pytest.approx(BASE)  # warm-up end
    assert warm_cosine_lr(100, BASE, FINAL, total, warm) == pytest.approx(BASE)  # cosine start
    assert warm_cosine_lr(150, BASE, FINAL, total, warm) == pytest.approx((BASE + FINAL) / 2)  # mid
    assert warm_cosine_lr(200, BASE, FINAL, total, warm) == pytest.approx(FINAL, rel=1e-12)  # last step
    assert warm_cosine_lr(500, BASE, FINAL, total, warm) == FINAL
    lrs = [warm_cosine_lr(s, BASE, FINAL, total, warm) for s in range(total)]
    assert all(x <= y for x, y in zip(lrs[:100], lrs[1:100])) and all(x >= y for x, y in zip(lrs[100:], lrs[101:]))


def test_paper_schedule_ends_at_final_on_step_2999():
    assert warm_cosine_lr(2999, BASE, FINAL, 3000, 100) == pytest.approx(FINAL, rel=1e-12)
    assert warm_cosine_lr(1549, BASE, FINAL, 3000, 100) == pytest.approx(
        FINAL + 0.5 * (BASE - FINAL) * (1 + math.cos(math.pi * 1449 / 2899))
    )


def test_original_indexing_matches_the_original_schedule_array():
    total, warm = 300, 100
    # The original precomputes linspace(0, base, W) followed by a cosine over T − W steps.
    cosine = FINAL + 0.5 * (BASE - FINAL) * (1 + np.cos(np.pi * np.arange(total - warm) / (total - warm)))
    schedule = np.concatenate([np.linspace(0, BASE, warm), cosine])
    ours = [warm_cosine_lr(s, BASE, FINAL, total, warm, reach_final_at_last=False) for s in range(total)]
    assert np.allclose(ours, schedule, rtol=1e-12, atol=0)
    assert warm_cosine_lr(total, BASE, FINAL, total, warm, reach_final_at_last=False) == FINAL


def test_no_warmup_starts_at_the_base_rate():
    assert warm_cosine_lr(0, BASE, FINAL, 11, 0) == pytest.approx(BASE)
    assert warm_cosine_lr(10, BASE, FINAL, 11, 0) == pytest.approx(FINAL)
    with pytest.raises(ValueError):
        warm_cosine_lr(-1, BASE, FINAL, 11, 0)


@pytest.mark.parametrize("amsgrad", [True, False])
def test_fused_path_matches_the_op_by_op_reference(amsgrad):
    """The default (fused AdamW kernel + scratch RMS) and `fused=False` give the same trajectory,
    with the clip binding on some tensors and steps and not on others."""
    torch.manual_seed(3)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    fused = [torch.randn(s, requires_grad=True) for s in shapes]
    plain = [x.detach().clone().requires_grad_() for x in fused]
    kw = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, amsgrad=amsgrad, clip_threshold=1.0)
    a, b = StableAdamW(fused, **kw), StableAdamW(plain, fused=False, **kw)
    assert a._use_fused(fused[0]) and not b._use_fused(plain[0])
    for step in range(8):
        for i, (x, y) in enumerate(zip(fused, plain)):
            g = torch.randn(x.shape) * (50.0 if step == 3 and i == 0 else 1.0)  # a spike: the clip binds
            x.grad, y.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for x, y in zip(fused, plain):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)
    for x, y in zip(fused, plain):
        for key in ("exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else [])):
            assert torch.allclose(a.state[x][key], b.state[y][key], rtol=1e-5, atol=1e-7)
