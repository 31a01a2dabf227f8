"""curves.png in the run directory: the loss and validation curves for a user without W&B.

Drawn from train_log.jsonl (what the run logged, resumed runs included) at the end of training: training loss
and validation loss against step on the left, validation accuracy per evaluation on the right, on the same steps,
with the majority-answer baseline as the line to beat; benchmark scores (`train.benchmarks`) in a third panel when
the run has any. Each kind has its own hollow marker, nudged sideways, so
kinds with equal accuracy do not hide each other; a panel with nothing to draw says so.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402

KIND_MARKERS = "s^Dvp*hX"
NUDGE = 0.006  # of the step range, per kind: side by side instead of on top of each other


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and not r.get("skipped")]
    points = [(s, v) for s, v in points if v == v]  # NaN: nothing to draw
    return [s for s, _ in points], [v for _, v in points]


def _note_if_empty(axes, what: str) -> None:
    if not any(line.get_xdata().size for line in axes.get_lines()):
        axes.text(0.5, 0.5, f"no {what} was logged", ha="center", va="center", transform=axes.transAxes)


def draw_curves(records: list[dict], title: str, baseline: float | None = None) -> Figure:
    scores = sorted({k for r in records for k in r if k.startswith("bench/")})
    figure, panels = plt.subplots(1, 3 if scores else 2, figsize=(16.5 if scores else 11, 4), sharex=True)
    losses, accuracy = panels[:2]
    for key, label in [("loss", "training loss"), ("val_loss", "validation loss")]:
        steps, values = _series(records, key)
        if steps:
            losses.plot(steps, values, marker="o" if key == "val_loss" else None, label=label)
    losses.set(xlabel="step", ylabel="loss (per supervised token)", title="loss")
    _note_if_empty(losses, "finite loss")
    steps, values = _series(records, "val_accuracy")
    if steps:
        accuracy.plot(steps, values, marker="o", linewidth=2.5, label="all")
    span = max((r["step"] for r in records), default=1)
    kinds = sorted({k for r in records for k in r if k.startswith("val_accuracy/")})
    for number, key in enumerate(kinds):
        steps, values = _series(records, key)
        nudge = (number - (len(kinds) - 1) / 2) * NUDGE * span
        accuracy.plot([s + nudge for s in steps], values, marker=KIND_MARKERS[number % len(KIND_MARKERS)],
                      fillstyle="none", linewidth=1, label=key.removeprefix("val_accuracy/"))  # fmt: skip
    accuracy.set(xlabel="step", ylabel="accuracy (normalised answers)", title="validation accuracy", ylim=(0, 1))
    _note_if_empty(accuracy, "validation accuracy")
    if baseline is not None:
        accuracy.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="majority baseline")
    if scores:
        _draw_scores(panels[2], records, scores)
    for axes in panels:
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _draw_scores(axes, records: list[dict], scores: list[str]) -> None:
    for number, key in enumerate(scores):
        steps, values = _series(records, key)
        axes.plot(steps, values, marker=KIND_MARKERS[number % len(KIND_MARKERS)], label=key.removeprefix("bench/"))
    axes.set(xlabel="step", ylabel="score (as the task defines it)", title="benchmarks (lmms-eval)")


def write_curves(log_path: Path, out_path: Path, title: str, baseline: float | None = None) -> None:
    if not log_path.exists():  # nothing was logged (no step run)
        return
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    figure = draw_curves(records, title, baseline)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
