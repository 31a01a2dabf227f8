"""Streaming records: every record once an epoch in a seeded window-shuffled order, and a saved position that
resumes with exactly the records the straight stream hands out next (JSONL and a datasets IterableDataset).

Run: pytest tests/test_streaming.py
"""

import json

import datasets
import pytest

from vlm.data.llava import BadLine
from vlm.data.streaming import IterableSource, JsonlSource, StreamPosition, WindowShuffledStream

RECORDS = 23  # not a multiple of the window: the last window of an epoch is shorter


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"id": i}) for i in range(RECORDS)]
    lines.insert(7, "{not json")  # a broken line is a record too (a counted bad sample later)
    path.write_text("\n".join(lines) + "\n")
    return JsonlSource(str(path))


def iterable():
    return IterableSource(datasets.Dataset.from_dict({"id": list(range(RECORDS))}).to_iterable_dataset(num_shards=1))


def ids(records):
    return [r["id"] if isinstance(r, dict) else "bad" for r in records]


def test_each_record_once_an_epoch_in_a_shuffled_order(jsonl):
    stream = WindowShuffledStream(jsonl, window=5, seed=0)
    first, second = ids(stream.take(RECORDS + 1)), ids(stream.take(RECORDS + 1))
    assert sorted(first, key=str) == sorted([*range(RECORDS), "bad"], key=str) == sorted(second, key=str)
    assert first != [*range(7), "bad", *range(7, RECORDS)] and first != second  # shuffled, anew each epoch
    assert stream.position.epoch == 1
    bad = next(r for r in WindowShuffledStream(jsonl, 100, 0).take(RECORDS + 1) if isinstance(r, BadLine))
    assert bad.where.startswith("the line at byte")


@pytest.mark.parametrize("source", ["jsonl", "iterable"])
def test_a_saved_position_resumes_exactly(source, jsonl):
    make = (lambda: jsonl) if source == "jsonl" else iterable
    straight = WindowShuffledStream(make(), window=5, seed=3)
    taken = [ids(straight.take(4)) for _ in range(15)]  # crosses windows and an epoch
    for stop in [1, 3, 7, 12]:
        stream = WindowShuffledStream(make(), window=5, seed=3)
        for _ in range(stop):
            stream.take(4)
        saved = json.loads(json.dumps(stream.position.state_dict()))  # as it goes through trainer_state.json
        resumed = WindowShuffledStream(make(), window=5, seed=3, position=StreamPosition(**saved))
        assert [ids(resumed.take(4)) for _ in range(15 - stop)] == taken[stop:], stop
