"""Trained models a person can load anywhere: safetensors weights, tokenizer, resolved config.

Layout of a model directory (every checkpoint of a run is one, and `save_pretrained` writes one):
  model.safetensors   weights (tied tensors stored once)
  config.yaml         the resolved run config: model architecture, chat format, image settings
  tokenizer/          the tokenizer, including a locally trained one
  lm/config.json      the LM's transformers config, so reloading never touches the hub
`export_language_model` writes the LM alone in transformers format, for tools that know nothing of vlm.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_file, save_model
from transformers import AutoConfig, PreTrainedTokenizerBase

from vlm.build import build_model_and_processor, data_config
from vlm.data.processing import SampleProcessor
from vlm.data.tokenizer import build_tokenizer
from vlm.models.vision_language_model import VisionLanguageModel


@dataclass
class Pretrained:
    """A loaded model with what it needs to take conversations and images."""

    model: VisionLanguageModel
    tokenizer: PreTrainedTokenizerBase
    processor: SampleProcessor
    config: DictConfig

    def save_pretrained(self, directory: Path) -> None:
        save_pretrained(Path(directory), self.model, self.tokenizer, self.config)


def save_pretrained(directory: Path, model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig,
                    weights: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """`weights`: the full state dict when the model's own tensors are shards (FSDP; see model_state.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    if weights is None:
        save_model(model, str(directory / "model.safetensors"))
    else:
        save_file(_unshared(weights), str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory / "tokenizer")
    model.lm.config.save_pretrained(directory / "lm")
    OmegaConf.save(cfg, directory / "config.yaml", resolve=True)


def load_pretrained(directory: Path, device: str | torch.device = "cpu") -> Pretrained:
    directory = Path(directory)
    cfg = OmegaConf.load(directory / "config.yaml")
    # Rebuild from what the checkpoint holds: no hub access, no re-training of the tokenizer.
    cfg.data.tokenizer.pretrained = str(directory / "tokenizer")
    cfg.model.lm.pretrained = None
    cfg.model.lm.config = AutoConfig.from_pretrained(directory / "lm").to_dict()
    cfg.model.vision.pretrained = False
    cfg.model.vision.weights_path = None
    data = data_config(cfg)
    tokenizer = build_tokenizer(data.tokenizer, [], data.chat.special_tokens)
    model, processor = build_model_and_processor(cfg, data, tokenizer)
    load_model(model, str(directory / "model.safetensors"), device=str(device))
    return Pretrained(model.to(device), tokenizer, processor, cfg)


def export_language_model(directory: Path, model: VisionLanguageModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The LM alone in transformers format (weights, config, tokenizer): `AutoModelForCausalLM.from_pretrained`
    loads it anywhere. Its vocabulary includes the image token, which text-only use never produces."""
    model.lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give repeats their own copy."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return out
