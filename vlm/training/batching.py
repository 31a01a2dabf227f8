"""Which samples each optimizer step sees: a pure function of (seed, step).

The sample order is a seeded permutation per epoch; step s takes the s-th slice of
`global_batch_size` samples. Because nothing depends on iteration history, the data position of
a checkpoint is just its step number: resuming replays exactly the batches an uninterrupted run
would have seen, and changing the micro-batch size (or the OOM back-off doing so) never changes
which samples form a step. Each process takes an interleaved share of the step's samples.
"""

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class StepSampler(Sampler[list[int]]):
    """Yields, for steps start_step, start_step+1, ..., the dataset indices this process uses."""

    def __init__(self, dataset_size: int, global_batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        if global_batch_size > dataset_size:
            raise ValueError(f"train.global_batch_size={global_batch_size} exceeds the dataset's {dataset_size} samples")
        self.dataset_size, self.global_batch_size, self.seed = dataset_size, global_batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.steps_per_epoch = dataset_size // global_batch_size  # the last partial batch of an epoch is dropped
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.dataset_size, generator=generator)
        return self._order

    def step_indices(self, step: int) -> list[int]:
        """All samples of 0-based step `step`, over every process, in order."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.step_indices(step)[self.rank :: self.world_size]
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its progress estimate
        return 2**62


def step_loader(dataset: Dataset, sampler: StepSampler, num_workers: int) -> DataLoader:
    """One item per step: the list of encoded samples of this process's share, uncollated.

    Collation happens per micro-batch, after the trainer has chosen the micro-batch size.
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        # Its own generator: creating the iterator then draws no number from the global RNG, so a
        # resumed run's dropout/sampling RNG continues exactly where the checkpoint left it.
        generator=torch.Generator().manual_seed(sampler.seed),
        collate_fn=list,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
