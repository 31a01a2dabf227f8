"""The dataset contract, the registry of dataset formats, the `data` config, and the wrapper that encodes raw
samples for the model.

The contract, in one place. A dataset is a map-style `torch.utils.data.Dataset`, built as
`Dataset(cfg, split, image_size)` with `split` "train" or "val", whose items are raw samples:
- required: `images`, a list of images (PIL image, HxWx3 uint8 array, bytes, `{"bytes", "path"}`, or a
  file path), and `messages`, a list of `{"role": "user" | "assistant" | "system", "content": str |
  [{"type": "image"} | {"type": "text", "text": str}]}` with one image part per image, in order;
- optional: `id` (named in every message about the sample), `answer` (the reference for exact-match
  evaluation of the last question; default: the last assistant message), `kind` (the last question's kind:
  accuracy is also reported per kind, and evaluation scores the last answer, so a multi-turn record carries the
  kind of its last question, not of its first).
`__getitem__` raises `BadSample(reason, detail)` for a record it cannot turn into a sample; the
sample is then skipped and counted (bad_samples.py). Optional: `corpus(limit)` yielding text for a
locally trained tokenizer, when reading samples is expensive (default: the first samples' messages).
A new format is one small file registered in DATASETS (see llava.py, hf.py, shapes.py).
"""

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig
from torch.utils.data import Dataset

from vlm.config import ConfigError, typed_section
from vlm.data.bad_samples import BadSample, SkippedSample
from vlm.data.chat_format import ChatFormatConfig
from vlm.data.hf import HFConfig, HFDataset
from vlm.data.images import ImageSplittingConfig
from vlm.data.llava import LlavaConfig, LlavaDataset
from vlm.data.processing import EncodedSample, SampleProcessor, message_text
from vlm.data.shapes import ShapesConfig, ShapesVQA
from vlm.data.tokenizer import TokenizerConfig
from vlm.errors import DataFileError

ON_ERROR = ("skip", "raise")
BATCHING = ("padded", "grouped", "packed")


@dataclass
class DataConfig:
    dataset: Any = field(default_factory=dict)  # validated against its own format's schema (DATASETS)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    chat: ChatFormatConfig = field(default_factory=ChatFormatConfig)
    max_length: int = 256
    batching: str = "padded"  # padded | grouped (similar lengths per step) | packed (samples share rows of at most max_length tokens)
    group_steps: int = 16  # grouped: steps whose samples are sorted by length together
    num_workers: int = 0
    # The next step's samples encoded in a background thread during the step; null: on accelerators only (on a
    # CPU the step itself keeps every core busy, and the thread measured slower there: vlm/training/steps_ahead.py).
    encode_ahead: bool | None = None
    image_splitting: ImageSplittingConfig = field(default_factory=ImageSplittingConfig)
    max_image_pixels: int | None = None  # larger images are bad samples; null: PIL's decompression-bomb limit
    on_error: str = "skip"  # skip: leave a bad sample out and count it | raise: stop naming it
    max_skip_fraction: float = 0.05  # stop when more of the samples drawn so far were bad ...
    skip_check_after: int = 256  # ... judged once this many samples were drawn


DATASETS = {"shapes": (ShapesConfig, ShapesVQA), "llava": (LlavaConfig, LlavaDataset), "hf": (HFConfig, HFDataset)}


def data_config(cfg: DictConfig) -> DataConfig:
    """The run config's `data` section, typed (its dataset section by its own format's schema) and checked."""
    data = typed_section(cfg.data, DataConfig, "data")
    data.dataset = typed_section(cfg.data.dataset, dataset_schema(cfg.data.dataset.name), "data.dataset")
    check_data_config(data)
    return data


def check_data_config(data: DataConfig) -> None:
    choices = {"data.batching": (data.batching, BATCHING), "data.on_error": (data.on_error, ON_ERROR)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} is not one of: {', '.join(allowed)}. See TROUBLESHOOTING.md#config-key-errors."
            )
    if not 0 <= data.max_skip_fraction <= 1:
        raise ConfigError(f"data.max_skip_fraction={data.max_skip_fraction} must be in [0, 1]")
    if data.batching == "grouped" and getattr(data.dataset, "streaming", False):
        raise ConfigError(
            "data.batching=grouped needs every sample's length up front, which a stream does not have; use padded "
            "or packed with data.dataset.streaming=true. See TROUBLESHOOTING.md#streaming-resume."
        )


def dataset_schema(name: str) -> type:
    if name not in DATASETS:
        raise ConfigError(f"data.dataset.name={name!r} is not one of: {', '.join(DATASETS)}")
    return DATASETS[name][0]


def build_dataset(dataset_cfg: Any, split: str, image_size: int) -> Dataset:
    dataset = DATASETS[dataset_cfg.name][1](dataset_cfg, split, image_size)
    if len(dataset) == 0 and getattr(dataset, "stream", None) is None:
        raise DataFileError(f"the {split} split of data.dataset ({dataset_cfg.name}) is empty; for validation set "
                         "data.dataset.val_fraction > 0 or a validation path/split")  # fmt: skip
    return dataset


def dataset_corpus(dataset: Dataset, limit: int = 2000) -> Iterator[str]:
    """Text to train a local tokenizer on: the dataset's own `corpus`, or its first samples' messages."""
    if hasattr(dataset, "corpus"):
        yield from dataset.corpus(limit)
        return
    if getattr(dataset, "stream", None) is not None:  # streaming: the stream's first records
        records = itertools.islice(dataset.stream.read(None), limit)
        reads = ((dataset.raw_sample, (record, i, i)) for i, (record, _) in enumerate(records))
    else:
        reads = ((dataset.__getitem__, (i,)) for i in range(min(limit, len(dataset))))
    for read, args in reads:
        try:
            messages = read(*args)["messages"]
        except BadSample:
            continue
        yield from map(message_text, messages)


class EncodedDataset(Dataset):
    """Encodes raw samples on access (in DataLoader workers when there are any); a bad one becomes SkippedSample."""

    def __init__(self, raw: Dataset, processor: SampleProcessor):
        self.raw, self.processor = raw, processor

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> EncodedSample | SkippedSample:
        return encode_or_skip(self.processor, lambda: self.raw[index], index)


def encode_or_skip(processor: SampleProcessor, read: Callable[[], dict], index: int) -> EncodedSample | SkippedSample:
    """The training encoding of the sample `read()` returns, or a SkippedSample saying why it cannot be used."""
    try:
        return processor(read(), index)
    except BadSample as err:
        return SkippedSample.from_error(index, err)
