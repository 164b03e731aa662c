"""model.recenter (docs/design.md#model-recenter) and the plain model against anomalib's published Dinomaly
(`DinomalyModel(use_context_recentering=..., remove_class_token=False)`, checked with anomalib 2.7.0) on
copied weights: encoder groups, decoder groups and the anomaly map over a grid of input and batch sizes.
Skipped where anomalib is not installed (the `bench` extra installs it). Nothing is downloaded: anomalib's
request for pretrained encoder weights is turned into timm's random initialisation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("anomalib", minversion="2.4")  # use_context_recentering arrived in anomalib 2.4

from hdmap_ad.core.model import Dinomaly, DinomalyConfig, anomaly_map, group_distances  # noqa: E402

pytestmark = pytest.mark.slow  # two ViT-S models per case on the CPU: ~1 min for the file

SIZES = [(28, 42), (56, 196), (42, 126)]  # multiples of 14: 2×3, 4×14 and 3×9 patch grids
BATCHES = [1, 3]
ATOL = 1e-5


@pytest.fixture(scope="module", params=[True, False], ids=["recenter", "plain"])
def anomalib_model(request):
    """anomalib's DinomalyModel on a ViT-S/14 DINOv2-reg4 encoder with random weights, in eval mode.

    Its feature extractor asks timm for pretrained weights; that one call gets pretrained=False. On creation
    anomalib replaces timm's position-table resampling (module-wide) with an antialias-free one; that
    replacement is undone when the module's tests end, so later tests see timm unchanged."""
    import anomalib.models.components.feature_extractors.timm as fe
    import timm
    import timm.models.vision_transformer as timm_vit
    from anomalib.models.image.dinomaly.torch_model import DinomalyModel

    class OfflineTimm:
        def __getattr__(self, name: str):
            return getattr(timm, name)

        @staticmethod
        def create_model(*args, **kwargs):
            return timm.create_model(*args, **{**kwargs, "pretrained": False})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "timm", OfflineTimm())
        mp.setattr(timm_vit, "resample_abs_pos_embed", timm_vit.resample_abs_pos_embed)  # restored on exit
        torch.manual_seed(0)
        model = DinomalyModel(
            encoder_name="vit_small_patch14_reg4_dinov2",
            use_context_recentering=request.param,
            remove_class_token=False,
        ).eval()
        vit = model.encoder.feature_extractor
        # timm's random DINOv2 init leaves every block near the identity (LayerScale 1e-5) and the class
        # token near 0, which would make the class token and the blocks invisible in the comparison.
        with torch.no_grad():
            for name, p in vit.named_parameters():
                if name.endswith(".gamma"):
                    p.uniform_(0.2, 1.0)
                elif name in ("cls_token", "reg_token"):
                    p.normal_(0.0, 1.0)
                elif name == "pos_embed":
                    p.normal_(0.0, 0.5)
        yield model


def copy_into_ours(ano, size: tuple[int, int]) -> Dinomaly:
    """Our model of the same architecture with anomalib's weights.

    Name mapping: encoder.feature_extractor.* -> encoder.vit.* (ours keeps only the blocks up to the last
    target block and no final norm); bottleneck.0.* and decoder.N.* keep their names. anomalib's bottleneck
    and decoder MLPs have no biases: ours get zeros. anomalib's encoder keeps its 37×37 position table and
    resamples it to every input's grid at run time (bicubic, antialias off); ours (pos_embed timm) holds a
    table for one grid, so it gets that same resampled table. Not used: the blocks after the last target
    block, the final norm and anomalib's image-score blur.
    """
    from timm.layers import resample_abs_pos_embed

    recenter = ano.use_context_recentering
    cfg = DinomalyConfig(encoder="small", weights="random", image_size=size, pos_embed="timm", recenter=recenter)
    ours = Dinomaly(cfg)
    assert ours.config.target_blocks == ano.target_layers
    assert ours.config.fuse_groups == ano.fuse_layer_encoder == ano.fuse_layer_decoder
    vit = ano.encoder.feature_extractor
    assert vit.no_embed_class  # the table covers the patches only
    source = {k.replace("encoder.feature_extractor.", "encoder.vit.", 1): v for k, v in ano.state_dict().items()}
    grid = ours.grid
    source["encoder.vit.pos_embed"] = resample_abs_pos_embed(
        vit.pos_embed.detach(), new_size=grid, old_size=vit.patch_embed.grid_size, num_prefix_tokens=0, antialias=False
    )
    state = {}
    for key, value in ours.state_dict().items():
        if key in source:
            assert source[key].shape == value.shape, key
            state[key] = source.pop(key)
        else:
            assert key.endswith(".bias") and key.startswith(("bottleneck.", "decoder.")), key
            state[key] = torch.zeros_like(value)
    last = max(ano.target_layers)
    blocks_after = (f"encoder.vit.blocks.{i}." for i in range(last + 1, len(vit.blocks)))
    unused_ok = ("encoder.vit.norm.", "gaussian_blur.", *blocks_after)
    assert all(k.startswith(unused_ok) for k in source), sorted(source)
    ours.load_state_dict(state, strict=True)
    return ours.eval()


def max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_anomalib_dinomaly_on_copied_weights(anomalib_model, size):
    ano = anomalib_model
    ours = copy_into_ours(ano, size)
    torch.manual_seed(1)
    for batch in BATCHES:
        images = torch.randn(batch, 3, *size)
        with torch.no_grad():
            en_ref, de_ref = ano.get_encoder_decoder_outputs(images)
            map_ref, _ = ano.calculate_anomaly_maps(en_ref, de_ref, out_size=size)
            recon = ours(images)
            amap = anomaly_map(group_distances(recon), size)
        diffs = {
            "encoder": max_abs(recon.enc_groups, en_ref),
            "decoder": max_abs(recon.dec_groups, de_ref),
            "map": max_abs([amap], [map_ref]),
        }
        scale = max(float(t.abs().max()) for t in [*en_ref, *de_ref])
        mode = "recenter" if ano.use_context_recentering else "plain"
        print(f"\n{mode} {size[0]}x{size[1]} batch {batch}: max |ours - anomalib| {diffs} (features up to {scale:.3g})")
        tokens = size[0] * size[1] // 14**2 + (0 if ano.use_context_recentering else ours.encoder.num_prefix_tokens)
        assert recon.bottleneck_out.shape[1] == tokens  # recentering: the prefix tokens leave the sequence
        assert all(d <= ATOL for d in diffs.values()), diffs
        assert float(map_ref.std()) > 1e-3  # the maps are not trivially flat
