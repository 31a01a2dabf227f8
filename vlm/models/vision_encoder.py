"""Vision encoder: a timm backbone that turns images into a sequence of patch features.

Any timm model that implements `forward_intermediates` works (ViTs, ConvNets, ...). Layers
after `feature_layer` are pruned at build time, so they cost no compute and hold no parameters
that would never receive a gradient.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from vlm.compile_policy import compilable_blocks
from vlm.config import ConfigError
from vlm.hub import loading

logger = logging.getLogger(__name__)


@dataclass
class VisionConfig:
    name: str = "resnet10t"
    pretrained: bool = False
    weights_path: str | None = None  # local weights file (safetensors or .pth); overrides the hub
    feature_layer: int = -1  # which block/stage's output to take (python indexing)
    drop_prefix_tokens: bool = True  # drop CLS/register tokens of ViTs
    final_norm: bool = False  # apply the backbone's final norm to the taken features
    image_size: int = 224
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, load_weights: bool = True):
        """`load_weights=False`: the backbone without its pretrained weights (an empty build)."""
        super().__init__()
        self.cfg = cfg
        self.backbone = _create_backbone(cfg, load_weights)
        # Indices come back relative to the pruned model, e.g. -2 becomes the new last block.
        try:
            self._layer = self.backbone.prune_intermediate_layers(
                [cfg.feature_layer], prune_norm=not cfg.final_norm, prune_head=True
            )
        except (AssertionError, IndexError) as err:
            raise ConfigError(
                f"model.vision.feature_layer={cfg.feature_layer} does not exist in {cfg.name} ({err}). "
                "Use a block/stage index in range, or a negative index counted from the last one. "
                "See TROUBLESHOOTING.md#vision-feature-layer-out-of-range."
            ) from err
        self.num_prefix_tokens = 0 if cfg.drop_prefix_tokens else getattr(self.backbone, "num_prefix_tokens", 0)
        grid, self._embed_dim = self._probe_output()
        self.grid_size = grid

    @torch.no_grad()
    def _probe_output(self) -> tuple[tuple[int, int], int]:
        """Run one dummy image to learn the feature grid and width for this backbone and size."""
        was_training = self.training
        self.eval()
        dummy = torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size)
        try:
            feats = self.backbone.forward_intermediates(
                dummy, indices=self._layer, intermediates_only=True, norm=self.cfg.final_norm
            )[0]
        except (AssertionError, RuntimeError) as err:  # a ViT built for another size rejects the image
            raise ConfigError(
                f"model.vision.image_size={self.cfg.image_size} does not fit {self.cfg.name} as built ({err}). "
                "For a ViT set model.vision.model_kwargs.img_size to the same size (timm then resamples the "
                "position embeddings). See TROUBLESHOOTING.md#image-size-differs-from-the-backbones-pretrained-size."
            ) from err
        self.train(was_training)
        return (feats.shape[2], feats.shape[3]), feats.shape[1]

    @torch.no_grad()
    def blocks_in_use(self) -> list[nn.Module]:
        """The backbone's blocks that regional compile compiles (compile_policy.compilable_blocks) and that a forward
        really runs, found by running one dummy image (timm truncates a ViT's blocks to the feature layer)."""
        candidates, ran = compilable_blocks(self.backbone), set()
        hooks = [block.register_forward_hook(lambda module, *_: ran.add(id(module))) for block in candidates]
        was_training = self.training
        try:
            self.eval()
            self(torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size))
        finally:
            self.train(was_training)
            for hook in hooks:
                hook.remove()
        return [block for block in candidates if id(block) in ran]

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_patches, embed_dim] (patch tokens in row-major order)."""
        # Only ViT-like backbones know `return_prefix_tokens`; ConvNets reject the keyword.
        extra = {"return_prefix_tokens": True} if self.num_prefix_tokens else {}
        taken = self.backbone.forward_intermediates(
            pixel_values, indices=self._layer, intermediates_only=True, norm=self.cfg.final_norm, **extra
        )[0]
        if self.num_prefix_tokens == 0:
            return taken.flatten(2).transpose(1, 2)
        spatial, prefix = taken
        return torch.cat([prefix, spatial.flatten(2).transpose(1, 2)], dim=1)


def _create_backbone(cfg: VisionConfig, load_weights: bool) -> nn.Module:
    """timm's own loading: the hub by name (`pretrained`), or a local file through its pretrained-config overlay."""
    kwargs = dict(cfg.model_kwargs)
    key, source = (
        ("model.vision.weights_path", cfg.weights_path)
        if cfg.weights_path
        else ("model.vision.pretrained: name", cfg.name)
    )
    if cfg.weights_path:
        kwargs["pretrained_cfg_overlay"] = dict(file=cfg.weights_path)
    with loading(key, source):
        backbone = timm.create_model(
            cfg.name, pretrained=load_weights and (cfg.pretrained or bool(cfg.weights_path)), num_classes=0, **kwargs
        )
    trained_at = (backbone.pretrained_cfg or {}).get("input_size", [None])[-1]
    if cfg.pretrained and not cfg.weights_path and trained_at and trained_at != cfg.image_size:
        logger.warning(
            "model.vision.image_size=%d but %s was trained at %d px: its features shift until finetuned. "
            "See TROUBLESHOOTING.md#image-size-differs-from-the-backbones-pretrained-size.",
            cfg.image_size, cfg.name, trained_at,
        )  # fmt: skip
    return backbone
