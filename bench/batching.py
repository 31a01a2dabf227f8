"""Padded vs grouped vs packed batching on a corpus whose samples run from ~40 to ~1,000 tokens, and the
data-wait fraction with and without DataLoader workers.

    python bench/batching.py [--records 800] [--steps 30] [--batch-sizes 16,32] [train.py overrides ...]

The corpus is Shapes VQA in LLaVA format (vlm.data.shapes_export) with one more turn per record: a description
whose length is drawn uniformly, so token lengths spread evenly over 40..1000. Each mode trains `--steps` steps of
`llava_tiny` with data.max_length=1024 at each global batch size and reports metrics.json's real_token_fraction
(real tokens / computed tokens), real_tokens_per_s and data_wait_fraction. Then `llava_tiny` (on a plain 3,000-record export) and `shapes`
with 0 and 2 DataLoader workers, for the data-wait fraction. Runs go under /tmp/bench_batching.
"""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from vlm.data.shapes_export import data_overrides, export

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("/tmp/bench_batching")
WORDS = "the red blue green square circle triangle is left right of above below and a next to small large one".split()


def spread_corpus(records: int) -> Path:
    """Shapes VQA records, each with a description turn of 0..~900 tokens appended."""
    path = export(OUT / "corpus", records=records, image_size=32)
    rows, rng = json.loads(path.read_text()), random.Random(0)
    for row in rows:
        words = rng.randint(0, 700)
        description = " ".join(rng.choice(WORDS) for _ in range(words)) or "nothing"
        row["conversations"] = row["conversations"][:2] + [
            {"from": "human", "value": "Describe the scene."}, {"from": "gpt", "value": description}]  # fmt: skip
    path.write_text(json.dumps(rows))
    return path


def train(name: str, overrides: list[str]) -> dict:
    run_dir = OUT / name
    subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    figures = ["real_token_fraction", "real_tokens_per_s", "data_wait_fraction", "wall_time_s"]
    return {"run": name, **{k: round(metrics[k], 3) for k in figures}}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=800)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--batch-sizes", default="16,32", help="global batch sizes (packing fills rows better with more)"
    )
    args, overrides = parser.parse_known_args(argv)
    corpus = spread_corpus(args.records)
    common = ["+experiment=llava_tiny", *data_overrides(corpus), "data.max_length=1024", "data.tokenizer.vocab_size=1000",
              f"train.max_steps={args.steps}", "train.eval_every=0", "train.log_every=1",
              "data.dataset.max_val_samples=16", *overrides]  # fmt: skip
    for batch in map(int, args.batch_sizes.split(",")):
        for mode in ["padded", "grouped", "packed"]:
            run = [*common, f"train.global_batch_size={batch}", f"data.batching={mode}"]
            print(json.dumps({"global_batch_size": batch, **train(f"{mode}_{batch}", run)}), flush=True)
    shapes = ["+experiment=shapes", f"train.max_steps={args.steps}", "train.eval_every=0", "train.log_every=1",
              "data.dataset.val_size=16", *overrides]  # fmt: skip
    plain = export(OUT / "plain", records=3000, image_size=64)  # the llava_tiny experiment's usual corpus
    llava = ["+experiment=llava_tiny", *data_overrides(plain), *shapes[1:4], *overrides]  # its own batch size
    for experiment, base in [("llava_tiny", llava), ("shapes", shapes)]:
        for workers in [0, 2]:
            print(
                json.dumps(train(f"{experiment}_workers_{workers}", [*base, f"data.num_workers={workers}"])), flush=True
            )


if __name__ == "__main__":
    main(sys.argv[1:])
