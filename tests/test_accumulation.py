"""Gradient accumulation is exact, and the OOM back-off changes nothing but the micro-batch size.

Run: pytest tests/test_accumulation.py
"""

import json

import numpy as np
import pytest
import torch

from tests.conftest import make_trainer
from vlm.training.accumulation import MicroBatchAccumulator, SimulatedOOM


def conversation(index: int, answer_words: int) -> dict:
    """A sample whose answer is `answer_words` words long: steps mix very different answer lengths."""
    rng = np.random.default_rng(index)
    return {
        "images": [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]},
            {"role": "assistant", "content": " ".join(["red circle"] * answer_words)},
        ],
    }


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return make_trainer(tmp_path_factory.mktemp("accumulate"), "train.global_batch_size=8")


def gradients_with_micro_batch(trainer, samples, micro_batch_size: int) -> dict:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulator.micro_batch_size = micro_batch_size
    trainer.accumulate_gradients(samples)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def collate_ids(chunk: list[int]) -> dict:
    """Samples that are bare integers, one per row."""
    return {"input_ids": torch.tensor(chunk).view(-1, 1)}


def test_gradients_are_identical_for_every_micro_batch_split(trainer):
    processor = trainer.parts.processor
    samples = [processor(conversation(i, words), i) for i, words in enumerate([1, 12, 2, 30, 1, 7, 3, 20])]
    assert len({s.num_predicted for s in samples}) >= 6  # very different answer lengths
    reference = gradients_with_micro_batch(trainer, samples, 8)
    for micro in (4, 2, 1):
        grads = gradients_with_micro_batch(trainer, samples, micro)
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            scale = reference[name].abs().max().clamp_min(1e-12)
            assert ((grad - reference[name]).abs().max() / scale) < 1e-6, (micro, name)


def test_token_weighting_is_per_token_not_per_micro_batch(trainer):
    """A plain mean of micro-batch means would weigh the 1-word and the 30-word answer alike."""
    processor = trainer.parts.processor
    samples = [processor(conversation(i, words), i) for i, words in enumerate([1, 30])]
    trainer.accumulator.micro_batch_size = 1
    loss, tokens, _ = trainer.accumulate_gradients(samples)
    with torch.no_grad():
        sums = [float(trainer._loss_sum(trainer.collator([s]))) for s in samples]  # on the trainer's device
    assert tokens == sum(s.num_predicted for s in samples)
    assert loss == pytest.approx(sum(sums) / tokens, rel=1e-6)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_back_off_halves_the_micro_batch_and_replays(where):
    calls = []

    def loss_sum(batch):
        calls.append(batch["input_ids"].shape[0])
        return batch["input_ids"].float().sum() * torch.ones((), requires_grad=True)

    accumulator = MicroBatchAccumulator(8, SimulatedOOM(max_samples=2, where=where))
    zeroed = []
    total = accumulator.run(
        1, list(range(8)), collate_ids, loss_sum, lambda loss: loss.backward(), lambda: zeroed.append(1)
    )
    assert float(total) == sum(range(8))  # every sample once
    assert [(b.old_micro_batch_size, b.new_micro_batch_size) for b in accumulator.back_offs] == [(8, 4), (4, 2)]
    assert accumulator.micro_batch_size == 2
    assert bool(zeroed) == (where == "backward")  # only a backward OOM may leave partial gradients


def test_out_of_memory_at_micro_batch_one_is_a_clear_error():
    accumulator = MicroBatchAccumulator(2, SimulatedOOM(max_samples=0))
    with pytest.raises(RuntimeError, match="micro-batch size 1.*TROUBLESHOOTING.md#out-of-memory"):
        accumulator.run(3, [0, 1], collate_ids, lambda b: b["input_ids"].float().sum(), lambda loss: None, lambda: None)


