"""Experiment tracking: a JSONL log on disk always, W&B when `logger=wandb`.

W&B runs offline (files under the run directory) when no API key is set, so it never prompts.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class LoggerConfig:
    type: str = "none"  # none | wandb
    project: str = "vlm"
    run_name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto | online | offline | disabled


class JsonlLog:
    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Tracker:
    """The `none` tracker; subclasses send metrics somewhere."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict):
        import wandb

        mode = cfg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(
            project=cfg.project, name=cfg.run_name, tags=cfg.tags, config=config, dir=str(run_dir), mode=mode
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def build_tracker(cfg: LoggerConfig, run_dir: Path, config: dict) -> Tracker:
    if cfg.type == "none":
        return Tracker()
    if cfg.type == "wandb":
        return WandbTracker(cfg, run_dir, config)
    raise ValueError(f"logger.type={cfg.type!r} is not one of: none, wandb")
