"""Train a vision-language model: `python train.py +experiment=shapes [key=value ...]`."""

import json
import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vlm.training.trainer import Trainer


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    trainer = Trainer(cfg, HydraConfig.get().runtime.output_dir)
    metrics = trainer.fit()
    logging.getLogger(__name__).info("final metrics: %s", json.dumps(metrics))


if __name__ == "__main__":
    main()
