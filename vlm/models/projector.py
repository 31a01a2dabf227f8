"""Projectors: map vision features [N, P, Dv] into the language model's embedding space [N, T, Dl].

`mlp` keeps one token per patch (LLaVA). `pixel_shuffle` folds each factor x factor block of
patches into one token before a linear map (Idefics3 / nanoVLM), cutting image tokens by factor².
The number of image tokens per image is a property derived from the config, never a constant.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ProjectorConfig:
    type: str = "mlp"  # mlp | pixel_shuffle
    factor: int = 2  # pixel_shuffle only: side of the patch block folded into one token


class MLPProjector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, num_patches: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.tokens_per_image = num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class PixelShuffleProjector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, num_patches: int, factor: int):
        super().__init__()
        side = math.isqrt(num_patches)
        if side * side != num_patches or side % factor:
            raise ValueError(
                f"model.projector.factor={factor} needs a square patch grid whose side divides by it, "
                f"got {num_patches} patches. Change model.projector.factor or the image size, or set "
                "model.vision.drop_prefix_tokens=true (see TROUBLESHOOTING.md#pixel-shuffle-grid)."
            )
        self.side, self.factor = side, factor
        self.proj = nn.Linear(vision_dim * factor * factor, lm_dim)
        self.tokens_per_image = num_patches // (factor * factor)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, _, dim = features.shape
        s, f = self.side, self.factor
        # [N, s*s, D] -> [N, s/f, f, s/f, f, D] -> [N, s/f, s/f, f, f, D]: each token holds one f x f block.
        blocks = features.reshape(n, s // f, f, s // f, f, dim).permute(0, 1, 3, 2, 4, 5)
        return self.proj(blocks.reshape(n, (s // f) ** 2, f * f * dim))


def build_projector(cfg: ProjectorConfig, vision_dim: int, lm_dim: int, num_patches: int) -> nn.Module:
    if cfg.type == "mlp":
        return MLPProjector(vision_dim, lm_dim, num_patches)
    if cfg.type == "pixel_shuffle":
        return PixelShuffleProjector(vision_dim, lm_dim, num_patches, cfg.factor)
    raise ValueError(f"model.projector.type={cfg.type!r} is not one of: mlp, pixel_shuffle")
