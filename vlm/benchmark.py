"""Benchmark a trained model with lmms-eval:
`python -m vlm.benchmark checkpoint=DIR tasks=mmstar,textvqa_val output_dir=OUT [limit=N]`.

Arguments are `key=value`, as for train.py:
  checkpoint=DIR             a checkpoint or exported directory (a LoRA one too)
  tasks=A,B | tasks=[A,B]    lmms-eval task or group names (`lmms-eval --tasks list`)
  output_dir=DIR             lmms-eval's results and per-sample files, and our summary.json
  limit=N                    at most N samples per task: for trying things, as scores on part of a task are
                             not comparable with published ones
  batch_size=8 max_new_tokens=256 (for tasks that set none) include_path=DIR (one's own task YAMLs) device=auto
Several processes: `accelerate launch --multi_gpu --num_processes N -m vlm.benchmark ...` (each answers its share).
The same model through lmms-eval's own command line: `lmms-eval --model vlm --model_args pretrained=DIR ...`.
Needs the bench extra: pip install -e '.[bench]'.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

from vlm.cli import UsageError, command, parse_args, resolve_device
from vlm.harness import require_lmms_eval
from vlm.training.train_config import BenchmarkConfig

KEYS = {"checkpoint", "tasks", "output_dir", "limit", "batch_size", "max_new_tokens", "include_path", "device"}


def task_list(tasks) -> list[str]:
    """`tasks=a,b` (one string) or `tasks=[a,b]`."""
    names = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    if not (names := [name.strip() for name in names if name.strip()]):
        raise UsageError("tasks= names no task")
    return names


@command(__doc__)
def main(argv: list[str]) -> int:
    args = parse_args(argv, KEYS, {"checkpoint", "tasks", "output_dir"})
    require_lmms_eval("python -m vlm.benchmark")
    from vlm.harness.model import VlmModel  # lmms-eval is imported only once it is known to be there
    from vlm.harness.tasks import Benchmarks

    settings = {key: args[key] for key in ("limit", "batch_size", "max_new_tokens", "include_path") if key in args}
    cfg = BenchmarkConfig(tasks=task_list(args.tasks), **settings)
    benchmarks = Benchmarks(cfg, "python -m vlm.benchmark")  # unknown task names fail before the model loads
    device = resolve_device(args.get("device", "auto")) if "device" in args else None
    lm = VlmModel(str(args.checkpoint), cfg.batch_size, device and str(device), cfg.max_new_tokens)
    scores = benchmarks.run(lm, Path(args.output_dir), str(args.checkpoint), asdict(cfg))
    if scores is not None:
        print(json.dumps(scores.values, indent=2))
        print(f"wrote lmms-eval's results and {args.output_dir}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
