"""The trips a step's data makes: from a DataLoader worker to the trainer (`StepSamples`), then to the device.

A worker hands every tensor to the main process through a shared-memory segment of its own, which for small
tensors costs far more than their bytes: a step of 32 samples sent as 96 tensors took 42 ms on a 2-core CPU,
the same data as 3 concatenated tensors 2.5 ms. So a worker sends the step concatenated (`StepSamples.of`) and
the main process splits it back into samples (`samples()`, views: no copy). A collated batch reaches the model's
device with `move_to`.
"""

from dataclasses import dataclass

import torch

from vlm.data.bad_samples import SkippedSample
from vlm.data.processing import EncodedSample


@dataclass
class StepSamples:
    input_ids: torch.Tensor  # every sample's ids, concatenated
    labels: torch.Tensor
    pixel_values: torch.Tensor  # every sample's views, concatenated
    lengths: list[int]  # tokens per encoded sample
    views: list[int]  # pixel_values rows per encoded sample
    entries: list  # per sample in order: (index, num_images) of an encoded one, or its SkippedSample

    @classmethod
    def of(cls, samples: list) -> "StepSamples":
        """A DataLoader `collate_fn`: the step's samples (EncodedSample or SkippedSample), concatenated."""
        encoded = [s for s in samples if isinstance(s, EncodedSample)]  # samples: rows are packed after the trip
        return cls(
            input_ids=_cat([s.input_ids for s in encoded]),
            labels=_cat([s.labels for s in encoded]),
            pixel_values=_cat([s.pixel_values for s in encoded]),
            lengths=[len(s.input_ids) for s in encoded],
            views=[len(s.pixel_values) for s in encoded],
            entries=[s if isinstance(s, SkippedSample) else (s.index, s.num_images) for s in samples],
        )

    def samples(self) -> list:
        """The step's samples again, in order."""
        ids, labels = self.input_ids.split(self.lengths), self.labels.split(self.lengths)
        encoded = iter(zip(ids, labels, self.pixel_values.split(self.views)))
        out = []
        for entry in self.entries:
            if isinstance(entry, SkippedSample):
                out.append(entry)
                continue
            index, num_images = entry
            sample_ids, sample_labels, pixel_values = next(encoded)
            out.append(EncodedSample(index, sample_ids, sample_labels, pixel_values, num_images))
        return out

    def pin_memory(self) -> "StepSamples":
        """Called by DataLoader(pin_memory=True) (CUDA): page-locked tensors copy to the GPU asynchronously."""
        pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return StepSamples(**pinned)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.long)  # a step of bad samples only


def move_to(batch: dict, device: torch.device) -> dict:
    """A collated batch's tensors on `device` (asynchronous copies from pinned memory); other values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
