"""Streaming records (data larger than memory): read as they come, shuffled in windows, resumable exactly.

Sources: a JSONL file read line by line (its position: a byte offset) or a `datasets.IterableDataset` (its
position: the library's own `state_dict`). Order: consecutive windows of `window` records, each shuffled with a
seed of (seed, epoch, window number); at the end of the source the next epoch starts over with new seeds.
A position is (epoch, window number, the source's position at the window's start, records already taken from the
window): a resumed run re-reads at most one window and goes on with exactly the record the straight run would take.
"""

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlm.data.records import BadLine
from vlm.errors import DataFileError


class JsonlSource:
    """One record per line; an unparsable line is a BadLine (a counted bad sample, as in non-streaming JSONL)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def read(self, position: int | None) -> Iterator[tuple[Any, int]]:
        """(record, position after it), from `position` (None: the start)."""
        with self.path.open("rb") as f:
            f.seek(position or 0)
            while True:
                start = f.tell()
                line = f.readline()
                if not line:
                    return
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        record = BadLine(f"the line at byte {start}", str(err))
                    yield record, f.tell()


class IterableSource:
    """A `datasets.IterableDataset`; positions are its own `state_dict()`, taken after each record it yields.

    Read through `iter(batch_size=1)`: iterated plainly inside a DataLoader worker, the dataset would give each
    worker only its own shards, while every worker must read the whole stream (see StreamedSteps)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.start = dataset.state_dict()  # before any record: where every epoch begins

    def read(self, position: dict | None) -> Iterator[tuple[Any, dict]]:
        self.dataset.load_state_dict(position if position is not None else self.start)
        for batch in self.dataset.iter(batch_size=1):
            yield {column: values[0] for column, values in batch.items()}, self.dataset.state_dict()


@dataclass
class StreamPosition:
    epoch: int = 0
    window: int = 0  # window number within the epoch
    window_start: Any = None  # the source's position before the window's first record (None: the source's start)
    taken: int = 0  # records of this window already handed out

    def state_dict(self) -> dict:
        return asdict(self)


class WindowShuffledStream:
    """`take(n)` hands out the next n (record number in the source, record) pairs of the shuffled stream;
    `position` is where the next take starts. Record numbers are the same every epoch: a sample's id."""

    def __init__(self, source, window: int, seed: int, position: StreamPosition | None = None):
        self.source, self.window_size, self.seed = source, window, seed
        self.position = position or StreamPosition()
        self._window: list | None = None  # the current window's records, shuffled
        self._next_start: Any = None  # the source's position after the current window
        self._reader: Iterator | None = None

    def take(self, count: int) -> list:
        records = []
        while len(records) < count:
            if self._window is None:
                self._load_window()
            if self.position.taken == len(self._window):
                self._advance()
                continue
            records.append(self._window[self.position.taken])
            self.position.taken += 1
        return records

    def _load_window(self) -> None:
        """Read the window at `position` (reopening the source there: a fresh start or a resume)."""
        self._reader = self.source.read(self.position.window_start)
        self._fill()

    def _fill(self) -> None:
        records, after = [], self.position.window_start
        first = self.position.window * self.window_size  # the window's first record's number in the source
        for record, after in self._reader:
            records.append((first + len(records), record))
            if len(records) == self.window_size:
                break
        if not records:  # the source is exhausted: the next epoch
            if self.position.window == 0:
                raise DataFileError("the streamed training data holds no records")
            self.position = StreamPosition(self.position.epoch + 1)
            self._load_window()
            return
        seed = (self.seed * 1_000_003 + self.position.epoch) * 1_000_003 + self.position.window
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        self._window, self._next_start = [records[i] for i in order], after

    def _advance(self) -> None:
        p = self.position
        self.position = StreamPosition(p.epoch, p.window + 1, self._next_start, 0)
        self._fill()
