"""hseg and vdrop (docs/design.md#m-hseg, #m-vdrop) and combined methods (docs/design.md#5-methods):
dropped fractions equal their formulas, only the intended tokens / rows / heads / layers change, evaluation
is untouched, draws come from the run's generator, and combinations are refused or composed as promised."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import tiny
from hdmap_ad.core import checkpoint
from hdmap_ad.core.config import parse_params
from hdmap_ad.core.errors import HdmapError
from hdmap_ad.core.method_params import HsegParams, VdropParams, method_parts
from hdmap_ad.core.methods import Combination, MethodContext, build_method
from hdmap_ad.core.methods.hseg import drop_row_segments
from hdmap_ad.core.methods.segments import expected_fraction, row_segment_mask
from hdmap_ad.core.methods.vdrop import drop_values, ramp, value_drop_mask

DOMAINS = ["domain_A", "domain_C"]
CHANNELS = 8  # of the hand-made reconstructions below


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def within_3_se(units: torch.Tensor, expected: float) -> tuple[float, float]:
    """Mean of iid per-unit fractions and its standard error; asserts |mean − expected| ≤ 3 SE."""
    units = units.double().flatten()
    mean, se = float(units.mean()), float(units.std() / math.sqrt(units.numel()))
    assert abs(mean - expected) <= 3 * se, (mean, expected, se)
    return mean, se


# --- the row-segment mask ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grid", "row_p", "seg_len", "drop_p"),
    [((3, 9), 0.2, 2, 0.6), ((28, 28), 0.2, 2, 0.6), ((3, 9), 0.7, 4, 0.3), ((4, 5), 1.0, 5, 1.0)],
)
def test_hseg_dropped_fraction_and_column_profile_match_the_formula(grid, row_p, seg_len, drop_p):
    torch.manual_seed(0)
    h, w = grid
    n = 40000 // h
    mask = row_segment_mask((n,), h, w, row_p, seg_len, drop_p, torch.device("cpu"))  # n×h×w
    # rows of different samples and rows are independent units: their fractions are iid
    per_row = mask.float().mean(dim=-1)
    within_3_se(per_row, expected_fraction(row_p, seg_len, w, drop_p))
    # start uniform over the w − seg_len + 1 positions: column j is covered by min(j, ..) of them
    starts = w - seg_len + 1
    for j in range(w):
        covering = sum(1 for s in range(starts) if s <= j < s + seg_len)
        within_3_se(mask[..., j].float(), row_p * drop_p * covering / starts)
    # every dropped token of a row lies within one window of seg_len consecutive tokens
    cols = torch.arange(w).expand_as(mask)
    first = torch.where(mask, cols, w).amin(-1)
    last = torch.where(mask, cols, -1).amax(-1)
    hit = mask.any(-1)
    assert bool((last[hit] - first[hit] < seg_len).all())


def test_hseg_zeroes_whole_tokens_of_patch_rows_without_rescaling():
    torch.manual_seed(1)
    prefix, grid, c = 5, (3, 9), 7
    x = torch.randn(64, prefix + 27, c) + 3.0  # no exact zeros
    out = drop_row_segments(x, prefix, grid, HsegParams(row_p=0.5, seg_len=3, seg_drop_p=0.7))
    assert torch.equal(out[:, :prefix], x[:, :prefix])  # CLS and registers untouched
    patches, kept = out[:, prefix:], x[:, prefix:]
    zero = (patches == 0).all(-1)
    assert bool(zero.any()) and bool(((patches == 0).any(-1) == zero).all())  # all channels or none
    assert torch.equal(patches[~zero], kept[~zero])  # the rest unchanged: no 1/(1-p) rescaling


def test_the_masks_are_drawn_from_the_run_generator():
    draw = lambda: row_segment_mask((16,), 3, 9, 0.5, 2, 0.6, torch.device("cpu"))  # noqa: E731
    torch.manual_seed(5)
    a = draw()
    torch.manual_seed(5)
    assert torch.equal(draw(), a)
    assert not torch.equal(draw(), a)


# --- vdrop ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "head_ratio"), [(6, 0.5), (4, 0.3), (2, 1.0)])
def test_vdrop_fraction_and_head_count_match_the_formula(heads, head_ratio):
    torch.manual_seed(0)
    params = VdropParams(row_p=0.4, band_width=2, seg_drop_p=0.8, head_ratio=head_ratio)
    grid, n = (3, 9), 6000
    mask = value_drop_mask(n, heads, grid, params, params.row_p, torch.device("cpu"))  # n×heads×27
    k = math.ceil(head_ratio * heads - 1e-9)
    # per sample, rows of the chosen heads: whatever is dropped lies in at most k heads
    assert int(mask.any(-1).sum(-1).max()) <= k
    per_sample = mask.float().mean(dim=(1, 2))
    within_3_se(per_sample, k / heads * expected_fraction(params.row_p, 2, grid[1], params.seg_drop_p))
    # each head is chosen equally often
    for head in range(heads):
        within_3_se(mask[:, head].float().mean(-1), k / heads * expected_fraction(0.4, 2, 9, 0.8))


def test_vdrop_touches_only_value_rows_of_patch_tokens():
    torch.manual_seed(2)
    b, heads, d, prefix, grid = 8, 4, 3, 5, (3, 9)
    t = prefix + 27
    qkv = torch.randn(b, t, 3 * heads * d) + 3.0
    mask = value_drop_mask(b, heads, grid, VdropParams(row_p=1.0, seg_drop_p=1.0), 1.0, qkv.device)
    out = drop_values(qkv, heads, prefix, mask).view(b, t, 3, heads, d)
    ref = qkv.view(b, t, 3, heads, d)
    assert torch.equal(out[:, :, :2], ref[:, :, :2])  # queries and keys
    assert torch.equal(out[:, :prefix], ref[:, :prefix])  # prefix tokens
    expected = ref[:, prefix:, 2].clone()
    expected[mask.transpose(1, 2)] = 0.0  # B×N×heads
    assert torch.equal(out[:, prefix:, 2], expected)


def test_vdrop_ramps_in_over_its_warmup():
    assert [ramp(s, 200) for s in (0, 50, 200, 900)] == [0.0, 0.25, 1.0, 1.0]
    assert ramp(0, 0) == 1.0


# --- on the model ---------------------------------------------------------------------------------------


def built(method: str, *extra: str):
    torch.manual_seed(0)
    params = tiny.params(f"method={method}", *extra)
    return checkpoint.build(params, DOMAINS, torch.device("cpu"))


def qkv_changes(model, method, step: int = 1000) -> dict[int, torch.Tensor]:
    """Per decoder block: the qkv output after the method's hooks minus the plain projection of its input."""
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.decoder):
        lin = block.attn.qkv

        def grab(mod, args, out, i=i, lin=lin):
            seen[i] = (out - F.linear(args[0], lin.weight, lin.bias)).detach()

        handles.append(lin.register_forward_hook(grab))  # runs after the method's hook
    model.train()
    method.begin_step(step)
    torch.manual_seed(3)
    model(torch.randn(4, 3, *tiny.SIZE))
    for h in handles:
        h.remove()
    return seen


