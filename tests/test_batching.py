"""Batching modes (data.batching): grouped steps stay a pure function of (seed, step) and cover each sample once
an epoch; packed training gives the padded run's losses and weights (same samples per step); every run reports
how much of its compute was real tokens.

Run: pytest tests/test_batching.py
"""

import json
import os
import random

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tests.conftest import make_trainer
from vlm.training.batching import StepSampler, loader_options

_rng = random.Random(0)
LENGTHS = [_rng.randint(40, 1000) for _ in range(200)]


def test_grouped_steps_cover_each_sample_once_and_hold_similar_lengths():
    grouped = StepSampler(200, 8, seed=0, lengths=LENGTHS, group_steps=5)  # 25 steps an epoch, groups of 5
    epoch = [grouped.step_indices(s) for s in range(25)]
    assert sorted(i for step in epoch for i in step) == list(range(200))
    assert [grouped.step_indices(s) for s in range(25, 50)] != epoch  # the next epoch: another order
    spread = lambda steps: sum(max(LENGTHS[i] for i in s) - min(LENGTHS[i] for i in s) for s in steps) / len(steps)  # noqa: E731
    padded = StepSampler(200, 8, seed=0)
    assert spread(epoch) < 0.3 * spread([padded.step_indices(s) for s in range(25)])
    longest = [max(LENGTHS[i] for i in step) for step in epoch]
    groups = [longest[g : g + 5] for g in range(0, 25, 5)]
    assert any(g != sorted(g, reverse=True) for g in groups)  # inside a group the steps are shuffled, not longest first


def test_an_epochs_shorter_last_group_draws_each_remaining_sample_once():
    """203 samples, steps of 8, groups of 6 steps: 25 steps an epoch (3 samples left out), the last group a single
    step. Every epoch draws 200 distinct samples, the last group's step included, and never the next epoch's."""
    lengths = [_rng.randint(40, 1000) for _ in range(203)]
    grouped = StepSampler(203, 8, seed=1, lengths=lengths, group_steps=6)
    assert grouped.steps_per_epoch == 25
    for epoch in range(2):
        drawn = [i for s in range(25 * epoch, 25 * (epoch + 1)) for i in grouped.step_indices(s)]
        assert len(drawn) == len(set(drawn)) == 200
        last_group = grouped.step_indices(25 * epoch + 24)
        assert len(last_group) == 8 and not set(last_group) & set(drawn[:-8])
        assert set(drawn) <= set(grouped._permutation(epoch)[:200].tolist())  # this epoch's samples only


def test_grouped_steps_are_a_pure_function_of_seed_and_step():
    first = StepSampler(200, 8, seed=3, lengths=LENGTHS, group_steps=4)
    again = StepSampler(200, 8, seed=3, lengths=LENGTHS, group_steps=4, start_step=7, rank=1, world_size=2)
    assert next(iter(again)) == first.step_indices(7)[1::2]  # resumed mid-group on another process: same samples
    assert StepSampler(200, 8, seed=4, lengths=LENGTHS, group_steps=4).step_indices(7) != first.step_indices(7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps in each mode (3 questions per image: lengths differ), micro-batches of 3 samples/rows."""
    results = {}
    for mode in ["padded", "grouped", "packed"]:
        run_dir = tmp_path_factory.mktemp(mode)
        trainer = make_trainer(run_dir, "train.max_steps=4", "train.global_batch_size=12", "train.micro_batch_size=3",
                               "data.dataset.questions_per_image=3", "data.max_length=256", f"data.batching={mode}")  # fmt: skip
        metrics = trainer.fit()
        records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        steps = [r for r in records if "grad_norm" in r]  # step records, not evaluations
        results[mode] = trainer, metrics, steps
    return results


def test_packed_training_gives_the_padded_runs_losses_and_weights(runs):
    padded, packed = runs["padded"], runs["packed"]
    torch.testing.assert_close([s["loss"] for s in packed[2]], [s["loss"] for s in padded[2]], rtol=1e-5, atol=0)
    for (name, a), (_, b) in zip(padded[0].model.named_parameters(), packed[0].model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert packed[1]["real_token_fraction"] > padded[1]["real_token_fraction"]


def test_every_run_reports_real_tokens_and_data_wait(runs):
    for mode, (_, metrics, steps) in runs.items():
        for record in [metrics, *steps]:
            assert 0 < record["real_token_fraction"] <= 1, mode
            assert record["real_tokens_per_s"] > 0 and 0 <= record["data_wait_fraction"] < 1, mode
        assert all(s["tokens_per_s"] >= s["real_tokens_per_s"] for s in steps)  # padding computed too


class WorkerNiceness(Dataset):
    """Each item: the scheduling priority (niceness) of the process that reads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return os.nice(0)


def test_data_workers_of_a_cpu_run_take_the_lowest_priority_and_the_trainer_keeps_its_own():
    """On a CPU the step's threads use every core: a worker at nice 19 prepares data only in the gaps they leave."""
    mine = os.nice(0)
    loader = DataLoader(WorkerNiceness(), batch_size=None, **loader_options(0, 1, "cpu"))
    assert list(loader) == [19, 19] and os.nice(0) == mine
    assert loader_options(0, 1, "cuda")["worker_init_fn"] is None  # a GPU's host cores are free: no need
