"""Collation: pads encoded samples into a batch.

Padding is masked by position: `attention_mask` is 0 and labels are IGNORE_INDEX on padded
positions, whatever the pad id is (it often equals EOS, so comparing ids would mask real EOS).
Samples with nothing to learn from are reported and left out by the trainer, before collation.
Packed rows (packing.py) bring their own restarting `position_ids`; the padding after them restarts too (a
segment of its own).
"""

from dataclasses import dataclass

import torch

from vlm.data.chat_format import IGNORE_INDEX
from vlm.data.processing import EncodedSample


@dataclass
class Collator:
    pad_token_id: int
    padding_side: str = "right"  # right for training; left for generation

    def __call__(self, samples: list[EncodedSample]) -> dict:
        longest = max((len(s.input_ids) for s in samples), default=0)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            span = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            input_ids[row, span] = sample.input_ids
            labels[row, span] = sample.labels
            attention_mask[row, span] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([s.pixel_values for s in samples]) if samples else None,
            "image_counts": [len(s.pixel_values) for s in samples],
            "sample_indices": [s.sample_ids if s.members else s.index for s in samples],
        }
        if any(s.position_ids is not None for s in samples):
            batch["position_ids"] = torch.stack([_restarting_positions(s, longest) for s in samples])
        return batch


def _restarting_positions(sample: EncodedSample, length: int) -> torch.Tensor:
    """A packed row's positions, then the padding as one more segment starting at 0 (right padding)."""
    own = sample.position_ids if sample.position_ids is not None else torch.arange(len(sample.input_ids))
    return torch.cat([own, torch.arange(length - len(own))])


def filler_sample(pad_token_id: int, image_size: int) -> EncodedSample:
    """One padding token, nothing supervised, no image: a micro-batch that adds exactly zero to the loss."""
    return EncodedSample(
        index=-1,
        input_ids=torch.tensor([pad_token_id]),
        labels=torch.tensor([IGNORE_INDEX]),
        pixel_values=torch.zeros(0, 3, image_size, image_size),
    )
