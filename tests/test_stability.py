"""Stability guards: non-finite steps are skipped and counted, clipping logs the pre-clip norm,
samples without supervision are reported, bf16 and activation checkpointing train correctly.

Run: pytest tests/test_stability.py
"""

import json
import logging

import numpy as np
import pytest
import torch

from tests.conftest import compose_config, make_trainer, new_trainer
from vlm.data.bad_samples import SkippedSample
from vlm.data.formats import EncodedDataset
from vlm.training.non_finite import NonFiniteLossError
from vlm.training.trainer import Trainer


def poison_steps(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the loss NaN on the given steps, as a corrupt batch or an overflow would."""
    clean = trainer._loss_sum

    def loss_sum(batch):
        loss = clean(batch)
        return loss * float("nan") if trainer.step in bad_steps else loss

    trainer._loss_sum = loss_sum


def log_records(trainer: Trainer) -> list[dict]:
    return [json.loads(line) for line in (trainer.run_dir / "train_log.jsonl").read_text().splitlines()]


def test_a_non_finite_step_is_skipped_counted_and_logged(tmp_path, caplog):
    trainer = make_trainer(
        tmp_path, "train.max_steps=4", "train.global_batch_size=4", "train.log_every=100", "train.warmup_steps=0"
    )
    poison_steps(trainer, {2})
    snapshots = {}
    original = trainer.train_step

    def train_step(samples):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        stats = original(samples)
        snapshots[trainer.step] = all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        return stats

    trainer.train_step = train_step
    with caplog.at_level(logging.WARNING):
        metrics = trainer.fit()
    assert snapshots == {1: False, 2: True, 3: False, 4: False}  # only the bad step left the weights alone
    assert metrics["skipped_non_finite_steps"] == 1
    assert "step 2: non-finite loss" in caplog.text and "Samples: [" in caplog.text
    skipped = [r for r in log_records(trainer) if r.get("skipped")]
    assert [r["step"] for r in skipped] == [2]  # logged even between log_every steps


def test_max_bad_steps_in_a_row_stops_the_run_with_a_pointer(tmp_path):
    trainer = make_trainer(tmp_path, "train.max_steps=6", "train.global_batch_size=4", "train.max_bad_steps=3")
    poison_steps(trainer, {2, 3, 4, 5, 6})
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*step 4.*TROUBLESHOOTING.md#nan-or-inf-loss"):
        trainer.fit()


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_too(tmp_path):
    """An overflow in the backward alone: the loss is fine, one gradient is not. The update must not happen."""
    trainer = make_trainer(tmp_path, "train.max_steps=3", "train.global_batch_size=4", "train.warmup_steps=0")
    weight = next(p for p in trainer.model.parameters() if p.requires_grad)
    weight.register_hook(lambda grad: grad * float("inf") if trainer.step == 2 else grad)
    steps = {}
    original = trainer.train_step

    def train_step(samples):
        before = weight.detach().clone()
        stats = original(samples)
        steps[trainer.step] = (stats, torch.equal(weight, before))
        return stats

    trainer.train_step = train_step
    metrics = trainer.fit()
    stats, unchanged = steps[2]
    assert np.isfinite(stats["loss"]) and not np.isfinite(stats["grad_norm"]) and stats["skipped"] and unchanged
    assert not steps[3][0]["skipped"] and not steps[3][1] and metrics["skipped_non_finite_steps"] == 1


def test_bad_steps_that_are_not_consecutive_never_stop_a_run(tmp_path):
    trainer = make_trainer(tmp_path, "train.max_steps=6", "train.global_batch_size=4", "train.max_bad_steps=2")
    poison_steps(trainer, {2, 4, 6})  # three bad steps, never two in a row
    assert trainer.fit()["skipped_non_finite_steps"] == 3


def test_pre_clip_norm_is_logged_and_clipping_bounds_the_update(tmp_path):
    trainer = make_trainer(tmp_path, "train.max_steps=2", "train.global_batch_size=4", "train.grad_clip=1e-3")
    samples = next(trainer.batches())
    trainer.accumulate_gradients(samples)
    unclipped = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in trainer.model.parameters() if p.grad is not None])
    )
    trainer.optimizer.zero_grad(set_to_none=True)
    stats = trainer.train_step(samples)
    assert stats["grad_norm"] == pytest.approx(float(unclipped), rel=1e-5) and stats["grad_norm"] > 1e-3


def test_samples_without_supervised_tokens_are_counted_not_trained_on(tmp_path, caplog):
    trainer = make_trainer(tmp_path, "train.global_batch_size=2")
    raw = {
        "images": [np.zeros((32, 32, 3), dtype=np.uint8)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
            {"role": "assistant", "content": "red"},
        ],
    }
    encoded = EncodedDataset(
        [{**raw, "messages": raw["messages"][:1]}, raw], trainer.parts.processor
    )  # no answer, good
    empty, good = encoded[0], encoded[1]
    assert isinstance(empty, SkippedSample) and empty.reason == "nothing_to_learn"
    with caplog.at_level(logging.WARNING):
        loss, tokens, _ = trainer.accumulate_gradients([empty, good])
    assert tokens == good.num_predicted and np.isfinite(loss)
    assert trainer.data_skips.counts() == {"nothing_to_learn": 1}
    assert "sample 0: has no assistant turn" in caplog.text and "samples-with-nothing-to-learn" in caplog.text


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    trainer = make_trainer(tmp_path, "train.max_steps=3", "train.global_batch_size=4", "train.mixed_precision=bf16")
    metrics = trainer.fit()
    assert np.isfinite(metrics["final_train_loss"])
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    plain = make_trainer(tmp_path / "a", "train.global_batch_size=4")
    checkpointed = make_trainer(tmp_path / "b", "train.global_batch_size=4", "train.activation_checkpointing=true")
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.unwrapped.lm.modules())
    samples = next(plain.batches())
    plain.accumulate_gradients(samples)
    checkpointed.accumulate_gradients(samples)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), checkpointed.model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_batch_norm_with_accumulation_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        new_trainer(compose_config("train.global_batch_size=4", "train.micro_batch_size=2"), tmp_path)
    assert "accumulation-with-batchnorm" in caplog.text


def test_fp16_without_cuda_is_a_clear_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with CUDA")
    with pytest.raises(ValueError, match="mixed_precision=fp16 needs CUDA"):
        make_trainer(tmp_path, "train.mixed_precision=fp16")


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_the_optimizer_applies_gradients_scaled_to_the_clip(tmp_path, clip):
    """What the optimizer steps with is the accumulated gradient times min(1, clip / norm): scaled when the
    norm is above the clip, untouched below it."""
    trainer = make_trainer(tmp_path, "train.max_steps=2", "train.global_batch_size=4", f"train.grad_clip={clip}")
    samples = next(trainer.batches())
    trainer.accumulate_gradients(samples)
    raw = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()])))
    trainer.optimizer.zero_grad(set_to_none=True)
    applied, step = {}, trainer.optimizer.step

    def capture_then_step(*args, **kwargs):
        applied.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture_then_step
    trainer.train_step(samples)
    scale = min(1.0, clip / norm)
    assert (scale < 1e-2) == (clip == 1e-3)  # the small clip really clips, the large one really does not
    for name, grad in raw.items():
        assert torch.allclose(applied[name], grad * scale, rtol=1e-5, atol=1e-12), name
