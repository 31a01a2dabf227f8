"""eval.html: an evaluation a person can look at, as one self-contained file (images embedded, no server).

The accuracy table first (overall, exact match, per kind, validation loss), then each shown sample: its images,
the conversation up to the scored question (earlier turns too, greyed), the reference answer, the prediction and
whether it was right. Wrong answers come first: they are what a person opens the page for.
"""

import base64
import io
from collections import Counter
from pathlib import Path

import numpy as np
from jinja2 import Environment
from PIL import Image

from vlm.data.bad_samples import BadSample
from vlm.data.images import load_image
from vlm.data.processing import message_text

THUMBNAIL = 224  # px, longest side

PAGE = Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.4em 0.8em; text-align: left; vertical-align: top; }
.samples td:first-child { white-space: nowrap; }
img { height: 160px; margin: 2px; image-rendering: pixelated; }  /* small images are scaled up, crisp */
.right { background: #e6f4e6; } .wrong { background: #fbe4e4; }
.mark { font-size: 1.4em; font-weight: bold; }
.turn { color: #777; } .turn.asked { color: #222; }
pre { background: #f6f6f6; padding: 0.6em; }
</style></head><body>
<h1>{{ title }}</h1>
<pre>{{ source }}</pre>
<table class="summary">
<tr><th>metric</th><th>value</th><th>samples</th></tr>
<tr><td>accuracy (normalised answers)</td><td>{{ fmt(summary.val_accuracy) }}</td><td>{{ summary.val_accuracy_samples }}</td></tr>
<tr><td>exact match</td><td>{{ fmt(summary.val_exact_match) }}</td><td>{{ summary.val_accuracy_samples }}</td></tr>
{% for kind, value in summary.val_accuracy_by_kind.items() %}
<tr><td>accuracy: {{ kind }}</td><td>{{ fmt(value) }}</td><td>{{ kind_counts[kind] }}</td></tr>
{% endfor %}
<tr><td>majority baseline</td><td>{{ fmt(summary.majority_baseline) }}</td><td></td></tr>
<tr><td>validation loss</td><td>{{ fmt(summary.val_loss, 4) }}</td><td>{{ summary.val_samples }}</td></tr>
{% if summary.val_skipped %}<tr><td>bad samples skipped</td><td colspan="2">{{ summary.val_skipped }}</td></tr>{% endif %}
</table>
<h2>{{ rows | length }} of {{ summary.val_accuracy_samples }} predictions ({{ wrong }} wrong shown first)</h2>
<table class="samples">
<tr><th></th><th>images</th><th>conversation (the scored question last)</th><th>answer</th><th>prediction</th><th>kind</th><th>id</th></tr>
{% for row in rows %}
<tr class="{{ 'right' if row.correct else 'wrong' }}">
<td class="mark">{{ '&#10003;' | safe if row.correct else '&#10007;' | safe }}</td>
<td>{% for src in row.images %}<img src="{{ src }}" alt="image {{ loop.index }} of sample {{ row.id }}">{% else %}(text only){% endfor %}</td>
<td>{% for turn in row.turns %}<div class="turn{{ ' asked' if loop.last else '' }}">{{ turn.role }}: {{ turn.text }}</div>{% endfor %}</td><td>{{ row.answer }}</td><td>{{ row.prediction }}</td><td>{{ row.kind }}</td><td>{{ row.id }}</td>
</tr>
{% endfor %}
</table></body></html>
""")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _data_uri(image: Image.Image | np.ndarray) -> str:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _row(prediction: dict, sample: dict) -> dict:
    """A prediction with its sample's images (as embedded PNGs) and its turns up to the scored question."""
    images = []
    for source in sample.get("images", []):
        try:
            images.append(_data_uri(load_image(source, f"sample {prediction['id']}")))
        except BadSample:  # it was evaluated, so this cannot happen unless the file changed since: show none
            continue
    messages = sample["messages"]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the reference answer has its own column
    turns = [{"role": m["role"], "text": message_text(m)} for m in messages]
    return {**prediction, "images": images, "turns": turns}


def write_eval_page(path: Path, title: str, source: str, summary: dict, predictions: list[dict], samples_by_index,
                    max_rows: int) -> None:  # fmt: skip
    """`samples_by_index(i)`: the raw sample of prediction index i (its images are read again for the page)."""
    shown = sorted(predictions, key=lambda p: (p["correct"], p["index"]))[:max_rows]
    kind_counts = Counter(p["kind"] for p in predictions)
    page = PAGE.render(
        title=title, source=source, summary=summary, fmt=_fmt, kind_counts=kind_counts,
        rows=[_row(p, samples_by_index(p["index"])) for p in shown], wrong=sum(not p["correct"] for p in shown),
    )  # fmt: skip
    path.write_text(page, encoding="utf-8")