def run_params(tmp_path, *overrides):
    trainer = make_trainer(tmp_path, "train.max_steps=4", "train.global_batch_size=8", *overrides)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.fit()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, metrics, initial


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_injected_oom_run_ends_with_the_same_parameters(tmp_path, where, caplog):
    reference, _, initial = run_params(tmp_path / "plain")
    with caplog.at_level("WARNING"):
        params, metrics, _ = run_params(
            tmp_path / "oom", "train.simulate_oom_above=3", f"train.simulate_oom_in={where}"
        )
    assert metrics["oom_back_offs"] == 2 and metrics["micro_batch_size"] == 2
    assert "micro-batch size 8 -> 4" in caplog.text and "micro-batch size 4 -> 2" in caplog.text
    logged = [json.loads(line) for line in (tmp_path / "oom" / "train_log.jsonl").read_text().splitlines()]
    assert [r["micro_batch_size"] for r in logged if "loss" in r] == [2, 2, 2, 2]
    # Relative error of the parameter vector. Summing gradients in another order is all that differs;
    # AdamW normalises each update, so a zero-initialised bias can carry a few 1e-6 of its own tiny size.
    difference = torch.cat([(params[n] - reference[n]).flatten() for n in reference]).norm()
    assert difference / torch.cat([p.flatten() for p in reference.values()]).norm() < 1e-6
    moved = torch.cat([(params[n] - initial[n]).flatten() for n in reference]).norm()
    assert difference / moved < 1e-4  # also small against what training changed


def test_accumulated_gradient_equals_autograd_of_the_token_mean(trainer):
    """Independent reference: autograd of (summed token cross-entropy / supervised tokens) on the whole batch,
    computed here from the logits (shifted logits, not the model's shifted labels), against micro-batches of 3."""
    processor = trainer.parts.processor
    samples = [processor(conversation(i, words), i) for i, words in enumerate([1, 12, 2, 30, 1, 7, 3, 20])]
    grads = gradients_with_micro_batch(trainer, samples, 3)
    model = trainer.unwrapped
    batch = trainer.collator(samples)
    logits = model(batch).logits[:, :-1]
    targets = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    names = list(grads)
    parameters = dict(model.named_parameters())
    reference = torch.autograd.grad(loss / (targets != -100).sum(), [parameters[n] for n in names])
    trainer.optimizer.zero_grad(set_to_none=True)
    for name, ref in zip(names, reference):
        assert torch.linalg.vector_norm(grads[name] - ref) <= 1e-6 * torch.linalg.vector_norm(ref) + 1e-12, name


def test_out_of_memory_in_the_backward_of_a_later_micro_batch_replays_the_step(trainer, caplog):
    """The fourth micro-batch (two long answers) fails in its backward after three have added gradients:
    those must be zeroed and the step replayed at the smaller size, giving the clean gradient."""
    processor = trainer.parts.processor
    samples = [processor(conversation(i, words), i) for i, words in enumerate([1, 1, 2, 1, 1, 2, 30, 30])]
    clean = gradients_with_micro_batch(trainer, samples, 2)
    lengths = [len(s.input_ids) for s in samples]
    budget = max(2 * max(lengths[:6]), max(lengths)) + 1  # all pairs but the last fit; one long sample alone fits
    assert 2 * max(lengths[:6]) < budget and max(lengths) < budget < 2 * max(lengths)
    trainer.accumulator.simulate = SimulatedOOM(max_tokens=budget, where="backward")
    try:
        with caplog.at_level("WARNING"):
            replayed = gradients_with_micro_batch(trainer, samples, 2)
    finally:
        trainer.accumulator.simulate = None
    back_off = trainer.accumulator.back_offs[-1]
    assert (back_off.where, back_off.old_micro_batch_size, back_off.new_micro_batch_size) == ("backward", 2, 1)
    for name, grad in clean.items():
        assert torch.linalg.vector_norm(replayed[name] - grad) <= 1e-6 * torch.linalg.vector_norm(grad) + 1e-12, name
