"""What the trainer is handed: the run's config, typed and checked (`RunConfig`), and the parts built from it
(`Components`). train.py builds both with vlm/build.py; the trainer builds nothing but its optimizer state."""

from dataclasses import dataclass

from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlm.data.formats import DataConfig
from vlm.data.processing import SampleProcessor
from vlm.models.vision_language_model import ModelConfig, VisionLanguageModel
from vlm.training.tracking import LoggerConfig
from vlm.training.train_config import TrainConfig


@dataclass
class RunConfig:
    """Every section of a run's config, typed and checked."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    logger: LoggerConfig


@dataclass
class Components:
    tokenizer: PreTrainedTokenizerBase
    model: VisionLanguageModel
    processor: SampleProcessor
    train_set: Dataset
    val_set: Dataset
    data: DataConfig
