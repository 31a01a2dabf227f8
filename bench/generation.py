"""Decode speed (with the KV cache: transformers always uses it when generating from input embeddings) and prefill
time, on the shapes model (random weights, CPU).

python bench/generation.py [--new-tokens 32] [--batch 8] [train.py overrides ...]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vlm.build import build_components, validate_config  # noqa: E402
from vlm.data.collate import Collator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args, overrides = parser.parse_known_args()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=shapes", *overrides])
    parts = build_components(validate_config(cfg))
    model = parts.model.eval()
    prompts = [parts.processor.encode_prompt(parts.val_set[i], i) for i in range(args.batch)]
    batch = Collator(parts.tokenizer.pad_token_id, padding_side="left")(prompts)
    results = {"batch": args.batch, "prompt_tokens": int(batch["attention_mask"].sum()), "new_tokens": args.new_tokens}
    with torch.no_grad():
        model(batch)  # warm-up
        start = time.perf_counter()
        model(batch)
        results["prefill_s"] = round(time.perf_counter() - start, 4)
        # Forced to the full length (the stop token would end random weights at once).
        start = time.perf_counter()
        out = model.generate(batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        results["decode_tokens_per_s"] = round(out.numel() / (time.perf_counter() - start), 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