def test_vdrop_changes_only_the_values_of_its_layers_on_the_model():
    model, method = built(
        "vdrop", "vdrop.apply_layers=[1, 3]", "vdrop.row_p=1.0", "vdrop.seg_drop_p=1.0", "vdrop.warmup_steps=0"
    )
    changes = qkv_changes(model, method)
    c = model.encoder.embed_dim
    for i, diff in changes.items():
        assert torch.equal(diff[..., : 2 * c], torch.zeros_like(diff[..., : 2 * c])), i  # q, k kept
        assert bool(diff[..., 2 * c :].abs().sum() > 0) == (i in (1, 3)), i
    # before the ramp starts nothing is dropped
    model, method = built("vdrop", "vdrop.apply_layers=[1, 3]", "vdrop.warmup_steps=10")
    assert all(float(d.abs().sum()) == 0 for d in qkv_changes(model, method, step=0).values())


@pytest.mark.parametrize("method", ["hseg", "vdrop", "topk+hseg", "hseg+vdrop"])
def test_evaluation_is_unchanged_by_the_dropouts(method):
    model, _ = built("baseline")
    other, m = built(method)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    torch.manual_seed(4)
    images = torch.rand(3, 3, *tiny.SIZE)
    s0, a0 = model.predict(images)
    s1, a1 = other.predict(images)
    assert torch.equal(s0, s1) and torch.equal(a0, a1)
    # and in training mode they do change the reconstruction
    other.train()
    m.begin_step(10_000)
    torch.manual_seed(4)
    recon = other(images)
    model.train()
    torch.manual_seed(4)
    assert not all(torch.equal(a, b) for a, b in zip(model(images).dec_groups, recon.dec_groups))


