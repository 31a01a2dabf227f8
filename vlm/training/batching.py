"""Which samples each optimizer step sees: a pure function of (seed, step).

The sample order is a seeded permutation per epoch; step s takes the s-th slice of
`global_batch_size` samples. Because nothing depends on iteration history, the data position of
a checkpoint is just its step number: resuming replays exactly the batches an uninterrupted run
would have seen, and changing the micro-batch size (or the OOM back-off doing so) never changes
which samples form a step. Each process takes an interleaved share of the step's samples.

Grouped batching (`lengths` given) keeps that promise: the epoch's permutation is cut into groups of
`group_steps` steps; inside a group the samples are sorted by token length (longest first) and cut into
steps, whose order inside the group is shuffled with a seed of (seed, epoch, group). A step then holds
samples of similar length (little padding), its micro-batches and each process's share too, and the
longest step of a group is not always its first.

A stream (StreamedSteps) has no random access: its steps follow the stream's order, and a checkpoint saves the
stream's position instead (vlm/data/streaming.py).
"""

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from vlm.config import ConfigError
from vlm.data.formats import EncodedDataset, encode_or_skip
from vlm.data.lengths import sample_lengths
from vlm.data.streaming import StreamPosition, WindowShuffledStream
from vlm.data.transfer import StepSamples
from vlm.training.parts import Components
from vlm.training.train_config import TrainConfig


