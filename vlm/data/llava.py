"""LLaVA-format data: a JSON array or JSONL file of records and a folder of images (`data=llava`).

A record: `{"id"?: str, "image"?: path | [paths], "conversations": [{"from": "human"|"gpt"|"system",
"value": str}, ...], "kind"?: str}` with `<image>` markers in the values. Paths are relative to
`data.dataset.image_root` (default: the JSON file's directory) and may not leave it. A JSONL line that
is not valid JSON is one bad record (counted), not a crash; a file that cannot be read at all is an
error at start-up.
"""

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vlm.config import ConfigError
from vlm.data.bad_samples import BadSample
from vlm.data.conversation import llava_turns, place_images
from vlm.data.records import BadLine, RecordDataset, RecordsConfig, holdout_split
from vlm.data.streaming import JsonlSource
from vlm.errors import DataFileError


@dataclass
class LlavaConfig(RecordsConfig):
    name: str = "llava"
    val_path: str | None = None  # a separate validation file (same format); null: hold out val_fraction
    image_marker: str = "<image>"


def check_file(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise DataFileError(f"data.dataset.path: LLaVA file {path!r} does not exist")
    return file


def read_records(path: str) -> list:
    """A JSON array, or JSONL (one record per line; an unparsable line becomes a BadLine, counted as one bad record).
    A file of another shape (one JSON object, a list of numbers, lines that are no records) is a DataFileError
    that says what it holds and what was expected."""
    file = check_file(path)
    return _read_cached(str(file.resolve()), file.stat().st_mtime_ns)


EXPECTED = "expected a JSON array of records, or JSONL (one record per line), each an object with 'conversations'"


@lru_cache(maxsize=4)  # train and validation splits of one file parse it once
def _read_cached(path: str, _mtime: int) -> list:
    text = Path(path).read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataFileError(f"{path} is not valid JSON ({err}); for one record per line use JSONL") from err
        return _records(path, _jsonl_lines(text), "line")
    if isinstance(whole, dict) and "conversations" not in whole:
        keys = ", ".join(repr(k) for k in list(whole)[:5])
        inner = [k for k, v in whole.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        hint = f"; the records look to be under {inner[0]!r}: write that list alone to a file" if inner else ""
        raise DataFileError(f"{path} holds one JSON object (keys {keys}), not records: {EXPECTED}{hint}")
    return _records(path, whole if isinstance(whole, list) else [whole], "element")


def _jsonl_lines(text: str) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                records.append(BadLine(f"line {number}", f"{err}: {line[:60]!r}"))
    return records


def _records(path: str, records: list, unit: str) -> list:
    """`records` unless not one of them is a record (an object): then the file is not LLaVA data at all. A few
    bad ones among records are bad samples, skipped and counted."""
    if not records:
        raise DataFileError(f"{path} holds no records: {EXPECTED}")
    if not any(isinstance(r, dict) for r in records):
        first = records[0]
        shown = (
            f"{first.where}: {first.error}" if isinstance(first, BadLine) else f"{unit} 1 is {json.dumps(first)[:80]}"
        )
        raise DataFileError(f"{path} holds no record: {EXPECTED}; {shown}")
    return records


class LlavaDataset(RecordDataset):
    def __init__(self, cfg: LlavaConfig, split: str, image_size: int):
        self.marker = cfg.image_marker
        root = Path(cfg.image_root) if cfg.image_root else Path(cfg.path).parent
        if cfg.streaming and not cfg.val_path:
            raise ConfigError(
                "data.dataset.streaming=true needs data.dataset.val_path: a stream is never held out from"
            )
        if cfg.streaming and split == "train":
            check_file(cfg.path)
            with open(cfg.path, "rb") as f:
                if f.read(4096).lstrip().startswith(b"["):
                    raise DataFileError(f"data.dataset.streaming=true reads JSONL (one record per line); {cfg.path} is a "
                                     "JSON array: convert it, or train without streaming")  # fmt: skip
            self.stream = JsonlSource(cfg.path)
            super().__init__([], [], root)
            return
        own_file = split == "train" or not cfg.val_path
        records = read_records(cfg.path if own_file else cfg.val_path)
        if cfg.val_path:
            positions = list(range(len(records)))
        else:
            positions = holdout_split(len(records), cfg.val_fraction, cfg.seed, split)
        super().__init__(records, positions, root, cfg.max_val_samples if split != "train" else None)

    def to_raw(self, record, label: str) -> dict:
        if isinstance(record, BadLine):
            raise BadSample("malformed_record", f"{record.where} is not valid JSON ({record.error})", label)
        if not isinstance(record, dict):
            raise BadSample("malformed_record", f"record is {type(record).__name__}, not an object", label)
        images = record.get("image")
        images = [] if images is None else images if isinstance(images, list) else [images]
        messages, order = place_images(llava_turns(record.get("conversations"), label), len(images), self.marker, label)
        raw = {"images": [self.image_path(images[k], label) for k in order], "messages": messages}
        if "kind" in record:
            raw["kind"] = str(record["kind"])
        return raw
