"""Two processes == one: `accelerate launch` with DDP on CPU (gloo) gives the same losses and weights.

Each process takes half of every step's samples; the supervised-token count is summed over both
before any backward, so the all-reduced gradient is the one-process gradient.
Run: pytest tests/test_distributed.py
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import TINY, TINY_VIT

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["+experiment=shapes", *TINY, *TINY_VIT, "train.max_steps=3", "train.global_batch_size=8", "train.log_every=1",
        "train.eval_every=0", "train.warmup_steps=0", "data.dataset.val_size=4"]  # fmt: skip


def launch(run_dir: Path, processes: int) -> tuple[list[float], dict]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    done = subprocess.run([*launcher, "train.py", *ARGS, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], load_file(run_dir / "checkpoints" / "final" / "model.safetensors")


def test_two_processes_train_like_one(tmp_path):
    one_losses, one_weights = launch(tmp_path / "one", 1)
    two_losses, two_weights = launch(tmp_path / "two", 2)
    assert len(two_losses) == 3
    for a, b in zip(one_losses, two_losses):
        assert abs(a - b) <= 1e-5 * abs(a)
    for name, weight in one_weights.items():
        assert torch.allclose(weight, two_weights[name], rtol=1e-5, atol=1e-6), name
