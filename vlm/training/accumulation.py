"""Gradient accumulation over micro-batches that survives out-of-memory, in step on every process.

A step's loss is the sum of per-token losses over all its micro-batches divided by the step's
total supervised-token count (known before any backward), so the gradient equals that of one big
batch whatever the split. When a micro-batch runs out of memory the micro-batch size is halved
for the rest of the run and the work is replayed:
- OOM in the forward: no gradient was touched, so only the rest of the step is redone, in halves;
- OOM in the backward: some gradients may hold a partial sum, so they are zeroed and the whole
  step is replayed at the new size.
Either way the step sees the same samples in the same order and the same gradient.

With several processes every forward and backward may hold collectives (DDP's gradient all-reduce,
FSDP's all-gathers), so all processes must run the same number of micro-batches and back off
together. Through `Agreement` they take the largest micro-batch count of any process (a process
with fewer samples runs a zero-weight filler), and after every forward and every backward they
share whether anyone ran out of memory: if one did, all back off and replay alike.
"""

import gc
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from vlm.compat import is_out_of_memory
from vlm.training.distributed import Agreement
from vlm.training.train_config import TrainConfig

log = logging.getLogger(__name__)


class SimulatedOutOfMemoryError(torch.OutOfMemoryError):
    """Raised by `train.simulate_oom_above*` so the back-off can be tested without a full device."""


def warn_if_batch_norm(model: torch.nn.Module) -> None:
    """Trainable BatchNorm makes the gradient depend on how a step is split: said once, at start-up."""
    trainable_bn = [
        n for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in m.parameters())
    ]  # fmt: skip
    if trainable_bn:
        log.warning(
            "the model has trainable BatchNorm layers (%s, ...): with micro-batches smaller than the step, or several "
            "processes (each normalises over its own share: BatchNorm statistics are per process by nature), their "
            "statistics (and so the gradients) depend on the split; a micro-batch without images runs the tower on a "
            "blank image, which moves the running statistics. See TROUBLESHOOTING.md#accumulation-with-batchnorm.",
            trainable_bn[0],
        )


@dataclass
class SimulatedOOM:
    max_samples: int | None = None
    max_tokens: int | None = None
    where: str = "forward"  # forward | backward

    @classmethod
    def for_process(cls, train: TrainConfig, rank: int) -> "SimulatedOOM | None":
        """`train.simulate_oom_*` for the process of this rank (None: it never runs out)."""
        if train.simulate_oom_above is None and train.simulate_oom_above_tokens is None:
            return None
        if train.simulate_oom_on_process is not None and train.simulate_oom_on_process != rank:
            return None
        return cls(train.simulate_oom_above, train.simulate_oom_above_tokens, train.simulate_oom_in)

    def check(self, batch: dict, where: str) -> None:
        if where != self.where:
            return
        samples, length = batch["input_ids"].shape
        if (self.max_samples is not None and samples > self.max_samples) or (
            self.max_tokens is not None and samples * length > self.max_tokens
        ):
            raise SimulatedOutOfMemoryError(
                f"simulated out of memory in the {where} of a {samples}x{length} micro-batch"
            )


@dataclass
class BackOff:
    step: int
    old_micro_batch_size: int
    new_micro_batch_size: int
    where: str  # forward | backward


FAILURE_CODES = {None: 0, "forward": 1, "backward": 2}  # a backward failure outranks a forward one


class MicroBatchAccumulator:
    """Runs forward+backward over a step's samples in micro-batches, halving them on OOM."""

    def __init__(self, micro_batch_size: int, simulate: SimulatedOOM | None = None, agreement: Agreement | None = None):
        self.micro_batch_size = micro_batch_size
        self.simulate = simulate
        self.agreement = agreement or Agreement(1)
        self.back_offs: list[BackOff] = []

    def run(
        self,
        step: int,
        samples: Sequence,
        collate: Callable[[Sequence], dict],
        loss_sum: Callable[[dict], torch.Tensor],
        backward: Callable[[torch.Tensor], None],
        zero_grad: Callable[[], None],
        no_sync: Callable[[], AbstractContextManager] = nullcontext,
        step_tokens: int = 1,
        filler=None,
    ) -> torch.Tensor | None:
        """Accumulate gradients of sum(loss_sum)/step_tokens; returns the summed loss (detached).

        `filler`: a sample with nothing to learn, run (zero-weighted) as a micro-batch by a process
        that has run out of samples while others still have some; it keeps the collectives matched.
        """
        start, total = 0, None
        while True:
            size = self.micro_batch_size
            count = self.agreement.max(math.ceil(max(0, len(samples) - start) / size))
            failed = None
            for i in range(count):
                chunk = samples[start + i * size : start + (i + 1) * size]
                failed, loss = self._forward_backward(
                    collate(chunk or [filler]), loss_sum, backward, no_sync, step_tokens, last=i == count - 1
                )
                if failed:
                    break
                if chunk:
                    total = loss if total is None else total + loss
            if not failed:
                return total
            where, processes = failed
            self._back_off(step, size, where, processes)
            if where == "backward":  # gradients may hold part of a micro-batch: replay the whole step
                zero_grad()
                start, total = 0, None
            else:  # no process touched a gradient in this micro-batch: redo from its first sample
                start += i * size

    def _forward_backward(self, batch, loss_sum, backward, no_sync, step_tokens, last: bool):
        """One micro-batch; returns (failure agreed over processes or None, detached loss)."""
        try:
            loss = self._forward(batch, loss_sum)
        except Exception as err:
            loss = self._raise_unless_out_of_memory(err)
        # Outside the except block the exception (and the tensors its frames hold) is released.
        failed = self._agree(None if loss is not None else "forward")
        if failed:
            return failed, None
        try:
            with nullcontext() if last else no_sync():
                backward(loss / step_tokens)
                if self.simulate:  # strikes once this micro-batch's gradients are written: the worst case
                    self.simulate.check(batch, "backward")
            done = loss.detach()
        except Exception as err:
            done = self._raise_unless_out_of_memory(err)
        return self._agree(None if done is not None else "backward"), done

    @staticmethod
    def _raise_unless_out_of_memory(err: BaseException) -> None:
        if not is_out_of_memory(err):
            raise err
        return None

    def _agree(self, failure: str | None) -> tuple[str, list[int]] | None:
        """(where, which processes) if any process ran out of memory, else None."""
        codes = self.agreement.gather(FAILURE_CODES[failure])
        if not any(codes):
            return None
        where = "backward" if max(codes) == FAILURE_CODES["backward"] else "forward"
        return where, [rank for rank, code in enumerate(codes) if code]

    def _forward(self, batch: dict, loss_sum: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        if self.simulate:
            self.simulate.check(batch, "forward")
        return loss_sum(batch)

    def _back_off(self, step: int, size: int, where: str, processes: list[int]) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        on = f" on process(es) {processes}" if self.agreement.world_size > 1 else ""
        if size <= 1:
            raise RuntimeError(
                f"step {step}: out of memory with micro-batch size 1 in the {where}{on}; nothing left to split. "
                "Shorten data.max_length, enable train.activation_checkpointing or use mixed precision. "
                "See TROUBLESHOOTING.md#out-of-memory."
            )
        new = max(1, size // 2)
        self.back_offs.append(BackOff(step, self.micro_batch_size, new, where))
        log.warning(
            "step %d: out of memory in the %s of a %d-sample micro-batch%s; micro-batch size %d -> %d "
            "(effective batch unchanged). See TROUBLESHOOTING.md#out-of-memory.",
            step, where, size, on, self.micro_batch_size, new,
        )  # fmt: skip
        self.micro_batch_size = new
