"""The training loop: accelerate-driven steps with exact accumulation, guards, evaluation and checkpoints.

One optimizer step = `train.global_batch_size` samples (batching.py decides which, from the step
number alone). Each process runs its share in micro-batches (accumulation.py, which also backs off
on OOM); the loss of the step is the summed token loss over every micro-batch of every process,
divided by the step's total supervised-token count, counted on the host before any backward.
"""

import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from vlm.build import build_components, validate_config
from vlm.compile_policy import apply_compile, mode_for_device
from vlm.data.bad_samples import SkippedSample, SkipTally
from vlm.data.collate import Collator, filler_sample
from vlm.data.datasets import EncodedDataset
from vlm.data.lengths import sample_lengths
from vlm.data.packing import pack_samples
from vlm.data.streaming import StreamPosition
from vlm.pretrained import save_pretrained
from vlm.training.accumulation import MicroBatchAccumulator, SimulatedOOM
from vlm.training.batching import (
    StepSampler,
    StreamedSteps,
    Throughput,
    computed_tokens,
    step_loader,
    streamed_step_loader,
)
from vlm.training.checkpoint_manager import (
    TRAINER_STATE,
    TRAINING_STATE,
    CheckpointManager,
    resolve_resume,
    restore_rng_states,
    rng_states,
)  # fmt: skip
from vlm.training.curves import write_curves
from vlm.training.device import (
    configure_cpu_allocator,
    configure_cuda_allocator,
    move_to,
    peak_memory_bytes,
)
from vlm.training.distributed import Agreement, build_accelerator, describe, log_to_own_file, prepare
from vlm.training.evaluation import EvalResult, evaluate, merge_results
from vlm.training.model_state import ModelState
from vlm.training.optim import (
    apply_trainable,
    build_optimizer,
    build_scheduler,
    param_settings,
    trainable_table,
)
from vlm.training.stop_signal import StopSignal
from vlm.training.tracking import JsonlLog, build_tracker

log = logging.getLogger(__name__)


def warn_if_batch_norm(model: torch.nn.Module) -> None:
    trainable_bn = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                    and any(p.requires_grad for p in m.parameters())]  # fmt: skip
    if trainable_bn:
        log.warning(
            "the model has trainable BatchNorm layers (%s, ...): with micro-batches smaller than the step, or several "
            "processes (each normalises over its own share: BatchNorm statistics are per process by nature), their "
            "statistics (and so the gradients) depend on the split; a micro-batch without images runs the tower on a "
            "blank image, which moves the running statistics. See TROUBLESHOOTING.md#accumulation-with-batchnorm.",
            trainable_bn[0],
        )


class NonFiniteLossError(RuntimeError):
    pass


