"""Shared fixtures: tiny configs composed through Hydra exactly as train.py composes them."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vlm.build import Components, build_components

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

# Small enough that building and a few steps take seconds on a 2-core CPU.
TINY = [
    "data.dataset.train_size=256",
    "data.dataset.val_size=16",
    "data.tokenizer.vocab_size=300",
    "model.vision.image_size=32",
    "model.lm.config.hidden_size=32",
    "model.lm.config.intermediate_size=64",
    "model.lm.config.num_hidden_layers=1",
]


def compose_config(*overrides: str, experiment: str = "shapes") -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"+experiment={experiment}", *TINY, *overrides])


@pytest.fixture(scope="session")
def tiny() -> Components:
    torch.manual_seed(0)
    return build_components(compose_config())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
