"""lmms-eval benchmarks (vlm/harness/): the adapter answers as `python -m vlm.generate` does, token for token, in
left-padded batches; lmms-eval's scores equal the ones computed by hand from its logged samples; multiple-choice
losses equal the training forward's; training logs benchmark scores; mistakes get clear messages.

Needs the bench extra (lmms-eval), so it runs in `make test-bench` (.venv-bench), not in `make test`.
Run: make test-bench
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="the bench extra is not installed: run `make test-bench`")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from PIL import Image  # noqa: E402

from tests.benchmark_tasks import CHOICE, VQA, questions, write_tasks  # noqa: E402
from tests.conftest import make_trainer  # noqa: E402
from tests.test_distributed import launcher  # noqa: E402
from vlm.benchmark import main as benchmark_main  # noqa: E402
from vlm.data.chat_format import IGNORE_INDEX  # noqa: E402
from vlm.data.collate import Collator  # noqa: E402
from vlm.data.conversation import question_sample  # noqa: E402
from vlm.generate import main as generate_main  # noqa: E402
from vlm.harness.model import Served, VlmModel  # noqa: E402
from vlm.pretrained import load_pretrained  # noqa: E402
from vlm.training.distributed import build_accelerator  # noqa: E402

STOP = "e"  # the local task's `until`: frequent in what the tiny model says, so ignoring it changes answers
NEW_TOKENS = 6
ROOT = Path(__file__).resolve().parents[1]


def generated(checkpoint: Path, row: dict, *settings: str) -> str:
    """`python -m vlm.generate`'s answer to one question (its printed line)."""
    images = "images=[" + ",".join(row["images"]) + "]"
    argv = [f"checkpoint={checkpoint}", images, f"prompt={json.dumps(row['question'])}", f"max_new_tokens={NEW_TOKENS}"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # not capsys: module fixtures call this too
        assert generate_main([*argv, *settings]) == 0
    return printed.getvalue().removesuffix("\n")


def samples_of(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"*_samples_{task}.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def answer(sample: dict) -> str:
    return sample["filtered_resps"]  # lmms-eval logs `resps` only where a filter changed them


def losses(sample: dict) -> list[float]:
    """A multiple-choice sample's value per choice (logged as strings)."""
    return [float(value) for value, _ in sample["filtered_resps"]]


def results_of(out: Path) -> dict:
    (path,) = out.rglob("*_results.json")
    return json.loads(path.read_text())["results"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A tiny model trained until it answers differently per question (val accuracy about 0.4; benchmarks run
    during training at step 60 and at the end), and the questions."""
    root = tmp_path_factory.mktemp("bench")
    rows = questions(root / "data", 12, 32)
    tasks = write_tasks(root / "tasks_training", rows, [STOP], NEW_TOKENS)
    run = ["train.max_steps=120", "train.global_batch_size=16", "train.lr=1e-2", "train.eval_every=60",
           f"train.benchmarks.tasks=[{VQA},{CHOICE}]", f"train.benchmarks.include_path={tasks}",
           "train.best_metric=bench/vlm_local_choice/acc"]  # fmt: skip
    make_trainer(root / "run", *run).fit()
    return root / "run", rows


@pytest.fixture(scope="module")
def benchmarked(trained, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """`python -m vlm.benchmark` on the final checkpoint, batch 4, the first questions' reference answers set to what
    `vlm.generate` answers (so the exact-match score is not trivially 0)."""
    run, rows = trained
    checkpoint, root = run / "checkpoints" / "final", tmp_path_factory.mktemp("benchmarked")
    rows = [dict(r) for r in rows]
    for row in rows[:4]:
        row["answer"] = generated(checkpoint, row, f"stop_strings=[{STOP}]")
    tasks = write_tasks(root / "tasks", rows, [STOP], NEW_TOKENS)
    out = root / "out"
    argv = [f"checkpoint={checkpoint}", f"tasks={VQA},{CHOICE}", f"output_dir={out}", f"include_path={tasks}",
            "batch_size=4"]  # fmt: skip
    assert benchmark_main(argv) == 0
    return checkpoint, out, rows


def test_answers_equal_vlm_generate_token_for_token(benchmarked):
    """Batched with left padding (batch 4, prompts of different lengths: one image, two images, none) against
    `python -m vlm.generate` one question at a time: the same answers, with the task's stop string applied."""
    checkpoint, out, rows = benchmarked
    samples = samples_of(out, VQA)
    assert len(samples) == len(rows)
    uncut = [generated(checkpoint, row) for row in rows]
    assert any(STOP in answer for answer in uncut)  # the stop string matters: ignoring it would change answers
    assert len(set(uncut)) > 3  # different answers per question: a reordered or misplaced prompt shows
    for sample, row in zip(samples, rows):
        assert answer(sample) == generated(checkpoint, row, f"stop_strings=[{STOP}]"), row


def test_images_reach_the_model_in_the_task_order(benchmarked):
    """The two-image request's prompt holds its images in the order the task gives them, as vlm.generate's does
    (the tiny model answers that question the same either way, so the answers alone would not show a swap)."""
    checkpoint, _, rows = benchmarked
    loaded = load_pretrained(checkpoint)
    served = Served(loaded.model.eval(), loaded.tokenizer, loaded.processor, torch.device("cpu"))
    lm = VlmModel(served=served, accelerator=build_accelerator("cpu", "no"))
    two = next(row for row in rows if len(row["images"]) == 2)
    lm.task_dict = {"task": {"test": [two]}}
    visuals = lambda doc: [Image.open(path).convert("RGB") for path in doc["images"]]  # noqa: E731
    arguments = (two["question"], {}, visuals, 0, "task", "test")
    request = Instance("generate_until", arguments, idx=0, metadata={"task": "task", "doc_id": 0, "repeats": 1})
    reference = loaded.processor.encode_prompt(question_sample(two["images"], [two["question"]]), 0)
    prompt = lm._prompt(request)
    assert not torch.equal(reference.pixel_values[0], reference.pixel_values[1])  # two different pictures
    assert torch.equal(prompt.pixel_values, reference.pixel_values)
    assert torch.equal(prompt.input_ids, reference.input_ids)


def test_scores_lmms_eval_computes_equal_the_scores_by_hand(benchmarked):
    checkpoint, out, rows = benchmarked
    results = results_of(out)
    vqa = samples_of(out, VQA)
    by_hand = sum(answer(s).strip() == rows[s["doc_id"]]["answer"] for s in vqa) / len(vqa)
    assert results[VQA]["exact_match,none"] == pytest.approx(by_hand)
    assert by_hand >= 4 / len(rows)  # the first four references are the model's own answers
    choice = samples_of(out, CHOICE)
    right = [losses(s).index(min(losses(s))) == int(s["target"]) for s in choice]
    assert results[CHOICE]["acc,none"] == pytest.approx(sum(right) / len(right))
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["task"], r["metric"]) for r in summary["scores"]} == {(VQA, "exact_match"), (CHOICE, "acc")}
    assert summary["model"] == str(checkpoint) and summary["processes"] == 1


def test_choice_losses_equal_the_training_forward(benchmarked):
    """Each choice's value is the mean loss of its answer tokens in the training encoding of (question, choice)
    (end of turn left out): lmms-eval picks the lowest, so the likeliest choice wins."""
    checkpoint, out, _ = benchmarked
    loaded = load_pretrained(checkpoint)
    model, processor = loaded.model.eval(), loaded.processor
    stop_ids = len(processor.chat_format.end_of_turn_ids)
    sample = samples_of(out, CHOICE)[0]
    row = json.loads((out.parent / "tasks" / "choice.jsonl").read_text().splitlines()[sample["doc_id"]])
    for k, choice in enumerate(row["choices"]):
        raw = question_sample(row["images"], [row["question"], choice])
        encoded = processor(raw, 0)
        supervised = (encoded.labels != IGNORE_INDEX).nonzero().flatten()
        encoded.labels[supervised[-stop_ids:]] = IGNORE_INDEX  # the end of turn is not part of the choice
        batch = Collator(loaded.tokenizer.pad_token_id)([encoded])
        with torch.no_grad():
            loss = model(batch).loss_sum / (len(supervised) - stop_ids)
        assert losses(sample)[k] == pytest.approx(float(loss), rel=1e-5)


def test_lmms_eval_still_turns_tuples_into_strings():
    """Why `loglikelihood` wraps its tuples in GenerationResult (vlm/harness/model.py): lmms-eval 0.7.3 turns a bare
    (loss, greedy) tuple into its string. When this fails, lmms-eval is fixed and the wrapping can go."""
    assert unwrap_generation_output((1.5, True))[0] == "(1.5, True)"


def test_training_logs_benchmark_scores_and_keeps_the_best_by_one(trained):
    run, _ = trained
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if f"bench/{VQA}/exact_match" in r]
    assert steps == [60, 120]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {f"bench/{VQA}/exact_match", f"bench/{CHOICE}/acc"} <= set(metrics)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["metric"] == f"bench/{CHOICE}/acc"
    assert (run / "benchmarks" / "step_60" / "summary.json").is_file()
    assert (run / "curves.png").is_file()


