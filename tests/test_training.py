"""Short real runs: loss goes down, every trainable weight moves, outputs land, checkpoints reload.

Run: pytest tests/test_training.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.conftest import TINY, compose_config, new_trainer
from vlm.build import build_components, validate_config
from vlm.data.bad_samples import SkippedSample
from vlm.data.collate import Collator
from vlm.data.processing import EncodedSample
from vlm.data.transfer import StepSamples
from vlm.evaluation import normalise_answer
from vlm.pretrained import load_pretrained
from vlm.training.batching import StepSampler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        "train.max_steps=20", "train.log_every=1", "train.warmup_steps=2", "train.lr=3e-3", "train.global_batch_size=8"
    )
    trainer = new_trainer(cfg, run_dir)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = trainer.fit()
    return trainer, run_dir, before, metrics


def test_short_run_lowers_loss_and_updates_every_trainable_parameter(short_run):
    trainer, run_dir, before, _ = short_run
    losses = [r["loss"] for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged


def test_run_directory_holds_config_log_metrics_and_checkpoint(short_run):
    _, run_dir, _, metrics = short_run
    record = json.loads((run_dir / "train_log.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= record.keys()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert {"val_accuracy", "val_accuracy_by_kind", "majority_baseline", "steps", "wall_time_s"} <= saved.keys()
    assert saved == json.loads(json.dumps(metrics))
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "tokenizer" / "tokenizer.json").exists()  # saved at start-up, not only at the end
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").exists()


def test_checkpoint_reload_gives_identical_logits(short_run):
    trainer, run_dir, _, _ = short_run
    loaded = load_pretrained(run_dir / "checkpoints" / "final")
    raw = [trainer.parts.val_set[i] for i in range(3)]
    batch = Collator(trainer.parts.tokenizer.pad_token_id)([trainer.parts.processor(r, i) for i, r in enumerate(raw)])
    reloaded = Collator(loaded.tokenizer.pad_token_id)([loaded.processor(r, i) for i, r in enumerate(raw)])
    assert torch.equal(batch["input_ids"], reloaded["input_ids"])  # same tokenizer, same format
    trainer.model.eval(), loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(batch).logits, loaded.model(reloaded).logits)


def test_pretrained_lm_and_tokenizer_load_from_a_local_directory(tmp_path, tiny):
    """The from_pretrained path, on a tiny model and tokenizer saved here (no network)."""
    tiny.tokenizer.save_pretrained(tmp_path / "tok")
    plain = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    plain.save_pretrained(tmp_path / "lm")
    lm_config = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=len(plain) - 3)  # fmt: skip
    AutoModelForCausalLM.from_config(lm_config).save_pretrained(tmp_path / "lm")
    cfg = compose_config(f"model.lm.pretrained={tmp_path / 'lm'}", f"data.tokenizer.pretrained={tmp_path / 'lm'}")
    parts = build_components(validate_config(cfg))
    assert parts.model.lm.config.model_type == "qwen2"
    assert parts.model.lm.get_input_embeddings().num_embeddings >= len(parts.tokenizer)  # resized for new tokens
    batch = Collator(parts.tokenizer.pad_token_id)([parts.processor(parts.train_set[i], i) for i in range(2)])
    assert torch.isfinite(parts.model(batch).loss_sum)


def test_train_py_runs_from_the_command_line(tmp_path):
    cmd = [sys.executable, "train.py", "+experiment=shapes", *TINY, "train.max_steps=3", "train.global_batch_size=4",
           f"hydra.run.dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "metrics.json").exists()
    bad = subprocess.run(
        [sys.executable, "train.py", "+experiment=does_not_exist"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "experiment/does_not_exist" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_init_from_starts_a_new_run_from_the_checkpoint_weights(short_run, tmp_path):
    """The next stage: weights from the previous run's final checkpoint, a fresh step count and optimizer."""
    _, run_dir, _, _ = short_run
    cfg = compose_config(
        "train.max_steps=2", "train.global_batch_size=8", f"train.init_from={run_dir / 'checkpoints' / 'final'}"
    )
    trainer = new_trainer(cfg, tmp_path)
    saved = load_file(run_dir / "checkpoints" / "final" / "model.safetensors")
    current = trainer.unwrapped.state_dict()
    assert saved and all(torch.equal(current[name], weight) for name, weight in saved.items())
    assert trainer.step == 0 and not trainer.optimizer.state


def test_data_loader_workers_give_the_same_steps(tmp_path):
    """data.num_workers=2 encodes in worker processes (each step sent as a few concatenated tensors): the same
    samples, in the same order, as the main process."""

    def first_steps(workers: int) -> list[list[tuple]]:
        trainer = new_trainer(
            compose_config("train.global_batch_size=4", f"data.num_workers={workers}"), tmp_path / str(workers)
        )
        batches = trainer.batches()
        return [[sample_fields(s) for s in next(batches)] for _ in range(3)]

    assert first_steps(2) == first_steps(0)


def sample_fields(sample: EncodedSample | SkippedSample) -> tuple:
    if isinstance(sample, SkippedSample):
        return (sample,)
    return (
        sample.index,
        sample.input_ids.tolist(),
        sample.labels.tolist(),
        sample.pixel_values.tolist(),
        sample.num_images,
    )


def test_a_step_crosses_processes_as_concatenated_tensors_and_comes_back_whole():
    def encoded(index: int, length: int, views: int) -> EncodedSample:
        ids = torch.arange(length) + index
        return EncodedSample(index, ids, ids * 2, torch.rand(views, 3, 4, 4), num_images=min(views, 1))

    step = [
        encoded(3, 5, 1),
        SkippedSample(7, "record 7", "bad_image", "truncated"),
        encoded(1, 2, 0),
        encoded(9, 4, 5),
    ]
    flat = StepSamples.of(step)
    assert flat.input_ids.shape == (11,) and flat.pixel_values.shape == (6, 3, 4, 4)  # 3 tensors, not 9
    assert [sample_fields(s) for s in flat.samples()] == [sample_fields(s) for s in step]
    assert StepSamples.of(step[1:2]).samples() == step[1:2]  # a step of bad samples only


def test_epochs_wrap_around_with_a_new_order_and_every_sample_once():
    sampler = StepSampler(dataset_size=10, global_batch_size=4, seed=0)  # 2 steps an epoch; 2 samples dropped each
    epoch0 = sampler.step_indices(0) + sampler.step_indices(1)
    epoch1 = sampler.step_indices(2) + sampler.step_indices(3)
    assert len(set(epoch0)) == len(set(epoch1)) == 8 and epoch0 != epoch1
    steps = iter(StepSampler(10, 4, 0, start_step=2, rank=1, world_size=2))
    assert next(steps) == sampler.step_indices(2)[1::2]  # a resumed rank continues mid-stream


def test_val_predictions_are_scored_as_written(short_run):
    _, run_dir, _, metrics = short_run
    predictions = [json.loads(line) for line in (run_dir / "val_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["val_accuracy_samples"] > 0
    for p in predictions:
        assert p["correct"] == (normalise_answer(p["prediction"]) == normalise_answer(p["answer"]))
    assert metrics["val_accuracy"] == sum(p["correct"] for p in predictions) / len(predictions)
    assert normalise_answer(" Red. ") == normalise_answer("red")