def test_hseg_lowers_the_bottleneck_element_dropout():
    model, _ = built("hseg", "hseg.elem_p=0.05")
    assert {m.p for m in model.bottleneck.modules() if isinstance(m, torch.nn.Dropout)} == {0.05}
    model, _ = built("topk")
    assert {m.p for m in model.bottleneck.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}


def test_segments_longer_than_a_row_are_one_line_errors():
    with pytest.raises(HdmapError, match=r"hseg.seg_len: 7 is longer than a token-grid row \(6 patches"):
        built("hseg", "hseg.seg_len=7")
    with pytest.raises(HdmapError, match=r"vdrop.apply_layers: \[8\] are not decoder blocks"):
        built("vdrop", "vdrop.apply_layers=[2, 8]")


# --- combinations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("topk+gem", "topk and gem both change the training loss"),
        ("gem+scale", "gem and scale both change the training loss"),
        ("aux+topk", "aux and topk both change the training loss"),
        ("hseg+topk", "write the parts in the order of the method list, 'topk+hseg'"),
        ("baseline+hseg", "write 'hseg'"),
        ("topk+topk", "listed twice"),
        ("topk+nope", "unknown method 'nope'"),
        ("topk+", "unknown method ''"),
    ],
)
def test_bad_combinations_are_refused_with_one_line(name, needle):
    with pytest.raises(ValueError, match=re_escape(needle)):
        method_parts(name)
    raw = tiny_raw()
    raw["method"] = name
    with pytest.raises(HdmapError) as err:
        parse_params(raw)
    assert needle in str(err.value) and "\n" not in str(err.value)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def tiny_raw() -> dict:
    import yaml

    import shipped

    return yaml.safe_load(shipped.params_file().read_text())


@pytest.mark.parametrize(
    ("section", "value"), [("hseg", {"row_p": 1.5}), ("topk", {"q": 0}), ("vdrop", {"apply_layers": []})]
)
def test_a_bad_value_in_a_part_s_section_names_that_section(section, value):
    raw = tiny_raw()
    raw["method"] = "topk+hseg" if section != "vdrop" else "topk+vdrop"
    raw[section] = value
    with pytest.raises(HdmapError) as err:
        parse_params(raw)
    assert f"section `{section}`" in str(err.value) and "\n" not in str(err.value)


def test_a_combination_is_a_method_of_its_own_with_each_part_s_section():
    params = tiny.params("method=topk+hseg", "topk.q=5", "hseg.row_p=0.3", "gem.p=9")
    assert params.method == "topk+hseg" and params.method_parts == ["topk", "hseg"]
    resolved = params.resolved()
    assert resolved["topk"]["q"] == 5 and resolved["hseg"]["row_p"] == 0.3 and "gem" not in resolved
    # the comparison key leaves the method and its parts' sections out (runs pair across methods) ...
    assert params.comparison_key("d") == tiny.params("method=baseline").comparison_key("d")
    # ... but training depends on each part's section
    assert params.training_fingerprint() != tiny.params("method=topk+hseg", "topk.q=5").training_fingerprint()
    # a checkpoint's recorded config rebuilds the same params
    assert checkpoint.params_from_resolved(resolved).method_sections == params.method_sections