def test_unknown_task_is_named_with_close_names(trained, tmp_path, capsys):
    run, rows = trained
    tasks = write_tasks(tmp_path / "tasks", rows, [STOP])
    argv = [f"checkpoint={run}/checkpoints/final", "tasks=vlm_local_vqq", f"output_dir={tmp_path}/out",
            f"include_path={tasks}"]  # fmt: skip
    assert benchmark_main(argv) == 2
    err = capsys.readouterr().err
    assert "no task vlm_local_vqq" in err and VQA in err and "TROUBLESHOOTING.md#benchmark-task-errors" in err


def test_a_task_needing_the_hub_offline_says_so(trained, tmp_path, capsys, monkeypatch):
    run, _ = trained
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text("task: vlm_remote\ndataset_path: vlm-test/not-cached\ntest_split: test\n"
                                       "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n")  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    argv = [f"checkpoint={run}/checkpoints/final", "tasks=vlm_remote", f"output_dir={tmp_path}/out",
            f"include_path={tasks}"]  # fmt: skip
    assert benchmark_main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot reach" in err and "TROUBLESHOOTING.md#benchmark-task-errors" in err


def test_a_checkpoint_without_its_tokenizer_is_refused(trained, tmp_path, capsys):
    run, rows = trained
    broken = tmp_path / "no_tokenizer"
    broken.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        (broken / name).symlink_to(run / "checkpoints" / "final" / name)
    tasks = write_tasks(tmp_path / "tasks", rows, [STOP])
    argv = [f"checkpoint={broken}", f"tasks={VQA}", f"output_dir={tmp_path}/out", f"include_path={tasks}"]
    assert benchmark_main(argv) == 2
    err = capsys.readouterr().err
    assert f"checkpoint={broken} has no tokenizer/" in err and "TROUBLESHOOTING.md#not-a-model-directory" in err


