"""What the trainer needs of benchmark runs (`train.benchmarks`) without importing lmms-eval, an optional extra:
vlm/harness/training.py implements `BenchmarkRun`, and train.py hands it to the trainer."""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from vlm.training.parts import Components


@dataclass
class BenchmarkScores:
    values: dict[str, float]  # {"bench/TASK/METRIC": score}
    higher_is_better: dict[str, bool]  # as each task declares it, per score


class BenchmarkRun(Protocol):
    def __call__(self, model: torch.nn.Module, parts: Components, output_dir: Path) -> BenchmarkScores | None:
        """The configured tasks on `model` (every process takes part); scores on the main process, else None."""
