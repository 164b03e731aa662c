"""Frozen DINOv2-reg encoder (docs/design.md#model-encoder): which blocks run, token order, frozen state, and weights
from the original DINOv2 layout / timm safetensors / the hub cache, loaded strictly, with clear
errors offline. Tiny timm encoders only (embed_dim 32); nothing is downloaded."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny
from hdmap_ad.core.encoder import (
    DEFAULT_TARGET_BLOCKS,
    ENCODER_NAMES,
    FrozenEncoder,
    create_vit,
    default_target_blocks,
    load_weights,
)
from hdmap_ad.core.errors import HdmapError

TINY = {**tiny.ENCODER, "depth": 6}
SIZE = (28, 42)  # 2×3 patches: non-square on purpose
SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_vit(size=SIZE, seed: int = 0, **over):
    torch.manual_seed(seed)
    return create_vit("small", "random", size, {**TINY, **over})


def to_original_layout(timm_state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict as the original dinov2_vit*14_reg4_pretrain.pth holds it.

    The original keeps the class token's position embedding as row 0 of pos_embed (added to the
    class token at run time), names the register tokens `register_tokens`, and has a mask_token;
    timm folds row 0 into cls_token. Row 0 is random here so the folding is exercised.
    """
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in timm_state.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    c = timm_state["cls_token"].shape[-1]
    cls_pos = torch.randn(1, 1, c, generator=g)
    out["cls_token"] = timm_state["cls_token"] - cls_pos
    out["pos_embed"] = torch.cat([cls_pos, timm_state["pos_embed"]], dim=1)
    out["register_tokens"] = timm_state["reg_token"].clone()
    out["mask_token"] = torch.zeros(1, c)
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


# --- names and defaults ---------------------------------------------------------------------------


def test_names_and_default_targets():
    assert ENCODER_NAMES["base"] == "vit_base_patch14_reg4_dinov2"
    assert DEFAULT_TARGET_BLOCKS["small"] == DEFAULT_TARGET_BLOCKS["base"] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert DEFAULT_TARGET_BLOCKS["large"] == [4, 6, 8, 10, 12, 14, 16, 18]
    assert default_target_blocks("vit_large_patch14_reg4_dinov2") == DEFAULT_TARGET_BLOCKS["large"]
    assert default_target_blocks("base") == DEFAULT_TARGET_BLOCKS["base"]


def test_real_architectures_have_the_spec_sizes():
    with torch.device("meta"):  # shapes only
        for alias, (dim, heads, depth) in {
            "small": (384, 6, 12),
            "base": (768, 12, 12),
            "large": (1024, 16, 24),
        }.items():
            vit = create_vit(alias, "random", (392, 392))
            assert (vit.embed_dim, vit.blocks[0].attn.num_heads, len(vit.blocks)) == (dim, heads, depth)
            assert vit.num_prefix_tokens == 5 and vit.pos_embed.shape[1] == 28 * 28


# --- the frozen extractor -------------------------------------------------------------------------


def test_blocks_after_the_last_target_never_run():
    vit = tiny_vit()
    calls = [0] * len(vit.blocks)
    for i, block in enumerate(vit.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.__setitem__(i, calls[i] + 1))
    enc = FrozenEncoder(vit, [1, 3])
    out = enc(torch.randn(2, 3, *SIZE))
    assert calls == [1, 1, 1, 1, 0, 0]
    assert len(enc.vit.blocks) == 4 and len(out) == 2


def test_outputs_are_raw_target_block_outputs_with_cls_registers_patches_order():
    vit = tiny_vit()
    reference = copy.deepcopy(vit)
    enc = FrozenEncoder(vit, [0, 2, 5])
    images = torch.randn(2, 3, *SIZE)
    seen = {}
    enc.vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("tokens", args[0]))
    out = enc(images)

    tokens = seen["tokens"]
    patches = reference.patch_embed(images) + reference.pos_embed  # B×N×C, position added to patches only
    assert tokens.shape == (2, 1 + 4 + 6, 32)
    assert torch.equal(tokens[:, 0], reference.cls_token[:, 0].expand(2, -1))
    assert torch.equal(tokens[:, 1:5], reference.reg_token.expand(2, -1, -1))
    assert torch.allclose(tokens[:, 5:], patches, atol=1e-6)

    x, expected = tokens, []
    for i, block in enumerate(reference.blocks):
        x = block(x)
        if i in (0, 2, 5):
            expected.append(x)
    for o, e in zip(out, expected):  # no final norm
        assert o.shape == (2, 11, 32)
        assert torch.allclose(o, e, atol=1e-5)
    assert (enc.num_prefix_tokens, enc.embed_dim, enc.patch_size, enc.num_heads) == (5, 32, 14, 2)


