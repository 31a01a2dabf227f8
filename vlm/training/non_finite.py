"""The non-finite guard: a step whose loss or gradient norm is not finite updates nothing; too many in a row stop
the run, naming the samples. Its counts are part of a checkpoint (the trainer's progress)."""

import logging
import math

from vlm.errors import UserError

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    exit_code = 1


class NonFiniteSteps:
    def __init__(self, max_in_a_row: int, in_a_row: int = 0, total: int = 0):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, in_a_row, total

    def check(self, step: int, loss: float, grad_norm: float, sample_ids: list[int]) -> bool:
        """Whether the step must be skipped; raises NonFiniteLossError at `train.max_bad_steps` in a row."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        log.warning(
            "step %d: non-finite loss %s or grad norm %s; update skipped (%d in a row, %d in total). Samples: %s. "
            "See TROUBLESHOOTING.md#nan-or-inf-loss.", step, loss, grad_norm, self.in_a_row, self.total, sample_ids,
        )  # fmt: skip
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
                f"{self.max_in_a_row}); last at step {step}, samples {sample_ids}. Lower train.lr, "
                "check the data, or use bf16 instead of fp16. See TROUBLESHOOTING.md#nan-or-inf-loss."
            )
        return True
