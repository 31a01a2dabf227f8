"""The train_debug.py suite: graph breaks, recompiles, eager vs compiled speed and memory, MFU.

Everything runs on synthetic batches shaped by the experiment's config (vlm/debug/synthetic.py), so
it needs no data and answers in minutes whether compiling pays off for this model on this machine.
"""

import copy
import logging
import random
from dataclasses import dataclass, field

import torch

from vlm.compile_policy import apply_compile
from vlm.debug.measure import (
    PeakMemory,
    TrainingStep,
    compiled_graphs,
    graph_breaks,
    largest_linear_shape,
    matmul_peak_flops,
    training_flops,
)
from vlm.debug.synthetic import synthetic_batch
from vlm.models.lora import weight_count

log = logging.getLogger(__name__)

BATCH_RANGE = (2, 16)
SEQ_RANGE = (32, 512)


@dataclass
class DebugOptions:
    batch_size: int = 8
    seq_len: int = 256
    timed_steps: int = 10
    vary_steps: int = 20
    modes: tuple[str, ...] = ("core", "regional")
    baseline: bool = True  # eager timing
    graph_check: bool = True
    compile_bench: bool = True
    recompile_check: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32


class Suite:
    def __init__(self, model: torch.nn.Module, special_ids: set[int], options: DebugOptions):
        self.base = model.to(options.device)
        self.special_ids, self.options = special_ids, options
        self.generator = torch.Generator().manual_seed(0)
        self.results: dict = {
            "params": sum(weight_count(p) for p in model.parameters()),
            "trainable_params": sum(weight_count(p) for p in model.parameters() if p.requires_grad),
        }
        # One batch for FLOPs, the graph check and every mode's timing, so the figures compare.
        self.main = self.batch(options.batch_size, options.seq_len)

    def batch(self, batch_size: int, seq_len: int, padded: bool = True) -> dict:
        batch = synthetic_batch(self.base, batch_size, seq_len, self.generator, self.special_ids, padded)
        return {k: v.to(self.options.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def run(self) -> dict:
        o = self.options
        if o.graph_check:
            self.check_graph_breaks()
        # The machine's speed drifts (on a shared 2-core CPU by +-30% within minutes): the peak is measured before
        # and after the timed steps, on a square matmul and on the model's own largest one, and the best is used.
        side = 4096 if o.device.type == "cuda" else 1536
        shapes = [(side, side, side), largest_linear_shape(self.base, int(self.main["attention_mask"].numel()))]
        self.results["matmul_peak_flops_before"] = matmul_peak_flops(o.device, o.dtype, shapes)
        self.results["flops_per_step"] = training_flops(self.base, self.main)
        modes = (["off"] if o.baseline else []) + (list(o.modes) if o.compile_bench else [])
        for mode in modes:
            self.benchmark(mode)
        self.results["matmul_peak_flops_after"] = matmul_peak_flops(o.device, o.dtype, shapes)
        self._summarise()
        return self.results

    def check_graph_breaks(self) -> None:
        b = self.main
        count, reasons = graph_breaks(
            self.base._forward_core, b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"]
        )
        self.results["graph_breaks"] = count
        self.results["graph_break_reasons"] = reasons

    def benchmark(self, mode: str) -> None:
        """First step (compile latency), timed steps, peak memory, then the varying-shape recompile checks."""
        o = self.options
        torch._dynamo.reset()
        model = copy.deepcopy(self.base)
        apply_compile(model, mode)
        step = TrainingStep(model, o.device, o.dtype)
        main = self.main
        with PeakMemory(o.device) as memory:
            first = step(main)
            step(main)
            times = [step(main) for _ in range(o.timed_steps)]
        step_time = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
        tokens = int(main["attention_mask"].sum())
        r = self.results
        r.setdefault("first_step_s", {})[mode] = first
        r.setdefault("step_time_s", {})[mode] = step_time
        r.setdefault("tokens_per_s", {})[mode] = tokens / step_time
        r.setdefault("peak_memory_bytes", {})[mode] = memory.peak
        if mode != "off" and o.recompile_check:
            self._recompiles(mode, step)

    def _recompiles(self, mode: str, step: TrainingStep) -> None:
        o, rng = self.options, random.Random(0)
        # Sequences must hold the image run plus some text (bench_small has 49 image tokens).
        seq_range = (max(SEQ_RANGE[0], self.base.tokens_per_image + 8), SEQ_RANGE[1])
        self.results["seq_range"] = seq_range
        # Warm-up: the extremes of the ranges, and a batch without padding (transformers then passes no mask).
        for batch_size, seq_len, padded in [
            (BATCH_RANGE[0], seq_range[0], True),
            (BATCH_RANGE[1], seq_range[1], True),
            (BATCH_RANGE[0], seq_range[0], False),
        ]:
            step(self.batch(batch_size, seq_len, padded))
        for key, shape in [
            ("recompiles_vary_batch", lambda: (rng.randint(*BATCH_RANGE), o.seq_len)),
            ("recompiles_vary_seq", lambda: (o.batch_size, rng.randint(*seq_range))),
        ]:
            before = compiled_graphs()
            for _ in range(o.vary_steps):
                step(self.batch(*shape()))
            self.results.setdefault(key, {})[mode] = compiled_graphs() - before
        before = compiled_graphs()
        step(self.batch(1, o.seq_len))
        self.results.setdefault("batch1_new_graphs", {})[mode] = compiled_graphs() - before

    def _summarise(self) -> None:
        r = self.results
        r["matmul_peak_flops"] = max(r["matmul_peak_flops_before"], r["matmul_peak_flops_after"])
        r["mfu"] = {
            mode: r["flops_per_step"] / t / r["matmul_peak_flops"] for mode, t in r.get("step_time_s", {}).items()
        }
        tokens = r.get("tokens_per_s", {})
        if "off" in tokens:
            r["eager_tokens_per_s"] = tokens["off"]
        r["compiled_tokens_per_s"] = {m: v for m, v in tokens.items() if m != "off"}
