"""The GPU check: everything a scarce GPU session must run, in one command, in under 10 minutes on one GPU.

    python bench/gpu_check.py                       # on the GPU machine: writes outputs/gpu_check/gpu_check.json
    python bench/gpu_check.py --device cpu --quick  # tried here first: the same steps at small sizes, fp16 skipped

Steps, each a subprocess with its own time limit (its log beside the JSON), one failing never stopping the others:
1. the test suite (on a GPU machine its GPU-only tests run instead of skipping);
2. `train_debug.py --large-scale` in bf16 for each compile mode, with the graph-break and recompile checks;
3. a short training run in fp16 with the grad scaler (CUDA only);
4. packed rows on a LLaVA corpus with flash-attention when the flash-attn package is installed, else SDPA;
5. LoRA and QLoRA (a 4-bit base, with the graph-break and recompile checks) against full fine-tuning of the LM
   (`--large-scale`, bf16, eager steps): trained parameters, memory, tokens/s.
The JSON holds each step's exit status and seconds, and the figures: tokens/s, MFU, recompiles, graph breaks, first
step per mode; the fp16 run's losses and skipped steps; the packed run's real tokens/s and real-token fraction.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vlm.data.shapes_export import data_overrides, export  # noqa: E402


def run(name: str, command: list[str], out: Path, timeout: int) -> dict:
    """One step: its exit status (None when it ran out of time) and wall seconds; its output in OUT/NAME.log."""
    start = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        try:
            status = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = None
    return {"exit": status, "seconds": round(time.perf_counter() - start, 1), "log": str(out / f"{name}.log")}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (trying the script)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (for trying it on a CPU)")
    parser.add_argument("--skip-suite", action="store_true", help="leave out the test suite")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python, cuda = sys.executable, args.device == "cuda"
    steps, figures = {}, {}
    if not args.skip_suite:
        steps["suite"] = run("suite", [python, "-m", "pytest", "-q", "-x"], out, timeout=360)

    debug = [python, "train_debug.py", "--large-scale", "--dtype", "bfloat16", "--device", args.device]
    debug += ["--quick", "--batch-size", "2", "--seq-len", "128"] if args.quick else []
    for mode in ("core", "regional"):
        summary = out / f"debug_bf16_{mode}.json"
        baseline = ["--skip-baseline"] if mode != "core" else []  # eager is timed once, with the first mode
        command = [*debug, *baseline, "--modes", mode, "--json", str(summary)]
        steps[f"debug_bf16_{mode}"] = run(f"debug_bf16_{mode}", command, out, timeout=300)
        figures[f"debug_bf16_{mode}"] = read_json(summary)

    short = ["train.max_steps=20" if args.quick else "train.max_steps=200", "train.eval_every=0", "train.log_every=1"]
    if cuda:
        fp16 = out / "fp16"
        command = [python, "train.py", "+experiment=shapes", *short, "train.mixed_precision=fp16", "train.device=cuda",
                   f"hydra.run.dir={fp16}"]  # fmt: skip
        steps["fp16"] = run("fp16", command, out, timeout=300)
        figures["fp16"] = read_json(fp16 / "metrics.json")
    else:
        steps["fp16"] = {"exit": None, "skipped": "fp16 needs CUDA (its grad scaler)"}

    corpus = export(out / "corpus", records=200 if args.quick else 2000, image_size=64)
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    attention = "flash_attention_2" if flash else "sdpa"
    packed = out / "packed"
    command = [python, "train.py", "+experiment=llava_tiny", *data_overrides(corpus), *short, "data.batching=packed",
               f"model.lm.attn_implementation={attention}", f"train.device={args.device}", f"hydra.run.dir={packed}",
               *(["train.mixed_precision=bf16"] if cuda else [])]  # fmt: skip
    steps["packed"] = run("packed", command, out, timeout=300)
    figures["packed"] = {"attention": attention, "metrics": read_json(packed / "metrics.json")}

    tunings = [("finetune_full", []), ("finetune_lora", ["train.lora.enabled=true"]),
               ("finetune_qlora", ["train.lora.enabled=true", "train.lora.quantize_base=4bit"])]  # fmt: skip
    for name, tuning in tunings:
        summary = out / f"{name}.json"
        checks = [] if name == "finetune_qlora" else ["--skip-graph-check", "--skip-recompile-check"]  # QLoRA's here
        command = [*debug, "--skip-compile-bench", *checks, "--json", str(summary), "train.stage=finetune", *tuning]
        steps[name] = run(name, command, out, timeout=300)
        figures[name] = read_json(summary)

    report = {"device": args.device, "quick": args.quick, "python": platform.python_version(), "steps": steps,
              "figures": figures, "environment": environment()}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({name: step for name, step in steps.items()}, indent=1))
    print(f"wrote {out / 'gpu_check.json'}")
    return 0 if all(s.get("exit") == 0 for s in steps.values() if "skipped" not in s) else 1


def environment() -> dict:
    import torch
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if importlib.util.find_spec("bitsandbytes") is not None:
        found["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
    return found


if __name__ == "__main__":
    sys.exit(main())
