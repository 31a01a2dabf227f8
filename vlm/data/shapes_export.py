"""Write Shapes VQA samples as a LLaVA-format corpus (PNG files + JSON), for trying `data=llava` without data.

    python -m vlm.data.shapes_export OUT_DIR --records 3000 [--image-size 64] [--seed 0] [--jsonl]

writes OUT_DIR/images/NNNNNN.png and OUT_DIR/data.json (or data.jsonl): records with `id`, `image` (relative to
the image folder, as in LLaVA's own data), `conversations` (the first question after an `<image>` marker, further
questions as more turns) and `kind` (the last question's: the one evaluation scores). Used by the tests and the data
benchmarks; train on it as on any LLaVA data, with the command it prints:
`python train.py +experiment=llava_tiny data.dataset.path=OUT_DIR/data.json data.dataset.image_root=OUT_DIR/images`.
"""

import argparse
import json
from pathlib import Path

from PIL import Image

from vlm.data.shapes import ShapesConfig, ShapesVQA


def shapes_records(records: int, image_size: int, seed: int, questions_per_image: int = 4) -> ShapesVQA:
    cfg = ShapesConfig(train_size=records, val_size=1, seed=seed, questions_per_image=questions_per_image)
    return ShapesVQA(cfg, "train", image_size)


IMAGES = "images"


def export(out_dir: Path, records: int, image_size: int = 64, seed: int = 0, jsonl: bool = False) -> Path:
    """Write the corpus; returns the path of the JSON (or JSONL) file."""
    (out_dir / IMAGES).mkdir(parents=True, exist_ok=True)
    shapes = shapes_records(records, image_size, seed)
    rows = []
    for i in range(records):
        sample = shapes[i]
        name = f"{i:06d}.png"
        Image.fromarray(sample["images"][0]).save(out_dir / IMAGES / name)
        turns = []
        for message in sample["messages"]:
            content = message["content"]
            text = content if isinstance(content, str) else "<image>\n" + "".join(p.get("text", "") for p in content)
            turns.append({"from": "human" if message["role"] == "user" else "gpt", "value": text})
        rows.append({"id": f"shapes-{i}", "image": name, "conversations": turns, "kind": sample["kind"]})
    path = out_dir / ("data.jsonl" if jsonl else "data.json")  # beside the image folder
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows, indent=1))
    return path


def data_overrides(path: Path) -> list[str]:
    """The `data.dataset` overrides that read an exported corpus."""
    return [f"data.dataset.path={path}", f"data.dataset.image_root={Path(path).parent / IMAGES}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl", action="store_true")
    args = parser.parse_args()
    path = export(args.out_dir, args.records, args.image_size, args.seed, args.jsonl)
    print(f"wrote {path}; train on it with:\npython train.py +experiment=llava_tiny {' '.join(data_overrides(path))}")


if __name__ == "__main__":
    main()
