"""Projectors: map vision features [N, P, Dv] into the language model's embedding space [N, T, Dl].

`mlp` keeps one token per patch (LLaVA). `pixel_shuffle` folds each factor x factor block of
patches into one token before a linear map (Idefics3 / nanoVLM), cutting image tokens by factor².
The number of image tokens per image is a property derived from the config, never a constant.
`input_norm` puts a LayerNorm on the vision features first (Qwen2-VL merger, InternVL): raw
ConvNet stage outputs have very uneven channel scales, and without it the LM learns to read the
loud channels (colour) long before the quiet ones (shape).
`position_embedding` adds a learned row vector plus a learned column vector to each image token:
ConvNet features carry no explicit 2D position (ViTs do), RoPE alone only tells the LM offsets
from the text, and a factorised row/column code makes "left" one direction for every row.
`output_norm` LayerNorms each image token to the RMS of the LM's text embeddings (and starts the
position embedding at that scale too). Without it a from-scratch projector emits tokens ~25x larger
than text embeddings: the row/column code is a few percent of each token, and the LM's layers,
whose outputs are text-sized, can barely change what the image tokens hold.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from vlm.config import ConfigError


@dataclass
class ProjectorConfig:
    type: str = "mlp"  # mlp | pixel_shuffle
    factor: int = 2  # pixel_shuffle only: side of the patch block folded into one token
    input_norm: bool = False  # LayerNorm over each vision feature before projecting
    position_embedding: bool = False  # learned row + column embedding added to each image token
    output_norm: bool = False  # LayerNorm image tokens to the scale of the LM's text embeddings


class GridPositions(nn.Module):
    """Learned row and column embeddings, summed per token of a side x side grid (row-major)."""

    def __init__(self, side: int, dim: int, std: float):
        super().__init__()
        self.rows = nn.Parameter(torch.randn(side, 1, dim) * std)
        self.cols = nn.Parameter(torch.randn(1, side, dim) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + (self.rows + self.cols).flatten(0, 1)


def _output_norm(enabled: bool, dim: int, text_scale: float) -> nn.Module:
    """LayerNorm whose gain starts at the RMS of the LM's text embeddings, so image tokens start at that scale."""
    if not enabled:
        return nn.Identity()
    norm = nn.LayerNorm(dim)
    nn.init.constant_(norm.weight, text_scale)
    return norm


def _positions(cfg: ProjectorConfig, tokens: int, dim: int, text_scale: float) -> nn.Module:
    if not cfg.position_embedding:
        return nn.Identity()
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConfigError(
            f"model.projector.position_embedding needs a square grid of image tokens, got {tokens} "
            "(prefix tokens kept?). Set model.vision.drop_prefix_tokens=true or position_embedding=false. "
            "See TROUBLESHOOTING.md#pixel-shuffle-grid."
        )
    # With output_norm, rows + columns together start at the image tokens' scale; else at a typical 0.02 init.
    std = text_scale / math.sqrt(2) if cfg.output_norm else 0.02
    return GridPositions(side, dim, std)


class MLPProjector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, num_patches: int, cfg: ProjectorConfig, text_scale: float):
        super().__init__()
        self.norm = nn.LayerNorm(vision_dim) if cfg.input_norm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.tokens_per_image = num_patches
        self.out_norm = _output_norm(cfg.output_norm, lm_dim, text_scale)
        self.positions = _positions(cfg, num_patches, lm_dim, text_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.positions(self.out_norm(self.net(self.norm(features))))


class PixelShuffleProjector(nn.Module):
    def __init__(self, vision_dim: int, lm_dim: int, num_patches: int, cfg: ProjectorConfig, text_scale: float):
        super().__init__()
        factor = cfg.factor
        side = math.isqrt(num_patches)
        if side * side != num_patches or side % factor:
            raise ConfigError(
                f"model.projector.factor={factor} needs a square patch grid whose side divides by it, "
                f"got {num_patches} patches. Change model.projector.factor or the image size, or set "
                "model.vision.drop_prefix_tokens=true (see TROUBLESHOOTING.md#pixel-shuffle-grid)."
            )
        self.side, self.factor = side, factor
        self.norm = nn.LayerNorm(vision_dim) if cfg.input_norm else nn.Identity()
        self.proj = nn.Linear(vision_dim * factor * factor, lm_dim)
        self.tokens_per_image = num_patches // (factor * factor)
        self.out_norm = _output_norm(cfg.output_norm, lm_dim, text_scale)
        self.positions = _positions(cfg, self.tokens_per_image, lm_dim, text_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.norm(features)
        n, _, dim = features.shape
        s, f = self.side, self.factor
        # [N, s*s, D] -> [N, s/f, f, s/f, f, D] -> [N, s/f, s/f, f, f, D]: each token holds one f x f block.
        blocks = features.reshape(n, s // f, f, s // f, f, dim).permute(0, 1, 3, 2, 4, 5)
        return self.positions(self.out_norm(self.proj(blocks.reshape(n, (s // f) ** 2, f * f * dim))))


def build_projector(
    cfg: ProjectorConfig, vision_dim: int, lm_dim: int, num_patches: int, text_scale: float = 0.02
) -> nn.Module:
    """`text_scale`: RMS of the LM's input embeddings, the scale `output_norm` gives image tokens."""
    if cfg.type not in PROJECTORS:
        raise ConfigError(f"model.projector.type={cfg.type!r} is not one of: {', '.join(PROJECTORS)}")
    return PROJECTORS[cfg.type](vision_dim, lm_dim, num_patches, cfg, text_scale)


PROJECTORS = {"mlp": MLPProjector, "pixel_shuffle": PixelShuffleProjector}
