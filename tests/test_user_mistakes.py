"""The first hour of a new user: the mistakes they make get a run that fails clearly, never one that "succeeds"
on nothing.

Run: pytest tests/test_user_mistakes.py
"""

import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import train
from tests.conftest import TINY, TINY_VIT, compose_config, new_trainer
from vlm.benchmark import main as benchmark_main
from vlm.check_data import main as check_main
from vlm.checkpoint import Checkpointer
from vlm.data.bad_samples import TooManyBadSamplesError
from vlm.data.shapes_export import export
from vlm.evaluate import main as evaluate_main
from vlm.export import main as export_main
from vlm.generate import main as generate_main
from vlm.training.trainer import Trainer

TROUBLESHOOTING = (Path(__file__).resolve().parents[1] / "TROUBLESHOOTING.md").read_text()


def exported_corpus_trainer(run_dir: Path, corpus: Path, image_root: Path, *overrides: str):
    data = [f"data.dataset.path={corpus}", f"data.dataset.image_root={image_root}", "data.dataset.val_fraction=0.1"]
    cfg = compose_config("train.eval_every=0", "train.log_every=1", "train.global_batch_size=4", *overrides,
                         experiment="llava_tiny", data=data)  # fmt: skip
    return new_trainer(cfg, run_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return export(tmp_path_factory.mktemp("exported"), records=40, image_size=32)


def test_a_short_run_on_only_bad_samples_fails_with_the_counts_and_updates_nothing(corpus, tmp_path):
    """Two steps of four samples, every image missing (the image root is the data file's folder, one level too
    high): fewer draws than any early check needs, yet the run fails at its end, before anything is saved."""
    trainer = exported_corpus_trainer(tmp_path, corpus, corpus.parent, "train.max_steps=2")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(TooManyBadSamplesError, match=r"every one of the 8 samples drawn was bad.*image_missing: \d"):
        trainer.fit()
    assert trainer.step == 2
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # no optimizer step
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [None, None] and all(r["skipped"] for r in records)  # never a NaN loss
    assert not (tmp_path / "checkpoints" / "final").exists() and not (tmp_path / "metrics.json").exists()


def test_a_wrong_image_root_stops_after_the_first_draws_naming_the_root_and_the_paths(corpus, tmp_path):
    trainer = exported_corpus_trainer(tmp_path, corpus, corpus.parent, "train.max_steps=50")
    with pytest.raises(TooManyBadSamplesError) as stopped:
        trainer.fit()
    assert trainer.step == 4  # 16 draws, all bad: long before data.skip_check_after (256)
    message = str(stopped.value)
    assert f"data.dataset.image_root={corpus.parent}" in message  # the root used
    assert "image '0000" in message and ".png' is not under" in message  # what the records' paths look like
    assert "set it to the folder the records' paths are relative to" in message
    assert "TROUBLESHOOTING.md#too-many-bad-samples" in message


def test_the_final_evaluation_counts_for_the_best_checkpoint(tmp_path):
    """An evaluation at step 2 and the final one at step 4: validation loss falls, so the final step is the best,
    and best.json names it with a resumable checkpoint beside it (train.save_every=0: none otherwise)."""
    overrides = ["train.max_steps=4", "train.eval_every=2", "train.global_batch_size=8", "train.lr=3e-3",
                 "train.warmup_steps=0", "train.best_metric=val_loss", "train.log_every=1", "train.save_every=0"]  # fmt: skip
    new_trainer(compose_config(*overrides), tmp_path).fit()
    evaluations = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    val_loss = {r["step"]: r["val_loss"] for r in evaluations if "val_loss" in r}
    assert set(val_loss) == {2, 4} and val_loss[4] < val_loss[2]  # the premise
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 4
    assert (tmp_path / "checkpoints" / "step_00000004" / "trainer_state.json").is_file()


def run_train(argv: list[str], run_dir: Path, capsys) -> tuple[int, str]:
    """`python train.py ARGV` in this process: (exit status, stderr)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["train.py", *argv, f"hydra.run.dir={run_dir}"])
        AcceleratorState._reset_state(reset_partial_state=True)
        capsys.readouterr()
        with pytest.raises(SystemExit) as ended:
            train.run(sys.argv[1:])
    return ended.value.code, capsys.readouterr().err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


LLAVA = ["+experiment=llava_tiny", "train.max_steps=1", "data.dataset.val_fraction=0.5"]
MISTAKES = {  # name: (arguments, given a tmp_path; what the message must say; the entry it must link)
    "no such data file": (lambda d: [*LLAVA, f"data.dataset.path={d / 'nope.json'}"],
                          ["data.dataset.path", "nope.json", "does not exist"], "a-data-file-that-is-missing-or-not-records"),
    "no data path": (lambda d: LLAVA, ["data.dataset.path is required and not set", "data.dataset.path=..."],
                     "config-key-errors"),
    "a mistyped key": (lambda d: ["+experiment=shapes", "train.max_step=10"],
                       ["train.max_step is not a config key", "did you mean train.max_steps?"], "config-key-errors"),
    "a mistyped key forced in": (lambda d: ["+experiment=shapes", "+train.max_step=10"],
                                 ["has no key train.max_step", "did you mean train.max_steps?"], "config-key-errors"),
    "one JSON object": (lambda d: [*LLAVA, f"data.dataset.path={write(d / 'o.json', json.dumps({'data': [{'conversations': []}]}, indent=1))}"],
                        ["o.json holds one JSON object (keys 'data')", "expected a JSON array of records, or JSONL",
                         "the records look to be under 'data'"], "a-data-file-that-is-missing-or-not-records"),
    "a list of numbers": (lambda d: [*LLAVA, f"data.dataset.path={write(d / 'n.json', '[1, 2, 3]')}"],
                          ["n.json holds no record", "element 1 is 1"], "a-data-file-that-is-missing-or-not-records"),
    "a best metric no benchmark gives": (lambda d: ["+experiment=shapes", "train.best_metric=bench/mmstar/average"],
                                         ["train.best_metric='bench/mmstar/average' is not one of",
                                          "a task in train.benchmarks.tasks (none set)"], "config-key-errors"),
    "a CSV file": (lambda d: [*LLAVA, f"data.dataset.path={write(d / 'c.jsonl', 'a,b' + chr(10) + '1,2' + chr(10))}"],
                   ["c.jsonl holds no record", "line 1", "'a,b'"], "a-data-file-that-is-missing-or-not-records"),
}  # fmt: skip


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_prints_its_message_alone_and_exits_2(mistake, tmp_path, capsys):
    arguments, says, entry = MISTAKES[mistake]
    code, err = run_train(arguments(tmp_path), tmp_path / "run", capsys)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    for words in says:
        assert words in err, (words, err)
    assert f"TROUBLESHOOTING.md#{entry}" in err and f"## {entry.replace('-', ' ')}" in TROUBLESHOOTING.lower()


TOOLS = {"generate": (generate_main, ["prompt=hi"]), "evaluate": (evaluate_main, ["output_dir=out"]),
         "export": (export_main, ["output_dir=out"])}  # fmt: skip


@pytest.mark.parametrize("tool", list(TOOLS))
def test_a_tool_given_no_model_directory_says_what_one_is_and_lists_those_under_it(tool, saved_model, tmp_path, capsys):
    main, arguments = TOOLS[tool]
    shutil.copytree(saved_model[1], tmp_path / "run" / "checkpoints" / "final")
    for given, says in [(tmp_path / "nope", "does not exist"), (tmp_path / "run", "has no model.safetensors")]:
        assert main([f"checkpoint={given}", *arguments]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: checkpoint={given} {says}") and "TROUBLESHOOTING.md#not-a-model-directory" in err
    assert f"model directories under it: {tmp_path / 'run' / 'checkpoints' / 'final'}" in err


def test_benchmarks_without_the_bench_extra_name_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # as on a machine without the extra (`make test` has none)
    code, err = run_train(["+experiment=shapes", "train.benchmarks.tasks=[mmstar]"], tmp_path / "run", capsys)
    assert code == 2 and err.startswith("error: train.benchmarks.tasks needs lmms-eval, which is not installed")
    assert benchmark_main(["checkpoint=c", "tasks=mmstar", "output_dir=o"]) == 2
    assert capsys.readouterr().err.startswith("error: python -m vlm.benchmark needs lmms-eval")
    assert "pip install -e '.[bench]'" in err
    assert (
        "TROUBLESHOOTING.md#benchmarks-need-the-bench-extra" in err
        and "## benchmarks need the bench extra" in TROUBLESHOOTING.lower()
    )


@pytest.mark.parametrize("tool", [check_main, generate_main, evaluate_main, export_main, benchmark_main])
def test_every_tool_has_a_usage_line(tool, capsys):
    assert tool(["--help"]) == 0
    assert f"python -m vlm.{tool.__module__.rsplit('.', 1)[1]}" in capsys.readouterr().out


TINY_RUN = [
    *TINY,
    *TINY_VIT,
    "+experiment=shapes",
    "train.max_steps=5",
    "train.global_batch_size=4",
    "train.eval_every=0",
]


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stopped_by_a_signal_saves_and_exits_non_zero(sent, code, tmp_path, capsys, monkeypatch):
    after_step = Trainer._after_step

    def signal_at_step_2(self, record, stop):
        if self.step == 2:
            signal.raise_signal(sent)
        return after_step(self, record, stop)

    monkeypatch.setattr(Trainer, "_after_step", signal_at_step_2)
    assert run_train(TINY_RUN, tmp_path, capsys)[0] == code
    assert (tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
    assert not (tmp_path / "checkpoints" / "final").exists() and not (tmp_path / "metrics.json").exists()


def test_a_second_ctrl_c_during_the_save_stops_at_once_in_one_line(tmp_path, capsys, monkeypatch):
    after_step, save = Trainer._after_step, Checkpointer.save

    def ctrl_c_at_step_2(self, record, stop):
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)
        return after_step(self, record, stop)

    def impatient_save(self, step, progress):
        signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C again while the checkpoint is written
        return save(self, step, progress)

    monkeypatch.setattr(Trainer, "_after_step", ctrl_c_at_step_2)
    monkeypatch.setattr(Checkpointer, "save", impatient_save)
    code, err = run_train(TINY_RUN, tmp_path, capsys)
    logged = "".join(log.read_text() for log in tmp_path.glob("*.log"))  # Hydra's log of the run
    assert "a second Ctrl-C stops at once, without saving" in logged  # the first one says so
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == "interrupted again: stopped at once, without saving this step's checkpoint"
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def test_the_traceback_comes_on_request(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLM_TRACEBACK", "1")
    code, err = run_train(["+experiment=shapes", "+train.max_step=10"], tmp_path, capsys)
    assert code != 0 and "Traceback" in err and "did you mean train.max_steps?" in err
