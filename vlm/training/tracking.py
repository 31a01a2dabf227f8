"""Experiment tracking: a JSONL log on disk always, W&B when `logger=wandb`.

W&B runs offline (files under the run directory) when no API key is set, so it never prompts.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlm.compat import log_table_with_images
from vlm.config import ConfigError
from vlm.data.images import load_image
from vlm.data.processing import message_text


@dataclass
class LoggerConfig:
    type: str = "none"  # none | wandb
    project: str = "vlm"
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto | online | offline | disabled


class JsonlLog:
    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records after `step`: a resumed run logs those steps again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        self.path.write_text("".join(kept))


class Tracker:
    """The `none` tracker; subclasses send metrics somewhere."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_predictions(self, step: int, predictions: list[dict], samples: list[dict]) -> None:
        """Validation predictions with their raw samples (images and messages)."""

    def summary(self, metrics: dict) -> None:
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

    def log_predictions(self, step: int, predictions: list[dict], samples: list[dict]) -> None:
        """A table of predictions plus the same rows as captioned images (beside the table: vlm/compat.py)."""
        import wandb

        table = wandb.Table(columns=["index", "kind", "question", "answer", "prediction", "correct"])
        images = []
        for p, sample in zip(predictions, samples):
            question = _first_question(sample["messages"])
            table.add_data(p["index"], p["kind"], question, p["answer"], p["prediction"], p["correct"])
            caption = f"#{p['index']} {question} -> {p['prediction']!r} (answer {p['answer']!r})"
            images += [
                wandb.Image(load_image(image, str(p["index"])), caption=caption) for image in sample["images"][:1]
            ]
        log_table_with_images(self.run, "val/predictions", table, "val/prediction_images", images, step)

    def summary(self, metrics: dict) -> None:
        """Nested figures (`data_skipped: {reason: n}`) flattened to `data_skipped/reason`."""
        flat = {}
        for key, value in metrics.items():
            flat.update({f"{key}/{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
        self.run.summary.update(flat)

    def finish(self) -> None:
        self.run.finish()


def _first_question(messages: list[dict]) -> str:
    return next((message_text(m) for m in messages if m["role"] == "user"), "")


def build_tracker(cfg: LoggerConfig | None, run_dir: Path, config: dict) -> Tracker:
    """`cfg` None (processes other than the main one) gives the silent tracker."""
    if cfg is None or cfg.type == "none":
        return Tracker()
    if cfg.type == "wandb":
        return WandbTracker(cfg, run_dir, config)
    raise ConfigError(f"logger.type={cfg.type!r} is not one of: none, wandb")
