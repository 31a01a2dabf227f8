"""Exact resume: a run stopped (SIGTERM, or kill -9 mid-save) and resumed equals an uninterrupted one.

Run: pytest tests/test_resume.py
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, TINY_VIT, compose_config, make_trainer, new_trainer
from vlm.checkpoint import TRAINER_STATE, TRAINING_STATE, CheckpointDirectory, ResumeMismatchError
from vlm.config import ConfigError
from vlm.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
RUN = [f"train.max_steps={STEPS}", "train.global_batch_size=4", "train.save_every=2", "train.keep_last=2",
       "train.warmup_steps=2", "train.lr=3e-3", "train.best_metric=null",
       "+model.lm.config.attention_dropout=0.2"]  # dropout draws from the RNG that the checkpoint must restore  # fmt: skip


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def params(trainer: Trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    trainer = make_trainer(run_dir, *RUN)
    trainer.fit()
    return run_dir, params(trainer)


class StopAfter(Trainer):
    """Delivers a real SIGTERM (or `signal_to_send`) to this process after `stop_at` steps."""

    stop_at = 3
    signal_to_send = signal.SIGTERM

    def _after_step(self, record, stop):
        if self.step == self.stop_at:
            signal.raise_signal(self.signal_to_send)
        return super()._after_step(record, stop)


class InterruptAfter(StopAfter):
    signal_to_send = signal.SIGINT


def test_sigterm_checkpoints_and_resume_is_bitwise_identical(straight, tmp_path):
    """With the next step encoded ahead in a thread (off in `straight`): same samples, same RNG, same result."""
    cfg = compose_config(*TINY_VIT, "train.eval_every=0", "train.log_every=1", *RUN, "data.encode_ahead=true")
    summary = new_trainer(cfg, tmp_path, StopAfter).fit()
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 3
    assert (tmp_path / "checkpoints" / "step_00000003" / TRAINER_STATE).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = make_trainer(tmp_path, *RUN, "train.resume=auto", "data.encode_ahead=true")
    assert resumed.encode_ahead
    assert resumed.step == 3
    resumed.fit()
    straight_dir, straight_params = straight
    assert losses(tmp_path) == losses(straight_dir)  # every step, bitwise
    assert_bitwise_equal(params(resumed), straight_params)


KILL_DURING_SAVE = """
import os, signal, sys, runpy, threading
from torch.distributed.checkpoint.filesystem import FileSystemWriter
import vlm.checkpoint as checkpoint_module

def dying(original, directory):  # death as under kill -9, in the middle of step 6's save
    def write(path, *args, **kwargs):
        if ".tmp-step_00000006" in str(path if directory else path.path):
            if not directory and threading.current_thread() is threading.main_thread():
                os._exit(3)  # a background save must write in its own thread
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, *args, **kwargs)
    return write

if os.environ["KILL_IN"] == "model files":  # the weights on disk, the rest not
    checkpoint_module.save_model_files = dying(checkpoint_module.save_model_files, directory=True)
