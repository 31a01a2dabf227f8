"""Images from untrusted data: paths confined to the image root, any file mode to RGB, optional tiling.

Every failure is a `BadSample` with a reason (missing, empty, truncated, not an image, too large,
outside the root), so one bad file in a million is skipped and counted instead of killing a run.
A data file never chooses what the trainer reads: relative paths are resolved (symlinks included)
and must stay under the dataset's image root; anything else is refused before it is opened.
"""

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm.data.bad_samples import BadSample

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def resolve_image_path(root: Path, path: str, sample: str) -> Path:
    """`path` (relative to `root`, or absolute) resolved; refused unless it lies inside `root` (already resolved) and
    is a file there."""
    if not isinstance(path, str) or not path:
        raise BadSample("malformed_record", f"image path {path!r} is not a non-empty string", sample)
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise BadSample(
            "image_outside_root", f"image path {path!r} resolves to {resolved}, outside the image root {root}", sample
        )
    if not resolved.is_file():  # named with the root and the record's own path: a wrong root shows at once
        raise BadSample("image_missing", f"image {path!r} is not under data.dataset.image_root={root}", sample)
    return resolved


def load_image(source: Any, sample: str, max_pixels: int | None = None) -> Image.Image | np.ndarray:
    """An RGB PIL image (or an HxWx3 uint8 array, passed through) from a path, bytes, HF image dict or PIL image."""
    if isinstance(source, np.ndarray) and source.ndim == 3 and source.shape[2] == 3 and source.dtype == np.uint8:
        return source
    if isinstance(source, np.ndarray):
        return to_rgb(Image.fromarray(source))
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    if isinstance(source, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadSample("image_empty", "image bytes are empty", sample)
        return _decode(io.BytesIO(source), "image bytes", sample, max_pixels)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadSample("image_missing", f"image file {str(path)!r} does not exist", sample)
        if path.stat().st_size == 0:
            raise BadSample("image_empty", f"image file {str(path)!r} is empty (0 bytes)", sample)
        with path.open("rb") as f:
            return _decode(f, f"image file {str(path)!r}", sample, max_pixels)
    raise BadSample("malformed_record", f"image of type {type(source).__name__} is not a path, bytes or image", sample)


def _decode(stream, what: str, sample: str, max_pixels: int | None) -> Image.Image:
    try:
        with Image.open(stream) as image:  # reads the header only
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise BadSample("image_too_large", f"{what} is {image.width}x{image.height} pixels, over "
                                f"data.max_image_pixels={max_pixels}", sample)  # fmt: skip
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except BadSample:
        raise
    except Image.DecompressionBombError as err:
        raise BadSample("image_too_large", f"cannot read {what}: {err}", sample) from err
    except UnidentifiedImageError as err:
        raise BadSample("image_not_an_image", f"cannot read {what}: not an image", sample) from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or corrupt image data
        raise BadSample("image_truncated", f"cannot read {what}: {err}", sample) from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit grey scaled (not clipped), transparency over white, CMYK converted."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode in SIXTEEN_BIT_MODES or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


@dataclass
class ImageSplittingConfig:
    """High-resolution images as a global view plus a grid of tiles (Idefics3 / nanoVLM style)."""

    enabled: bool = False
    max_tiles: int = 4  # rows x cols at most; an image no larger than one tile is not split


def tile_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols): no more tiles than the image needs at full size, at most `max_tiles`, aspect kept closest."""
    need_rows, need_cols = max(1, -(-height // tile)), max(1, -(-width // tile))
    best, best_key = (1, 1), None
    for rows in range(1, need_rows + 1):
        for cols in range(1, need_cols + 1):
            if rows * cols > max_tiles:
                continue
            key = (abs(np.log((cols / rows) / (width / height))), -rows * cols)
            if best_key is None or key < best_key:
                best, best_key = (rows, cols), key
    return best


def image_dimensions(source: Any) -> tuple[int, int] | None:
    """(width, height) from the header alone (nothing decoded); None when it cannot be read cheaply."""
    if isinstance(source, Image.Image):
        return source.size
    if isinstance(source, np.ndarray):
        return source.shape[1], source.shape[0]
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            return image.size
    except (OSError, ValueError, TypeError, Image.DecompressionBombError):
        return None


def split_image(image: Image.Image | np.ndarray, tile: int, max_tiles: int) -> tuple[list[Any], tuple[int, int]]:
    """Tiles in row-major order, then the global view; (1, 1) grids give the global view alone."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    rows, cols = tile_grid(image.width, image.height, tile, max_tiles)
    if rows * cols == 1:
        return [image], (1, 1)
    grid = image.resize((cols * tile, rows * tile), Image.BICUBIC)
    tiles = [grid.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    return [*tiles, image], (rows, cols)


class ImageTransform:
    """Resize to the encoder's size with its interpolation and normalise with its mean/std (timm's data config)."""

    def __init__(
        self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...], interpolation: str = "bicubic"
    ):
        self.image_size = image_size
        self.resample = Image.Resampling[interpolation.upper()]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if not (isinstance(image, np.ndarray) and image.shape[:2] == (self.image_size, self.image_size)):
            image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
            image = image.resize((self.image_size, self.image_size), self.resample)
        array = np.array(image)  # a writable copy: torch refuses read-only arrays
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0).sub_(self.mean).div_(self.std)