def test_two_processes_and_the_plain_lmms_eval_command_give_the_same_scores(benchmarked, tmp_path):
    """`accelerate launch --num_processes 2 -m vlm.benchmark` (each process answers its share, asserted) and
    `lmms-eval --model vlm` (our entry point) score as the one-process run did."""
    checkpoint, out, _ = benchmarked
    (tasks,) = {Path(p).parent for p in out.parent.glob("tasks/*.yaml")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    two = tmp_path / "two"
    launch = [*launcher("accelerate", 2), "-m", "vlm.benchmark", f"checkpoint={checkpoint}", f"tasks={VQA},{CHOICE}", f"output_dir={two}",
              f"include_path={tasks}", "batch_size=4"]  # fmt: skip
    subprocess.run(launch, check=True, env=env, cwd=tmp_path, timeout=600)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2
    assert results_of(two) == results_of(out)
    plain = tmp_path / "plain"
    command = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "vlm", "--model_args",
               f"pretrained={checkpoint}", "--tasks", f"{VQA},{CHOICE}", "--include_path", str(tasks),
               "--batch_size", "4", "--output_path", str(plain), "--log_samples"]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=tmp_path, timeout=600)
    for task in (VQA, CHOICE):
        assert [s["filtered_resps"] for s in samples_of(plain, task)] == [
            s["filtered_resps"] for s in samples_of(out, task)
        ]


def test_benchmarks_during_training_leave_its_random_state_alone(trained, tmp_path):
    """lmms-eval reseeds Python, NumPy and torch for each run: with dropout on, a run with benchmarks at step 5 trains
    on exactly as the same run without them."""
    _, rows = trained
    tasks = write_tasks(tmp_path / "tasks", rows, [STOP], NEW_TOKENS)
    run = ["train.max_steps=10", "train.global_batch_size=4", "train.eval_every=0", "train.best_metric=null",
           "+model.lm.config.attention_dropout=0.2"]  # fmt: skip
    bench = [f"train.benchmarks.tasks=[{VQA}]", f"train.benchmarks.include_path={tasks}", "train.benchmarks.every=5",
             "train.benchmarks.limit=2"]  # fmt: skip
    losses_of = {}
    for name, extra in [("plain", []), ("benchmarked", bench)]:
        make_trainer(tmp_path / name, *run, *extra).fit()
        records = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        losses_of[name] = [r["loss"] for r in records if "loss" in r]
    assert len(losses_of["plain"]) == 10
    assert losses_of["benchmarked"] == losses_of["plain"]
