"""curves.png in the run directory: the loss and validation curves for a user without W&B.

Drawn from train_log.jsonl (what the run logged, resumed runs included) at the end of training: training loss
and validation loss against step on the left, validation accuracy per evaluation on the right.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and not r.get("skipped")]
    return [s for s, _ in points], [v for _, v in points]


def write_curves(log_path: Path, out_path: Path, title: str) -> None:
    if not log_path.exists():  # nothing was logged (no step run)
        return
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in [("loss", "training loss"), ("val_loss", "validation loss")]:
        steps, values = _series(records, key)
        losses.plot(steps, values, marker="o" if key == "val_loss" else None, label=label)
    losses.set(xlabel="step", ylabel="loss (per supervised token)", title="loss")
    losses.legend()
    kinds = sorted({k for r in records for k in r if k.startswith("val_accuracy/")})
    for key in ["val_accuracy", *kinds]:
        steps, values = _series(records, key)
        overall = key == "val_accuracy"
        accuracy.plot(steps, values, marker="o", linewidth=2.5 if overall else 1,
                      label="all" if overall else key.removeprefix("val_accuracy/"))  # fmt: skip
    accuracy.set(xlabel="step", ylabel="accuracy (normalised answers)", title="validation accuracy", ylim=(0, 1))
    accuracy.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
