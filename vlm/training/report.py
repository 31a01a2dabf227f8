"""What a run reports: the evaluation line and record, the end-of-run line, and the files written at the end
(metrics.json, val_predictions.jsonl, curves.png). The trainer decides when; this module decides what."""

import json
from pathlib import Path

from vlm.evaluation import EvalResult
from vlm.training.curves import write_curves


def describe_eval(loss: float, accuracy: float | None, by_kind: dict[str, float]) -> str:
    kinds = f" ({', '.join(f'{k} {v:.3f}' for k, v in by_kind.items())})" if by_kind else ""
    return f"val loss {loss:.4f}, val accuracy {_fmt(accuracy)}{kinds}"


def eval_record(result: EvalResult, step: int) -> dict:
    """An evaluation's line of train_log.jsonl (and the tracker's record)."""
    by_kind = {f"val_accuracy/{k}": v for k, v in result.accuracy_by_kind.items()}
    return {"step": step, **result.metrics(), **by_kind}


def summary_line(metrics: dict, bad_samples: str, run_dir: Path) -> str:
    loss = metrics["final_train_loss"]
    loss = "n/a (no step run)" if loss is None else f"{loss:.4f}"
    evaluation = describe_eval(metrics["val_loss"], metrics["val_accuracy"], metrics["val_accuracy_by_kind"])
    return (
        f"done: {metrics['steps']} steps in {metrics['wall_time_s']:.0f} s; final train loss {loss}; {evaluation}; "
        f"majority baseline {_fmt(metrics['majority_baseline'])}; OOM back-offs {metrics['oom_back_offs']}; "
        f"skipped steps {metrics['skipped_non_finite_steps']}; bad samples skipped: {bad_samples}; run dir {run_dir}"
    )


def write_run_outputs(run_dir: Path, metrics: dict, predictions: list[dict], train_log: Path, title: str) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = "".join(json.dumps(p, default=str) + "\n" for p in predictions)
    (run_dir / "val_predictions.jsonl").write_text(lines)
    write_curves(train_log, run_dir / "curves.png", title, metrics["majority_baseline"])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
