"""The training loop: accelerate-driven steps with exact accumulation, guards, evaluation and checkpoints.

One optimizer step = `train.global_batch_size` samples (batching.py decides which, from the step
number alone). Each process runs its share in micro-batches (accumulation.py, which also backs off
on OOM); the loss of the step is the summed token loss over every micro-batch of every process,
divided by the step's total supervised-token count, counted on the host before any backward.
"""

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from vlm.checkpoint import HIGHER_IS_BETTER, Checkpointer
from vlm.compile_policy import apply_compile, mode_for_device
from vlm.config import ConfigError
from vlm.data.bad_samples import SkippedSample, SkipTally
from vlm.data.collate import Collator, filler_sample
from vlm.data.packing import pack_samples
from vlm.data.streaming import StreamPosition
from vlm.data.transfer import move_to
from vlm.evaluation import EvalResult, evaluate, merge_results
from vlm.models.lora import adapter_base, has_adapters
from vlm.training.accumulation import MicroBatchAccumulator, SimulatedOOM, warn_if_batch_norm
from vlm.training.batching import Throughput, computed_tokens, training_steps
from vlm.training.benchmark_hook import BenchmarkRun
from vlm.training.device import peak_memory_bytes
from vlm.training.distributed import Agreement, per_process_share, prepare
from vlm.training.non_finite import NonFiniteSteps
from vlm.training.optim import (
    apply_trainable,
    build_optimizer,
    build_scheduler,
    param_settings,
    parameter_counts,
    trainable_table,
)
from vlm.training.parts import Components, RunConfig
from vlm.training.report import describe_eval, eval_record, summary_line, write_run_outputs
from vlm.training.steps_ahead import StepsAhead
from vlm.training.stop_signal import StopSignal
from vlm.training.tracking import JsonlLog, build_tracker

log = logging.getLogger(__name__)


