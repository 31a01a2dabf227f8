"""train_debug.py: synthetic batches are clean, and the suite runs end to end and writes its JSON summary.

Run: pytest tests/test_debug.py
"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import TINY, TINY_VIT
from vlm.debug.synthetic import synthetic_batch

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_ids_hold_special_tokens_only_where_intended(tiny):
    model, special = tiny.model, set(tiny.tokenizer.all_special_ids)
    batch = synthetic_batch(model, 6, 64, torch.Generator().manual_seed(0), special)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    image = ids == model.token_ids.image
    assert image.sum(dim=1).tolist() == [model.tokens_per_image] * 6
    assert image[:, 1 : 1 + model.tokens_per_image].all()
    others = ids[mask & ~image]
    assert not torch.isin(others, torch.tensor(sorted(special))).any()  # no accidental special token
    assert (ids[~mask] == model.token_ids.pad).all()
    assert torch.isfinite(model(batch).loss_sum)


def test_train_debug_runs_every_check_and_writes_the_summary(tmp_path):
    out = tmp_path / "summary.json"
    cmd = [sys.executable, "train_debug.py", "+experiment=shapes", *TINY, *TINY_VIT, "--quick", "--modes", "core",
           "--batch-size", "4", "--seq-len", "64", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    for key in ["graph_breaks", "recompiles_vary_batch", "recompiles_vary_seq", "eager_tokens_per_s",
                "compiled_tokens_per_s", "first_step_s", "peak_memory_bytes", "mfu", "matmul_peak_flops", "params"]:  # fmt: skip
        assert key in summary, key
    assert summary["graph_breaks"] == 0
    assert summary["recompiles_vary_batch"] == {"core": 0} and summary["recompiles_vary_seq"] == {"core": 0}
    assert set(summary["first_step_s"]) == {"off", "core"}
    assert 0 < summary["mfu"]["off"] < 1 and 0 < summary["mfu"]["core"] < 1
    before, after = summary["matmul_peak_flops_before"], summary["matmul_peak_flops_after"]
    assert summary["matmul_peak_flops"] == max(before, after) > 0  # measured on both sides of the timed steps
    assert "graph breaks in _forward_core (fullgraph): 0" in done.stdout


def test_expect_speedup_fails_a_compiled_mode_slower_than_eager_and_points_to_the_entry():
    from train_debug import failures, hint

    results = {"step_time_s": {"off": 0.35, "core": 0.96, "regional": 0.29}}
    assert failures(results) == []  # a report, not a failure, unless asked
    (problem,) = failures(results, expect_speedup=True)
    assert problem.startswith("step_time_s[core] = 0.960 s, slower than eager (0.350 s)")
    assert "TROUBLESHOOTING.md#compiled-steps-slower-than-eager" in hint(problem)
    assert failures({"step_time_s": {"core": 0.2}}, expect_speedup=True) == [
        "--expect-speedup needs the eager baseline (drop --skip-baseline)"
    ]
