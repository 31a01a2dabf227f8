"""The training loop: build, train with AdamW + warmup/cosine + clipping, evaluate, save.

The loss of a step is the summed cross-entropy over supervised tokens divided by their count,
which the collator computes on the host, so normalising costs no device sync.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlm.build import build_components
from vlm.config import typed_section
from vlm.data.collate import Collator
from vlm.data.datasets import EncodedDataset
from vlm.training.checkpoint import save_checkpoint
from vlm.training.device import move_to, resolve_device
from vlm.training.evaluation import EvalResult, evaluate, majority_baseline
from vlm.training.optim import build_optimizer, build_scheduler
from vlm.training.tracking import JsonlLog, LoggerConfig, build_tracker

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"
    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    lr_min_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    lr_scale: dict[str, float] = field(default_factory=dict)  # per top-level module: vision, projector, lm
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 500
    eval_samples: int = 256
    eval_batch_size: int = 128
    max_new_tokens: int = 8


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.started = time.perf_counter()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.train_cfg = typed_section(cfg.train, TrainConfig, "train")
        logger_cfg = typed_section(cfg.logger, LoggerConfig, "logger")
        set_seed(self.train_cfg.seed)
        self.parts = build_components(cfg)
        self.device = resolve_device(self.train_cfg.device)
        self.model = self.parts.model.to(self.device)
        tc = self.train_cfg
        self.optimizer = build_optimizer(self.model, tc.lr, tc.weight_decay, tuple(tc.betas), tc.lr_scale)
        self.scheduler = build_scheduler(self.optimizer, tc.warmup_steps, tc.max_steps, tc.lr_min_ratio)
        self.collator = Collator(self.parts.tokenizer.pad_token_id, padding_side="right")
        self.train_log = JsonlLog(self.run_dir / "train_log.jsonl")
        resolved = OmegaConf.to_container(cfg, resolve=True)
        self.tracker = build_tracker(logger_cfg, self.run_dir, resolved)
        OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
        self.parts.tokenizer.save_pretrained(self.run_dir / "tokenizer")  # a trained one must outlive a crash

    def batches(self) -> Iterator[dict]:
        """Endless shuffled batches, reshuffled every epoch from the seeded generator."""
        generator = torch.Generator().manual_seed(self.train_cfg.seed)
        loader = DataLoader(
            EncodedDataset(self.parts.train_set, self.parts.processor),
            batch_size=self.train_cfg.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            collate_fn=self.collator,
            num_workers=self.cfg.data.num_workers,
            persistent_workers=self.cfg.data.num_workers > 0,
        )
        while True:
            yield from loader

    def train_step(self, batch: dict) -> dict:
        batch = move_to(batch, self.device)
        out = self.model(batch)
        loss = out.loss_sum / batch["num_supervised_tokens"]
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    def evaluate(self, num_samples: int) -> EvalResult:
        tc = self.train_cfg
        return evaluate(
            self.model, self.parts.processor, self.parts.tokenizer, self.parts.val_set,
            num_samples, tc.eval_batch_size, tc.max_new_tokens, self.device,
        )  # fmt: skip

    def fit(self) -> dict:
        tc = self.train_cfg
        self.model.train()
        batches = self.batches()
        stats = {"loss": None}
        progress = tqdm(range(1, tc.max_steps + 1), desc="train", dynamic_ncols=True)
        for step in progress:
            step_start = time.perf_counter()
            batch = next(batches)
            if batch["num_supervised_tokens"] == 0:
                log.warning("step %d: no supervised tokens in the batch; skipped", step)
                continue
            stats = self.train_step(batch)
            record = self._step_record(step, stats, batch, time.perf_counter() - step_start)
            progress.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % tc.log_every == 0 or step == tc.max_steps:
                self.train_log.write(record)
                self.tracker.log(record, step)
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                self._log_eval(self.evaluate(tc.eval_samples), step)
        return self._finish(stats["loss"])

    def _step_record(self, step: int, stats: dict, batch: dict, elapsed: float) -> dict:
        return {
            "step": step,
            **stats,
            # The schedule's current factor, applied to the base lr (groups may scale it per module).
            "lr": self.train_cfg.lr * self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0]["initial_lr"],
            **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups},
            "tokens_per_s": int(batch["attention_mask"].sum()) / elapsed,
            "step_time_s": elapsed,
        }

    def _finish(self, last_loss: float | None) -> dict:
        """Evaluate on the whole validation split, save the checkpoint, write metrics and predictions."""
        steps = self.train_cfg.max_steps
        final = self.evaluate(len(self.parts.val_set))
        self._log_eval(final, steps)
        save_checkpoint(self.run_dir / "checkpoints" / "final", self.model, self.parts.tokenizer, self.cfg)
        metrics = {
            "val_accuracy": final.accuracy,
            "val_accuracy_by_kind": final.accuracy_by_kind,
            "majority_baseline": majority_baseline([p["answer"] for p in final.predictions]),
            "steps": steps,
            "final_train_loss": last_loss,
            "skipped_unsupervised_samples": len(self.collator.dropped_indices),
            "wall_time_s": time.perf_counter() - self.started,
        }
        (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (self.run_dir / "val_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in final.predictions))
        self.tracker.log({f"final/{k}": v for k, v in metrics.items() if not isinstance(v, dict)}, steps)
        self.tracker.finish()
        return metrics

    def _log_eval(self, result: EvalResult, step: int) -> None:
        by_kind = " ".join(f"{k}={v:.3f}" for k, v in result.accuracy_by_kind.items())
        tqdm.write(f"step {step}: val accuracy {result.accuracy:.3f} ({by_kind})")
        record = {"step": step, "val_accuracy": result.accuracy, **{f"val_accuracy/{k}": v for k, v in result.accuracy_by_kind.items()}}
        self.train_log.write(record)
        self.tracker.log(record, step)
