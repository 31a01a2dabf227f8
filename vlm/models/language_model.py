"""Language model: any transformers `AutoModelForCausalLM`, built from a config or loaded.

`model.lm.pretrained` (a hub name or a local directory) loads weights with `from_pretrained`;
otherwise `model.lm.config` (with `model_type`) builds a randomly initialised model. Either way
the vocabulary is sized to the tokenizer, so added special tokens (the image token) get rows.
"""

from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from vlm.config import ConfigError
from vlm.hub import loading
from vlm.models.packed_attention import attention_for


@dataclass
class LMConfig:
    pretrained: str | None = None  # hub name or local directory
    config: dict[str, Any] = field(default_factory=dict)  # model_type plus AutoConfig kwargs
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | ...
    dtype: str = "float32"  # of the weights as loaded; training precision is train.mixed_precision
    trust_remote_code: bool = False  # run code from the model's repository: only after reading it
    vocab_size: int | None = None  # embedding rows if more than the tokenizer has (fixed benchmark shapes, padding)


def build_language_model(cfg: LMConfig, vocab_size: int, load_weights: bool = True) -> PreTrainedModel:
    """`load_weights=False`: a pretrained LM's structure from its config alone, its weight files unread (an empty
    build, vlm/models/vision_language_model.py)."""
    vocab_size = max(vocab_size, cfg.vocab_size or 0)
    if cfg.pretrained and load_weights:
        with loading("model.lm.pretrained", cfg.pretrained):
            lm = AutoModelForCausalLM.from_pretrained(
                cfg.pretrained, attn_implementation=attention_for(cfg.attn_implementation), dtype=cfg.dtype,
                trust_remote_code=cfg.trust_remote_code,
            )  # fmt: skip
    else:
        config = _lm_config(cfg, vocab_size)
        dtype = (
            (getattr(config, "dtype", None) or "float32") if cfg.dtype == "auto" else cfg.dtype
        )  # as from_pretrained
        lm = AutoModelForCausalLM.from_config(
            config, attn_implementation=attention_for(cfg.attn_implementation), dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip
    if lm.get_input_embeddings().num_embeddings < vocab_size:
        # New special tokens (e.g. <image>) need embedding rows; mean-init keeps old outputs stable.
        lm.resize_token_embeddings(vocab_size, mean_resizing=load_weights)
    return lm


def _lm_config(cfg: LMConfig, vocab_size: int) -> PretrainedConfig:
    """The pretrained LM's own config, or one built from `model.lm.config` with the tokenizer's vocabulary."""
    if cfg.pretrained:
        with loading("model.lm.pretrained", cfg.pretrained):
            return AutoConfig.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code)
    kwargs = dict(cfg.config)
    if "model_type" not in kwargs:
        raise ConfigError("model.lm.config needs a model_type (e.g. llama, qwen2) when model.lm.pretrained is null")
    lm_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    lm_config.vocab_size = vocab_size
    return lm_config
