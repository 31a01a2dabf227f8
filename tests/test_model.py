"""Model parts: image merge, placeholder checks, projectors, vision backbones.

Run: pytest tests/test_model.py
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from vlm.config import ConfigError
from vlm.data.tokenizer import TokenizerConfig, build_tokenizer
from vlm.models.language_model import LMConfig, build_language_model
from vlm.models.projector import ProjectorConfig, build_projector
from vlm.models.vision_encoder import VisionConfig, VisionEncoder
from vlm.models.vision_language_model import merge_image_features


def test_merge_puts_image_features_exactly_at_placeholders():
    image_id = 9
    input_ids = torch.tensor([[1, 9, 9, 5, 6], [9, 9, 9, 9, 2]])
    embeds = torch.zeros(2, 5, 3)
    features = torch.arange(6 * 3, dtype=torch.float).view(6, 3) + 1
    merged = merge_image_features(embeds, input_ids, image_id, features)
    placeholder = input_ids == image_id
    assert torch.equal(merged[placeholder], features)  # in order, row-major across the batch
    assert torch.equal(merged[~placeholder], torch.zeros(int((~placeholder).sum()), 3))


def test_placeholder_mismatch_names_sample_and_counts(tiny):
    processor, model = tiny.processor, tiny.model
    samples = [processor(tiny.train_set[i], i) for i in range(2)]
    ids = samples[1].input_ids
    first_image = int((ids == model.token_ids.image).nonzero()[0])
    samples[1].input_ids = torch.cat([ids[:first_image], ids[first_image + 1 :]])
    samples[1].labels = samples[1].labels[1:]
    samples[1].index = 41
    from vlm.data.collate import Collator

    batch = Collator(tiny.tokenizer.pad_token_id)(samples)
    tpi = model.tokens_per_image
    with pytest.raises(
        ValueError, match=rf"sample 41: {tpi - 1} image placeholder tokens .* = {tpi} expected.*TROUBLESHOOTING"
    ):
        model(batch)


def test_pixel_shuffle_tokens_follow_config():
    projector = build_projector(ProjectorConfig(type="pixel_shuffle", factor=2), 8, 16, num_patches=64)
    assert projector.tokens_per_image == 16
    features = torch.randn(3, 64, 8)
    assert projector(features).shape == (3, 16, 16)
    # Token 0 must hold exactly the top-left 2x2 block of patches: (0,0), (0,1), (1,0), (1,1).
    block = features.view(3, 8, 8, 8)[:, :2, :2].reshape(3, 32)
    assert torch.allclose(projector(features)[:, 0], projector.proj(block), atol=1e-6)
    with pytest.raises(ValueError, match="model.projector.factor=3"):
        build_projector(ProjectorConfig(type="pixel_shuffle", factor=3), 8, 16, num_patches=64)


def test_vit_encoder_layer_and_prefix_tokens():
    common = dict(name="vit_tiny_patch16_224", image_size=32, model_kwargs={"img_size": 32, "depth": 3})
    dropped = VisionEncoder(VisionConfig(feature_layer=-2, **common))
    kept = VisionEncoder(VisionConfig(feature_layer=-1, drop_prefix_tokens=False, final_norm=True, **common))
    images = torch.randn(2, 3, 32, 32)
    assert dropped(images).shape == (2, dropped.num_patches, dropped.embed_dim) == (2, 4, 192)
    assert kept(images).shape == (2, kept.num_patches, 192) == (2, 5, 192)
    assert len(dropped.backbone.blocks) == 2  # blocks after the feature layer are pruned


def test_vision_weights_from_local_file(tmp_path):
    cfg = VisionConfig(name="resnet10t", feature_layer=1, image_size=32)
    source = VisionEncoder(cfg)
    full = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    save_file(full, tmp_path / "weights.safetensors")
    loaded = VisionEncoder(VisionConfig(**{**cfg.__dict__, "weights_path": str(tmp_path / "weights.safetensors")}))
    for name, tensor in loaded.backbone.state_dict().items():
        assert torch.equal(tensor, full[name]), name


@pytest.fixture
def offline(monkeypatch):
    """As with HF_HUB_OFFLINE=1 (read once at import, so set where the hub library keeps it): no network tried."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize(
    "build, names",
    [
        (lambda: build_language_model(LMConfig(pretrained="Org/not-downloaded-lm"), 10), "model.lm.pretrained='Org/not-downloaded-lm'"),
        (lambda: build_tokenizer(TokenizerConfig(pretrained="Org/not-downloaded-lm"), [], []), "data.tokenizer.pretrained="),
        (lambda: VisionEncoder(VisionConfig(name="resnet10t", pretrained=True)), "model.vision.pretrained"),
        (lambda: build_language_model(LMConfig(pretrained="./no/such/dir"), 10), "no such file or directory"),
    ],
)  # fmt: skip
def test_an_unreachable_pretrained_part_is_a_config_error_naming_key_and_entry(offline, build, names):
    with pytest.raises(ConfigError, match="a-hub-name-with-no-network") as err:
        build()
    assert names in str(err.value)


