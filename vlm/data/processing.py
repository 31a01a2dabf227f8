"""Turns one raw sample (images + conversation) into model inputs, with checks that name the sample.

A raw sample is `{"images": [...], "messages": [...]}`; images may be PIL images, HxWx3 uint8
arrays or file paths. Output: token ids, labels, and the images as one normalised float tensor.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlm.data.chat_format import IGNORE_INDEX, ChatFormat


@dataclass
class EncodedSample:
    index: int
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, IGNORE_INDEX where not supervised
    pixel_values: torch.Tensor  # [num_images, 3, H, W] float

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_predicted(self) -> int:
        """Supervised tokens the loss sees: position 0 has no previous token to predict it from."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


class ImageTransform:
    """Resize to the encoder's size and normalise with its mean/std (both from timm's data config)."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Any, sample_index: int) -> torch.Tensor:
        array = np.array(self._load(image, sample_index))  # a writable copy: torch refuses read-only arrays
        pixels = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        return (pixels - self.mean) / self.std

    def _load(self, image: Any, sample_index: int) -> Image.Image | np.ndarray:
        if isinstance(image, np.ndarray) and image.shape[:2] == (self.image_size, self.image_size):
            return image
        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(
                    f"sample {sample_index}: cannot read image file {image!r} ({err}). "
                    "See TROUBLESHOOTING.md#corrupt-or-unreadable-image."
                ) from err
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)


class SampleProcessor:
    def __init__(
        self,
        chat_format: ChatFormat,
        image_transform: ImageTransform,
        max_length: int,
        image_token_id: int,
        tokens_per_image: int,
    ):
        self.chat_format = chat_format
        self.image_transform = image_transform
        self.max_length = max_length
        self.image_token_id = image_token_id
        self.image_run = [image_token_id] * tokens_per_image

    def __call__(self, sample: dict, index: int) -> EncodedSample:
        ids, labels = self.chat_format.encode(sample["messages"], self.image_run)
        return self._finish(sample, index, ids, labels)

    def encode_prompt(self, sample: dict, index: int) -> EncodedSample:
        """Everything before the last assistant answer, plus the assistant header (for generation)."""
        messages = sample["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, labels = self.chat_format.encode(messages, self.image_run, add_generation_prompt=True)
        return self._finish(sample, index, ids, labels)

    def _finish(self, sample: dict, index: int, ids: list[int], labels: list[int]) -> EncodedSample:
        images = sample.get("images", [])
        if len(ids) > self.max_length:
            expected = ids.count(self.image_token_id)
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            kept = ids.count(self.image_token_id)
            if kept != expected:
                raise ValueError(
                    f"sample {index}: truncation to data.max_length={self.max_length} cuts into its image "
                    f"placeholders ({kept} of {expected} kept). Raise data.max_length. "
                    "See TROUBLESHOOTING.md#placeholder-count-mismatch."
                )
        pixel_values = (
            torch.stack([self.image_transform(img, index) for img in images])
            if images
            else torch.empty(0, 3, self.image_transform.image_size, self.image_transform.image_size)
        )
        return EncodedSample(index, torch.tensor(ids), torch.tensor(labels), pixel_values)
