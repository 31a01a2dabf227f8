"""The checkpoint format stays readable: a checkpoint written by an earlier version loads and resumes exactly.

tests/fixtures/checkpoint_a1f6654/ is step 2 of a 4-step run written by commit a1f6654, before issue 23 gave the
format one owner (vlm/checkpoint.py). Beside it, what that code computed: the logits of the loaded model on one
validation sample (`_expected.safetensors`) and the losses of steps 3 and 4 of the uninterrupted run
(`_expected.json`, with the run's overrides). Tolerances allow for another CPU's kernels, nothing more.

Run: pytest tests/test_checkpoint_format.py
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import compose_config, new_trainer
from vlm import load_pretrained

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT = FIXTURES / "checkpoint_a1f6654"
EXPECTED = json.loads((FIXTURES / "checkpoint_a1f6654_expected.json").read_text())


def test_an_earlier_versions_checkpoint_loads_with_the_same_logits():
    saved = load_file(str(FIXTURES / "checkpoint_a1f6654_expected.safetensors"))
    model = load_pretrained(CHECKPOINT).model.eval()
    batch = {k: saved[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    with torch.no_grad():
        logits = model({**batch, "image_counts": EXPECTED["image_counts"]}).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)


def test_an_earlier_versions_checkpoint_resumes_as_the_run_that_wrote_it_continued(tmp_path):
    trainer = new_trainer(compose_config(*EXPECTED["overrides"], f"train.resume={CHECKPOINT}"), tmp_path)
    assert trainer.step == 2
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    torch.testing.assert_close(losses, EXPECTED["losses_after_step_2"], rtol=1e-6, atol=0)
