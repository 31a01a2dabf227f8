"""`python -m vlm.evaluate`: the run's own evaluation again from its checkpoint, eval.json and an eval.html a person
can read (checked in a real headless browser where Chromium is installed), and curves.png at the end of training.

Run: pytest tests/test_evaluate.py
"""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_VIT, compose_config, new_trainer
from vlm.eval_page import write_eval_page
from vlm.evaluate import main as evaluate_main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short run evaluated twice on the way (curve points) and at the end, on all 16 validation samples."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config(*TINY_VIT, "train.max_steps=12", "train.eval_every=4", "train.eval_samples=8",
                         "train.global_batch_size=8", "train.lr=3e-3", "train.log_every=1", "train.eval_batch_size=16")  # fmt: skip
    metrics = new_trainer(cfg, run_dir).fit()
    return run_dir, metrics


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    run_dir, _ = run
    out = tmp_path_factory.mktemp("eval")
    code = evaluate_main(
        [f"checkpoint={run_dir / 'checkpoints' / 'final'}", f"output_dir={out}", "batch_size=16", "show=10"]
    )
    assert code == 0
    return out, json.loads((out / "eval.json").read_text())


def test_the_command_reproduces_the_runs_final_evaluation(run, evaluated):
    run_dir, metrics = run
    _, report = evaluated
    assert report["val_samples"] == metrics["val_samples"] == 16
    assert report["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert report["val_accuracy"] == metrics["val_accuracy"] and report["val_exact_match"] == metrics["val_exact_match"]
    saved = [json.loads(line) for line in (run_dir / "val_predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in report["predictions"]] == [p["prediction"] for p in saved]
    assert report["val_accuracy_by_kind"] == metrics["val_accuracy_by_kind"] and len(report["val_accuracy_by_kind"]) > 1


def test_the_page_shows_the_table_and_each_sample_with_its_images(evaluated):
    out, report = evaluated
    page = (out / "eval.html").read_text()
    rows = re.findall(r'<tr class="(right|wrong)">(.*?)</tr>', page, flags=re.S)
    assert len(rows) == 10  # show=10
    for _, row in rows:
        (source,) = re.findall(r'<img src="data:image/png;base64,([^"]+)"', row)  # a shapes sample has one image
        image = Image.open(io.BytesIO(base64.b64decode(source)))
        assert image.format == "PNG" and image.size == (32, 32)
    for kind in report["val_accuracy_by_kind"]:
        assert f"accuracy: {kind}" in page
    assert f"{report['val_accuracy']:.3f}" in page and "exact match" in page
    assert "data:\n  dataset:\n" in page and "{&#39;name&#39;" not in page  # the data config as YAML, not a repr


def test_the_page_puts_wrong_answers_first_and_escapes_text(evaluated, tmp_path):
    _, report = evaluated
    predictions = [{**p, "correct": i % 3 == 0} for i, p in enumerate(report["predictions"])]
    sample = {"images": [np.full((8, 8, 3), 200, np.uint8)], "messages": [{"role": "user", "content": "<b>bold?</b>"}]}
    write_eval_page(tmp_path / "eval.html", "t", "s", report, predictions, lambda index: sample, max_rows=8)
    page = (tmp_path / "eval.html").read_text()
    marks = re.findall(r'<tr class="(right|wrong)">', page)
    right = sum(p["correct"] for p in predictions)
    assert marks == ["wrong"] * 8  # two thirds are wrong: the first 8 shown are all wrong ones
    write_eval_page(tmp_path / "eval.html", "t", "s", report, predictions, lambda index: sample, max_rows=100)
    marks = re.findall(r'<tr class="(right|wrong)">', (tmp_path / "eval.html").read_text())
    assert marks == ["wrong"] * (len(predictions) - right) + ["right"] * right and right >= 4
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page and "<b>bold" not in page


def test_another_data_format_and_file(run, shapes_llava, tmp_path):
    """data=llava with a validation file of its own: the whole file is evaluated; bad arguments are usage errors."""
    run_dir, _ = run
    path = shapes_llava[0].split("=", 1)[1]
    checkpoint = f"checkpoint={run_dir / 'checkpoints' / 'final'}"
    code = evaluate_main([checkpoint, f"output_dir={tmp_path}", "data=llava", *shapes_llava[:2],
                          f"data.dataset.val_path={path}", "max_new_tokens=4"])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["val_samples"] == len(json.loads(open(path).read())) and report["data"]["name"] == "llava"
    assert evaluate_main([checkpoint, f"output_dir={tmp_path}", "data.dataset.no_such_key=1"]) == 2
    assert evaluate_main([checkpoint, "outptu_dir=x"]) == 2


def test_curves_png_is_written_at_the_end_of_training(run):
    run_dir, _ = run
    image = np.asarray(Image.open(run_dir / "curves.png").convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # lines and text, not a blank canvas


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_the_page_renders_its_images_in_a_headless_browser(evaluated, tmp_path):
    out, _ = evaluated
    shot = tmp_path / "page.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400", f"--screenshot={shot}"]  # fmt: skip
    subprocess.run([CHROMIUM, *flags, (out / "eval.html").as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The page's own colours are greys and pale red/green; saturated colours come only from rendered shapes images.
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 120
    assert saturated.sum() > 2000, f"{saturated.sum()} saturated pixels: the images did not render"
