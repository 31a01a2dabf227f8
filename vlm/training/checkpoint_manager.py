"""Resumable checkpoints: atomic writes, rotation, and finding the one to resume from.

A resumable checkpoint is an inference checkpoint (see checkpoint.py: weights, tokenizer, config)
plus `training_state.pt` (optimizer, scheduler, grad scaler, RNG states) and `trainer_state.json`
(step, micro-batch size, best metric). The data position is the step: batches are a pure
function of (seed, step), see batching.py.

Writes go to a hidden temporary directory that is renamed into place when complete, so a run
killed mid-save (kill -9, node loss) leaves the previous checkpoint intact and the partial one
invisible; leftovers are cleaned up at the next start.
"""

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
BEST = "best.json"
HIGHER_IS_BETTER = {"val_accuracy": True, "val_loss": False}  # the metrics evaluation reports


def rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def is_complete(path: Path) -> bool:
    return (path / TRAINER_STATE).is_file() and (path / TRAINING_STATE).is_file()


class CheckpointManager:
    """Owns the checkpoint directory. With several processes every one keeps the same view of the best
    evaluation (they all see the same merged metrics) but only the writer touches the disk."""

    def __init__(self, directory: Path, keep_last: int, best_metric: str | None, writer: bool = True):
        if best_metric is not None and best_metric not in HIGHER_IS_BETTER:
            raise ValueError(f"train.best_metric={best_metric!r} is not a metric evaluation reports; use one of "
                             f"{sorted(HIGHER_IS_BETTER)} or null")  # fmt: skip
        self.directory = Path(directory)
        self.keep_last, self.best_metric, self.writer = keep_last, best_metric, writer
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".tmp-*"):  # partial writes of a killed run
                log.warning("removing partial checkpoint %s left by an interrupted save", stale)
                shutil.rmtree(stale, ignore_errors=True)
        path = self.directory / BEST
        self._best = json.loads(path.read_text()) if path.exists() else None

    def checkpoints(self) -> list[Path]:
        """Complete step checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if step_of(p) >= 0 and is_complete(p)]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write via `write(tmp_dir)` (which must write TRAINER_STATE last), then rename into place."""
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        if final.exists():  # re-saving a step (e.g. a stop signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._rotate()
        return final

    def record_eval(self, step: int, metrics: dict) -> bool:
        """Remember the best step by `best_metric`; True if this step is the new best."""
        if not self.best_metric or self.best_metric not in metrics:
            return False
        best, value = self.best(), metrics[self.best_metric]
        if best is not None and (
            value <= best["value"] if HIGHER_IS_BETTER[self.best_metric] else value >= best["value"]
        ):
            return False
        self._best = {"step": step, "metric": self.best_metric, "value": metrics[self.best_metric]}
        if self.writer:
            tmp = self.directory / f".tmp-{BEST}"
            tmp.write_text(json.dumps(self._best))
            os.replace(tmp, self.directory / BEST)
        return True

    def best(self) -> dict | None:
        return self._best

    def _rotate(self) -> None:
        best = self.best()
        keep_step = best["step"] if best else None
        found = self.checkpoints()
        for path in found[: max(0, len(found) - self.keep_last)]:
            if step_of(path) != keep_step:
                shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume: str | None, manager: CheckpointManager) -> Path | None:
    """`train.resume`: null -> None; auto -> newest complete checkpoint here (or None); else a path."""
    if not resume:
        return None
    if resume == "auto":
        found = manager.latest()
        if found is None:
            log.info("train.resume=auto: no checkpoint in %s yet; starting from scratch", manager.directory)
        return found
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(
            f"train.resume={resume!r} is not a complete checkpoint directory (it needs {TRAINING_STATE} and "
            f"{TRAINER_STATE}). See TROUBLESHOOTING.md#resume-mismatch."
        )
    return path