else:  # the background thread: each process's shards on disk, not the metadata that makes them a checkpoint
    FileSystemWriter.finish = dying(FileSystemWriter.finish, directory=False)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.parametrize("checkpoint_format", ["consolidated", "sharded", "sharded_async"])
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_and_resume_is_exact(
    straight, tmp_path, checkpoint_format
):
    """Consolidated (model.safetensors) or sharded (each process's part through DCP, here one process without a
    process group): a kill after the weights, before the rest, leaves step 4 as the checkpoint resume picks, and the
    resumed run repeats the straight (consolidated) run bitwise. Sharded in the background (async_save): the kill
    comes while a thread writes the shards of step 6; step 4 was put in place when step 6's save began."""
    checkpoint_format, _, asynchronous = checkpoint_format.partition("_")
    saving = [f"train.checkpoint.format={checkpoint_format}", f"train.checkpoint.async_save={bool(asynchronous)}"]
    args = [
        "+experiment=shapes",
        *TINY,
        *TINY_VIT,
        "train.eval_every=0",
        "train.log_every=1",
        *RUN,
        *saving,
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "KILL_IN": "shard writer" if asynchronous else "model files"}
    done = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    checkpoints = tmp_path / "checkpoints"
    (partial,) = checkpoints.glob(".tmp-*")
    assert partial.name == ".tmp-step_00000006"
    weights = {"consolidated": "model.safetensors", "sharded": "dcp/.metadata"}[checkpoint_format]
    assert (checkpoints / "step_00000004" / weights).is_file()
    if asynchronous:  # the shards written, not the metadata: a half-written checkpoint
        assert (partial / "dcp" / "__0_0.distcp").is_file() and not (partial / weights).exists()
    else:
        assert (partial / weights).is_file()
    manager = CheckpointDirectory(checkpoints, keep_last=2, best_metric=None)  # cleans the partial write
    assert not list(checkpoints.glob(".tmp-*"))
    assert manager.latest().name == "step_00000004"
    resumed = make_trainer(tmp_path, *RUN, "train.resume=auto", *saving)
    assert resumed.step == 4
    resumed.fit()
    straight_dir, straight_params = straight
    assert losses(tmp_path) == losses(straight_dir)
    assert_bitwise_equal(params(resumed), straight_params)


def test_rotation_keeps_the_last_k_and_the_best(tmp_path):
    manager = CheckpointDirectory(tmp_path, keep_last=2, best_metric="val_accuracy")

    def write(directory: Path) -> None:
        directory.mkdir()
        (directory / TRAINING_STATE).write_bytes(b"x")
        (directory / TRAINER_STATE).write_text("{}")

    for step, accuracy in [(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.6), (5, 0.7)]:
        manager.record_eval(step, {"val_accuracy": accuracy})
        manager.save(step, write)
    assert [p.name for p in manager.checkpoints()] == ["step_00000002", "step_00000004", "step_00000005"]
    assert manager.best() == {"step": 2, "metric": "val_accuracy", "value": 0.9}


def test_resume_with_another_global_batch_size_is_refused(straight, tmp_path):
    straight_dir, _ = straight
    latest = CheckpointDirectory(straight_dir / "checkpoints", 2, None).latest()
    with pytest.raises(ResumeMismatchError, match="global_batch_size 4 -> 8.*TROUBLESHOOTING.md#resume-mismatch"):
        make_trainer(tmp_path, *RUN, "train.global_batch_size=8", f"train.resume={latest}")


def test_resume_from_a_path_that_is_no_checkpoint_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.resume=.*nowhere.*not a complete checkpoint"):
        make_trainer(tmp_path, *RUN, f"train.resume={tmp_path / 'nowhere'}")


def test_ctrl_c_checkpoints_and_stops_like_sigterm(tmp_path):
    # Python's own handler to start from: once, in a fresh clone's whole suite, something outside vlm had left
    # SIGINT ignored in this process before this test (nothing in vlm ignores it), and the run restored that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = compose_config(*TINY_VIT, "train.eval_every=0", "train.log_every=1", *RUN)
    summary = new_trainer(cfg, tmp_path, InterruptAfter).fit()
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == 3
    assert (tmp_path / "checkpoints" / "step_00000003" / TRAINER_STATE).exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back


def test_background_saves_of_consolidated_checkpoints_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="train.checkpoint.format=sharded"):
        make_trainer(tmp_path, *RUN, "train.checkpoint.async_save=true")  # one process: consolidated by default
    assert not (tmp_path / "train_log.jsonl").exists()


def test_a_stop_signal_puts_a_background_save_in_place_before_the_run_ends(tmp_path):
    background = ["train.checkpoint.format=sharded", "train.checkpoint.async_save=true"]
    cfg = compose_config(*TINY_VIT, "train.eval_every=0", *RUN, *background)
    summary = new_trainer(cfg, tmp_path, StopAfter).fit()
    assert summary["stopped_by"] == "SIGTERM" and summary["checkpoint"] == str(
        tmp_path / "checkpoints" / "step_00000003"
    )
    assert (tmp_path / "checkpoints" / "step_00000003" / "dcp" / ".metadata").is_file()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
