"""Dataset registry and the wrapper that encodes raw samples for the model."""

from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from vlm.data.chat_format import ChatFormatConfig
from vlm.data.processing import EncodedSample, SampleProcessor
from vlm.data.shapes import ShapesConfig, ShapesVQA
from vlm.data.tokenizer import TokenizerConfig


@dataclass
class DataConfig:
    dataset: Any = field(default_factory=ShapesConfig)  # validated against the dataset's own schema
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    chat: ChatFormatConfig = field(default_factory=ChatFormatConfig)
    max_length: int = 256
    num_workers: int = 0


DATASETS = {"shapes": (ShapesConfig, ShapesVQA)}


def dataset_schema(name: str) -> type:
    if name not in DATASETS:
        raise ValueError(f"data.dataset.name={name!r} is not one of: {', '.join(DATASETS)}")
    return DATASETS[name][0]


def build_dataset(dataset_cfg: Any, split: str, image_size: int) -> Dataset:
    return DATASETS[dataset_cfg.name][1](dataset_cfg, split, image_size)


class EncodedDataset(Dataset):
    """Encodes raw samples on access (in DataLoader workers when there are any)."""

    def __init__(self, raw: Dataset, processor: SampleProcessor):
        self.raw, self.processor = raw, processor

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index: int) -> EncodedSample:
        return self.processor(self.raw[index], index)
