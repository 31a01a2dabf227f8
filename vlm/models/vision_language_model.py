"""The vision-language model: vision encoder -> projector -> image features merged into the LM.

`forward` does the Python-side work (images list -> one tensor, placeholder checks) and calls
`_forward_core`, which takes and returns tensors only, so it can be compiled whole. Every token
id the forward needs is cached at init: the model never touches the tokenizer. On disk a model is a model
directory (vlm/checkpoint.py): `save_pretrained` writes one, `from_pretrained` reads one back.
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from vlm.checkpoint import SavedModel, base_mismatch, load_initial_weights, read_model_directory, save_pretrained
from vlm.compat import enable_lm_activation_checkpointing
from vlm.compile_policy import lm_layers, mark_batch_and_sequence_dynamic, mark_image_count_unbacked, vision_blocks
from vlm.config import typed_section
from vlm.data.chat_format import IGNORE_INDEX, ChatFormat
from vlm.models.language_model import LMConfig, build_language_model
from vlm.models.lora import LoraSettings, adapter_base, add_adapters, base_fingerprint, is_quantized
from vlm.models.packed_attention import sample_boundaries
from vlm.models.projector import ProjectorConfig, build_projector
from vlm.models.vision_encoder import VisionConfig, VisionEncoder


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)


@dataclass(frozen=True)
class TokenIds:
    image: int
    pad: int
    stop: int  # end of turn: generation stops here
    vocab_size: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat, image_token: str) -> "TokenIds":
        return cls(
            image=tokenizer.convert_tokens_to_ids(image_token),
            pad=tokenizer.pad_token_id,
            stop=chat_format.stop_token_id,
            vocab_size=len(tokenizer),
        )


class CoreOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    loss_sum: torch.Tensor | None  # summed cross-entropy over supervised tokens


def merge_image_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor
) -> torch.Tensor:
    """Write image features, in order, into the placeholder positions of `embeds` (one masked scatter)."""
    mask = (input_ids == image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, token_ids: TokenIds, empty: bool = False):
        """`empty`: the structure without its values, for an FSDP process that receives its weights from process 0
        (vlm/training/distributed.py). Built on the meta device (no initialisation, no weight files read), then given
        storage that is allocated but never written, so it holds no memory until the weights arrive."""
        super().__init__()
        self.cfg = cfg
        self.token_ids = token_ids
        with torch.device("meta") if empty else contextlib.nullcontext():
            self.vision = VisionEncoder(cfg.vision, load_weights=not empty)
            self.lm = build_language_model(cfg.lm, token_ids.vocab_size, load_weights=not empty)
            # The projector's scale follows the LM's embeddings; an empty build takes process 0's projector anyway.
            text_scale = 1.0 if empty else self.lm.get_input_embeddings().weight.detach().pow(2).mean().sqrt().item()
            self.projector = build_projector(
                cfg.projector, self.vision.embed_dim, self.lm.config.hidden_size, self.vision.num_patches, text_scale
            )
        if empty:
            self.to_empty(device="cpu")  # real storage: accelerate maps optimizer parameters by their addresses
            self.tie_weights()
        self.tokens_per_image = self.projector.tokens_per_image

    def tie_weights(self) -> None:
        """Tie the LM's output layer to its input embeddings again where its config ties them. Moving tensors between
        devices unties them; accelerate calls this after loading process 0's weights into the shards."""
        self.lm.tie_weights()

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device = "cpu") -> "VisionLanguageModel":
        """A model saved by `save_pretrained` or by training (any checkpoint directory); offline.
        `vlm.load_pretrained` also gives its tokenizer and processor."""
        return cls.from_saved(read_model_directory(directory), device)

    @classmethod
    def from_saved(cls, saved: SavedModel, device: str | torch.device = "cpu") -> "VisionLanguageModel":
        """The model of a model directory already read (`vlm.checkpoint.read_model_directory`), with its weights."""
        token_ids = TokenIds.of(saved.tokenizer, saved.chat_format, saved.data.tokenizer.image_token)
        model_cfg = typed_section(saved.config.model, ModelConfig, "model")
        train = saved.config.train
        lora = typed_section(train.lora, LoraSettings, "train.lora") if "lora" in train else LoraSettings()
        if saved.adapter_base is None:  # every tensor in the file (an adapted model's too: its adapters)
            model = cls(model_cfg, token_ids)
            if lora.enabled:
                add_adapters(model, lora)
            return saved.load_weights(model, device)
        # LoRA adapters: the base is built as training built it (vlm/build.py), then checked against the fingerprint.
        with torch.random.fork_rng():
            torch.manual_seed(train.seed)  # a randomly initialised base draws what training drew after set_seed
            model = cls(model_cfg, token_ids)
        if train.init_from:
            load_initial_weights(model, Path(train.init_from))
        add_adapters(model, lora)
        found = base_fingerprint(model, saved.adapter_base.stored)
        if found != saved.adapter_base.fingerprint:
            raise base_mismatch(saved.directory, saved.adapter_base.fingerprint, found)
        return saved.load_weights(model, device)

    def save_pretrained(self, directory, tokenizer, config) -> None:
        """`config`: the run config the model was built from (a checkpoint's config.yaml). A quantized base (QLoRA)
        is not saved: state dicts cannot restore bitsandbytes' layers, so the directory stores the rest, and loading
        rebuilds the base from its sources, quantizes it again and checks it against its fingerprint."""
        quantized = any(is_quantized(module) for module in self.modules())
        save_pretrained(
            Path(directory), self, tokenizer, config, adapter_base=adapter_base(self) if quantized else None
        )

    @property
    def _no_split_modules(self) -> list[str]:
        """Class names of the repeated blocks (LM decoder layers, vision blocks): the units FSDP shards and
        gathers one at a time. accelerate's transformer wrap policy reads this attribute, as on HF models."""
        blocks = [*lm_layers(self.lm), *vision_blocks(self.vision.backbone)]
        return sorted({type(block).__name__ for block in blocks})

    def check_placeholders(
        self, input_ids: torch.Tensor, image_counts: Sequence[int], sample_indices: Sequence[int]
    ) -> None:
        found = (input_ids == self.token_ids.image).sum(dim=1).tolist()
        for row, (n_found, n_images) in enumerate(zip(found, image_counts)):
            if n_found != n_images * self.tokens_per_image:
                raise ValueError(
                    f"sample {sample_indices[row]}: {n_found} image placeholder tokens but {n_images} image(s) x "
                    f"{self.tokens_per_image} tokens per image = {n_images * self.tokens_per_image} expected. "
                    "See TROUBLESHOOTING.md#placeholder-count-mismatch."
                )

    def _images_tensor(self, batch: dict) -> torch.Tensor:
        """Check placeholders against images, and turn the batch's images into one tensor."""
        input_ids = batch["input_ids"]
        indices = batch.get("sample_indices") or list(range(len(input_ids)))
        self.check_placeholders(input_ids, batch["image_counts"], indices)
        pixel_values = batch.get("pixel_values")
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values)) if pixel_values else None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            return pixel_values
        # A batch without images still runs the vision tower, on one blank image merged into no position:
        # its result (and the gradient it sends back) is exactly zero, but every forward runs the same
        # modules. So with several processes DDP's gradient buckets and FSDP's all-gathers match whatever
        # each process's share holds, and the optimizer sees the same (zero, not missing) gradients for any
        # number of processes.
        size = self.cfg.vision.image_size
        return torch.zeros(1, 3, size, size, device=input_ids.device)

    def enable_activation_checkpointing(self) -> None:
        """Recompute LM and vision block activations in the backward instead of storing them."""
        enable_lm_activation_checkpointing(self.lm)
        self.vision.backbone.set_grad_checkpointing(True)

    def forward(self, batch: dict) -> CoreOutput:
        """Python-side work (checks, image list -> tensor), then the tensor-only core."""
        pixel_values = self._images_tensor(batch)
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch.get("labels")
        position_ids = batch.get("position_ids")  # packed rows only
        # Outside any compiled frame: a compiled core then serves every batch size and length.
        mark_batch_and_sequence_dynamic(input_ids, attention_mask, labels, position_ids)
        mark_image_count_unbacked(pixel_values)
        return self._forward_core(input_ids, pixel_values, attention_mask, labels, position_ids)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.lm.get_input_embeddings()(input_ids)
        features = self.projector(self.vision(pixel_values.to(embeds.dtype)))
        return merge_image_features(embeds, input_ids, self.token_ids.image, features.flatten(0, 1))

    def _forward_core(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> CoreOutput:
        embeds = self.embed(input_ids, pixel_values)
        if position_ids is None:
            # Positions count real tokens only, so left padding does not shift them (as in generation).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            lm_mask = attention_mask
        else:
            # Packed rows: with no 2-D mask, transformers makes attention block-causal wherever the positions
            # restart (one block per sample; see vlm/data/packing.py). Padding is masked out of the loss below.
            lm_mask = None
        # Eager packed rows on the CPU also tell the attention where samples start, so it can skip the masked blocks
        # (vlm/models/packed_attention.py); a compiled graph keeps the mask alone, and GPUs take flash_attention_2.
        per_sample = lm_mask is None and embeds.device.type == "cpu" and not torch.compiler.is_compiling()
        boundaries = sample_boundaries(position_ids) if per_sample else {}
        # use_cache=False: a forward over whole sequences needs no KV cache (transformers builds one by default).
        logits = self.lm(
            inputs_embeds=embeds, attention_mask=lm_mask, position_ids=position_ids, use_cache=False, **boundaries
        ).logits
        if labels is None:
            return CoreOutput(logits, None)
        # Padding is excluded by position, whatever its id. Position t predicts label t+1: the labels are
        # shifted (the last position gets nothing to predict), not the logits, so no [B, T-1, V] copy is made
        # and the loss reduces over B*T rows like every other reduction in the graph (one size regime).
        targets = F.pad(labels.masked_fill(attention_mask == 0, IGNORE_INDEX)[:, 1:], (0, 1), value=IGNORE_INDEX)
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return CoreOutput(logits, loss_sum)

    @torch.no_grad()
    def generate(self, batch: dict, synced: bool = False, **generate_kwargs) -> torch.Tensor:
        """Decoding from left-padded prompts; returns only the new tokens [B, <=max_new_tokens].

        `generate_kwargs` go to transformers' `generate` (greedy unless `do_sample=True`; see
        vlm/generation.py). `synced`: keep running forwards until every process has finished (FSDP: each
        forward is a collective). Each sample stops at its end-of-turn token."""
        embeds = self.embed(batch["input_ids"], self._images_tensor(batch))
        return self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            eos_token_id=self.token_ids.stop,
            pad_token_id=self.token_ids.pad,
            synced_gpus=synced,
            **{"do_sample": False, **generate_kwargs},
        )
