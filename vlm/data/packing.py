"""Packing (`data.batching=packed`): a step's samples concatenated into rows of at most `data.max_length` tokens.

A step's share goes into as few rows as `data.max_length` allows, spread evenly over them (`balanced_bins`), so
rows are padded little; the row length then varies from step to step like a padded batch's, which the compiled
core takes without recompiling (dynamic sequence length).

No sample ever sees another: each sample's position ids restart at 0, and transformers builds a block-causal mask
from position ids that restart when no 2-D attention mask is given (`masking_utils.find_packed_sequence_indices`),
so attention stays within a sample on every attention implementation and under torch.compile. The first token of
each sample is never a target (the previous sample's last token does not predict it), exactly as in an unpacked
row where position 0 has no previous token. Images follow their samples in order, so each one's features land
on its own placeholders. Eager steps on the CPU also hand the attention each sample's boundaries, so it runs per
sample instead of over the whole row's mask (vlm/models/packed_attention.py).
"""

import torch

from vlm.data.chat_format import IGNORE_INDEX
from vlm.data.processing import EncodedSample


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions of `lengths` grouped into bins of at most `capacity`, longest first, each into the first bin
    with room; inside a bin the positions keep their original order (deterministic for a given step)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for position in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((b for b, free in enumerate(room) if free >= lengths[position]), None)
        if slot is None:
            bins.append([])
            room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(position)
        room[slot] -= lengths[position]
    return [sorted(b) for b in bins]


def pack_row(samples: list[EncodedSample]) -> EncodedSample:
    """One row: ids, labels (each sample's first label ignored), restarting positions, images in order."""
    labels = []
    for sample in samples:
        labels += [torch.tensor([IGNORE_INDEX]), sample.labels[1:]]
    return EncodedSample(
        index=samples[0].index,
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat(labels),
        pixel_values=torch.cat([s.pixel_values for s in samples]),
        num_images=sum(s.num_images for s in samples),
        position_ids=torch.cat([torch.arange(len(s.input_ids)) for s in samples]),
        members=tuple(s.index for s in samples),
    )


def balanced_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """As few rows as rows of `max_length` need, each as short as that row count allows.

    Rows of the full budget leave the last row of a step part-empty (a step of 16 samples of 40..1,000 tokens
    fills 8.1 rows of 1,024: the 9th is mostly padding). With the row count fixed, the shortest capacity that
    still packs into it spreads the samples evenly, and micro-batches pad only to their longest row."""
    bins = first_fit_decreasing(lengths, max_length)
    low, high = max(lengths, default=0), max_length
    while low < high:  # the smallest capacity whose first-fit-decreasing needs no more rows
        middle = (low + high) // 2
        if len(first_fit_decreasing(lengths, middle)) <= len(bins):
            high = middle
        else:
            low = middle + 1
    tighter = first_fit_decreasing(lengths, low)
    return tighter if len(tighter) <= len(bins) else bins


def pack_samples(samples: list[EncodedSample], max_length: int) -> list[EncodedSample]:
    """The rows of a step's share (a sample is never longer than max_length: the processor truncates)."""
    bins = balanced_bins([len(s.input_ids) for s in samples], max_length)
    return [pack_row([samples[i] for i in positions]) for positions in bins]
