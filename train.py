"""Train a vision-language model: `python train.py +experiment=shapes [key=value ...]`.

The composition root: the whole config is checked before anything is built, every part is built once, and the
trainer gets them ready-made. A mistake in the command or the data prints its message alone and exits 2 (1 when the
run fails on its data); a run stopped by a signal saves a checkpoint and exits 128 + the signal's number (130 for
Ctrl-C, 143 for SIGTERM), so schedulers and scripts never take it for a finished run.
"""

import json
import logging
import signal
import sys
import time
from pathlib import Path

import hydra
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vlm.build import build_components, validate_config
from vlm.config import CONFIG_DIR, ConfigError, check_overrides
from vlm.errors import reported_as_message
from vlm.harness import require_lmms_eval
from vlm.training.benchmark_hook import BenchmarkRun
from vlm.training.device import configure_cpu_allocator, configure_cuda_allocator
from vlm.training.distributed import (
    build_accelerator,
    builds_empty_model,
    check_quantized_base,
    describe,
    log_to_own_file,
)
from vlm.training.parts import RunConfig
from vlm.training.trainer import Trainer

log = logging.getLogger(__name__)


def build_trainer(cfg: DictConfig, run_dir: Path, trainer_class: type[Trainer] = Trainer) -> Trainer:
    started = time.perf_counter()
    run = validate_config(cfg)  # every config error, before anything is built
    configure_cuda_allocator(run.train.cuda_alloc_conf)  # before CUDA initialises
    configure_cpu_allocator(run.train.cpu_keep_freed_bytes)
    accelerator = build_accelerator(run.train.device, run.train.mixed_precision)
    log_to_own_file(Path(run_dir), accelerator.process_index)
    log.info("%s", describe(accelerator))
    benchmarks = build_benchmarks(cfg, run, accelerator)  # an unknown task fails here, before the model is built
    check_quantized_base(run.train.lora, accelerator)
    set_seed(run.train.seed)  # the same on every process: identical initial weights
    empty = builds_empty_model(accelerator)
    if empty:
        log.info("the model is built empty here: process 0 sends each tensor as FSDP shards it")
    parts = build_components(run, empty)
    if accelerator.num_processes > 1:
        set_seed(run.train.seed + accelerator.process_index)  # from here on (dropout) each process draws its own
    return trainer_class(cfg, run, parts, accelerator, run_dir, started, benchmarks)


def build_benchmarks(cfg: DictConfig, run: RunConfig, accelerator: Accelerator) -> BenchmarkRun | None:
    """`train.benchmarks.tasks` run by lmms-eval (the bench extra, imported only when tasks are named)."""
    settings = run.train.benchmarks
    if not settings.tasks:
        return None
    require_lmms_eval("train.benchmarks.tasks")
    if accelerator.is_fsdp2:
        raise ConfigError(
            "train.benchmarks with FSDP: benchmark requests are answered per process on a whole model. Benchmark the "
            "saved checkpoints instead: accelerate launch -m vlm.benchmark checkpoint=RUN/checkpoints/final ... "
            "See TROUBLESHOOTING.md#benchmark-task-errors."
        )
    from vlm.harness.training import TrainingBenchmarks  # imports lmms-eval

    return TrainingBenchmarks(settings, accelerator, OmegaConf.to_container(cfg, resolve=True))


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        with reported_as_message():
            trainer = build_trainer(cfg, Path(HydraConfig.get().runtime.output_dir))
            metrics = trainer.fit()
            # The process group goes before the interpreter does: torch asks for it, and gloo's threads left to the
            # exit once aborted a process ("terminate called without an active exception") after a finished run.
            trainer.accelerator.end_training()
    except KeyboardInterrupt:  # a second Ctrl-C: the user chose not to wait for the checkpoint
        print("interrupted again: stopped at once, without saving this step's checkpoint", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if "stopped_by" in metrics:
        sys.exit(stop_exit_code(metrics["stopped_by"]))
    log.info("final metrics: %s", json.dumps(metrics))


def stop_exit_code(stopped_by: str) -> int:
    """128 + the signal's number; a process stopped because another one got a signal exits as under SIGTERM."""
    return 128 + (signal.Signals[stopped_by] if stopped_by in signal.Signals.__members__ else signal.SIGTERM)


def run(argv: list[str]) -> None:
    """The command line: a mistyped key is named with the key meant before Hydra runs (Hydra itself would suggest
    appending it with `+`); options such as `--cfg job` go to Hydra as they are."""
    if not any(arg.startswith("-") for arg in argv):
        with reported_as_message():
            check_overrides(argv)
    main()


if __name__ == "__main__":
    run(sys.argv[1:])
