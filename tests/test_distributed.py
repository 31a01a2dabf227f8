"""Several processes train like one: real 2-process runs (gloo on CPU) through torchrun and accelerate launch.

Each process takes half of every step's samples; the supervised-token count is summed over both before any
backward, so the all-reduced gradient is the one-process gradient. The one-process reference is a Trainer in
this test process, on the same config. Every run here asserts the world size it got.
Run: pytest tests/test_distributed.py
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY, TINY_MODEL, TINY_VIT, compose_config, new_trainer
from vlm.data.collate import Collator
from vlm.data.formats import build_dataset, data_config
from vlm.data.shapes_export import data_overrides, export
from vlm.export import main as export_main
from vlm.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
RUN = ["train.max_steps=5", "train.global_batch_size=8", "train.log_every=1", "train.eval_every=0",
       "train.warmup_steps=0", "train.lr=3e-3"]  # fmt: skip
SHAPES = ["+experiment=shapes", *TINY, *TINY_VIT, *RUN]  # for train.py; compose_config adds the first part itself
HANG_TIMEOUT_S = 240  # a run that hangs in a collective fails the test instead of stalling CI


@dataclass
class Run:
    run_dir: Path
    stderr: str

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "train_log.jsonl").read_text().splitlines()]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records if "loss" in r]

    @property
    def metrics(self) -> dict:
        return json.loads((self.run_dir / "metrics.json").read_text())

    def weights(self) -> dict:
        return load_file(self.run_dir / "checkpoints" / "final" / "model.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(name: str, processes: int) -> list[str]:
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    if name == "fsdp":  # the README's FSDP2 command; accelerate shards on CPU too (see distributed.py)
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
                "--num_processes", str(processes), "--main_process_port", str(free_port())]  # fmt: skip
    # The README's command; --multi_gpu is accelerate's flag for "start N processes" (gloo on a CPU-only machine).
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]  # fmt: skip


def launch(
    run_dir: Path, args: list[str], via: str = "torchrun", script: str = "train.py", expect_ok: bool = True,
    launch_options: list[str] = (),
) -> Run:  # fmt: skip
    """Two processes; killed (with all their children) and failed if they run past HANG_TIMEOUT_S."""
    command = [*launcher(via, 2), *launch_options, script, *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The launcher starts each worker in a session of its own: kill the whole tree, workers first.
        for child in [*psutil.Process(process.pid).children(recursive=True), process]:
            child.kill()
        _, stderr = process.communicate()
        pytest.fail(f"2-process run hung for {HANG_TIMEOUT_S} s: {stderr[-3000:]}")
    if expect_ok:
        assert process.returncode == 0, stderr[-4000:]
    return Run(run_dir, stderr)


def train_here(run_dir: Path, overrides: list[str], data: list[str] | None = None, experiment: str = "shapes") -> Run:
    """The one-process reference: a Trainer in this process (composed as train.py composes)."""
    new_trainer(compose_config(*overrides, experiment=experiment, data=data), run_dir).fit()
    return Run(run_dir, "")


def assert_close(a: list[float], b: list[float], rel: float = 1e-5) -> None:
    assert len(a) == len(b) and a, (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(x), (a, b)


def assert_same_weights(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.linalg.vector_norm(a[name] - b[name]) <= rel * torch.linalg.vector_norm(a[name]) + 1e-7, name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Run:
    return train_here(tmp_path_factory.mktemp("one"), [*TINY_VIT, *RUN])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Run:
    return launch(tmp_path_factory.mktemp("two"), SHAPES, via="torchrun")


def test_two_processes_train_like_one(one_process, two_processes):
    one, two = one_process.metrics, two_processes.metrics
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert "world_size 2: process 0" in (two_processes.run_dir / "train.log").read_text()
    assert "world_size 2: process 1" in (two_processes.run_dir / "train_rank1.log").read_text()
    # One writer: every step logged once.
    assert [r["step"] for r in two_processes.records if "loss" in r] == [1, 2, 3, 4, 5]
    # Different shares: the two processes' first steps are disjoint halves of the one-process first step.
    rank0, rank1 = (p["first_step_samples"] for p in two["processes"])
    (whole,) = (p["first_step_samples"] for p in one["processes"])
    assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1) and set(rank0) | set(rank1) == set(whole)
    # Each process draws dropout and sampling from its own seed (train.seed + rank), the first as one process does.
    (seed,) = (p["rng_seed"] for p in one["processes"])
    assert [p["rng_seed"] for p in two["processes"]] == [seed, seed + 1]
    assert_close(one_process.losses, two_processes.losses)
    assert_same_weights(one_process.weights(), two_processes.weights())
    # Validation: each process evaluates half; the merged figures are the one-process figures.
    assert two["val_samples"] == one["val_samples"] == 16
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["val_accuracy"] == one["val_accuracy"] and two["val_accuracy_samples"] == one["val_accuracy_samples"]


def test_two_machines_on_localhost_train_like_two_processes_on_one(two_processes, tmp_path):
    """README's multi-node command as two "machines" (torchrun --nnodes 2, one process each, c10d rendezvous): each
    is local process 0 of its machine, the global ranks are 0 and 1, one of them writes, and the run equals the
    one-machine 2-process run."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "vlm-test", "train.py", *SHAPES,
               f"hydra.run.dir={tmp_path}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]  # fmt: skip
    for machine in machines:
        _, stderr = machine.communicate(timeout=HANG_TIMEOUT_S)
        assert machine.returncode == 0, stderr[-3000:]
    logs = [(tmp_path / name).read_text() for name in ("train.log", "train_rank1.log")]
    assert "world_size 2: process 0 (local process 0 on its machine" in logs[0]
    assert "world_size 2: process 1 (local process 0 on its machine" in logs[1]
    two_machines = Run(tmp_path, "")
    assert two_machines.metrics["world_size"] == 2
    assert_close(two_processes.losses, two_machines.losses, rel=1e-6)
    assert_same_weights(two_processes.weights(), two_machines.weights(), rel=1e-6)