def test_remote_code_needs_trust_remote_code(tmp_path):
    """A model whose repository ships its own code does not run it unless the config says so."""
    config = {
        "model_type": "custom_vlm_test",
        "auto_map": {"AutoConfig": "configuration.Custom", "AutoModelForCausalLM": "modeling.Custom"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model.lm.trust_remote_code=true.*TROUBLESHOOTING.md#trust_remote_code"):
        build_language_model(LMConfig(pretrained=str(tmp_path)), 10)


def test_a_vit_built_for_another_image_size_is_a_clear_error():
    with pytest.raises(
        ValueError, match="model_kwargs.img_size.*image-size-differs-from-the-backbones-pretrained-size"
    ):
        VisionEncoder(VisionConfig(name="vit_tiny_patch16_224", image_size=64, model_kwargs={"depth": 1}))


def test_position_embedding_is_row_plus_column():
    cfg = ProjectorConfig(type="pixel_shuffle", factor=2, position_embedding=True)
    projector = build_projector(cfg, 8, 16, num_patches=16)  # 4x4 patches -> 2x2 tokens
    features = torch.randn(1, 16, 8)
    blocks = features.view(1, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(1, 4, 32)
    delta = projector(features) - projector.proj(blocks)
    assert not torch.allclose(delta[0, 1], delta[0, 0]) and not torch.allclose(delta[0, 2], delta[0, 0])
    # Same column, different rows differ by the row vectors; left-right differs the same way in every row.
    assert torch.allclose(delta[0, 1] - delta[0, 0], delta[0, 3] - delta[0, 2], atol=1e-6)
    assert torch.allclose(delta[0, 2] - delta[0, 0], delta[0, 3] - delta[0, 1], atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        build_projector(ProjectorConfig(type="mlp", position_embedding=True), 8, 16, num_patches=17)


@pytest.mark.parametrize("kind", ["mlp", "pixel_shuffle"])
def test_output_norm_gives_image_tokens_the_text_embedding_scale(kind):
    text_scale = 0.02
    cfg = ProjectorConfig(type=kind, factor=2, position_embedding=True, output_norm=True)
    projector = build_projector(cfg, 8, 64, num_patches=16, text_scale=text_scale)
    tokens = projector(100 * torch.randn(3, 16, 8))  # loud vision features
    rms = tokens.pow(2).mean(-1).sqrt()
    # Content at the text scale plus positions at the text scale: sqrt(2) x text scale per token.
    assert torch.allclose(rms, torch.full_like(rms, text_scale * 2**0.5), rtol=0.3)
    positions = (projector.positions.rows + projector.positions.cols).flatten(0, 1)
    assert 0.5 * text_scale < positions.pow(2).mean().sqrt() < 1.5 * text_scale
    plain = build_projector(ProjectorConfig(type=kind, factor=2), 8, 64, num_patches=16, text_scale=text_scale)
    assert plain(100 * torch.randn(3, 16, 8)).pow(2).mean().sqrt() > 100 * text_scale  # what it guards against


def test_feature_layer_out_of_range_names_the_key():
    with pytest.raises(ValueError, match="model.vision.feature_layer=7 does not exist in resnet10t"):
        VisionEncoder(VisionConfig(name="resnet10t", feature_layer=7, image_size=32))
