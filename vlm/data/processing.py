"""Turns one raw sample (images + conversation) into model inputs; a sample it cannot use is a `BadSample`.

A raw sample is `{"images": [...], "messages": [...]}` (see formats.py for the whole contract); images
may be PIL images, HxWx3 uint8 arrays, bytes or file paths. Output: token ids, labels, and the images
(or, with image splitting, their tiles and global views) as one normalised float tensor.
Checks here run per sample, before batching, so one bad record costs only itself: conversation
shape, one image part per image, something to learn, truncation that would cut an image.
"""

import array
from dataclasses import dataclass
from typing import Any

import torch

from vlm.data.bad_samples import BadSample, sample_label
from vlm.data.chat_format import IGNORE_INDEX, ChatFormat
from vlm.data.images import ImageSplittingConfig, ImageTransform, image_dimensions, load_image, split_image, tile_grid


@dataclass
class EncodedSample:
    index: int
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, IGNORE_INDEX where not supervised
    pixel_values: torch.Tensor  # [num_views, 3, H, W] float: one view per image, or tiles + global view each
    num_images: int = 0  # images of the raw sample (before splitting into views)
    position_ids: torch.Tensor | None = None  # [T] long; packed rows only (restarting at 0 for each sample)
    members: tuple[int, ...] = ()  # packed rows only: the dataset indices of the samples in the row, in order

    @property
    def sample_ids(self) -> tuple[int, ...]:
        return self.members or (self.index,)

    @property
    def num_predicted(self) -> int:
        """Supervised tokens the loss sees: position 0 has no previous token to predict it from."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def image_part_count(messages: list[dict]) -> int:
    return sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p["type"] == "image")


def message_text(message: dict) -> str:
    """A message's text: its string content, or its text parts joined (image parts left out)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def last_answer(messages: list[dict]) -> str | None:
    """The text of the last assistant message (the reference answer for evaluation), or None."""
    return next((message_text(m) for m in reversed(messages) if m["role"] == "assistant"), None)