def test_encoder_stays_frozen_and_in_eval_mode():
    enc = FrozenEncoder(tiny_vit(drop_path_rate=0.5), [1, 2])
    assert not enc.training and not any(m.training for m in enc.modules())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    images = torch.randn(1, 3, *SIZE)
    a, b = enc(images), enc(images)  # drop-path would make these differ in train mode
    assert torch.equal(a[-1], b[-1])
    assert not a[-1].requires_grad and not a[-1].is_inference()  # usable as an autograd input


def test_target_blocks_are_checked():
    with pytest.raises(HdmapError, match="target_blocks"):
        FrozenEncoder(tiny_vit(), [2, 9])
    with pytest.raises(HdmapError, match="target_blocks"):
        FrozenEncoder(tiny_vit(), [3, 1])


def test_input_size_must_match_the_built_size():
    enc = FrozenEncoder(tiny_vit(), [1])
    with pytest.raises(ValueError, match="built for 28x42"):
        enc(torch.randn(1, 3, 42, 28))


def test_bad_encoder_settings_are_user_errors():
    with pytest.raises(HdmapError, match="model.encoder"):
        create_vit("no_such_model_xyz", "random", SIZE)
    with pytest.raises(HdmapError, match="multiples of the patch size"):
        create_vit("small", "random", (30, 42), TINY)
    with pytest.raises(HdmapError, match="encoder_overrides"):
        create_vit("small", "random", SIZE, {**TINY, "img_size": 28})


# --- weights ---------------------------------------------------------------------------------------


def test_original_layout_pth_loads_strictly_and_exactly(tmp_path):
    source = tiny_vit(seed=1).state_dict()
    original = to_original_layout(source)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)

    vit = tiny_vit(seed=2)  # different random weights, all to be overwritten
    load_weights(vit, path)
    loaded = vit.state_dict()
    for k, v in source.items():
        if k == "cls_token":  # timm folds the class token's position into it: same arithmetic
            assert torch.equal(loaded[k], original["cls_token"] + original["pos_embed"][:, 0])
            assert torch.allclose(loaded[k], v, atol=1e-6)
        else:
            assert torch.equal(loaded[k], v), k


