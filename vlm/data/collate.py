"""Collation: pads encoded samples into a batch and reports samples with nothing to learn from.

Padding is masked by position: `attention_mask` is 0 and labels are IGNORE_INDEX on padded
positions, whatever the pad id is (it often equals EOS, so comparing ids would mask real EOS).
"""

import logging
from dataclasses import dataclass, field

import torch

from vlm.data.chat_format import IGNORE_INDEX
from vlm.data.processing import EncodedSample

log = logging.getLogger(__name__)


@dataclass
class Collator:
    pad_token_id: int
    padding_side: str = "right"  # right for training; left for generation
    drop_unsupervised: bool = True  # training: report and skip samples with no supervised token
    dropped_indices: list[int] = field(default_factory=list)

    def __call__(self, samples: list[EncodedSample]) -> dict:
        if self.drop_unsupervised:
            samples = self._drop_unsupervised(samples)
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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([s.pixel_values for s in samples]) if samples else None,
            "image_counts": [len(s.pixel_values) for s in samples],
            "sample_indices": [s.index for s in samples],
            # Counted here, on the host, so normalising the loss needs no device sync.
            "num_supervised_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),  # position 0 is never predicted
        }

    def _drop_unsupervised(self, samples: list[EncodedSample]) -> list[EncodedSample]:
        kept = [s for s in samples if s.num_supervised > 0]
        for s in samples:
            if s.num_supervised == 0:
                self.dropped_indices.append(s.index)
                log.warning(
                    "sample %d has no supervised tokens (answer missing or truncated away); skipped "
                    "(%d so far). See TROUBLESHOOTING.md#zero-supervised-tokens.",
                    s.index,
                    len(self.dropped_indices),
                )
        return kept
