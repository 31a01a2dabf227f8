"""Factories: from a resolved Hydra config to tokenizer, model, processor and datasets.

Build order follows the dependencies: datasets (their text trains a local tokenizer) ->
tokenizer -> model (needs vocabulary and special ids) -> processor (needs tokens per image).
"""

from collections.abc import Iterator
from dataclasses import dataclass

import timm
from omegaconf import DictConfig
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlm.compile_policy import MODES
from vlm.config import ConfigError, typed_section
from vlm.data.chat_format import ChatFormat, check_chat_template
from vlm.data.datasets import DataConfig, build_dataset, check_data_config, dataset_corpus, dataset_schema
from vlm.data.images import ImageTransform
from vlm.data.processing import SampleProcessor
from vlm.data.tokenizer import build_tokenizer
from vlm.models.projector import PROJECTORS
from vlm.models.vision_language_model import ModelConfig, TokenIds, VisionLanguageModel
from vlm.training.checkpoint_manager import HIGHER_IS_BETTER
from vlm.training.optim import SCHEDULES, STAGES
from vlm.training.tracking import LoggerConfig
from vlm.training.train_config import TrainConfig


@dataclass
class Components:
    tokenizer: PreTrainedTokenizerBase
    model: VisionLanguageModel
    processor: SampleProcessor
    train_set: Dataset
    val_set: Dataset
    data: DataConfig


def data_config(cfg: DictConfig) -> DataConfig:
    data = typed_section(cfg.data, DataConfig, "data")
    data.dataset = typed_section(cfg.data.dataset, dataset_schema(cfg.data.dataset.name), "data.dataset")
    check_data_config(data)
    return data


def token_ids_for(tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat, image_token: str) -> TokenIds:
    return TokenIds(
        image=tokenizer.convert_tokens_to_ids(image_token),
        pad=tokenizer.pad_token_id,
        stop=chat_format.stop_token_id,
        vocab_size=len(tokenizer),
    )


def build_processor(model: VisionLanguageModel, chat_format: ChatFormat, data: DataConfig) -> SampleProcessor:
    stats = timm.data.resolve_model_data_config(model.vision.backbone)
    transform = ImageTransform(model.cfg.vision.image_size, stats["mean"], stats["std"], stats["interpolation"])
    return SampleProcessor(
        chat_format, transform, data.max_length, model.token_ids.image, model.tokens_per_image,
        data.image_splitting, data.max_image_pixels,
    )  # fmt: skip


def build_model_and_processor(
    cfg: DictConfig, data: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[VisionLanguageModel, SampleProcessor]:
    model_cfg = typed_section(cfg.model, ModelConfig, "model")
    chat_format = ChatFormat(data.chat, tokenizer)
    check_chat_template(chat_format)
    model = VisionLanguageModel(model_cfg, token_ids_for(tokenizer, chat_format, data.tokenizer.image_token))
    return model, build_processor(model, chat_format, data)


def tokenizer_corpus(train_set: Dataset, data: DataConfig) -> Iterator[str]:
    """The dataset's text, each item followed by the chat template's words, so they weigh as in training."""
    template = data.chat.template_words()
    for text in dataset_corpus(train_set):
        yield text
        yield from template


def build_components(cfg: DictConfig) -> Components:
    data = data_config(cfg)
    image_size = cfg.model.vision.image_size
    train_set = build_dataset(data.dataset, "train", image_size)
    val_set = build_dataset(data.dataset, "val", image_size)
    tokenizer = build_tokenizer(data.tokenizer, tokenizer_corpus(train_set, data), data.chat.special_tokens)
    model, processor = build_model_and_processor(cfg, data, tokenizer)
    return Components(tokenizer, model, processor, train_set, val_set, data)


@dataclass
class RunConfig:
    """Every section of a run's config, typed and checked."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    logger: LoggerConfig


def validate_config(cfg: DictConfig) -> RunConfig:
    """Check every section against its schema and every choice against what exists, before anything is built:
    a typo anywhere (`train.compile: regionl`, `logger.projct`) fails in a second, naming the key."""
    run = RunConfig(
        typed_section(cfg.model, ModelConfig, "model"),
        data_config(cfg),
        typed_section(cfg.train, TrainConfig, "train"),
        typed_section(cfg.logger, LoggerConfig, "logger"),
    )
    t = run.train
    choices = {
        "train.compile": (t.compile, MODES),
        "train.stage": (t.stage, tuple(STAGES)),
        "train.schedule": (t.schedule, tuple(SCHEDULES)),
        "train.mixed_precision": (t.mixed_precision, ("no", "bf16", "fp16")),
        "train.device": (t.device, ("auto", "cpu", "cuda")),
        "train.simulate_oom_in": (t.simulate_oom_in, ("forward", "backward")),
        "train.best_metric": (t.best_metric, (None, *HIGHER_IS_BETTER)),
        "logger.type": (run.logger.type, ("none", "wandb")),
        "logger.mode": (run.logger.mode, ("auto", "online", "offline", "disabled")),
        "model.projector.type": (run.model.projector.type, PROJECTORS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}. "
                              "See TROUBLESHOOTING.md#config-key-errors.")  # fmt: skip
    if not timm.is_model(run.model.vision.name):
        raise ConfigError(f"model.vision.name={run.model.vision.name!r} is not a timm model. "
                          "See TROUBLESHOOTING.md#config-key-errors.")  # fmt: skip
    return run
