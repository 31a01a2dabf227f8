"""A trained model with everything it needs to take conversations and images, loaded from a model directory.

The directory's format (what it holds, how it is written) is vlm/checkpoint.py's; this module rebuilds the
processor beside the model, offline, from what the directory holds.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from vlm.build import build_processor
from vlm.checkpoint import AdapterBase, read_model_directory, save_pretrained
from vlm.data.processing import SampleProcessor
from vlm.models.vision_language_model import VisionLanguageModel


@dataclass
class Pretrained:
    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    processor: SampleProcessor
    config: DictConfig
    adapter_base: AdapterBase | None = None  # a LoRA directory's: what it stores, and its base's fingerprint

    def save_pretrained(self, directory: Path) -> None:
        save_pretrained(Path(directory), self.model, self.tokenizer, self.config, adapter_base=self.adapter_base)


def load_pretrained(directory: Path, device: str | torch.device = "cpu") -> Pretrained:
    """A model directory, a LoRA run's too (its base rebuilt and checked, the adapters on it, unmerged)."""
    saved = read_model_directory(directory)
    model = VisionLanguageModel.from_saved(saved, device)
    processor = build_processor(model, saved.chat_format, saved.data)
    return Pretrained(model, saved.tokenizer, processor, saved.config, saved.adapter_base)