def test_our_loader_equals_timms_pretrained_file_path(tmp_path):
    import timm

    path = tmp_path / "orig.pth"
    torch.save(to_original_layout(tiny_vit(seed=3).state_dict()), path)
    ours = create_vit("small", str(path), SIZE, TINY)
    theirs = timm.create_model(
        ENCODER_NAMES["small"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        img_size=SIZE,
        num_classes=0,
        **TINY,
    )
    assert_same_state(ours.state_dict(), theirs.state_dict())


def test_position_grid_of_another_size_is_resampled_as_timm_does(tmp_path):
    from timm.layers import resample_abs_pos_embed

    square = tiny_vit(size=(42, 42), seed=4).state_dict()  # 3×3 grid in the file
    path = tmp_path / "square.pth"
    torch.save(to_original_layout(square), path)
    vit = tiny_vit()  # 2×3 grid in the model
    load_weights(vit, path)
    expected = resample_abs_pos_embed(square["pos_embed"], new_size=(2, 3), num_prefix_tokens=0)
    assert vit.pos_embed.shape == (1, 6, 32)
    assert torch.allclose(vit.pos_embed, expected, atol=1e-6)


@pytest.mark.parametrize("layout", ["timm", "original"])
def test_safetensors_in_either_layout(tmp_path, layout):
    source = tiny_vit(seed=5).state_dict()
    state = source if layout == "timm" else to_original_layout(source)
    path = tmp_path / f"{layout}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    vit = create_vit("small", str(path), SIZE, TINY)
    assert_same_state(vit.state_dict(), source, exact=layout == "timm")


def test_missing_key_names_the_file_and_the_key(tmp_path):
    state = to_original_layout(tiny_vit().state_dict())
    del state["blocks.3.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(HdmapError, match=r"broken\.pth.*missing keys blocks\.3\.attn\.qkv\.weight"):
        create_vit("small", str(path), SIZE, TINY)


def test_wrong_shape_and_extra_keys_name_the_file(tmp_path):
    state = to_original_layout(tiny_vit().state_dict())
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(64, 32)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(HdmapError, match=r"wrong\.safetensors.*shape mismatch blocks\.0\.mlp\.fc1\.weight \(64, 32\)"):
        create_vit("small", str(path), SIZE, TINY)
    bigger = to_original_layout(tiny_vit(depth=7).state_dict())  # a deeper encoder's file
    path = tmp_path / "deeper.pth"
    torch.save(bigger, path)
    with pytest.raises(HdmapError, match=r"deeper\.pth.*unexpected keys blocks\.6\."):
        create_vit("small", str(path), SIZE, TINY)


def test_missing_or_unreadable_file_is_named(tmp_path):
    with pytest.raises(HdmapError, match="nowhere.pth does not exist"):
        create_vit("small", str(tmp_path / "nowhere.pth"), SIZE, TINY)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(HdmapError, match="junk.pth is not a readable weights file"):
        create_vit("small", str(junk), SIZE, TINY)


def test_hub_offline_without_cache_names_the_file_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(HdmapError) as err:
        create_vit("base", "hub", SIZE, TINY)
    msg = str(err.value)
    assert "dinov2_vitb14_reg4_pretrain.pth" in msg
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth" in msg
    assert "model.weights" in msg and "\n" not in msg


def test_hub_unreachable_fails_fast_in_a_fresh_process(tmp_path):
    """No offline flag: an unresolvable hub host must give the message at once, not retry for a minute."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "https://hub.invalid", "PYTHONPATH": str(SRC)}
    for var in (
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        env.pop(var, None)
    code = (
        "from hdmap_ad.core.encoder import create_vit\n"
        "from hdmap_ad.core.errors import HdmapError\n"
        f"try:\n    create_vit('small', 'hub', (28, 42), {dict(tiny.ENCODER, depth=2)!r})\n"
        "except HdmapError as e:\n    print('ERR', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "ERR" in done.stdout and "dinov2_vits14_reg4_pretrain.pth" in done.stdout, done.stdout + done.stderr


def test_hub_cache_is_used_offline(tmp_path, monkeypatch):
    """A hub download already in the cache loads without network, strictly, as timm's hub file."""
    source = tiny_vit(seed=6).state_dict()
    cache = tmp_path / "hub"
    repo = cache / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    vit = create_vit("small", "hub", SIZE, TINY)
    assert_same_state(vit.state_dict(), source)


# --- position embeddings: the original Dinomaly's per-size resize ------------------------------------


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps around a sample at fraction t (a = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_axis(values, out_len: int, scale: float):
    """1-D bicubic resample of the last axis as the DINOv2 code asks of F.interpolate: the source position of
    output i is (i + 0.5) / scale - 0.5 with the *given* scale factor, taps clamped at the borders."""
    import numpy as np

    n = values.shape[-1]
    out = np.zeros(values.shape[:-1] + (out_len,))
    for i in range(out_len):
        x = (i + 0.5) / scale - 0.5
        x0 = int(np.floor(x))
        for k, wgt in zip(range(x0 - 1, x0 + 3), _cubic_weights(x - x0)):
            out[..., i] += wgt * values[..., min(max(k, 0), n - 1)]
    return out


def reference_original_table(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Independent reading of the original's interpolate_pos_encoding: a sqrt(N)×sqrt(N) table, scale factor
    (g + 0.1) / sqrt(N) per axis, bicubic, no antialias; unchanged at the pretrained grid."""
    import math

    import numpy as np

    n, c = pos_embed.shape[1], pos_embed.shape[2]
    side = int(math.sqrt(n))
    if grid == (side, side):
        return pos_embed.float()
    table = pos_embed[0].double().numpy().reshape(side, side, c).transpose(2, 0, 1)  # C×H×W
    rows = _resize_axis(table.transpose(0, 2, 1), grid[0], (grid[0] + 0.1) / math.sqrt(n)).transpose(0, 2, 1)
    both = _resize_axis(rows, grid[1], (grid[1] + 0.1) / math.sqrt(n))
    return torch.from_numpy(np.ascontiguousarray(both.reshape(c, -1).T))[None].float()


def reference_original_features(vit518, images: torch.Tensor, targets: list[int]) -> list[torch.Tensor]:
    """Target-block outputs of a 518-px DINOv2-reg ViT with the original's position handling, by hand."""
    b, _, h, w = images.shape
    grid = (h // 14, w // 14)
    patches = (
        torch.nn.functional.conv2d(images, vit518.patch_embed.proj.weight, vit518.patch_embed.proj.bias, stride=14)
        .flatten(2)
        .transpose(1, 2)
    )
    x = patches + reference_original_table(vit518.pos_embed.detach(), grid)
    x = torch.cat([vit518.cls_token.expand(b, -1, -1), vit518.reg_token.expand(b, -1, -1), x], dim=1)
    out = []
    with torch.no_grad():
        for i, block in enumerate(vit518.blocks):
            x = block(x)
            if i in targets:
                out.append(x)
    return out


@pytest.mark.parametrize("size", [(392, 392), (42, 126)])
def test_original_pos_embed_equals_the_original_formula(size):
    import timm

    torch.manual_seed(7)
    vit518 = timm.create_model(ENCODER_NAMES["small"], pretrained=False, num_classes=0, img_size=518, **TINY).eval()
    assert vit518.pos_embed.shape == (1, 37 * 37, 32)
    with torch.no_grad():
        vit518.pos_embed.normal_()  # a table with structure at every scale (timm's init is tiny)
    ours = create_vit("small", "random", size, TINY, pos_embed="original")
    ours.load_state_dict(vit518.state_dict(), strict=True)  # identical weights, the 37×37 table included
    enc = FrozenEncoder(ours, [1, 3, 5], pos_embed="original")
    images = torch.randn(2, 3, *size)
    got = enc(images)
    expected = reference_original_features(vit518, images, [1, 3, 5])
    for g, e in zip(got, expected):
        assert g.shape == e.shape == (2, 5 + (size[0] // 14) * (size[1] // 14), 32)
        assert (g - e).abs().max() <= 1e-5  # float32 against a float64 reference: ~7e-6 seen

    # timm's load-time resample (antialias) is a different table: the option is not a no-op
    timm_vit = create_vit("small", "random", size, TINY, pos_embed="timm")
    state = vit518.state_dict()
    from timm.layers import resample_abs_pos_embed

    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=(size[0] // 14, size[1] // 14), num_prefix_tokens=0
    )
    timm_vit.load_state_dict(state)
    other = FrozenEncoder(timm_vit, [1, 3, 5])(images)
    assert (other[0] - expected[0]).abs().max() > 1e-3


def test_original_table_is_cached_per_size_and_follows_the_parameter():
    torch.manual_seed(8)
    enc = FrozenEncoder(create_vit("small", "random", SIZE, TINY, pos_embed="original"), [1], pos_embed="original")
    first = enc.position_table((2, 3))
    assert enc.position_table((2, 3)) is first  # no work per step
    assert enc.position_table((3, 9)).shape == (1, 27, 32)  # another input size, another table
    enc(torch.randn(1, 3, 42, 126))  # any multiple of the patch size runs
    with torch.no_grad():
        enc.vit.pos_embed.mul_(2.0)  # changed in place (e.g. load_state_dict)
    assert torch.allclose(enc.position_table((2, 3)), 2 * first, atol=1e-6)
    enc.double()  # new storage and dtype
    assert enc.position_table((2, 3)).dtype == torch.float64
    with torch.inference_mode():  # made in inference mode, usable outside it
        enc.to(torch.float32).position_table((1, 1))
    assert not enc.position_table((1, 1)).is_inference()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(1, 3, 30, 42))


def test_pos_embed_default_resolves_to_original_for_dinov2_encoders():
    from hdmap_ad.core.encoder import resolve_pos_embed

    for name in ("small", "base", "large", *ENCODER_NAMES.values()):
        assert resolve_pos_embed(name, "auto") == "original"
    assert resolve_pos_embed("vit_small_patch16_224", "auto") == "timm"
    assert resolve_pos_embed("small", "timm") == "timm"
    with pytest.raises(HdmapError, match="model.pos_embed"):
        resolve_pos_embed("small", "bilinear")

    import shipped
    from hdmap_ad.core.checkpoint import dinomaly_config
    from hdmap_ad.core.config import load_params
    from hdmap_ad.core.model import Dinomaly

    params = load_params(shipped.params_file(), [f"model.encoder_overrides={json.dumps(tiny.ENCODER)}"])
    assert params.model.pos_embed == "auto" and params.model.encoder == "small"
    model = Dinomaly(dinomaly_config(params))
    assert model.config.pos_embed == "original" and model.encoder.pos_embed_mode == "original"
    assert model.encoder.vit.pos_embed.shape[1] == 37 * 37  # the pretrained grid is kept


def test_original_layout_file_loads_without_resampling_in_original_mode(tmp_path):
    torch.manual_seed(9)
    source = create_vit("small", "random", (518, 518), TINY).state_dict()  # a 37×37 table, as the real files
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(to_original_layout(source), path)
    vit = create_vit("small", str(path), (42, 126), TINY, pos_embed="original")
    assert_same_state(vit.state_dict(), source, exact=False)
    assert torch.equal(vit.pos_embed, source["pos_embed"])  # not resampled
