"""The pretrained recipes (architecture in YAML): each builds offline with random weights, at its real size; and
built empty (FSDP processes other than the first), without memory for its weights or reading weight files.

Run: pytest tests/test_recipes.py
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from tests.conftest import CONFIG_DIR, TINY_SHAPES, compose_config
from vlm.build import build_components, validate_config
from vlm.config import typed_section
from vlm.errors import UserError
from vlm.models.lora import is_adapter
from vlm.models.vision_language_model import ModelConfig, VisionLanguageModel
from vlm.training.optim import apply_trainable, param_settings

# Experiments with pretrained parts (test_config builds the others).
RECIPES = ["siglip_smollm2", "clip_qwen", "siglip_smollm2_lora", "clip_qwen_lora"]


def compose_recipe(name: str, *overrides: str) -> DictConfig:
    """A recipe as train.py composes it offline: random weights, a local tokenizer, a small shapes dataset."""
    offline = ["model.vision.pretrained=false", "model.lm.pretrained=null"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"+experiment={name}", *TINY_SHAPES, *offline, *overrides])


def test_siglip_smollm2_recipe_builds_offline_at_the_real_size():
    """The architecture in YAML: random weights, no network, SmolLM2-135M and SigLIP B/16 parameter counts."""
    cfg = compose_recipe("siglip_smollm2")
    assert cfg.data.chat.default_system.startswith("You are a helpful AI assistant named SmolLM")
    parts = build_components(validate_config(cfg))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(parts.model.lm) == 134_515_008  # SmolLM2-135M (49,152-token vocabulary, tied)
    assert parts.model.lm.config.num_hidden_layers == 30 and parts.model.lm.config.hidden_size == 576
    assert count(parts.model.vision) == 85_797_120  # ViT-B/16 blocks (its attention-pool head pruned)
    assert parts.model.tokens_per_image == 49
    sample = parts.processor(parts.train_set[0], 0)
    assert sample.pixel_values.shape[-2:] == (224, 224)
    assert cfg.model.lm.pretrained is None and cfg.data.tokenizer.pretrained is None  # the tokenizer follows the LM


def test_clip_qwen_recipe_builds_offline():
    """LLaVA's recipe, built shallow (the parameter counts of ViT-L and Qwen2.5-0.5B cost 20 s and 3 GB here)."""
    cfg = compose_recipe("clip_qwen", "model.lm.config.num_hidden_layers=1", "++model.vision.model_kwargs.depth=3")
    parts = build_components(validate_config(cfg))
    assert parts.model.lm.config.model_type == "qwen2" and parts.model.lm.config.hidden_size == 896
    assert parts.model.lm.get_input_embeddings().num_embeddings == 151_936
    assert parts.model.tokens_per_image == 576  # 24 x 24 patches at 336 px, one token each (MLP)
    assert parts.processor.image_transform.mean.flatten().tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert cfg.train.stage == "align" and cfg.data.chat.default_system.startswith("You are Qwen")


@pytest.mark.parametrize("name", ["siglip_smollm2_lora", "clip_qwen_lora"])
def test_lora_recipes_adapt_every_attention_and_mlp_projection_and_train_the_projector(name):
    """Built shallow: adapters on each LM layer's seven projections (not the output head), the vision tower frozen."""
    cfg = compose_recipe(name, "model.lm.config.num_hidden_layers=2", "++model.vision.model_kwargs.depth=2")
    run = validate_config(cfg)
    assert run.train.lora.enabled and run.train.stage == "finetune" and run.train.lora.r == 16
    torch.manual_seed(0)
    model = build_components(run).model
    apply_trainable(model, param_settings(model, run.train))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A." in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sum(".lora_A." in n for n in trainable) == 2 * 7  # every layer's projections
    assert all(is_adapter(n) or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)


EMPTY_THEN_WHOLE = """
import json, re, sys
from pathlib import Path
from omegaconf import OmegaConf
from vlm.config import typed_section
from vlm.models.vision_language_model import ModelConfig, TokenIds, VisionLanguageModel
cfg, ids, sizes = typed_section(OmegaConf.load(sys.argv[1]), ModelConfig, "model"), TokenIds(1, 0, 2, 49153), {}
def peak():  # this process image's high-water mark (ru_maxrss would carry the parent's over from fork)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
for empty in (True, False):  # the empty one first: the whole one then raises the peak by its weights
    before = peak()
    model = VisionLanguageModel(cfg, ids, empty=empty)
    sizes[empty] = {"grown": peak() - before, "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                    "names": sorted((n, tuple(t.shape)) for n, t in model.state_dict().items())}
print(json.dumps([sizes[True], sizes[False]]))
"""


def test_an_empty_build_holds_no_memory_for_its_weights(tmp_path):
    """What an FSDP process other than the first builds (vlm/training/distributed.py): every tensor of the whole
    model with storage of its own, but none of it written, so the process's peak memory does not grow by the weights,
    not even for a moment. A fresh process measures it; the whole build after it shows the measurement sees weights."""
    cfg = compose_recipe("siglip_smollm2", "model.lm.config.num_hidden_layers=2", "++model.vision.model_kwargs.depth=2")
    (tmp_path / "model.yaml").write_text(OmegaConf.to_yaml(cfg.model, resolve=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    probe = [sys.executable, "-c", EMPTY_THEN_WHOLE, str(tmp_path / "model.yaml")]
    done = subprocess.run(probe, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    empty, whole = json.loads(done.stdout)
    assert empty["names"] == whole["names"] and empty["bytes"] == whole["bytes"] > 100e6  # the 49k-token embeddings
    assert whole["grown"] > 0.8 * whole["bytes"], (empty["grown"], whole["grown"], done.stderr[-2000:])
    assert empty["grown"] < 0.05 * empty["bytes"], (empty["grown"], empty["bytes"])


def test_an_empty_build_reads_no_weight_files(tmp_path, saved_model):
    """A pretrained LM's structure comes from its config.json alone, and timm is not asked for weights: process 0
    reads the files for all processes."""
    parts, _ = saved_model
    lm_dir = tmp_path / "lm"
    parts.model.lm.save_pretrained(lm_dir)
    (lm_dir / "model.safetensors").write_bytes(b"not weights")
    model_cfg = OmegaConf.merge(compose_config().model, {"lm": {"pretrained": str(lm_dir)}})
    model_cfg.vision.weights_path = str(tmp_path / "absent.safetensors")
    cfg = typed_section(model_cfg, ModelConfig, "model")
    empty = VisionLanguageModel(cfg, parts.model.token_ids, empty=True)
    assert empty.lm.config.hidden_size == parts.model.lm.config.hidden_size
    assert {n: t.shape for n, t in empty.state_dict().items()} == {
        n: t.shape for n, t in parts.model.state_dict().items()
    }
    with pytest.raises(UserError, match="model.vision.weights_path"):
        VisionLanguageModel(cfg, parts.model.token_ids)
