"""Gradient accumulation over micro-batches that survives out-of-memory.

A step's loss is the sum of per-token losses over all its micro-batches divided by the step's
total supervised-token count (known before any backward), so the gradient equals that of one big
batch whatever the split. When a micro-batch runs out of memory the micro-batch size is halved
for the rest of the run and the work is replayed:
- OOM in the forward: no gradient was touched, so only that micro-batch is redone, in halves;
- OOM in the backward: some gradients may hold a partial sum, so they are zeroed and the whole
  step is replayed at the new size.
Either way the step sees the same samples in the same order and the same gradient.
"""

import gc
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class SimulatedOutOfMemoryError(torch.OutOfMemoryError):
    """Raised by `train.simulate_oom_above*` so the back-off can be tested without a full device."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    message = str(err)
    # CPU allocator ("DefaultCPUAllocator: can't allocate memory") and older CUDA messages.
    return isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


@dataclass
class SimulatedOOM:
    max_samples: int | None = None
    max_tokens: int | None = None
    where: str = "forward"  # forward | backward

    def check(self, batch: dict, where: str) -> None:
        if where != self.where:
            return
        samples, length = batch["input_ids"].shape
        if (self.max_samples is not None and samples > self.max_samples) or (
            self.max_tokens is not None and samples * length > self.max_tokens
        ):
            raise SimulatedOutOfMemoryError(f"simulated out of memory in the {where} of a {samples}x{length} micro-batch")


@dataclass
class BackOff:
    step: int
    old_micro_batch_size: int
    new_micro_batch_size: int
    where: str  # forward | backward


class MicroBatchAccumulator:
    """Runs forward+backward over a step's samples in micro-batches, halving them on OOM."""

    def __init__(self, micro_batch_size: int, simulate: SimulatedOOM | None = None):
        self.micro_batch_size = micro_batch_size
        self.simulate = simulate
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
    ) -> torch.Tensor:
        """Accumulate gradients of sum(loss_sum)/step_tokens; returns the summed loss (detached)."""
        start, total = 0, None
        while start < len(samples):
            chunk = samples[start : start + self.micro_batch_size]
            last = start + len(chunk) >= len(samples)
            batch = collate(chunk)
            failed_in = None
            try:
                failed_in = "forward"
                loss = self._forward(batch, loss_sum)
                failed_in = "backward"
                with nullcontext() if last else no_sync():
                    backward(loss / step_tokens)
                    if self.simulate:  # strikes once this micro-batch's gradients are written: the worst case
                        self.simulate.check(batch, "backward")
                failed_in = None
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
            # Outside the except block the exception (and the tensors its frames hold) is released.
            if failed_in is not None:
                loss = batch = None
                self._back_off(step, len(chunk), failed_in)
                if failed_in == "backward":  # gradients may hold part of this micro-batch: replay the step
                    zero_grad()
                    start, total = 0, None
                continue  # a forward OOM touched no gradient: redo from `start` at the smaller size
            total = loss.detach() if total is None else total + loss.detach()
            start += len(chunk)
        return total

    def _forward(self, batch: dict, loss_sum: Callable[[dict], torch.Tensor]) -> torch.Tensor:
        if self.simulate:
            self.simulate.check(batch, "forward")
        return loss_sum(batch)

    def _back_off(self, step: int, size: int, where: str) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size <= 1:
            raise RuntimeError(
                f"step {step}: out of memory with micro-batch size 1 in the {where}; nothing left to split. "
                "Shorten data.max_length, enable train.activation_checkpointing or use mixed precision. "
                "See TROUBLESHOOTING.md#out-of-memory."
            )
        new = max(1, size // 2)
        self.back_offs.append(BackOff(step, self.micro_batch_size, new, where))
        log.warning(
            "step %d: out of memory in the %s of a %d-sample micro-batch; micro-batch size %d -> %d "
            "(effective batch unchanged). See TROUBLESHOOTING.md#out-of-memory.",
            step, where, size, self.micro_batch_size, new,
        )  # fmt: skip
        self.micro_batch_size = new