class ResumeMismatchError(ValueError):
    pass


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.started = time.perf_counter()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        run_config = validate_config(cfg)  # the whole config, before anything is built
        tc = self.train_cfg = run_config.train
        configure_cuda_allocator(tc.cuda_alloc_conf)
        configure_cpu_allocator(tc.cpu_keep_freed_bytes)
        if tc.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
        if tc.mixed_precision == "fp16" and (tc.device == "cpu" or not torch.cuda.is_available()):
            raise ValueError("train.mixed_precision=fp16 needs CUDA (its grad scaler); use bf16 on CPU")
        self.accelerator = build_accelerator(tc.device, tc.mixed_precision)
        self.world_size, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        log_to_own_file(self.run_dir, self.rank)
        log.info("%s", describe(self.accelerator))
        set_seed(tc.seed)  # the same on every process: identical initial weights
        self.parts = build_components(cfg)
        model = self.parts.model
        if self.world_size > 1:
            set_seed(tc.seed + self.rank)  # from here on (dropout) each process draws its own numbers
        settings = param_settings(model, tc)
        apply_trainable(model, settings)
        if tc.activation_checkpointing:
            model.enable_activation_checkpointing()
        apply_compile(model, mode_for_device(tc.compile, self.accelerator.device))
        optimizer = build_optimizer(model, tc, settings)
        self.scheduler = build_scheduler(optimizer, tc)
        self.model, self.optimizer = prepare(self.accelerator, model, optimizer)
        self.model_state = ModelState(self.accelerator, self.model, self.optimizer)
        self.share = self._per_process_share()
        self.agreement = Agreement(self.world_size)
        self.accumulator = MicroBatchAccumulator(
            min(tc.micro_batch_size or self.share, self.share), self._simulated_oom(), self.agreement
        )
        if self.accumulator.micro_batch_size < self.share or self.accumulator.simulate or self.world_size > 1:
            warn_if_batch_norm(model)
        self.packed = self.parts.data.batching == "packed"
        self.collator = Collator(self.parts.tokenizer.pad_token_id, "right")
        self.throughput = Throughput()
        self.filler = filler_sample(self.parts.tokenizer.pad_token_id, model.cfg.vision.image_size)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", tc.keep_last, tc.best_metric, self.is_main)
        self.first_step_samples, self.peak_memory = None, 0
        self.stream_position: StreamPosition | None = None  # streaming: where the next step's records start
        self.step, self.bad_in_a_row, self.bad_total = 0, 0, 0
        data = self.parts.data
        self.data_skips = SkipTally(data.on_error, data.max_skip_fraction, data.skip_check_after)
        if tc.init_from:
            self._load_weights(Path(tc.init_from))
        resume_from = resolve_resume(tc.resume, self.checkpoints)
        if resume_from is not None:
            self._resume(resume_from)
        self.train_log = JsonlLog(self.run_dir / "train_log.jsonl")
        if self.is_main:
            self.train_log.truncate_after(self.step)  # a resumed run rewrites the steps after its checkpoint
        resolved = OmegaConf.to_container(cfg, resolve=True)
        self.tracker = build_tracker(run_config.logger if self.is_main else None, self.run_dir, resolved)
        if self.is_main:
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
            self.parts.tokenizer.save_pretrained(self.run_dir / "tokenizer")  # a trained one must outlive a crash
            log.info("parameters (stage %s):\n%s", tc.stage, trainable_table(self.unwrapped))

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _simulated_oom(self) -> SimulatedOOM | None:
        tc = self.train_cfg
        if tc.simulate_oom_above is None and tc.simulate_oom_above_tokens is None:
            return None
        if tc.simulate_oom_on_process is not None and tc.simulate_oom_on_process != self.rank:
            return None
        return SimulatedOOM(tc.simulate_oom_above, tc.simulate_oom_above_tokens, tc.simulate_oom_in)

    def _per_process_share(self) -> int:
        world = self.world_size
        if self.train_cfg.global_batch_size % world:
            raise ValueError(
                f"train.global_batch_size={self.train_cfg.global_batch_size} is not divisible by {world} processes"
            )
        return self.train_cfg.global_batch_size // world

    # ----- one optimizer step -------------------------------------------------------------------

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        return self.model(move_to(batch, self.accelerator.device)).loss_sum

    def accumulate_gradients(self, samples: list) -> tuple[float, float, int]:
        """Backward over this process's share of a step; returns (step loss, step supervised tokens, token
        positions this process computed, padding included).

        Gradients end up as those of (sum of token losses over the whole step) / (its token count).
        Bad samples (SkippedSample) are counted and left out of every micro-batch.
        """
        kept = [s for s in samples if not isinstance(s, SkippedSample)]
        units = pack_samples(kept, self.parts.data.max_length) if self.packed else kept
        self.data_skips.record([s for s in samples if isinstance(s, SkippedSample)])
        local_tokens = sum(s.num_predicted for s in kept)  # counted on the host: no device sync
        # One collective for the token count and the skip tally, so every process judges the same figures.
        step_tokens, draws, bad = self._all_processes_sum(local_tokens, len(samples), len(samples) - len(kept))
        self.data_skips.count_draws(draws, bad)
        if step_tokens == 0:
            return math.nan, 0.0, 0
        # DDP and FSDP average gradients over processes; scaling by the process count turns that into a sum.
        per_process_tokens = step_tokens / self.world_size
        loss_sum = self.accumulator.run(
            self.step, units, self.collator, self._loss_sum, self.accelerator.backward,
            lambda: self.optimizer.zero_grad(set_to_none=True), lambda: self.accelerator.no_sync(self.model),
            per_process_tokens, self.filler,
        )  # fmt: skip
        (total,) = self._all_processes_sum(0.0 if loss_sum is None else loss_sum)
        computed = computed_tokens(units, self.accumulator.micro_batch_size)
        return total / step_tokens, step_tokens, computed

    def train_step(self, samples: list) -> dict:
        """One optimizer step: accumulate, clip, skip the update if anything is non-finite."""
        self.step += 1
        loss, step_tokens, computed = self.accumulate_gradients(samples)
        real = sum(len(s.input_ids) for s in samples if not isinstance(s, SkippedSample))
        tokens = {"tokens": real, "computed_tokens": computed}
        if step_tokens == 0:
            log.warning("step %d: no supervised tokens in the whole step; skipped", self.step)
            lrs = self._learning_rates()
            self.scheduler.step()
            return {"loss": loss, "grad_norm": math.nan, **tokens, "skipped": True, **lrs}
        max_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))  # pre-clip norm
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self._non_finite(loss, grad_norm, [s.index for s in samples])
        else:
            self.bad_in_a_row = 0
        if not skipped or self.train_cfg.mixed_precision == "fp16":  # the fp16 scaler skips and rescales itself
            self.optimizer.step()
        lrs = self._learning_rates()  # the ones this update used
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": grad_norm, **tokens, "skipped": skipped, **lrs}

    def _learning_rates(self) -> dict:
        group = self.optimizer.param_groups[0]
        return {
            # The schedule's current factor applied to the base lr (groups may scale it per module).
            "lr": self.train_cfg.lr * group["lr"] / group["initial_lr"],
            **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups},
        }

    def _all_processes_sum(self, *values) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        device = self.accelerator.device
        tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def _non_finite(self, loss: float, grad_norm: float, sample_ids: list[int]) -> None:
        self.bad_in_a_row += 1
        self.bad_total += 1
        log.warning(
            "step %d: non-finite loss %s or grad norm %s; update skipped (%d in a row, %d in total). Samples: %s. "
            "See TROUBLESHOOTING.md#nan-or-inf-loss.", self.step, loss, grad_norm, self.bad_in_a_row, self.bad_total, sample_ids,
        )  # fmt: skip
        if self.bad_in_a_row >= self.train_cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
                f"{self.train_cfg.max_bad_steps}); last at step {self.step}, samples {sample_ids}. Lower train.lr, "
                "check the data, or use bf16 instead of fp16. See TROUBLESHOOTING.md#nan-or-inf-loss."
            )

    # ----- the loop ------------------------------------------------------------------------------

    def batches(self):
        data = self.parts.data
        if getattr(self.parts.train_set, "stream", None) is not None:
            return self._streamed_steps()
        lengths = None
        if data.batching == "grouped":
            lengths = sample_lengths(self.parts.train_set, self.parts.processor, data.num_workers, self.is_main)
        sampler = StepSampler(
            len(self.parts.train_set), self.train_cfg.global_batch_size, self.train_cfg.seed, self.step,
            self.rank, self.world_size, lengths, data.group_steps,
        )  # fmt: skip
        encoded = EncodedDataset(self.parts.train_set, self.parts.processor)
        return step_loader(encoded, sampler, self.parts.data.num_workers, self.accelerator.device.type == "cuda")

    def _streamed_steps(self):
        """Each step: the stream's next global batch (every process reads it and takes its share), encoded in the
        DataLoader's workers. `stream_position` is then where the step after this one starts: what a checkpoint of
        this step saves."""
        if self.parts.data.batching == "grouped":
            raise ValueError("data.batching=grouped needs every sample's length up front, which a stream does not "
                             "have; use padded or packed with data.dataset.streaming=true")  # fmt: skip
        data = self.parts.data
        steps = StreamedSteps(
            self.parts.train_set, self.parts.processor, self.train_cfg.global_batch_size, data.dataset.shuffle_window,
            self.train_cfg.seed, self.stream_position, self.rank, self.world_size,
        )  # fmt: skip
        for step, position in streamed_step_loader(steps, data.num_workers, self.accelerator.device.type == "cuda"):
            self.stream_position = position
            yield step.samples()

    def fit(self) -> dict:
        tc = self.train_cfg
        self.model.train()
        batches = self.batches()
        stats, stopping = {"loss": None}, None
        progress = tqdm(
            total=tc.max_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not self.is_main
        )
        with StopSignal() as stop:
            while self.step < tc.max_steps:
                step_start = time.perf_counter()
                samples = next(batches)
                if self.first_step_samples is None:
                    self.first_step_samples = [s.index for s in samples]
                data_wait = time.perf_counter() - step_start
                stats = self.train_step(samples)
                record = self._step_record(stats, time.perf_counter() - step_start, data_wait)
                progress.update(1)
                progress.set_postfix(
                    loss=f"{stats['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
                stopping = self._after_step(record, stop)
                if stopping:
                    break
        progress.close()
        if stopping:
            return self._stopped(stopping)
        return self._finish(stats["loss"])

    def _after_step(self, record: dict, stop: StopSignal) -> str | None:
        """Log, evaluate, save; returns why the run stops here (a signal to any process) or None."""
        tc, step = self.train_cfg, self.step
        # A signal may reach one process, or reach them at different steps: all stop at the same step.
        anyone = self.agreement.max(bool(stop.received))  # called by every process, whatever it received
        stopping = stop.received or ("a signal to another process" if anyone else None)
        if self.is_main and (step % tc.log_every == 0 or step == tc.max_steps or record["skipped"]):
            self.train_log.write(record)
            self.tracker.log(record, step)
        saved = False
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            result = self.evaluate(tc.eval_samples)
            self._log_eval(result, step)
            if self.checkpoints.record_eval(step, result.metrics()):
                log.info("step %d: new best %s; saving its checkpoint", step, tc.best_metric)
                self.save()
                saved = True
        if not saved and (stopping or (tc.save_every and step % tc.save_every == 0)):
            self.save()
        return stopping

    def _step_record(self, stats: dict, elapsed: float, data_wait: float) -> dict:
        peak = peak_memory_bytes(self.accelerator.device)
        self.peak_memory = max(self.peak_memory, peak)
        self.throughput.add(stats["tokens"], stats["computed_tokens"], elapsed, data_wait)
        return {
            "step": self.step,
            **{k: v for k, v in stats.items() if k not in ("tokens", "computed_tokens")},
            # This process's figures times the process count: the processes' shares are alike.
            "tokens_per_s": stats["computed_tokens"] * self.world_size / elapsed,  # padding included: the work done
            "real_tokens_per_s": stats["tokens"] * self.world_size / elapsed,
            "real_token_fraction": stats["tokens"] / max(stats["computed_tokens"], 1),
            "step_time_s": elapsed,
            "data_wait_fraction": data_wait / elapsed,
            "micro_batch_size": self.accumulator.micro_batch_size,
            "data_skipped_draws": self.data_skips.bad_draws,  # bad samples drawn so far, all processes, repeats too
            "peak_memory_bytes": peak,  # this process's
        }

    def evaluate(self, num_samples: int) -> EvalResult:
        """Each process evaluates every world_size-th sample; every process gets the merged result."""
        tc = self.train_cfg
        count = min(num_samples, len(self.parts.val_set))
        indices = range(self.rank, count, self.world_size)
        in_step = (
            (math.ceil(math.ceil(count / self.world_size) / tc.eval_batch_size), self.filler)
            if self.model_state.sharded
            else None
        )
        result = evaluate(
            self.unwrapped, self.parts.processor, self.parts.tokenizer, self.parts.val_set,
            indices, tc.eval_batch_size, tc.max_new_tokens, self.accelerator.device, in_step,
        )  # fmt: skip
        return merge_results(gather_object([result]))  # gather_object: [result] itself with one process

    # ----- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        rng = gather_object([rng_states()])  # every process's, by rank
        weights, optimizer = (
            self.model_state.gather_weights(),
            self.model_state.optimizer_state(),
        )  # FSDP: gathered to process 0
        write = lambda directory: self._write_checkpoint(directory, rng, weights, optimizer)  # noqa: E731
        path = self.checkpoints.save(self.step, write) if self.is_main else None
        self.accelerator.wait_for_everyone()
        return path

    def _write_checkpoint(self, directory: Path, rng: list[dict], weights: dict | None, optimizer: dict) -> None:
        save_pretrained(directory, self.unwrapped, self.parts.tokenizer, self.cfg, weights)
        scaler = self.accelerator.scaler
        state = {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
        }
        torch.save(state, directory / TRAINING_STATE)
        trainer_state = {
            "step": self.step,
            "global_batch_size": self.train_cfg.global_batch_size,
            "micro_batch_size": self.accumulator.micro_batch_size,
            "bad_steps_in_a_row": self.bad_in_a_row,
            "bad_steps_total": self.bad_total,
            "data_skips": self.data_skips.state_dict(),
            "stream_position": self.stream_position.state_dict() if self.stream_position else None,
        }
        (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))  # last: marks completion

    def _load_weights(self, directory: Path) -> None:
        """Model weights only (train.init_from): the next stage starting from the previous stage's result."""
        try:
            self.model_state.load_weights(directory / "model.safetensors")
        except (RuntimeError, FileNotFoundError) as err:
            raise ResumeMismatchError(
                f"cannot load weights from {directory}: {err}. The model config must match the checkpoint's "
                "(compare its config.yaml). See TROUBLESHOOTING.md#resume-mismatch."
            ) from err

    def _resume(self, directory: Path) -> None:
        trainer_state = json.loads((directory / TRAINER_STATE).read_text())
        self._check_compatible(directory, trainer_state)
        self._load_weights(directory)
        state = torch.load(directory / TRAINING_STATE, weights_only=True)
        self.model_state.load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self._restore_rng(state["rng"])
        self.step = trainer_state["step"]
        self.accumulator.micro_batch_size = min(self.accumulator.micro_batch_size, trainer_state["micro_batch_size"])
        self.bad_in_a_row, self.bad_total = trainer_state["bad_steps_in_a_row"], trainer_state["bad_steps_total"]
        if "data_skips" in trainer_state:  # checkpoints from before bad-sample skipping have none
            self.data_skips.load_state_dict(trainer_state["data_skips"])
        if trainer_state.get("stream_position"):
            self.stream_position = StreamPosition(**trainer_state["stream_position"])
        log.info("resumed from %s at step %d", directory, self.step)

    def _restore_rng(self, saved: list[dict] | dict) -> None:
        saved = [saved] if isinstance(saved, dict) else saved  # checkpoints from before per-process RNG
        if len(saved) != self.world_size:
            log.warning(
                "the checkpoint holds RNG states of %d process(es), this run has %d: dropout and sampling continue "
                "from process 0's state, so the run will not repeat the interrupted one exactly", len(saved), self.world_size,
            )  # fmt: skip
        restore_rng_states(saved[self.rank] if len(saved) == self.world_size else saved[0])

    def _check_compatible(self, directory: Path, trainer_state: dict) -> None:
        problems = []
        if trainer_state["global_batch_size"] != self.train_cfg.global_batch_size:
            problems.append(
                f"train.global_batch_size {trainer_state['global_batch_size']} -> {self.train_cfg.global_batch_size}"
            )
        saved_vocab = AutoTokenizer.from_pretrained(directory / "tokenizer").get_vocab()
        if saved_vocab != self.parts.tokenizer.get_vocab():
            problems.append("the tokenizer differs from the checkpoint's")
        if problems:
            raise ResumeMismatchError(
                f"cannot resume exactly from {directory}: {'; '.join(problems)}. Resume with the checkpoint's "
                "config, or start a new run with train.init_from. See TROUBLESHOOTING.md#resume-mismatch."
            )

    # ----- the end -------------------------------------------------------------------------------

    def _stopped(self, signal_name: str) -> dict:
        summary = {"stopped_by": signal_name, "steps": self.step, "checkpoint": str(self.checkpoints.latest()),
                   "wall_time_s": time.perf_counter() - self.started}  # fmt: skip
        log.warning(
            "stopped by %s at step %d; resume with train.resume=auto (same hydra.run.dir)", signal_name, self.step
        )
        self.tracker.finish()
        return summary

    def _finish(self, last_loss: float | None) -> dict:
        """Evaluate on the whole validation split, save the checkpoints, write metrics and predictions."""
        final = self.evaluate(len(self.parts.val_set))
        self._log_eval(final, self.step)
        weights = self.model_state.gather_weights()
        if self.is_main:
            save_pretrained(
                self.run_dir / "checkpoints" / "final", self.unwrapped, self.parts.tokenizer, self.cfg, weights
            )
        if self.train_cfg.save_every:
            self.save()
        processes = gather_object(
            [{"rank": self.rank, "first_step_samples": self.first_step_samples, "peak_memory_bytes": self.peak_memory}]
        )
        if self.world_size > 1:  # each process saw its own share of the bad samples
            self.data_skips.merge(gather_object([self.data_skips.state_dict()]))
        metrics = {
            **final.summary(),
            "steps": self.step,
            "world_size": self.world_size,
            "processes": processes,
            "final_train_loss": last_loss,
            "data_skipped": self.data_skips.counts(),
            "skipped_non_finite_steps": self.bad_total,
            "oom_back_offs": len(self.accumulator.back_offs),
            "micro_batch_size": self.accumulator.micro_batch_size,
            **self.throughput.summary(self.world_size),
            "wall_time_s": time.perf_counter() - self.started,
        }
        if self.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            predictions = "".join(json.dumps(p, default=str) + "\n" for p in final.predictions)
            (self.run_dir / "val_predictions.jsonl").write_text(predictions)
            write_curves(
                self.train_log.path, self.run_dir / "curves.png", f"{self.cfg.experiment_name}: {self.run_dir}"
            )
            self._print_summary(metrics)
        self.tracker.summary(metrics)
        self.tracker.finish()
        return metrics

    def _print_summary(self, metrics: dict) -> None:
        loss = metrics["final_train_loss"]
        loss = "n/a (no step run)" if loss is None else f"{loss:.4f}"
        tqdm.write(
            f"done: {metrics['steps']} steps in {metrics['wall_time_s']:.0f} s; final train loss {loss}; "
            f"{_describe_eval(metrics['val_loss'], metrics['val_accuracy'], metrics['val_accuracy_by_kind'])}; "
            f"majority baseline {_fmt(metrics['majority_baseline'])}; OOM back-offs {metrics['oom_back_offs']}; "
            f"skipped steps {metrics['skipped_non_finite_steps']}; bad samples skipped: {self.data_skips.describe()}; "
            f"run dir {self.run_dir}"
        )

    def _log_eval(self, result: EvalResult, step: int) -> None:
        if not self.is_main:
            return
        tqdm.write(f"step {step}: {_describe_eval(result.loss, result.accuracy, result.accuracy_by_kind)}")
        if result.skipped:
            log.warning(
                "validation: bad samples skipped %s. See TROUBLESHOOTING.md#too-many-bad-samples.", result.skipped
            )
        record = {
            "step": step,
            **result.metrics(),
            **{f"val_accuracy/{k}": v for k, v in result.accuracy_by_kind.items()},
        }
        self.train_log.write(record)
        self.tracker.log(record, step)
        rows = result.predictions[: self.train_cfg.eval_table_rows]
        self.tracker.log_predictions(step, rows, [self.parts.val_set[p["index"]] for p in rows])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _describe_eval(loss: float, accuracy: float | None, by_kind: dict[str, float]) -> str:
    kinds = f" ({', '.join(f'{k} {v:.3f}' for k, v in by_kind.items())})" if by_kind else ""
    return f"val loss {loss:.4f}, val accuracy {_fmt(accuracy)}{kinds}"
