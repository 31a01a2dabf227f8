"""Shared fixtures: tiny configs composed through Hydra exactly as train.py composes them."""

import os
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.corpus import write_corpus
from train import build_trainer
from vlm.build import build_components, validate_config
from vlm.data.shapes_export import data_overrides, export
from vlm.training.parts import Components
from vlm.training.trainer import Trainer

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

# Small enough that building and a few steps take seconds on a 2-core CPU.
TINY_SHAPES = ["data.dataset.train_size=256", "data.dataset.val_size=16"]
TINY_MODEL = [
    "data.tokenizer.vocab_size=300",
    "model.vision.image_size=32",
    "model.lm.config.hidden_size=32",
    "model.lm.config.intermediate_size=64",
    "model.lm.config.num_hidden_layers=1",
    "train.compile=off",  # compiling is tested in test_compile.py; elsewhere it would only cost seconds per run
    "data.num_workers=0",  # the shapes experiment's worker: tests that want workers ask for them
]
TINY = TINY_SHAPES + TINY_MODEL


def compose_config(*overrides: str, experiment: str = "shapes", data: list[str] | None = None) -> DictConfig:
    """`data`: the dataset overrides (default: a tiny shapes dataset)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        data = TINY_SHAPES if data is None else data
        return compose("config", overrides=[f"+experiment={experiment}", *data, *TINY_MODEL, *overrides])


# A tiny ViT: unlike BatchNorm backbones, its gradients do not depend on how a batch is split,
# which the accumulation, OOM back-off and multi-process equivalence tests need.
TINY_VIT = [
    "model/vision=vit_tiny",
    "model.vision.image_size=32",
    "model.vision.feature_layer=-1",
    "+model.vision.model_kwargs.patch_size=8",
    "+model.vision.model_kwargs.embed_dim=32",
    "+model.vision.model_kwargs.depth=2",
    "+model.vision.model_kwargs.num_heads=2",
]


def new_trainer(cfg: DictConfig, run_dir: Path, trainer_class: type[Trainer] = Trainer) -> Trainer:
    """accelerate keeps one process-wide state; tests build trainers with different precisions."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return build_trainer(cfg, run_dir, trainer_class)


def make_trainer(run_dir: Path, *overrides: str) -> Trainer:
    """A tiny ViT-based trainer that evaluates only at the end (on 16 samples) unless told otherwise."""
    return new_trainer(compose_config(*TINY_VIT, "train.eval_every=0", "train.log_every=1", *overrides), run_dir)


@pytest.fixture(scope="session")
def shapes_llava(tmp_path_factory) -> list[str]:
    """Data overrides for a 192-record LLaVA-format export of Shapes VQA (learnable, every record good)."""
    path = export(tmp_path_factory.mktemp("shapes_llava"), records=192, image_size=32)
    return [*data_overrides(path), "data.dataset.val_fraction=0.1"]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """The fixture corpus of tests/corpus.py: good, bad and unusual records (LLaVA JSON, JSONL and HF)."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory) -> tuple[Components, Path]:
    """Tiny components whose weights are moved away from any fresh initialisation (so a load that silently
    re-initialises fails a comparison), saved with save_pretrained."""
    parts = build_components(validate_config(compose_config()))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in parts.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    directory = tmp_path_factory.mktemp("saved_model")
    parts.model.save_pretrained(directory, parts.tokenizer, compose_config())
    return parts, directory


@pytest.fixture(scope="session")
def tiny() -> Components:
    torch.manual_seed(0)
    return build_components(validate_config(compose_config()))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


# Nothing in the suite may reach a hub: local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