def test_two_processes_packing_train_like_one_padded(one_process, tmp_path):
    """Each process packs its own share into rows, one row per micro-batch; a process with fewer rows runs
    zero-weight filler micro-batches (unpacked), so both run the same number of forwards and all-reduces. The
    reference is the one-process padded run: same samples per step, same token-mean loss."""
    packed = launch(tmp_path, [*SHAPES, "data.batching=packed", "train.micro_batch_size=1"])
    assert packed.metrics["world_size"] == 2
    assert packed.metrics["real_token_fraction"] > one_process.metrics["real_token_fraction"]
    assert_close(one_process.losses, packed.losses)
    assert_same_weights(one_process.weights(), packed.weights())


def test_accelerate_launch_that_starts_one_process_is_an_error(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts a single process: refused, not a quiet 1-process run."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", *SHAPES, f"hydra.run.dir={tmp_path}"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert done.returncode != 0
    assert "TROUBLESHOOTING.md#launch-runs-one-process" in done.stderr
    assert not (tmp_path / "train_log.jsonl").exists()


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_on_one_process_backs_off_on_both(two_processes, tmp_path, where):
    """Only process 1 runs out (micro-batches above 2 samples); both halve from the same step, and the run
    matches the clean 2-process run. Launched with accelerate (the README's flags)."""
    oom = ["train.simulate_oom_above=2", "train.simulate_oom_on_process=1", f"train.simulate_oom_in={where}"]
    run = launch(tmp_path, [*SHAPES, *oom], via="accelerate")
    metrics = run.metrics
    assert metrics["world_size"] == 2
    assert metrics["oom_back_offs"] == 1 and metrics["micro_batch_size"] == 2  # seen by process 0 too
    assert [r["micro_batch_size"] for r in run.records if "loss" in r] == [2, 2, 2, 2, 2]
    assert (
        f"out of memory in the {where} of a 4-sample micro-batch on process(es) [1]"
        in (tmp_path / "train.log").read_text()
    )
    assert_close(two_processes.losses, run.losses)
    assert_same_weights(two_processes.weights(), run.weights())


def one_image_corpus(directory: Path) -> list[str]:
    """24 records of which only the first has an image: every step's images are on one process. One more
    names a missing image: a bad sample, so the process that draws it has fewer samples than its peer."""
    path = export(directory, records=24, image_size=32)
    records = json.loads(path.read_text())
    for record in records[1:]:
        del record["image"]
        record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>", "").strip()
    records[2]["image"] = "does_not_exist.png"
    path.write_text(json.dumps(records))
    return [*data_overrides(path), "data.dataset.val_fraction=0.2"]


def test_a_step_with_all_images_on_one_process_completes(tmp_path):
    """Also: a process with a bad sample in its share runs a zero-weight filler micro-batch (micro-batches of 1),
    and both processes count the bad sample as one process does."""
    data = one_image_corpus(tmp_path / "data")
    args = [*RUN, "train.global_batch_size=16", "train.micro_batch_size=1", "train.best_metric=val_loss"]
    one = train_here(tmp_path / "one", args, data=data, experiment="llava_tiny")
    two = launch(tmp_path / "two", ["+experiment=llava_tiny", *data, *TINY_MODEL, *args], via="torchrun")
    assert two.metrics["world_size"] == 2
    skipped = [(m["data_skipped"], m["val_skipped"]) for m in (one.metrics, two.metrics)]
    assert skipped[0] == skipped[1] and sum(skipped[0][0].values()) + sum(skipped[0][1].values()) == 1
    assert_close(one.losses, two.losses)
    assert_same_weights(one.weights(), two.weights())


STOP_ON_PROCESS_0 = """
import os, runpy, signal, sys
import vlm.training.trainer as trainer_module

def after_step(self, record, stop):
    if self.step == 2 and self.rank == 0:  # the scheduler signals one process only
        signal.raise_signal(signal.SIGTERM)
    return original(self, record, stop)

original = trainer_module.Trainer._after_step
trainer_module.Trainer._after_step = after_step
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_resumed_two_process_run_repeats_the_uninterrupted_one(tmp_path):
    """Dropout makes each process's RNG state matter; a SIGTERM to process 0 alone stops both at the same step."""
    args = [*SHAPES, "+model.lm.config.attention_dropout=0.2", "train.save_every=0", "train.best_metric=null"]
    straight = launch(tmp_path / "straight", args)
    script = tmp_path / "stop_on_process_0.py"
    script.write_text(STOP_ON_PROCESS_0)
    stopped = launch(tmp_path / "resumed", args, script=str(script), expect_ok=False)
    assert "exitcode: 143" in stopped.stderr  # a stopped run is no finished one: 128 + SIGTERM, on every process
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000002").is_dir()
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    resumed = launch(tmp_path / "resumed", [*args, "train.resume=auto"])
    assert "resumed from" in (tmp_path / "resumed" / "train_rank1.log").read_text()
    assert resumed.metrics["world_size"] == 2 and stopped.run_dir == resumed.run_dir
    assert resumed.losses == straight.losses
    assert_same_weights(straight.weights(), resumed.weights(), rel=0)


KILL_9_WRITING_STEP_4 = """
import os, runpy, signal, sys, threading
from torch.distributed.checkpoint.filesystem import FileSystemWriter

def finish(self, *args, **kwargs):  # process 0, in the saving thread: every shard on disk, the metadata not yet
    if ".tmp-step_00000004" in str(self.path):
        if threading.current_thread() is threading.main_thread():
            os._exit(3)  # a background save must write in its own thread
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)

original = FileSystemWriter.finish
FileSystemWriter.finish = finish
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_fsdp_trains_like_one_process_and_resumes_sharded(one_process, tmp_path, caplog):
    """FSDP2 through accelerate's plugin (configs/accelerate/fsdp.yaml): same per-step losses as one process;
    checkpoints/final is one consolidated file that loads on one process. Step checkpoints are sharded (each process
    wrote its part), here in the background: a run killed while step 4's shards were written resumes from step 2,
    exactly, on 2 processes, and on 1 as one process straight through; the sharded step exports to the consolidated
    final's logits, bitwise."""
    straight = launch(tmp_path / "straight", SHAPES, via="fsdp")
    assert (
        "world_size 2: process 0 (local process 0 on its machine; DistributedType.FSDP"
        in (straight.run_dir / "train.log").read_text()
    )
    assert straight.metrics["world_size"] == 2
    assert_built_empty_by_process_1(straight)  # equal to one process: process 0's initial weights, sharded
    assert_close(one_process.losses, straight.losses)
    assert_same_weights(one_process.weights(), straight.weights())
    assert straight.metrics["val_loss"] == pytest.approx(one_process.metrics["val_loss"], rel=1e-5)
    # Shards written by a thread while training goes on (step 2's beside steps 3 and 4), until a kill -9.
    in_background = [*SHAPES, "train.checkpoint.async_save=true", "train.save_every=2"]
    script = tmp_path / "kill_9_writing_step_4.py"
    script.write_text(KILL_9_WRITING_STEP_4)
    killed = launch(tmp_path / "resumed", in_background, via="fsdp", script=str(script), expect_ok=False)
    assert "exitcode: -9" in killed.stderr, killed.stderr[-3000:]
    half = tmp_path / "resumed" / "checkpoints" / ".tmp-step_00000004" / "dcp"  # both shards, no metadata
    assert sorted(p.name for p in half.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (half / ".metadata").exists()
    step = tmp_path / "resumed" / "checkpoints" / "step_00000002"  # put in place when step 4's save began
    assert sorted(p.name for p in (step / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (step / "model.safetensors").exists() and torch.load(step / "training_state.pt")["optimizer"] is None
    shutil.copytree(tmp_path / "resumed", tmp_path / "on_one")
    resumed = launch(tmp_path / "resumed", [*in_background, "train.resume=auto"], via="fsdp")
    assert [(s["step"], s["async_save"]) for s in resumed.metrics["processes"][1]["checkpoint_saves"]] == [
        (4, True),
        (5, True),
    ]
    for done in ("step_00000004", "step_00000005"):  # the last one put in place as the run ended
        assert (tmp_path / "resumed" / "checkpoints" / done / "dcp" / ".metadata").is_file()
    assert resumed.metrics["world_size"] == 2
    assert_close(straight.losses, resumed.losses, rel=1e-6)
    assert_same_weights(straight.weights(), resumed.weights(), rel=1e-6)
    with caplog.at_level("INFO"):  # the data position is the step; 2 processes' RNG states do not fit 1: a warning
        on_one = train_here(tmp_path / "on_one", [*TINY_VIT, *RUN, "train.resume=auto"])
    assert on_one.metrics["world_size"] == 1 and f"resumed from {tmp_path / 'on_one'}" in caplog.text
    assert "RNG states of 2 process(es), this run has 1" in caplog.text
    assert_close(one_process.losses, on_one.losses)
    assert_same_weights(one_process.weights(), on_one.weights())
    sharded, consolidated = (
        straight.run_dir / "checkpoints" / "step_00000005",
        straight.run_dir / "checkpoints" / "final",
    )
    assert (sharded / "dcp").is_dir()
    logits = []
    for checkpoint in (sharded, consolidated):
        assert export_main([f"checkpoint={checkpoint}", f"output_dir={tmp_path / 'export' / checkpoint.name}"]) == 0
        loaded = load_pretrained(tmp_path / "export" / checkpoint.name)
        batch = Collator(loaded.tokenizer.pad_token_id)([loaded.processor(validation_sample(), 0)])
        with torch.no_grad():
            logits.append(loaded.model.eval()(batch).logits)
    assert torch.equal(*logits)


def test_fsdp_keeps_tied_embeddings_tied(tmp_path):
    """An LM whose output layer is its input embeddings (SmolLM2, Qwen2.5-0.5B): process 1 builds it empty and
    receives process 0's weights, and the two stay one tensor through training, as on one process."""
    args = [*RUN, "model.lm.config.tie_word_embeddings=true", "train.max_steps=3"]
    one = train_here(tmp_path / "one", [*TINY_VIT, *args])
    two = launch(tmp_path / "two", [*SHAPES, *args], via="fsdp")
    assert two.metrics["world_size"] == 2
    assert_built_empty_by_process_1(two)
    assert_close(one.losses, two.losses)
    weights = two.weights()  # gathered whole: both names, one value
    assert torch.equal(weights.pop("lm.model.embed_tokens.weight"), weights["lm.lm_head.weight"])
    assert_same_weights(one.weights(), weights)


def test_fsdp_loads_batch_norm_buffers_from_process_0_as_every_process_building_would(tmp_path):
    """The shapes experiment's ResNet tower has buffers (BatchNorm statistics) that FSDP2 does not shard: process 1
    builds empty and receives them whole (vlm/compat.py), and the run equals the one where every process builds."""
    args = ["+experiment=shapes", *TINY, *RUN, "train.max_steps=3"]
    received = launch(tmp_path / "received", args, via="fsdp")
    assert received.metrics["world_size"] == 2
    assert_built_empty_by_process_1(received)
    built = launch(tmp_path / "built", args, via="fsdp", launch_options=["--fsdp_cpu_ram_efficient_loading", "false"])
    assert EMPTY_BUILD not in (built.run_dir / "train_rank1.log").read_text()
    assert received.losses == built.losses and len(received.losses) == 3
    assert received.metrics["val_loss"] == built.metrics["val_loss"]  # each process's share, by its statistics
    built_weights, received_weights = built.weights(), received.weights()  # BatchNorm's step counts included
    assert built_weights.keys() == received_weights.keys()
    assert all(torch.equal(built_weights[k], received_weights[k]) for k in built_weights)


def assert_built_empty_by_process_1(run: Run) -> None:
    """Process 1 built no weights of its own (configs/accelerate/fsdp.yaml: fsdp_cpu_ram_efficient_loading)."""
    assert EMPTY_BUILD in (run.run_dir / "train_rank1.log").read_text()
    assert EMPTY_BUILD not in (run.run_dir / "train.log").read_text()


EMPTY_BUILD = "the model is built empty here"


def validation_sample() -> dict:
    """A validation sample of the tiny Shapes config."""
    return build_dataset(data_config(compose_config()).dataset, "val", 32)[0]


def test_a_one_process_sharded_checkpoint_resumes_on_two_fsdp_processes(one_process, tmp_path):
    """Written by one process without a process group, resumed by FSDP2 on two: as one process straight through."""
    first = train_here(
        tmp_path, [*TINY_VIT, *RUN, "train.checkpoint.format=sharded", "train.save_every=2", "train.keep_last=3"]
    )
    for later in ["step_00000004", "step_00000005", "final"]:  # so that resume=auto picks step 2
        shutil.rmtree(first.run_dir / "checkpoints" / later)
    (first.run_dir / "checkpoints" / "best.json").unlink()
    assert (tmp_path / "checkpoints" / "step_00000002" / "dcp" / "__0_0.distcp").is_file()
    resumed = launch(tmp_path, [*SHAPES, "train.resume=auto"], via="fsdp")
    assert resumed.metrics["world_size"] == 2 and "resumed from" in (tmp_path / "train_rank1.log").read_text()
    assert_close(one_process.losses, resumed.losses)
    assert_same_weights(one_process.weights(), resumed.weights())


def test_two_processes_with_grouped_batching_train_like_one(tmp_path):
    args = [*RUN, "data.batching=grouped", "data.group_steps=2", "data.dataset.questions_per_image=3"]
    one = train_here(tmp_path / "one", [*TINY_VIT, *args])
    two = launch(tmp_path / "two", [*SHAPES, *args])
    assert two.metrics["world_size"] == 2
    assert_close(one.losses, two.losses)
    assert_same_weights(one.weights(), two.weights())


def test_two_processes_streaming_train_like_one(tmp_path):
    """A JSONL stream: every process reads it and takes its share of each step; the same samples as one process."""
    corpus = export(tmp_path / "corpus", records=40, image_size=32, jsonl=True)
    data = [*data_overrides(corpus), f"data.dataset.val_path={corpus}", "data.dataset.streaming=true",
            "data.dataset.shuffle_window=10", "data.dataset.max_val_samples=8"]  # fmt: skip
    one = train_here(tmp_path / "one", RUN, data=data, experiment="llava_tiny")
    two = launch(tmp_path / "two", ["+experiment=llava_tiny", *data, *TINY_MODEL, *RUN])
    assert two.metrics["world_size"] == 2
    assert_close(one.losses, two.losses)
    assert_same_weights(one.weights(), two.weights())


def test_fsdp_refuses_to_resume_from_weights_with_a_missing_tensor(one_process, tmp_path):
    """Each process takes its shard of the full tensors; a checkpoint that lacks one stops every process with a
    message naming it, instead of training on from a half-loaded model (set_model_state_dict alone would fill the
    gap with the model's own initial tensor)."""
    shutil.copytree(one_process.run_dir / "checkpoints", tmp_path / "checkpoints")
    (step,) = [p for p in (tmp_path / "checkpoints").glob("step_*")]  # the best (final) step, resumable
    weights = load_file(step / "model.safetensors")
    dropped = next(k for k in sorted(weights) if "layernorm" in k)  # no tied tensor: it must be there
    save_file({k: v for k, v in weights.items() if k != dropped}, str(step / "model.safetensors"))
    run = launch(tmp_path, [*SHAPES, "train.resume=auto", "train.max_steps=6"], via="fsdp", expect_ok=False)
    assert "exitcode: 2" in run.stderr
    assert f"error: cannot load weights from {step}: missing keys ['{dropped}']" in run.stderr


def test_lora_two_processes_train_like_one_with_ddp_and_fsdp(tmp_path):
    """Adapters and the projector train, the rest is frozen: DDP and FSDP2 (mixed frozen and trainable tensors in
    one shard unit) give the one-process losses and adapters."""
    args = [*RUN, "train.lora.enabled=true", "train.stage=finetune", "train.lora.r=4", "train.lora.dropout=0"]
    one = train_here(tmp_path / "one", [*TINY_VIT, *args])
    assert any(".lora_A." in name for name in one.weights())
    for via in ("torchrun", "fsdp"):
        two = launch(tmp_path / via, [*SHAPES, *args], via=via)
        assert two.metrics["world_size"] == 2
        if via == "fsdp":
            assert (
                "world_size 2: process 0 (local process 0 on its machine; DistributedType.FSDP"
                in (two.run_dir / "train.log").read_text()
            )
            assert_built_empty_by_process_1(two)
        assert_close(one.losses, two.losses)
        assert_same_weights(one.weights(), two.weights())
    # Every process checks the base's fingerprint on resume: process 0's, though process 1 built no base weights.
    step_5 = tmp_path / "fsdp" / "checkpoints" / "step_00000005"
    resumed = launch(tmp_path / "fsdp", [*SHAPES, *args, f"train.resume={step_5}", "train.max_steps=6"], via="fsdp")
    assert resumed.metrics["world_size"] == 2 and "resumed from" in (tmp_path / "fsdp" / "train_rank1.log").read_text()
