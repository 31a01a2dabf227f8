"""Benchmarks during training (`train.benchmarks`): the live model served to lmms-eval as `python -m vlm.benchmark`
serves a saved one, every `every` steps and at the end. train.py builds it; the trainer only calls it."""

from pathlib import Path

import torch
from accelerate import Accelerator

from vlm.harness.model import Served, VlmModel
from vlm.harness.tasks import Benchmarks
from vlm.training.benchmark_hook import BenchmarkScores
from vlm.training.parts import Components
from vlm.training.train_config import BenchmarkConfig


class TrainingBenchmarks:
    def __init__(self, cfg: BenchmarkConfig, accelerator: Accelerator, run_config: dict):
        self.benchmarks = Benchmarks(cfg, "train.benchmarks")  # unknown task names fail before training starts
        self.cfg, self.accelerator, self.run_config = cfg, accelerator, run_config

    def __call__(self, model: torch.nn.Module, parts: Components, output_dir: Path) -> BenchmarkScores | None:
        served = Served(model, parts.tokenizer, parts.processor, self.accelerator.device)
        lm = VlmModel(served=served, accelerator=self.accelerator, batch_size=self.cfg.batch_size,
                      max_new_tokens=self.cfg.max_new_tokens)  # fmt: skip
        was_training = model.training
        model.eval()
        try:
            described = f"{output_dir.parent.parent} at step {output_dir.name.removeprefix('step_')} (training)"
            return self.benchmarks.run(lm, output_dir, described, self.run_config)
        finally:
            model.train(was_training)