class Trainer:
    """Trains the model of `parts` as `run` says; train.py builds both (and the accelerator) and hands them over."""

    def __init__(self, cfg: DictConfig, run: RunConfig, parts: Components, accelerator: Accelerator, run_dir: Path,
                 started: float | None = None, benchmarks: BenchmarkRun | None = None):  # fmt: skip
        """`started`: when the run began (time.perf_counter()), building included; default: now. `benchmarks`: the
        lmms-eval tasks of `train.benchmarks` (vlm/harness/training.py), when the config names any."""
        self.started = started or time.perf_counter()
        self.cfg, self.parts, self.accelerator, self.run_dir = cfg, parts, accelerator, Path(run_dir)
        self.benchmarks = benchmarks
        self.higher_is_better = dict(HIGHER_IS_BETTER)  # grows with the benchmark scores as they come
        tc = self.train_cfg = run.train
        self.world_size, self.rank = accelerator.num_processes, accelerator.process_index
        self.is_main = accelerator.is_main_process
        model = parts.model
        settings = param_settings(model, tc)
        apply_trainable(model, settings)
        self.adapter_base = None  # before compile and sharding, by process 0: the others may hold no weights yet
        if has_adapters(model):
            self.adapter_base = broadcast_object_list([adapter_base(model) if self.is_main else None])[0]
        self.parameters = parameter_counts(model)
        if tc.activation_checkpointing:
            model.enable_activation_checkpointing()
        compiled = apply_compile(model, mode_for_device(tc.compile, accelerator.device))
        log.info("train.compile=%s: compiled %s", tc.compile, compiled or "nothing (eager)")
        optimizer = build_optimizer(model, tc, settings)
        self.scheduler = build_scheduler(optimizer, tc)
        self.model, self.optimizer = prepare(accelerator, model, optimizer)
        self.start_up_peak_memory = peak_memory_bytes(accelerator.device)  # built and sharded (metrics.json)
        self.checkpointer = Checkpointer(
            self.run_dir, accelerator, self.model, self.optimizer, self.scheduler, parts.tokenizer, cfg,
            tc.global_batch_size, tc.keep_last, tc.best_metric, self.adapter_base, tc.checkpoint.format,
            tc.checkpoint.async_save,
        )  # fmt: skip
        self.share = per_process_share(tc.global_batch_size, self.world_size)
        self.agreement = Agreement(self.world_size)
        micro_batch_size = min(tc.micro_batch_size or self.share, self.share)
        simulate = SimulatedOOM.for_process(tc, self.rank)
        self.accumulator = MicroBatchAccumulator(micro_batch_size, simulate, self.agreement)
        if self.accumulator.micro_batch_size < self.share or self.accumulator.simulate or self.world_size > 1:
            warn_if_batch_norm(model)
        self.packed = parts.data.batching == "packed"
        ahead = parts.data.encode_ahead
        self.encode_ahead = accelerator.device.type != "cpu" if ahead is None else ahead
        self.collator = Collator(parts.tokenizer.pad_token_id, "right")
        self.throughput = Throughput()
        self.filler = filler_sample(parts.tokenizer.pad_token_id, model.cfg.vision.image_size)
        self.first_step_samples, self.peak_memory = None, 0
        self.stream_position: StreamPosition | None = None  # streaming: where the next step's records start
        self.step, self.bad_steps = 0, NonFiniteSteps(tc.max_bad_steps)
        self.data_skips = SkipTally(parts.data.on_error, parts.data.max_skip_fraction, parts.data.skip_check_after)
        self.saves: list[dict] = []  # this process's checkpoint saves: step, seconds, peak memory after (metrics.json)
        self.resume_s = None
        resume_from = self.checkpointer.directory.resume_path(tc.resume)
        if resume_from is not None:
            started = time.perf_counter()
            self._restore(self.checkpointer.restore(resume_from))
            self.resume_s = time.perf_counter() - started
        self.train_log = JsonlLog(self.run_dir / "train_log.jsonl")
        self.tracker = build_tracker(
            run.logger if self.is_main else None, self.run_dir, OmegaConf.to_container(cfg, resolve=True)
        )
        if self.is_main:
            self.train_log.truncate_after(self.step)  # a resumed run rewrites the steps after its checkpoint
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
            parts.tokenizer.save_pretrained(self.run_dir / "tokenizer")  # a trained one must outlive a crash
            lora = " + LoRA adapters" if self.adapter_base else ""
            log.info("parameters (stage %s%s):\n%s", tc.stage, lora, trainable_table(self.parameters))

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # ----- one optimizer step -------------------------------------------------------------------

    def _loss_sum(self, batch: dict) -> torch.Tensor:
        return self.model(move_to(batch, self.accelerator.device)).loss_sum

    def accumulate_gradients(self, samples: list) -> tuple[float | None, float, int]:
        """Backward over this process's share of a step; returns (step loss, step supervised tokens, token
        positions this process computed, padding included); no loss for a step without a usable sample.

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
            return None, 0, 0
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
        if step_tokens == 0:  # every sample of the step was bad: no loss, no update
            log.warning("step %d: no usable sample in the whole step (all skipped as bad); no update", self.step)
            lrs = self._learning_rates()
            self.scheduler.step()
            return {"loss": None, "grad_norm": None, **tokens, "skipped": True, **lrs}
        max_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else math.inf
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))  # pre-clip norm
        skipped = self.bad_steps.check(self.step, loss, grad_norm, [s.index for s in samples])
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

    # ----- the loop ------------------------------------------------------------------------------

    def batches(self) -> Iterator[list]:
        """This process's share of each step's samples, from the step after the last one trained (grouped batching
        reads every sample's length here, before the first step)."""
        steps = training_steps(
            self.parts, self.train_cfg, self.step, self.rank, self.world_size, self.stream_position,
            self.accelerator.device.type,
        )  # fmt: skip
        self.steps_ahead = StepsAhead(steps, self.encode_ahead)
        return self._following_the_stream(self.steps_ahead)

    def _following_the_stream(self, steps: Iterator[tuple]) -> Iterator[list]:
        """With a stream, `stream_position` is where the step after the one just handed out starts: what its
        checkpoint saves."""
        for samples, position in steps:
            self.stream_position = position
            yield samples

    def fit(self) -> dict:
        tc = self.train_cfg
        self.model.train()
        batches = self.batches()
        last_loss, stopping = None, None  # the last step's loss that had one
        progress = tqdm(
            total=tc.max_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not self.is_main
        )
        with StopSignal() as stop, progress:  # the bar is closed however the loop ends
            while self.step < tc.max_steps:
                step_start = time.perf_counter()
                samples = next(batches)
                if self.first_step_samples is None:
                    self.first_step_samples = [s.index for s in samples]
                data_wait = time.perf_counter() - step_start
                with self.steps_ahead.meanwhile():  # on GPUs, the next step is encoded meanwhile
                    stats = self.train_step(samples)
                data_wait += self.steps_ahead.waited_s
                record = self._step_record(stats, time.perf_counter() - step_start, data_wait)
                progress.update(1)
                last_loss = last_loss if stats["loss"] is None else stats["loss"]
                loss = "-" if stats["loss"] is None else f"{stats['loss']:.4f}"
                progress.set_postfix(loss=loss, lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                stopping = self._after_step(record, stop)
                if stopping:
                    break
        if stopping:
            return self._stopped(stopping)
        self.data_skips.check_something_usable()  # a run of any length that drew only bad samples fails here
        return self._finish(last_loss)

    def _after_step(self, record: dict, stop: StopSignal) -> str | None:
        """Log, evaluate, save; returns why the run stops here (a signal to any process) or None."""
        tc, step = self.train_cfg, self.step
        # A signal may reach one process, or reach them at different steps: all stop at the same step.
        anyone = self.agreement.max(bool(stop.received))  # called by every process, whatever it received
        stopping = stop.received or ("a signal to another process" if anyone else None)
        if self.is_main and (step % tc.log_every == 0 or step == tc.max_steps or record["skipped"]):
            self.train_log.write(record)
            self.tracker.log(record, step)
        saved, metrics = False, {}
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
            result = self.evaluate(tc.eval_samples)
            self._log_eval(result, step)
            metrics.update(result.metrics())
        every = tc.eval_every if tc.benchmarks.every is None else tc.benchmarks.every
        if self.benchmarks and every and step % every == 0 and step < tc.max_steps:
            metrics.update(self.run_benchmarks())
        if metrics and self.checkpointer.directory.record_eval(step, metrics, self.higher_is_better):
            log.info("step %d: new best %s; saving its checkpoint", step, tc.best_metric)
            self.save()
            saved = True
        if not saved and (stopping or (tc.save_every and step % tc.save_every == 0)):
            self.save()
        return stopping

    def _step_record(self, stats: dict, elapsed: float, data_wait: float) -> dict:
        peak = peak_memory_bytes(self.accelerator.device)
        self.peak_memory = max(self.peak_memory, peak)
        real, computed = stats.pop("tokens"), stats.pop("computed_tokens")
        return {
            "step": self.step,
            **stats,
            **self.throughput.add(real, computed, elapsed, data_wait, self.world_size),
            "micro_batch_size": self.accumulator.micro_batch_size,
            "data_skipped_draws": self.data_skips.bad_draws,  # bad samples drawn so far, all processes, repeats too
            "peak_memory_bytes": peak,  # this process's
        }

    def evaluate(self, num_samples: int) -> EvalResult:
        """Each process evaluates every world_size-th sample; every process gets the merged result."""
        tc = self.train_cfg
        count = min(num_samples, len(self.parts.val_set))
        indices = range(self.rank, count, self.world_size)
        # FSDP gathers each block's weights in its forward: every process must run the same batches.
        batches = math.ceil(math.ceil(count / self.world_size) / tc.eval_batch_size)
        in_step = (batches, self.filler) if self.accelerator.is_fsdp2 else None
        result = evaluate(
            self.unwrapped, self.parts.processor, self.parts.tokenizer, self.parts.val_set,
            indices, tc.eval_batch_size, tc.max_new_tokens, self.accelerator.device, in_step,
        )  # fmt: skip
        return merge_results(gather_object([result]))  # gather_object: [result] itself with one process

    def run_benchmarks(self) -> dict[str, float]:
        """The `train.benchmarks` tasks on the model as it is now; every process gets the scores (they decide
        together whether this step is the best one). Files under benchmarks/step_N/ of the run directory."""
        scores = self.benchmarks(self.unwrapped, self.parts, self.run_dir / "benchmarks" / f"step_{self.step}")
        scores = broadcast_object_list([scores])[0]  # computed on the main process
        self.higher_is_better.update(scores.higher_is_better)
        best = self.train_cfg.best_metric
        if best and best.startswith("bench/") and best not in scores.values:
            raise ConfigError(f"train.best_metric={best} is not a score the benchmarks gave; they gave: "
                              f"{', '.join(scores.values)}. See TROUBLESHOOTING.md#benchmark-task-errors.")  # fmt: skip
        if self.is_main:
            tqdm.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.values.items()))
            record = {"step": self.step, **scores.values}
            self.train_log.write(record)
            self.tracker.log(record, self.step)
        return scores.values

    # ----- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path | None:
        started = time.perf_counter()
        path = self.checkpointer.save(self.step, self._progress())
        peak = peak_memory_bytes(self.accelerator.device)  # a save that gathers whole tensors shows here
        self.peak_memory = max(self.peak_memory, peak)
        self.saves.append({"step": self.step, "seconds": time.perf_counter() - started, "sharded": self.checkpointer.sharded,
                           "async_save": self.checkpointer.async_save, "peak_memory_bytes": peak})  # fmt: skip
        return path

    def _progress(self) -> dict:
        """What a checkpoint keeps of the loop (its trainer_state.json): the step is also the data position."""
        return {
            "step": self.step,
            "micro_batch_size": self.accumulator.micro_batch_size,
            "bad_steps_in_a_row": self.bad_steps.in_a_row,
            "bad_steps_total": self.bad_steps.total,
            "data_skips": self.data_skips.state_dict(),
            "stream_position": self.stream_position.state_dict() if self.stream_position else None,
        }

    def _restore(self, progress: dict) -> None:
        self.step = progress["step"]
        self.accumulator.micro_batch_size = min(self.accumulator.micro_batch_size, progress["micro_batch_size"])
        self.bad_steps.in_a_row, self.bad_steps.total = progress["bad_steps_in_a_row"], progress["bad_steps_total"]
        if "data_skips" in progress:  # checkpoints from before bad-sample skipping have none
            self.data_skips.load_state_dict(progress["data_skips"])
        if progress.get("stream_position"):
            self.stream_position = StreamPosition(**progress["stream_position"])

    # ----- the end -------------------------------------------------------------------------------

    def _stopped(self, signal_name: str) -> dict:
        self.checkpointer.finish_saving()
        latest = self.checkpointer.directory.latest()
        summary = {"stopped_by": signal_name, "steps": self.step, "checkpoint": str(latest),
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
        benchmark_scores = self.run_benchmarks() if self.benchmarks else {}
        best = self.checkpointer.directory.record_eval(
            self.step, {**final.metrics(), **benchmark_scores}, self.higher_is_better
        )  # the final one may be the best
        self.checkpointer.save_final()
        if self.train_cfg.save_every or best:  # best.json always names a resumable checkpoint that exists
            self.save()
        self.checkpointer.finish_saving()
        process = {
            "rank": self.rank,
            "rng_seed": torch.initial_seed(),  # dropout and sampling: train.seed + rank
            "first_step_samples": self.first_step_samples,
            "peak_memory_bytes": self.peak_memory,
            "start_up_peak_memory_bytes": self.start_up_peak_memory,
            "checkpoint_saves": self.saves,
            "resume_s": self.resume_s,
        }
        processes = gather_object([process])
        if self.world_size > 1:  # each process saw its own share of the bad samples
            self.data_skips.merge(gather_object([self.data_skips.state_dict()]))
        metrics = {
            **final.summary(),
            "steps": self.step,
            "world_size": self.world_size,
            "processes": processes,
            "final_train_loss": last_loss,
            "data_skipped": self.data_skips.counts(),
            "skipped_non_finite_steps": self.bad_steps.total,
            "oom_back_offs": len(self.accumulator.back_offs),
            "micro_batch_size": self.accumulator.micro_batch_size,
            **self.throughput.summary(self.world_size),
            "trainable_parameters": sum(t for t, _ in self.parameters.values()),
            "frozen_parameters": sum(f for _, f in self.parameters.values()),
            "final_checkpoint_bytes": self.checkpointer.final_size(),
            **benchmark_scores,
            "wall_time_s": time.perf_counter() - self.started,
        }
        if self.is_main:
            title = f"{self.cfg.experiment_name}: {self.run_dir}"
            write_run_outputs(self.run_dir, metrics, final.predictions, self.train_log.path, title)
            tqdm.write(summary_line(metrics, self.data_skips.describe(), self.run_dir))
        self.tracker.summary(metrics)
        self.tracker.finish()
        return metrics

    def _log_eval(self, result: EvalResult, step: int) -> None:
        if not self.is_main:
            return
        tqdm.write(f"step {step}: {describe_eval(result.loss, result.accuracy, result.accuracy_by_kind)}")
        if result.skipped:
            log.warning(
                "validation: bad samples skipped %s. See TROUBLESHOOTING.md#too-many-bad-samples.", result.skipped
            )
        record = eval_record(result, step)
        self.train_log.write(record)
        self.tracker.log(record, step)
        rows = result.predictions[: self.train_cfg.eval_table_rows]
        self.tracker.log_predictions(step, rows, [self.parts.val_set[p["index"]] for p in rows])
