"""Datasets backed by a sequence of records (LLaVA JSON, HF datasets): splits, image roots, per-record errors.

A format is one small class: how to open its records, and `to_raw(record, label)` turning one record into
a raw sample. This base holds what every format shares: a seeded hold-out of validation records (never
the same record in both splits), paths confined to the image root, and any error while converting one
record becoming a counted `malformed_record` instead of a crash.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from vlm.config import ConfigError
from vlm.data.bad_samples import BadSample, sample_label
from vlm.data.images import resolve_image_path


@dataclass
class RecordsConfig:
    name: str = "???"
    path: str = "???"  # the data: a file, a directory or (hf) a hub name
    image_root: str | None = None  # relative image paths resolve here; null: the data file's directory
    val_fraction: float = 0.05  # held out of the training records (seeded) when no separate validation data
    max_val_samples: int | None = 1000  # evaluate on at most this many validation records
    seed: int = 0  # which records are held out
    streaming: bool = False  # training records read as they come (data larger than memory); validation in memory
    shuffle_window: int = 1000  # streaming: records shuffled together (at most one window is re-read on resume)


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that is not JSON: kept as a record, so it becomes one counted bad sample, not a crash."""

    where: str  # "line 12" or (streaming) "the line at byte 3456"
    error: str


def holdout_split(num_records: int, fraction: float, seed: int, split: str) -> list[int]:
    """Record positions of `split` ("train" or "val"): a seeded `fraction` of them for validation."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"data.dataset.val_fraction={fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(num_records)
    held_out = max(1, round(num_records * fraction)) if fraction > 0 else 0
    chosen = order[:held_out] if split != "train" else order[held_out:]
    return sorted(int(i) for i in chosen)


class RecordDataset(Dataset):
    """Raw samples from `records[positions[i]]`; subclasses implement `to_raw`."""

    def __init__(
        self, records: Sequence, positions: list[int], image_root: Path | None, max_samples: int | None = None
    ):
        self.records = records
        self.positions = positions[:max_samples] if max_samples is not None else positions
        self.image_root = image_root.resolve() if image_root is not None else None

    def __len__(self) -> int:
        return len(self.positions)

    stream = None  # streaming training split: the records' source (streaming.py); the dataset then holds none

    def __getitem__(self, index: int) -> dict:
        position = self.positions[index]
        return self.raw_sample(self.records[position], position, index)

    def raw_sample(self, record, position: int, index: int) -> dict:
        """One record as a raw sample; `position` in the source names it when it has no id."""
        record_id = record.get("id") if isinstance(record, dict) else None
        label = sample_label(index, {"id": record_id if record_id is not None else f"record {position}"})
        try:
            raw = self.to_raw(record, label)
        except BadSample as err:
            raise err.for_sample(label) from err
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise BadSample("malformed_record", f"cannot read the record ({type(err).__name__}: {err})", label) from err
        return {"id": record_id if record_id is not None else f"record {position}", **raw}

    def to_raw(self, record, label: str) -> dict:
        raise NotImplementedError

    def image_path(self, path: str, label: str) -> Path:
        if self.image_root is None:
            raise BadSample("image_outside_root", f"image path {path!r} given but no data.dataset.image_root is set",
                            label)  # fmt: skip
        return resolve_image_path(self.image_root, path, label)
