"""Local lmms-eval tasks for the benchmark tests: Shapes VQA questions written as a JSONL file with PNG images, a
generation task (exact match, with a stop string) and a multiple-choice task (log-likelihoods), no network.

The questions include one asked about two images (which must reach the model in the order given) and a text-only
one; `process_results` scores exact match so the test can recompute the score from lmms-eval's logged samples.
"""

import json
from pathlib import Path

from PIL import Image

from vlm.data.processing import last_answer, message_text
from vlm.data.shapes import COLOURS, ShapesConfig, ShapesVQA

VQA, CHOICE = "vlm_local_vqa", "vlm_local_choice"

UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""

VQA_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: {until}
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHOICE_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def questions(out: Path, count: int, image_size: int) -> list[dict]:
    """`count` Shapes validation questions (PNG files under out/images), then one about two images and one
    without an image."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    shapes = ShapesVQA(ShapesConfig(train_size=1, val_size=count + 2), "val", image_size)
    rows = []
    for i in range(count + 2):
        sample = shapes[i]
        path = out / "images" / f"{i}.png"
        Image.fromarray(sample["images"][0]).save(path)
        question = message_text(sample["messages"][0])
        rows.append({"question": question, "answer": last_answer(sample["messages"]), "images": [str(path)]})
    two, text_only = rows[count], rows[count + 1]
    two["images"].append(rows[0]["images"][0])
    two["question"] = "Compare the two pictures. " + two["question"]
    text_only["images"] = []
    text_only["question"] = "Which colour comes first in the list: " + ", ".join(COLOURS) + "?"
    text_only["answer"] = next(iter(COLOURS))
    return rows


def write_tasks(out: Path, rows: list[dict], until: list[str], max_new_tokens: int = 6) -> Path:
    """The two tasks over `rows` in `out` (lmms-eval's include_path); returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    colours = list(COLOURS)
    choice_rows = [
        {**r, "choices": colours, "gold": colours.index(r["answer"])} for r in rows if r["answer"] in colours
    ]
    (out / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choice_rows))
    (out / "utils.py").write_text(UTILS)
    (out / f"{VQA}.yaml").write_text(VQA_YAML.format(task=VQA, data=out / "vqa.jsonl", until=json.dumps(until),
                                                     max_new_tokens=max_new_tokens))  # fmt: skip
    (out / f"{CHOICE}.yaml").write_text(CHOICE_YAML.format(task=CHOICE, data=out / "choice.jsonl"))
    return out
