"""Measurements for train_debug.py: training-step timing, memory, FLOPs, matmul peak, compile counters.

A "step" here is what the trainer does per optimizer step on one micro-batch: forward, backward,
gradient clipping, AdamW update. On CUDA every step synchronises, so a device-side assert surfaces
at the step that caused it and timings are real.
"""

import re
import resource
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from vlm.training.optim import adamw


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingStep:
    """forward + backward + clip + AdamW on a model, under autocast when dtype is not float32."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, lr: float = 1e-4):
        self.model, self.device, self.dtype = model, device, dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = adamw(params, lr)

    def __call__(self, batch: dict) -> float:
        """Run one step; returns its wall time in seconds."""
        synchronize(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.model(batch).loss_sum / batch["labels"].ne(-100).sum().clamp_min(1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start


def training_flops(model: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward + backward (matmuls, convolutions, attention), counted by torch itself."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).loss_sum.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def largest_linear_shape(model: torch.nn.Module, tokens: int) -> tuple[int, int, int]:
    """(tokens, in, out) of the model's largest linear layer applied to `tokens` rows."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    widest = max(linears, key=lambda m: m.in_features * m.out_features)
    return tokens, widest.in_features, widest.out_features


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int, int]] | None = None,
                      seconds: float = 2.0) -> float:  # fmt: skip
    """Best sustained FLOP/s over matmuls of these (m, k, n) shapes (default: one large square), the ceiling MFU
    is measured against. Each shape gets `seconds / len(shapes)`."""
    side = 4096 if device.type == "cuda" else 1536
    shapes = shapes or [(side, side, side)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=out)  # warm-up: thread pool, kernels
        deadline = time.perf_counter() + seconds / len(shapes)
        while time.perf_counter() < deadline:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(4):
                torch.matmul(a, b, out=out)
            synchronize(device)
            best = max(best, 4 * 2 * m * k * n / (time.perf_counter() - start))
    return best


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the process's peak RSS on CPU.

    On Linux the RSS high-water mark is reset through /proc/self/clear_refs, so each block gets its own
    peak; elsewhere the lifetime peak is reported.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        status = Path("/proc/self/status")
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
        self.peak = int(match.group(1)) * 1024 if match else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (its own counter); a rise after warm-up is a recompile."""
    return counters["stats"]["unique_graphs"]


def graph_breaks(fn, *args) -> tuple[int, list[str]]:
    """Graph breaks of `fn(*args)` as dynamo's explain reports them: count and reasons."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    reasons = [getattr(b, "reason", str(b)) for b in explanation.break_reasons]
    torch._dynamo.reset()
    return explanation.graph_break_count, reasons
