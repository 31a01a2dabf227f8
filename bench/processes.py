"""1 process vs 2 (DDP) vs 2 (FSDP2) on the same global batch: tokens/s and each process's peak memory; FSDP2's
start-up, process 0 building the model alone vs every process building it; then FSDP2 checkpoints, consolidated vs
sharded vs sharded in the background: save time, each process's peak memory after a save, and resume time.

    python bench/processes.py [--large-scale] [train.py overrides ...]

Each run trains `train.max_steps` steps (default 6) of the debug experiment, or the train_debug.py
--large-scale model; tokens/s is the median over the steps after the first, peak memory is each
process's own (peak RSS on CPU, peak allocated on GPU). The checkpoint runs save every 2 steps, then resume from
the last save for 2 more steps. Runs go under /tmp/bench_processes.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train_debug import LARGE_SCALE  # noqa: E402  the --large-scale model of train_debug.py

LAUNCHERS = {
    "1 process": [sys.executable],
    "2 processes, DDP": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "2 processes, FSDP2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           "configs/accelerate/fsdp.yaml", "--num_processes", "2", "--main_process_port", "29517"],
}  # fmt: skip


def train(name: str, launcher: list[str], overrides: list[str]) -> tuple[Path, dict]:
    run_dir = Path("/tmp/bench_processes") / name.replace(" ", "_").replace(",", "")
    subprocess.run([*launcher, "train.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def gib(size: int) -> float:
    return round(size / 2**30, 2)


def run(name: str, launcher: list[str], overrides: list[str]) -> dict:
    run_dir, metrics = train(name, launcher, overrides)
    steps = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    speeds = [s["tokens_per_s"] for s in steps if "tokens_per_s" in s][1:]
    peaks = [gib(p["peak_memory_bytes"]) for p in metrics["processes"]]
    return {"run": name, "world_size": metrics["world_size"], "tokens_per_s": round(statistics.median(speeds)),
            "peak_memory_gib_per_process": peaks, "final_train_loss": metrics["final_train_loss"]}  # fmt: skip


def start_up(loading: str, overrides: list[str]) -> dict:
    """FSDP2 with accelerate's `fsdp_cpu_ram_efficient_loading` true (process 0 builds, the others receive their
    shards) or false (every process builds the whole model, then keeps its shard): each process's peak memory once
    the model is built and sharded, and over the whole run; a whole fp32 copy of the weights for scale."""
    name = f"2 processes, FSDP2, cpu_ram_efficient_loading {loading}"
    launcher = [*LAUNCHERS["2 processes, FSDP2"], "--fsdp_cpu_ram_efficient_loading", loading]
    _, metrics = train(name, launcher, overrides)
    return {"run": name, "whole_model_fp32_gib": gib(4 * (metrics["trainable_parameters"] + metrics["frozen_parameters"])),
            "start_up_peak_memory_gib_per_process": [gib(p["start_up_peak_memory_bytes"]) for p in metrics["processes"]],
            "peak_memory_gib_per_process": [gib(p["peak_memory_bytes"]) for p in metrics["processes"]],
            "final_train_loss": metrics["final_train_loss"]}  # fmt: skip


def checkpoints(checkpoint_format: str, in_background: bool, overrides: list[str]) -> dict:
    """FSDP2 with `train.checkpoint.format` (and `async_save`): saves every 2 steps, then a resumed run of 2 more
    steps. The save time is what the step waited for."""
    background = ", in the background" if in_background else ""
    name, launcher = f"2 processes, FSDP2, {checkpoint_format} checkpoints{background}", LAUNCHERS["2 processes, FSDP2"]
    saving = [
        *overrides,
        f"train.checkpoint.format={checkpoint_format}",
        f"train.checkpoint.async_save={in_background}",
        "train.save_every=2",
        "train.best_metric=null",
    ]
    _, metrics = train(name, launcher, saving)
    steps = next(a for a in reversed(saving) if a.startswith("train.max_steps=")).split("=")[1]
    _, resumed = train(name, launcher, [*saving, f"train.max_steps={int(steps) + 2}", "train.resume=auto"])
    saves = [p["checkpoint_saves"] for p in metrics["processes"]]
    return {"run": name, "save_s_per_process": [round(statistics.median(s["seconds"] for s in p), 2) for p in saves],
            "peak_memory_gib_after_save_per_process": [gib(max(s["peak_memory_bytes"] for s in p)) for p in saves],
            "resume_s_per_process": [round(p["resume_s"], 2) for p in resumed["processes"]]}  # fmt: skip


def main(argv: list[str]) -> None:
    large = "--large-scale" in argv
    overrides = ["+experiment=debug", "train.max_steps=6", "train.log_every=1", "train.eval_every=0",
                 "data.dataset.val_size=8", "train.global_batch_size=8", *(LARGE_SCALE if large else []),
                 *[a for a in argv if a != "--large-scale"]]  # fmt: skip
    for name, launcher in LAUNCHERS.items():
        print(json.dumps(run(name, launcher, overrides)), flush=True)
    for loading in ("true", "false"):
        print(json.dumps(start_up(loading, overrides)), flush=True)
    for checkpoint_format, in_background in (("consolidated", False), ("sharded", False), ("sharded", True)):
        print(json.dumps(checkpoints(checkpoint_format, in_background, overrides)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