class StepSampler(Sampler[list[int]]):
    """Yields, for steps start_step, start_step+1, ..., the dataset indices this process uses."""

    def __init__(self, dataset_size: int, global_batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1, lengths: Sequence[int] | None = None, group_steps: int = 16):  # fmt: skip
        if global_batch_size > dataset_size:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} exceeds the dataset's {dataset_size} samples"
            )
        self.dataset_size, self.global_batch_size, self.seed = dataset_size, global_batch_size, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.steps_per_epoch = dataset_size // global_batch_size  # the last partial batch of an epoch is dropped
        self.lengths, self.group_steps = lengths, group_steps
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.dataset_size, generator=generator)
        return self._order

    def step_indices(self, step: int) -> list[int]:
        """All samples of 0-based step `step`, over every process, in order."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        if self.lengths is not None:
            return self._grouped(epoch, offset)
        start = offset * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size].tolist()

    def _grouped(self, epoch: int, offset: int) -> list[int]:
        group, place = divmod(offset, self.group_steps)
        first = group * self.group_steps
        steps = min(self.group_steps, self.steps_per_epoch - first)  # the epoch's last group may be shorter
        size = self.global_batch_size
        members = self._permutation(epoch)[first * size : (first + steps) * size].tolist()
        members.sort(key=lambda i: -self.lengths[i])  # stable: ties keep the permutation's order
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + group)
        chosen = int(torch.randperm(steps, generator=generator)[place])
        return members[chosen * size : (chosen + 1) * size]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.step_indices(step)[self.rank :: self.world_size]
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for its progress estimate
        return 2**62


def step_loader(dataset: Dataset, sampler: StepSampler, num_workers: int, device_type: str = "cpu") -> Iterator[list]:
    """One item per step: the list of encoded samples of this process's share, uncollated.

    Collation happens per micro-batch, after the trainer has chosen the micro-batch size. With workers,
    images are decoded and text tokenized off the main process, `prefetch_factor` steps ahead per worker, and
    each step travels as a few concatenated tensors (vlm/data/transfer.py).
    """
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=StepSamples.of,
        **loader_options(sampler.seed, num_workers, device_type),
    )
    return (step.samples() for step in loader)


class StreamedSteps(IterableDataset):
    """A stream's steps: (this process's share of the step, encoded, as StepSamples; the stream position after it).

    With k DataLoader workers, worker w encodes steps w, w+k, w+2k, ...: every worker reads the whole stream
    (reading a record is cheap, decoding its images is not) and the DataLoader hands the steps back in order,
    taking from the workers in turn. Every process reads the whole stream too and takes its share of each step.
    """

    def __init__(self, train_set, processor, global_batch_size: int, window: int, seed: int,
                 position: StreamPosition | None, rank: int = 0, world_size: int = 1):  # fmt: skip
        self.train_set, self.processor, self.global_batch_size = train_set, processor, global_batch_size
        self.window, self.seed, self.position = window, seed, position
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[tuple[StepSamples, StreamPosition]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        stream = WindowShuffledStream(self.train_set.stream, self.window, self.seed, self.position)
        for step in itertools.count():
            taken = stream.take(self.global_batch_size)
            if step % workers != worker_id:
                continue
            share = taken[self.rank :: self.world_size]
            read = self.train_set.raw_sample
            samples = [encode_or_skip(self.processor, partial(read, record, n, n), n) for n, record in share]
            yield StepSamples.of(samples), replace(stream.position)


def streamed_step_loader(steps: StreamedSteps, num_workers: int, device_type: str = "cpu") -> DataLoader:
    """Yields (StepSamples, position after the step) in step order."""
    options = loader_options(steps.seed, num_workers, device_type)
    return DataLoader(steps, batch_size=None, collate_fn=_as_is, **options)


def yield_to_the_step(_worker_id: int) -> None:
    """A DataLoader worker of a run on the CPU lowers its priority to the lowest (nice 19). The step's threads keep
    every core busy in its kernels and leave one idle in the Python between them: the worker prepares the next
    steps in those gaps instead of taking cores from the kernels. The default experiment on 2 cores (400 steps,
    alternating runs): data wait 8% without a worker; with one, 2.3% at normal priority but the runs 4% slower,
    4.3% at nice 19 and the steps no slower (55.5 s against 57.4 s over four pairs)."""
    os.nice(max(0, 19 - os.nice(0)))  # an increment; lowering it back would need privileges


def _as_is(item):
    return item


def loader_options(seed: int, num_workers: int, device_type: str) -> dict:
    return {
        # Its own generator: creating the iterator then draws no number from the global RNG, so a
        # resumed run's dropout/sampling RNG continues exactly where the checkpoint left it.
        "generator": torch.Generator().manual_seed(seed),
        "num_workers": num_workers,
        "persistent_workers": num_workers > 0,
        "prefetch_factor": 4 if num_workers > 0 else None,
        # StepSamples.pin_memory: page-locked host tensors copy to the GPU asynchronously.
        "pin_memory": device_type == "cuda",
        "worker_init_fn": yield_to_the_step if device_type == "cpu" else None,
    }


def training_steps(parts: Components, train: TrainConfig, start_step: int, rank: int, world_size: int,
                   position: StreamPosition | None, device_type: str) -> Iterator[tuple[list, StreamPosition | None]]:  # fmt: skip
    """This process's share of each step's samples from `start_step` on, with (a stream only) the stream position
    after the step: the map-style dataset by `StepSampler`, a stream by `StreamedSteps` from `position`."""
    data = parts.data
    if getattr(parts.train_set, "stream", None) is not None:
        steps = StreamedSteps(
            parts.train_set, parts.processor, train.global_batch_size, data.dataset.shuffle_window, train.seed,
            position, rank, world_size,
        )  # fmt: skip
        return ((step.samples(), after) for step, after in streamed_step_loader(steps, data.num_workers, device_type))
    lengths = None
    if data.batching == "grouped":
        lengths = sample_lengths(parts.train_set, parts.processor, data.num_workers, show_progress=rank == 0)
    sampler = StepSampler(
        len(parts.train_set), train.global_batch_size, train.seed, start_step, rank, world_size, lengths,
        data.group_steps,
    )  # fmt: skip
    loader = step_loader(EncodedDataset(parts.train_set, parts.processor), sampler, data.num_workers, device_type)
    return ((samples, None) for samples in loader)


def computed_tokens(units: Sequence, micro_batch_size: int) -> int:
    """Token positions the forward computes for these samples (or packed rows) in micro-batches of this size:
    each micro-batch is padded to its longest."""
    total = 0
    for start in range(0, len(units), micro_batch_size):
        chunk = units[start : start + micro_batch_size]
        total += len(chunk) * max(len(u.input_ids) for u in chunk)
    return total


@dataclass
class Throughput:
    """Run totals of this process for metrics.json: how much of the computed work was real tokens, how fast,
    and how much of the step time went to waiting for data."""

    real_tokens: int = 0
    computed_tokens: int = 0
    step_time_s: float = 0.0
    data_wait_s: float = 0.0

    def add(self, real: int, computed: int, step_time: float, data_wait: float, world_size: int) -> dict:
        """Count a step; returns its figures for the step log. This process's figures times the process count:
        the processes' shares are alike."""
        self.real_tokens += real
        self.computed_tokens += computed
        self.step_time_s += step_time
        self.data_wait_s += data_wait
        return {
            "tokens_per_s": computed * world_size / step_time,  # padding included: the work done
            "real_tokens_per_s": real * world_size / step_time,
            "real_token_fraction": real / max(computed, 1),
            "step_time_s": step_time,
            "data_wait_fraction": data_wait / step_time,
        }

    def summary(self, world_size: int) -> dict:
        time_s = max(self.step_time_s, 1e-9)
        return {
            "real_token_fraction": self.real_tokens / max(self.computed_tokens, 1),
            "real_tokens_per_s": self.real_tokens * world_size / time_s,
            "data_wait_fraction": self.data_wait_s / time_s,
        }
