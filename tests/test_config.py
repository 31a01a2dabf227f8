"""Every experiment composes and builds; bad names and keys get clear errors.

Run: pytest tests/test_config.py
"""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from tests.conftest import CONFIG_DIR, compose_config, new_trainer
from tests.test_recipes import RECIPES
from vlm.build import build_components, validate_config
from vlm.config import ConfigError, typed_section
from vlm.data.bad_samples import REASONS
from vlm.training.train_config import TrainConfig

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
FROM_SCRATCH = [e for e in EXPERIMENTS if e not in RECIPES]  # recipes load hub weights: tests/test_recipes.py


def data_of(experiment: str) -> str:
    text = (Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    return "llava" if "override /data: llava" in text else "shapes"


@pytest.mark.parametrize("experiment", FROM_SCRATCH)
def test_every_experiment_composes_and_builds(experiment, shapes_llava):
    cfg = compose_config(experiment=experiment, data=shapes_llava if data_of(experiment) == "llava" else None)
    assert not cfg.model.lm.pretrained and not cfg.model.vision.pretrained, "a recipe: add it to tests/test_recipes.py"
    parts = build_components(validate_config(cfg))
    sample = parts.processor(parts.train_set[0], 0)
    assert (sample.input_ids == parts.model.token_ids.image).sum() == parts.model.tokens_per_image
    typed_section(cfg.train, TrainConfig, "train")


@pytest.mark.parametrize("group", ["model/vision", "model/projector", "model/lm"])
def test_every_model_option_builds(group):
    """Each option at tiny sizes: two ViT blocks of 8 px patches, 4 attention heads; random weights (offline)."""
    vit = [
        "++model.vision.model_kwargs.depth=2",
        "++model.vision.model_kwargs.patch_size=8",
        "model.vision.feature_layer=-1",
    ]
    lm = ["model.lm.config.num_attention_heads=4", "model.lm.config.num_key_value_heads=2"]
    offline = ["model.vision.pretrained=false", "model.lm.pretrained=null"]
    options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    for option in options:
        shrink = vit if compose_config(f"{group}={option}").model.vision.name.startswith("vit") else []
        cfg = compose_config(f"{group}={option}", "model.vision.image_size=32", *offline, *lm, *shrink)
        parts = build_components(validate_config(cfg))
        assert parts.model.tokens_per_image > 0, option


def test_unknown_experiment_is_a_hydra_error():
    with pytest.raises(MissingConfigException, match="experiment/nope"):
        compose_config(experiment="nope")


def test_unknown_key_on_command_line_is_a_hydra_error():
    with pytest.raises(ConfigCompositionException, match="lerning_rate"):
        compose_config("train.lerning_rate=1e-3")


def test_unknown_key_inside_a_section_names_the_key():
    cfg = compose_config("+train.lerning_rate=1e-3")  # '+' forces the key in, as a YAML typo would
    with pytest.raises(ConfigError, match=r"'train'.*lerning_rate"):
        typed_section(cfg.train, TrainConfig, "train")


def test_wrong_type_names_the_key():
    cfg = compose_config("train.max_steps=many")
    with pytest.raises(ConfigError, match="max_steps"):
        typed_section(cfg.train, TrainConfig, "train")


def test_every_troubleshooting_anchor_named_in_code_exists():
    """Error messages point at TROUBLESHOOTING.md#anchor; each anchor must be a heading there."""
    root = Path(CONFIG_DIR).parent
    headings = [
        line[3:].strip() for line in (root / "TROUBLESHOOTING.md").read_text().splitlines() if line.startswith("## ")
    ]
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
    named = {m for path in [*root.glob("vlm/**/*.py"), root / "train_debug.py"]
             for m in re.findall(r"TROUBLESHOOTING\.md#([a-z0-9_-]+)", path.read_text())}  # fmt: skip
    named |= set(REASONS.values())
    assert named and not named - anchors, sorted(named - anchors)


def real_values(experiment: str) -> DictConfig:
    """An experiment as it would run (no tiny overrides); a data file name where the experiment needs one."""
    data = ["data.dataset.path=my_data.json"] if data_of(experiment) == "llava" else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"+experiment={experiment}", *data])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_validates_at_its_real_values(experiment):
    run = validate_config(real_values(experiment))
    assert run.train.max_steps > 0


@pytest.mark.parametrize("typo, key", [("train.compile=regionl", "train.compile"), ("train.stage=alig", "train.stage"),
                                       ("train.best_metric=val_acc", "train.best_metric"), ("logger.mode=offlne", "logger.mode"),
                                       ("model.projector.type=pixelshuffle", "model.projector.type"),
                                       ("model.vision.name=resnet10", "model.vision.name")])  # fmt: skip
def test_a_wrong_choice_is_an_error_naming_the_key(typo, key):
    cfg = real_values("shapes")
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, typo.split("=")[0], typo.split("=")[1])  # as a value in an experiment's YAML would
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_config(cfg)


GROUPED_STREAM = ["data.batching=grouped", "data.dataset.streaming=true"]


@pytest.mark.parametrize(
    "overrides, experiment, message",
    [(["+logger.projct=vlm"], "shapes", r"'logger'.*projct"), (GROUPED_STREAM, "llava_tiny", "data.batching=grouped")],
)
def test_the_whole_config_is_checked_before_anything_is_built(tmp_path, monkeypatch, overrides, experiment, message):
    def build_components(*_):
        raise AssertionError("built before the config was checked")

    monkeypatch.setattr("train.build_components", build_components)
    files = ["data.dataset.path=train.jsonl", "data.dataset.val_path=val.jsonl"]  # never opened
    cfg = compose_config(*overrides, experiment=experiment, data=files if experiment == "llava_tiny" else None)
    with pytest.raises(ConfigError, match=message):
        new_trainer(cfg, tmp_path)