def test_a_combination_applies_each_part_at_its_hook():
    ctx = MethodContext(embed_dim=CHANNELS, num_groups=2, domains=tuple(DOMAINS), total_steps=10)
    sections = {"topk": {"q": 10.0, "warmup": 0, "min_k": 1}, "hseg": {}}
    both = build_method("topk+hseg", sections, ctx)
    assert isinstance(both, Combination) and both.name == "topk+hseg"
    topk = build_method("topk", sections, ctx)
    gen = torch.Generator().manual_seed(0)
    enc = [torch.randn(2, 8, 3, 4, generator=gen) for _ in range(2)]
    dec = [e + torch.randn(2, 8, 3, 4, generator=gen) for e in enc]
    from hdmap_ad.core.model import Reconstruction

    recon = Reconstruction(enc, dec, torch.zeros(2, 17, 8))
    ids = torch.zeros(2, dtype=torch.long)
    assert torch.equal(both.loss(recon, ids, 5)[0], topk.loss(recon, ids, 5)[0])  # topk's loss
    maps = torch.rand(2, 2, 5, 5)
    assert torch.equal(both.reduce_maps(maps), maps.mean(1, keepdim=True))  # nobody changes the map
    gem_vdrop = build_method("gem+vdrop", {"gem": {"p": 3.0}}, ctx)
    assert torch.allclose(gem_vdrop.reduce_maps(maps), maps.pow(3).mean(1, keepdim=True).pow(1 / 3))
    scale_hseg = build_method("scale+hseg", {}, ctx)
    assert [g["name"] for g in scale_hseg.param_groups(0.1)] == ["scale"]  # the part's own optimiser group
    assert set(scale_hseg.state_dict()) == {"parts.scale.logits"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["method=hseg"],
        ["method=vdrop", "vdrop.warmup_steps=3", "vdrop.apply_layers=[0, 5]"],
        ["method=topk+hseg", "topk.warmup=2"],
        ["model.recenter=true"],
    ],
    ids=["hseg", "vdrop", "topk+hseg", "recenter"],
)
def test_an_interrupted_run_resumes_byte_identically(workdir, prepared_dir, monkeypatch, capsys, extra):
    from hdmap_ad.pipeline import training
    from hdmap_ad.pipeline.training import MODEL_FILE, STATE_FILE, train

    params = tiny.params(
        "runtime.device=cpu",
        f"data.prepared={prepared_dir}",
        f"data.domains={json.dumps(DOMAINS)}",
        "runtime.resume=auto",
        "train.steps=5",
        "runtime.checkpoint_every=2",
        *extra,
    )
    train(params)
    reference = MODEL_FILE.read_bytes()
    STATE_FILE.unlink()
    MODEL_FILE.unlink()
    original = training.train_step

    def killed_at_step_3(*args, **kwargs):
        if args[7] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(params)
    monkeypatch.setattr(training, "train_step", original)
    capsys.readouterr()
    train(params)
    assert "resuming from" in capsys.readouterr().err
    assert MODEL_FILE.read_bytes() == reference  # weights, optimizer and the dropouts' draws continued exactly


def test_configure_refuses_a_combination_of_two_losses_in_one_line(tmp_path, monkeypatch, capsys):
    """Through the command the DVC `configure` stage runs: non-zero exit, one line, nothing written."""
    import shipped
    from hdmap_ad.apps.cli import main

    out = tmp_path / "train_config.json"
    params = str(shipped.params_file())
    assert main(["configure", "--params", params, "--set", "method=topk+gem", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert "topk and gem both change the training loss" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["configure", "--params", params, "--set", "method=topk+hseg", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["method"] == "topk+hseg"
