"""Streaming records: every record once an epoch in a seeded window-shuffled order, and a saved position that
resumes with exactly the records the straight stream hands out next (JSONL and a datasets IterableDataset);
a streaming training run stopped and resumed sees the straight run's samples (its losses, bitwise).

Run: pytest tests/test_streaming.py
"""

import json

import datasets
import pytest

from tests.conftest import compose_config, new_trainer
from tests.test_resume import StopAfter, assert_bitwise_equal, losses, params
from vlm.check_data import main as check_main
from vlm.data.records import BadLine
from vlm.data.shapes_export import data_overrides, export
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


def ids(taken):
    return [r["id"] if isinstance(r, dict) else "bad" for _, r in taken]


def test_each_record_once_an_epoch_in_a_shuffled_order(jsonl):
    stream = WindowShuffledStream(jsonl, window=5, seed=0)
    epoch = stream.take(RECORDS + 1)
    numbers = {number: (record["id"] if isinstance(record, dict) else "bad") for number, record in epoch}
    assert sorted(numbers) == list(range(RECORDS + 1)) and numbers[7] == "bad"  # a record's number: its place
    first, second = ids(epoch), ids(stream.take(RECORDS + 1))
    assert {n: (r["id"] if isinstance(r, dict) else "bad") for n, r in stream.take(RECORDS + 1)} == numbers
    assert sorted(first, key=str) == sorted([*range(RECORDS), "bad"], key=str) == sorted(second, key=str)
    assert first != [*range(7), "bad", *range(7, RECORDS)] and first != second  # shuffled, anew each epoch
    assert stream.position.epoch == 2
    bad = next(r for _, r in WindowShuffledStream(jsonl, 100, 0).take(RECORDS + 1) if isinstance(r, BadLine))
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


def streaming_trainer(run_dir, corpus, *extra, trainer_class=None):
    data = [*data_overrides(corpus), f"data.dataset.val_path={corpus}", "data.dataset.streaming=true",
            "data.dataset.shuffle_window=10", "data.dataset.max_val_samples=8"]  # fmt: skip
    cfg = compose_config("train.max_steps=6", "train.global_batch_size=4", "train.eval_every=0",
                         "train.log_every=1", "train.best_metric=null", "+model.lm.config.attention_dropout=0.2",
                         *extra, experiment="llava_tiny", data=data)  # fmt: skip
    return new_trainer(cfg, run_dir, *([trainer_class] if trainer_class else []))


def test_a_streaming_run_resumes_with_the_samples_of_the_straight_run(tmp_path):
    corpus = export(tmp_path / "corpus", records=30, image_size=32, jsonl=True)  # 6 steps of 4 cross an epoch
    straight = streaming_trainer(tmp_path / "straight", corpus)
    straight.fit()
    stopped = streaming_trainer(tmp_path / "resumed", corpus, trainer_class=StopAfter).fit()
    assert stopped["stopped_by"] == "SIGTERM" and stopped["steps"] == 3
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["stream_position"]["taken"] + state["stream_position"]["window"] * 10 == 12  # 3 steps of 4 records
    resumed = streaming_trainer(tmp_path / "resumed", corpus, "train.resume=auto")
    assert resumed.step == 3
    resumed.fit()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # every step, bitwise
    assert_bitwise_equal(params(resumed), params(straight))


def test_a_streamed_hf_dataset_trains_and_saves_its_own_state(tmp_path):
    """data=hf with streaming: a save_to_disk dataset read as an IterableDataset; its state_dict is the position."""
    cfg = hf_streaming_config(tmp_path)
    trainer = new_trainer(cfg, tmp_path / "run")
    assert isinstance(trainer.parts.train_set.stream, IterableSource) and len(trainer.parts.val_set) == 4
    metrics = trainer.fit()
    assert metrics["steps"] == 3 and not metrics["data_skipped"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["stream_position"]["window"] == 1 and "examples_iterable" in state["stream_position"]["window_start"]


def test_the_load_check_refuses_a_stream_with_a_clear_message(tmp_path, capsys):
    corpus = export(tmp_path / "corpus", records=8, image_size=32, jsonl=True)
    code = check_main(["+experiment=llava_tiny", *data_overrides(corpus), f"data.dataset.val_path={corpus}",
                       "data.dataset.streaming=true"])  # fmt: skip
    assert code == 2 and "data.dataset.streaming=false" in capsys.readouterr().err


def hf_streaming_config(tmp_path, *extra):
    """data=hf with streaming: a save_to_disk dataset (40 question-answer rows) read as an IterableDataset."""
    rows = {"question": [f"What is {i} plus one?" for i in range(40)], "answer": [str(i + 1) for i in range(40)]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(tmp_path / "hf")
    data = [f"data.dataset.path={tmp_path / 'hf'}", "data.dataset.val_split=validation", "data.dataset.streaming=true",
            "data.dataset.shuffle_window=8", "data.dataset.max_val_samples=4"]  # fmt: skip
    return compose_config("train.max_steps=3", "train.global_batch_size=4", "train.eval_every=0", "train.save_every=3",
                          "train.best_metric=null", "data=hf", *extra, experiment="llava_tiny", data=data)  # fmt: skip


@pytest.mark.parametrize("source", ["jsonl", "hf"])
def test_workers_encode_a_stream_in_the_main_processs_order(tmp_path, source):
    """data.num_workers=2 with a stream: each worker reads the whole stream and encodes every other step; the
    steps and positions come back as the main process alone makes them (an HF stream is not split by worker)."""
    corpus = export(tmp_path / "corpus", records=30, image_size=32, jsonl=True)

    def first_steps(workers: int) -> list:
        if source == "hf":
            trainer = new_trainer(
                hf_streaming_config(tmp_path, f"data.num_workers={workers}"), tmp_path / f"run{workers}"
            )
            assert isinstance(trainer.parts.train_set.stream, IterableSource)
        else:
            trainer = streaming_trainer(tmp_path / f"run{workers}", corpus, f"data.num_workers={workers}")
        batches = trainer.batches()
        return [([s.index for s in next(batches)], trainer.stream_position) for _ in range(5)]

    assert first_steps(2) == first_steps(0)
