"""lmms-eval tasks run on a served model: task names checked before any model is built, lmms-eval's own results
and per-sample files, our summary.json beside them, and the scores as flat `bench/TASK/METRIC` metrics (training
logs them, and `train.best_metric` may name one).

lmms-eval reseeds Python, NumPy and torch for each run; a run inside training keeps the training's random state.
"""

import difflib
import json
import random
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.loggers import EvaluationTracker
from lmms_eval.tasks import TaskManager
from lmms_eval.utils import get_datetime_str

from vlm.config import ConfigError
from vlm.harness.model import VlmModel
from vlm.training.benchmark_hook import BenchmarkScores
from vlm.training.train_config import BenchmarkConfig

SUMMARY = "summary.json"


def _offline_hint(err: Exception) -> str | None:
    """What to do when a task's data could not be fetched; None when `err` is something else."""
    text = f"{type(err).__name__}: {err}"
    markers = (
        "offline",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "ConnectError",
        "couldn't reach",
        "LocalEntryNotFound",
    )
    if not any(marker.lower() in text.lower() for marker in markers):
        return None
    return (f"{text.splitlines()[0][:300]}\nThis task reads its dataset from the Hugging Face Hub, and this machine "
            "cannot reach it (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network). Run once online so the dataset "
            "is in the cache (HF_HOME), or use a local task (include_path). See TROUBLESHOOTING.md#benchmark-task-errors.")  # fmt: skip


@contextmanager
def kept_random_state():
    """Python's, NumPy's and torch's (every device's) random state as they were before."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def flat_scores(results: dict) -> BenchmarkScores:
    """lmms-eval's results as `bench/TASK/METRIC` scores (its `,none` filter suffix dropped; stderr left out)."""
    values, higher = {}, {}
    for task, metrics in results["results"].items():
        directions = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = f"bench/{task}/{metric if filter_name in ('', 'none') else key}"
            values[name], higher[name] = float(value), bool(directions.get(metric, True))
    return BenchmarkScores(values, higher)


class Benchmarks:
    def __init__(self, cfg: BenchmarkConfig, key: str):
        """Checks that every task in `cfg.tasks` exists (`key` names the config section in the error)."""
        self.cfg = cfg
        self.task_manager = TaskManager("WARNING", include_path=cfg.include_path, model_name="vlm")
        found = self.task_manager.match_tasks(list(cfg.tasks))
        if missing := [task for task in cfg.tasks if task not in found]:
            close = sorted({name for task in missing for name in difflib.get_close_matches(task, self.task_manager.all_tasks, 4)})  # fmt: skip
            local = f" (include_path={cfg.include_path} was searched too)" if cfg.include_path else ""
            raise ConfigError(f"{key}.tasks: lmms-eval has no task {', '.join(missing)}{local}; close names: "
                              f"{close or 'none'}. `lmms-eval --tasks list` lists every task; a local task needs "
                              f"{key}.include_path=DIR. See TROUBLESHOOTING.md#benchmark-task-errors.")  # fmt: skip

    def run(self, lm: VlmModel, output_dir: Path, model_dir: str, config: dict) -> BenchmarkScores | None:
        """Scores on the main process (None on the others); lmms-eval's files and summary.json in `output_dir`."""
        started = time.perf_counter()
        output_dir.mkdir(parents=True, exist_ok=True)
        tracker, stamp = EvaluationTracker(output_path=str(output_dir)), get_datetime_str()
        with kept_random_state():
            try:
                results = simple_evaluate(
                    model=lm, model_args=f"pretrained={model_dir}", tasks=list(self.cfg.tasks), limit=self.cfg.limit,
                    batch_size=self.cfg.batch_size, log_samples=True, evaluation_tracker=tracker,
                    task_manager=self.task_manager, verbosity="WARNING", datetime_str=stamp,
                )  # fmt: skip
            except Exception as err:
                if hint := _offline_hint(err):
                    raise ConfigError(hint) from err
                raise
        if results is None:  # lmms-eval gathers the scores on the main process
            return None
        samples = results.pop("samples")
        tracker.save_results_aggregated(results=results, samples=samples, datetime_str=stamp)
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        scores = flat_scores(results)
        write_summary(output_dir, results, scores, lm, model_dir, config, time.perf_counter() - started)
        return scores


def write_summary(
    out: Path, results: dict, scores: BenchmarkScores, lm: VlmModel, model_dir: str, config: dict, wall: float
):
    """summary.json: one row per task and metric, the model and settings, and where lmms-eval's files are."""
    rows = []
    for task, metrics in results["results"].items():
        counts = results.get("n-samples", {}).get(task, {})
        for name, score in scores.values.items():
            if name.startswith(f"bench/{task}/"):
                metric = name.removeprefix(f"bench/{task}/")
                stderr = metrics.get(f"{metric}_stderr,none")
                rows.append({"task": task, "metric": metric, "score": score,
                             "stderr": stderr if isinstance(stderr, (int, float)) else None,
                             "samples": counts.get("effective"), "task_samples": counts.get("original"),
                             "higher_is_better": scores.higher_is_better[name]})  # fmt: skip
    summary = {
        "model": model_dir,
        "scores": rows,
        "processes": lm.world_size,  # each answered its share of the requests
        "unanswered": dict(lm.unanswered),  # requests with unusable images, scored as wrong answers
        "lmms_eval_version": version("lmms_eval"),
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != SUMMARY),
        "wall_time_s": wall,
        "config": config,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
