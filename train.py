"""Train a vision-language model: `python train.py +experiment=shapes [key=value ...]`.

The composition root: the whole config is checked before anything is built, every part is built once, and the
trainer gets them ready-made.
"""

import json
import logging
import time
from pathlib import Path

import hydra
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vlm.build import build_components, validate_config
from vlm.training.device import configure_cpu_allocator, configure_cuda_allocator
from vlm.training.distributed import build_accelerator, describe, log_to_own_file
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
    set_seed(run.train.seed)  # the same on every process: identical initial weights
    parts = build_components(run)
    if accelerator.num_processes > 1:
        set_seed(run.train.seed + accelerator.process_index)  # from here on (dropout) each process draws its own
    return trainer_class(cfg, run, parts, accelerator, run_dir, started)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    metrics = build_trainer(cfg, Path(HydraConfig.get().runtime.output_dir)).fit()
    log.info("final metrics: %s", json.dumps(metrics))


if __name__ == "__main__":
    main()
