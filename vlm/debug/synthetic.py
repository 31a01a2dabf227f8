"""Synthetic batches shaped like real ones, for diagnostics and benchmarks (no data, no tokenizer calls).

Random token ids are drawn only from ids that are not special: an accidental image-token id would
change the placeholder count (on CUDA an out-of-bounds gather assert far from its cause), and an
accidental BOS/EOS/pad id would make the batch unlike any real one.
"""

import torch

from vlm.data.chat_format import IGNORE_INDEX


def synthetic_batch(
    model,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
    special_ids: set[int] | None = None,
    padded: bool = True,
) -> dict:
    """One image per sample at positions 1..tokens_per_image, random text after it, right padding on all
    rows but the first (none with `padded=False`); the text after the image is supervised."""
    ids = model.token_ids
    forbidden = {ids.image, ids.pad, ids.stop, *(special_ids or set())}
    allowed = torch.tensor([i for i in range(ids.vocab_size) if i not in forbidden])
    per_image = model.tokens_per_image
    if seq_len < per_image + 3:
        raise ValueError(f"seq_len={seq_len} leaves no room for text around {per_image} image tokens")
    input_ids = allowed[torch.randint(len(allowed), (batch_size, seq_len), generator=generator)]
    input_ids[:, 1 : 1 + per_image] = ids.image
    lengths = torch.randint(per_image + 3, seq_len + 1, (batch_size,), generator=generator)
    lengths[0] = seq_len  # the longest row sets the padded length
    if not padded:
        lengths[:] = seq_len
    attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, ids.pad)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, : 1 + per_image] = IGNORE_INDEX
    size = model.cfg.vision.image_size
    assert int((input_ids == ids.image).sum()) == batch_size * per_image
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "image_counts": [1] * batch_size,
        "sample_indices": list(range(batch_size)),
    }