class SampleProcessor:
    def __init__(
        self,
        chat_format: ChatFormat,
        image_transform: ImageTransform,
        max_length: int,
        image_token_id: int,
        tokens_per_image: int,
        splitting: ImageSplittingConfig | None = None,
        max_image_pixels: int | None = None,
    ):
        self.chat_format = chat_format
        self.image_transform = image_transform
        self.max_length = max_length
        self.image_token_id = image_token_id
        self.image_run = [image_token_id] * tokens_per_image
        self.splitting = splitting or ImageSplittingConfig()
        self.max_image_pixels = max_image_pixels
        self._layouts: dict[tuple[int, int], list[int]] = {(1, 1): self.image_run}  # grid -> ids, tokenized once

    def __call__(self, sample: dict, index: int) -> EncodedSample:
        """The training encoding: raises BadSample if the sample cannot be trained on."""
        label = sample_label(index, sample)
        self._check_conversation(sample, label, need_answer=True)
        return self._full(sample, index, label, *self._images(sample, label))

    def encode_prompt(self, sample: dict, index: int) -> EncodedSample:
        """Everything before the last assistant answer, plus the assistant header (for generation)."""
        label = sample_label(index, sample)
        self._check_conversation(sample, label, need_answer=False)
        return self._prompt(sample, index, label, *self._images(sample, label))

    def token_length(self, sample: dict, index: int) -> int:
        """The training encoding's length without decoding an image (grouped batching); 0 for a bad sample.
        With image splitting the grid comes from the image header, or the largest grid when that is unreadable."""
        try:
            self._check_conversation(sample, sample_label(index, sample), need_answer=True)
            runs = [self._layout(self._grid_of(source)) for source in sample.get("images", [])]
            return min(len(self.chat_format.encode(sample["messages"], runs)[0]), self.max_length)
        except (BadSample, KeyError, TypeError, ValueError):
            return 0

    def _grid_of(self, source) -> tuple[int, int]:
        if not self.splitting.enabled:
            return (1, 1)
        size, tiles = self.image_transform.image_size, self.splitting.max_tiles
        dimensions = image_dimensions(source)
        return tile_grid(*dimensions, size, tiles) if dimensions else tile_grid(size * tiles, size, size, tiles)

    def encode_for_eval(self, sample: dict, index: int) -> tuple[EncodedSample, EncodedSample]:
        """(training encoding, generation prompt), the images loaded once for both."""
        label = sample_label(index, sample)
        self._check_conversation(sample, label, need_answer=True)
        runs, pixels = self._images(sample, label)
        return self._full(sample, index, label, runs, pixels), self._prompt(sample, index, label, runs, pixels)

    def _full(self, sample: dict, index: int, label: str, runs: list, pixels: torch.Tensor) -> EncodedSample:
        ids, labels = self.chat_format.encode(sample["messages"], runs)
        full = self._finish(index, label, ids, labels, pixels, len(runs))
        if all(target == IGNORE_INDEX for target in labels[1 : self.max_length]):  # `full.num_predicted == 0`, sooner
            raise BadSample("answer_truncated", f"truncation to data.max_length={self.max_length} leaves no answer "
                            "token to learn from; raise data.max_length", label)  # fmt: skip
        return full

    def _prompt(self, sample: dict, index: int, label: str, runs: list, pixels: torch.Tensor) -> EncodedSample:
        messages = sample["messages"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, labels = self.chat_format.encode(messages, runs, add_generation_prompt=True)
        return self._finish(index, label, ids, labels, pixels[: self._views_in(messages, runs)], len(runs))

    def _views_in(self, messages: list[dict], runs: list[list[int]]) -> int:
        """Image views used by `messages` (a prompt may drop a final answer that held images)."""
        used = runs[: image_part_count(messages)]
        return sum(run.count(self.image_token_id) for run in used) // len(self.image_run)

    def _check_conversation(self, sample: dict, label: str, need_answer: bool) -> None:
        messages = sample.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadSample("malformed_record", "has no messages", label)
        roles = self.chat_format.cfg.role_headers
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in roles:
                role = message.get("role") if isinstance(message, dict) else message
                raise BadSample(
                    "malformed_record", f"message {turn} has role {role!r}, not one of {sorted(roles)}", label
                )
            if not _valid_content(message.get("content")):
                raise BadSample("malformed_record", f"message {turn} has content {message.get('content')!r}: expected "
                                "a string or a list of {type: image} / {type: text, text: str} parts", label)  # fmt: skip
        parts, images = image_part_count(messages), len(sample.get("images", []))
        if parts != images:
            raise BadSample(
                "marker_mismatch", f"{parts} image marker(s) in the conversation but {images} image(s)", label
            )
        if need_answer and not any(m["role"] == "assistant" and message_text(m).strip() for m in messages):
            raise BadSample("nothing_to_learn", "has no assistant turn with a non-empty answer", label)

    def _images(self, sample: dict, label: str) -> tuple[list[list[int]], torch.Tensor]:
        """Per image: the ids its image part expands to, and all views as one [N, 3, H, W] tensor."""
        runs, views = [], []
        for source in sample.get("images", []):
            image = load_image(source, label, self.max_image_pixels)
            if self.splitting.enabled:
                tiles, grid = split_image(image, self.image_transform.image_size, self.splitting.max_tiles)
            else:
                tiles, grid = [image], (1, 1)
            runs.append(self._layout(grid))
            views += [self.image_transform(tile) for tile in tiles]
        if len(views) == 1:
            return runs, views[0].unsqueeze(0)  # the common case, without a copy
        size = self.image_transform.image_size
        return runs, torch.stack(views) if views else torch.empty(0, 3, size, size)

    def _layout(self, grid: tuple[int, int]) -> list[int]:
        """One image's ids: tiles each preceded by its grid position as text, then the global view."""
        if grid not in self._layouts:
            self._layouts[grid] = self._tile_layout(*grid)
        return self._layouts[grid]

    def _tile_layout(self, rows: int, cols: int) -> list[int]:
        ids = []
        for r in range(rows):
            for c in range(cols):
                ids += self.chat_format.text_ids(f"<row_{r + 1}_col_{c + 1}>") + self.image_run
            ids += self.chat_format.text_ids("\n")
        return ids + self.chat_format.text_ids("<global_img>") + self.image_run

    def _finish(
        self, index: int, label: str, ids: list[int], labels: list[int], pixels: torch.Tensor, num_images: int
    ) -> EncodedSample:
        if len(ids) > self.max_length:
            expected = ids.count(self.image_token_id)
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            kept = ids.count(self.image_token_id)
            if kept != expected:
                raise BadSample(
                    "truncation_cuts_image",
                    f"truncation to data.max_length={self.max_length} cuts into its image placeholders ({kept} of "
                    f"{expected} kept); raise data.max_length",
                    label,
                )  # fmt: skip
        return EncodedSample(index, long_tensor(ids), long_tensor(labels), pixels, num_images)


def long_tensor(values: list[int]) -> torch.Tensor:
    """`torch.tensor(values)` for a list of ints, in a fifth of the time: the tensor takes over an array's buffer
    instead of converting each Python int (two per sample, 32 samples a step on the data's critical path)."""
    if not values:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


def _valid_content(content: Any) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict)
        and (p.get("type") == "image" or (p.get("type") == "text" and isinstance(p.get("text"), str)))
        for p in content
    )
