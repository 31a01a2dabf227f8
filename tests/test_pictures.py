"""What a person looks at: curves.png (loss and accuracy over the same steps, the baseline to beat, every kind
visible, a note where there is nothing to draw) and eval.html (the whole conversation of a multi-turn record, the
data config as YAML).

Run: pytest tests/test_pictures.py
"""

import numpy as np

from vlm.eval_page import write_eval_page
from vlm.training.curves import draw_curves

LOG = [
    {"step": 1, "loss": 5.0, "skipped": False},
    {"step": 2, "loss": None, "skipped": True},  # a step without a usable sample
    {"step": 50, "val_loss": 2.0, "val_accuracy": 0.5, "val_accuracy/colour": 0.5, "val_accuracy/shape": 0.5},
    {"step": 100, "loss": 1.0, "skipped": False},
    {"step": 100, "val_loss": 1.0, "val_accuracy": 0.8, "val_accuracy/colour": 0.8, "val_accuracy/shape": 0.8},
]


def test_curves_share_the_steps_show_the_baseline_and_keep_equal_kinds_apart():
    losses, accuracy = draw_curves(LOG, "t", baseline=0.25).axes
    assert losses.get_shared_x_axes().joined(losses, accuracy)
    lines = {line.get_label(): line for line in accuracy.get_lines()}
    assert list(lines["majority baseline"].get_ydata()) == [0.25, 0.25]
    colour, shape = lines["colour"], lines["shape"]
    assert list(colour.get_ydata()) == list(shape.get_ydata())  # equal accuracies ...
    assert colour.get_marker() != shape.get_marker()  # ... drawn with different markers
    assert all(c != s for c, s in zip(colour.get_xdata(), shape.get_xdata()))  # ... side by side
    assert not losses.texts and not accuracy.texts


def test_curves_of_a_run_with_nothing_to_draw_say_so():
    nothing = [{"step": 1, "loss": None, "skipped": True}, {"step": 2, "loss": float("nan"), "skipped": False}]
    losses, accuracy = draw_curves(nothing, "t").axes
    assert [t.get_text() for t in losses.texts] == ["no finite loss was logged"]
    assert [t.get_text() for t in accuracy.texts] == ["no validation accuracy was logged"]


def test_the_page_shows_a_multi_turn_conversation_and_the_data_config_as_yaml(tmp_path):
    sample = {
        "images": [np.full((8, 8, 3), 200, np.uint8)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Where is the square?"},
            {"role": "assistant", "content": "top left"},
        ],
    }
    prediction = {"index": 0, "id": "a", "kind": "position", "answer": "top left", "prediction": "top left",
                  "correct": True, "exact": True}  # fmt: skip
    summary = {"val_accuracy": 1.0, "val_exact_match": 1.0, "val_accuracy_by_kind": {"position": 1.0},
               "val_accuracy_samples": 1, "majority_baseline": 1.0, "val_loss": 0.1, "val_samples": 1, "val_skipped": {}}  # fmt: skip
    source = "checkpoint: run/checkpoints/final\ndata:\n  dataset:\n    name: llava\n"
    write_eval_page(tmp_path / "eval.html", "t", source, summary, [prediction], lambda index: sample, max_rows=8)
    page = (tmp_path / "eval.html").read_text()
    turns = ["user: What colour is the circle?", "assistant: red", "user: Where is the square?"]
    assert all(turn in page for turn in turns) and page.index(turns[0]) < page.index(turns[2])
    assert '<div class="turn asked">user: Where is the square?</div>' in page  # the scored question stands out
    assert "<pre>checkpoint: run/checkpoints/final\ndata:\n  dataset:\n    name: llava\n</pre>" in page
