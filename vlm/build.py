"""Factories: from a run config to its typed sections and to tokenizer, model, processor and datasets.

The entry points compose with these (train.py, train_debug.py, `python -m vlm.check_data`): `validate_config`
checks the whole config before anything is built, then `build_components` builds each part once. Build order
follows the dependencies: datasets (their text trains a local tokenizer) -> tokenizer -> model (needs vocabulary
and special ids) -> processor (needs tokens per image).
"""

from collections.abc import Iterator
from pathlib import Path

import timm
from omegaconf import DictConfig
from torch.utils.data import Dataset

from vlm.checkpoint import HIGHER_IS_BETTER, load_initial_weights
from vlm.compile_policy import MODES
from vlm.config import ConfigError, typed_section
from vlm.data.chat_format import ChatFormat, check_chat_template
from vlm.data.formats import DataConfig, build_dataset, data_config, dataset_corpus
from vlm.data.images import ImageTransform
from vlm.data.processing import SampleProcessor
from vlm.data.tokenizer import build_tokenizer
from vlm.models.lora import add_adapters, check_lora_settings
from vlm.models.projector import PROJECTORS
from vlm.models.vision_language_model import ModelConfig, TokenIds, VisionLanguageModel
from vlm.training.optim import SCHEDULES, STAGES
from vlm.training.parts import Components, RunConfig
from vlm.training.tracking import LoggerConfig
from vlm.training.train_config import TrainConfig


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
        "train.checkpoint.format": (t.checkpoint.format, ("auto", "sharded", "consolidated")),
        "logger.type": (run.logger.type, ("none", "wandb")),
        "logger.mode": (run.logger.mode, ("auto", "online", "offline", "disabled")),
        "model.projector.type": (run.model.projector.type, PROJECTORS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")
    check_lora_settings(t.lora)
    check_best_metric(t)
    if t.lora.enabled and t.stage == "align":
        raise ConfigError(
            "train.lora.enabled=true with train.stage=align: align trains the projector alone, and LoRA adapts the LM. "
            "Align without LoRA, then train.stage=finetune train.lora.enabled=true train.init_from=ALIGNED."
        )
    if not timm.is_model(run.model.vision.name):
        raise ConfigError(f"model.vision.name={run.model.vision.name!r} is not a timm model")
    return run


def check_best_metric(t: TrainConfig) -> None:
    """A validation metric, or a score (`bench/TASK/METRIC`) of a task in train.benchmarks.tasks."""
    best, tasks = t.best_metric, t.benchmarks.tasks
    if best is None or best in HIGHER_IS_BETTER:
        return
    if best.startswith("bench/") and best.split("/")[1] in tasks:
        return
    scores = f", or bench/TASK/METRIC for a task in train.benchmarks.tasks ({', '.join(tasks) or 'none set'})"
    raise ConfigError(f"train.best_metric={best!r} is not one of: None, {', '.join(HIGHER_IS_BETTER)}{scores}")


def build_components(run: RunConfig, empty_model: bool = False) -> Components:
    """`empty_model`: the model's structure only, on an FSDP process that receives process 0's weights (weights,
    `train.init_from` and LoRA adapters alike) while they are sharded (vlm/training/distributed.py)."""
    data = run.data
    image_size = run.model.vision.image_size
    train_set = build_dataset(data.dataset, "train", image_size)
    val_set = build_dataset(data.dataset, "val", image_size)
    tokenizer = build_tokenizer(data.tokenizer, tokenizer_corpus(train_set, data), data.chat.special_tokens)
    chat_format = ChatFormat(data.chat, tokenizer)
    check_chat_template(chat_format)
    model = VisionLanguageModel(run.model, TokenIds.of(tokenizer, chat_format, data.tokenizer.image_token), empty_model)
    if run.train.init_from and not empty_model:  # the previous stage's result, before LoRA adapters go on it
        load_initial_weights(model, Path(run.train.init_from))
    if run.train.lora.enabled:
        add_adapters(model, run.train.lora)
    return Components(tokenizer, model, build_processor(model, chat_format, data), train_set, val_set, data)


def build_processor(model: VisionLanguageModel, chat_format: ChatFormat, data: DataConfig) -> SampleProcessor:
    """The processor that turns raw samples into this model's inputs (its image size and normalisation, its
    image placeholder run) with this chat format."""
    stats = timm.data.resolve_model_data_config(model.vision.backbone)
    transform = ImageTransform(model.cfg.vision.image_size, stats["mean"], stats["std"], stats["interpolation"])
    return SampleProcessor(
        chat_format, transform, data.max_length, model.token_ids.image, model.tokens_per_image,
        data.image_splitting, data.max_image_pixels,
    )  # fmt: skip


def tokenizer_corpus(train_set: Dataset, data: DataConfig) -> Iterator[str]:
    """The dataset's text, each item followed by the chat template's words, so they weigh as in training."""
    template = data.chat.template_words()
    for text in dataset_corpus(train_set):
        yield text
        yield from template
