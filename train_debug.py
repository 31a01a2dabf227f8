"""Compile and throughput diagnostics before anyone spends GPU time.

    python train_debug.py                          # built-in ~6M-parameter debug config
    python train_debug.py +experiment=bench_small  # any experiment, plus Hydra overrides
    python train_debug.py --large-scale --quick --json out.json

Runs, on synthetic batches shaped by the config: a graph-break check of `_forward_core`
(fullgraph), eager vs compiled (core, regional) step time / tokens/s / peak memory, compile latency,
recompile counts over varying batch sizes and sequence lengths, and MFU against a matmul peak measured
in the same run. Prints one table and writes the same as JSON. Exit code 1 if a check failed.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from vlm.build import build_components, validate_config
from vlm.config import compose_config
from vlm.debug.diagnostics import DebugOptions, Suite
from vlm.errors import reported_as_message
from vlm.training.device import configure_cpu_allocator
from vlm.training.optim import apply_trainable, param_settings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --large-scale: LM 768 x 12 blocks, ViT 512 x 8 blocks at 224 px (49 image tokens after pixel shuffle).
LARGE_SCALE = [
    "model/vision=vit_tiny", "model/projector=pixel_shuffle", "model.vision.image_size=224",
    "model.vision.feature_layer=-1", "++model.vision.model_kwargs.patch_size=16", "++model.vision.model_kwargs.embed_dim=512",
    "++model.vision.model_kwargs.depth=8", "++model.vision.model_kwargs.num_heads=8", "model.projector.factor=2",
    "model.lm.config.hidden_size=768", "model.lm.config.intermediate_size=2048", "model.lm.config.num_hidden_layers=12",
    "model.lm.config.num_attention_heads=12", "model.lm.config.num_key_value_heads=4",
]  # fmt: skip
HINTS = {
    "graph_breaks": "TROUBLESHOOTING.md#graph-breaks-in-the-compiled-core",
    "recompiles_vary_batch": "TROUBLESHOOTING.md#recompiles-on-batch-or-sequence-length",
    "recompiles_vary_seq": "TROUBLESHOOTING.md#recompiles-on-batch-or-sequence-length",
    "mfu": "TROUBLESHOOTING.md#mfu-above-100",
    "step_time_s": "TROUBLESHOOTING.md#compiled-steps-slower-than-eager",
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-scale", action="store_true", help="LM 768x12, ViT 512x8 (~90M parameters)")
    parser.add_argument("--quick", action="store_true", help="fewer timed and varying-shape steps")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="autocast dtype (float32: none)")
    parser.add_argument("--batch-size", type=int, help="default: train.micro_batch_size or global_batch_size")
    parser.add_argument("--seq-len", type=int, help="default: data.max_length")
    parser.add_argument("--steps", type=int, help="timed steps per mode (default 10, --large-scale 20, --quick 3)")
    parser.add_argument("--modes", default="core,regional", help="compile modes to measure")
    parser.add_argument("--skip-baseline", action="store_true", help="no eager timing")
    parser.add_argument("--skip-graph-check", action="store_true")
    parser.add_argument("--skip-compile-bench", action="store_true", help="no compiled modes at all")
    parser.add_argument("--skip-recompile-check", action="store_true")
    parser.add_argument(
        "--expect-speedup", action="store_true",
        help="fail when a compiled mode's step is slower than eager's (a torch-version check; not for tests)",
    )  # fmt: skip
    return parser.parse_known_args(argv)


def load_config(overrides: list[str], large_scale: bool):
    if not any(o.startswith("+experiment=") for o in overrides):
        overrides = ["+experiment=debug", *overrides]
    return compose_config([*overrides, *(LARGE_SCALE if large_scale else [])])


def options_from(args: argparse.Namespace, cfg) -> DebugOptions:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = args.batch_size or cfg.train.micro_batch_size or cfg.train.global_batch_size
    steps = args.steps or (3 if args.quick else 20 if args.large_scale else 10)
    if args.large_scale:
        batch_size = max(batch_size, 8)
        steps = max(steps, 3 if args.quick else 20)
    return DebugOptions(
        batch_size=batch_size, seq_len=args.seq_len or cfg.data.max_length, timed_steps=steps,
        vary_steps=6 if args.quick else 20, modes=tuple(m for m in args.modes.split(",") if m),
        baseline=not args.skip_baseline, graph_check=not args.skip_graph_check,
        compile_bench=not args.skip_compile_bench, recompile_check=not args.skip_recompile_check,
        device=device, dtype=DTYPES[args.dtype],
    )  # fmt: skip


def failures(results: dict, expect_speedup: bool = False) -> list[str]:
    found = []
    if results.get("graph_breaks"):
        found.append(f"{results['graph_breaks']} graph break(s) in _forward_core: {results['graph_break_reasons']}")
    for key in ("recompiles_vary_batch", "recompiles_vary_seq"):
        for mode, count in results.get(key, {}).items():
            if count:
                found.append(f"{key}[{mode}] = {count} after warm-up")
    for mode, mfu in results.get("mfu", {}).items():
        if mfu > 1:  # the machine ran faster during the steps than in both peak measurements: no valid figure
            found.append(
                f"mfu[{mode}] = {mfu:.0%} exceeds the measured matmul peak; the machine's speed drifted, rerun"
            )
    if expect_speedup:
        found += slower_than_eager(results.get("step_time_s", {}))
    return found


def slower_than_eager(step_time_s: dict) -> list[str]:
    eager = step_time_s.get("off")
    if eager is None:
        return ["--expect-speedup needs the eager baseline (drop --skip-baseline)"]
    return [
        f"step_time_s[{mode}] = {time_s:.3f} s, slower than eager ({eager:.3f} s)"
        for mode, time_s in step_time_s.items()
        if mode != "off" and time_s > eager
    ]


def hint(message: str) -> str:
    key = next((k for k in HINTS if message.startswith(k) or (k == "graph_breaks" and "graph break" in message)), None)
    return f"{message}  -> see {HINTS[key]}" if key else message


def table(results: dict, options: DebugOptions) -> str:
    def fmt(value, unit=""):
        if value is None:
            return "-"
        if unit == "B":
            return f"{value / 2**20:,.0f} MiB"
        if unit == "%":
            return f"{100 * value:.1f}%"
        if unit == "x":
            return f"{value:.2f}x"
        return f"{value:,.3f}" if isinstance(value, float) and value < 100 else f"{value:,.0f}"

    modes = [m for m in ("off", "core", "regional") if m in results.get("step_time_s", {})]
    rows = [
        ("first step (s)", "first_step_s", ""), ("step time (s)", "step_time_s", ""), ("tokens/s", "tokens_per_s", ""),
        ("speed-up over eager", "speedup", "x"), ("peak memory", "peak_memory_bytes", "B"), ("MFU", "mfu", "%"),
        ("recompiles, vary batch", "recompiles_vary_batch", ""), ("recompiles, vary seq", "recompiles_vary_seq", ""),
        ("new graphs at batch 1", "batch1_new_graphs", ""),
    ]  # fmt: skip
    lines = [
        f"device {options.device} ({options.dtype}), batch {options.batch_size} x {options.seq_len} tokens, "
        f"{results['params']:,} parameters ({results['trainable_params']:,} trained), "
        f"{results['flops_per_step'] / 1e9:,.1f} GFLOP per step, "
        f"matmul peak {results['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s (best of {results['matmul_peak_flops_before'] / 1e9:,.1f} "
        f"before and {results['matmul_peak_flops_after'] / 1e9:,.1f} after the timed steps)",
        f"graph breaks in _forward_core (fullgraph): {results.get('graph_breaks', 'not checked')}",
        f"{'':<26}" + "".join(f"{('eager' if m == 'off' else m):>16}" for m in modes),
    ]
    for label, key, unit in rows:
        values = results.get(key, {})
        if values:
            lines.append(f"{label:<26}" + "".join(f"{fmt(values.get(m), unit):>16}" for m in modes))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    args, overrides = parse_args(argv)
    with reported_as_message():
        cfg = load_config(overrides, args.large_scale)
        configure_cpu_allocator(cfg.train.cpu_keep_freed_bytes)
        torch.manual_seed(0)
        run = validate_config(cfg)
        parts = build_components(run)
        # What the trainer trains: the stage, per-module settings and LoRA decide which parameters get gradients
        # and optimizer state, and so the step's time and memory.
        apply_trainable(parts.model, param_settings(parts.model, run.train))
    options = options_from(args, cfg)
    results = Suite(parts.model, set(parts.tokenizer.all_special_ids), options).run()
    results.update(config=cfg.experiment_name, large_scale=args.large_scale, device=str(options.device),
                   dtype=args.dtype, batch_size=options.batch_size, seq_len=options.seq_len)  # fmt: skip
    step_time_s = results.get("step_time_s", {})
    if "off" in step_time_s:  # eager's step time over each mode's
        results["speedup"] = {mode: step_time_s["off"] / time_s for mode, time_s in step_time_s.items()}
    print(table(results, options))
    problems = failures(results, args.expect_speedup)
    for problem in problems:
        print("FAILED: " + hint(problem))
    if args.json:
        args.json.write_text(json.dumps({**results, "failures": problems}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
