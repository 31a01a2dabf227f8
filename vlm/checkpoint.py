"""The on-disk format of trained models and resumable checkpoints: what they hold, how they are written and read.

A model directory (`checkpoints/final`, `vlm.save_pretrained`, `python -m vlm.export`; every step checkpoint is one):
  model.safetensors   weights (tied tensors stored once)
  config.yaml         the resolved run config: model architecture, chat format, image settings
  tokenizer/          the tokenizer, a locally trained one included
  lm/config.json      the LM's transformers config, so reloading never touches the hub
  language_model/     (exports only) the LM alone in transformers format, for tools that know nothing of vlm
A LoRA run's model directory stores only what trained (adapters, the projector, `modules_to_save`) and the buffers in
model.safetensors, and
  adapter_base.json   a fingerprint of the base the adapters were trained on, which is rebuilt from its sources
                      (pretrained weights, train.init_from, or the seed of a random init) and checked on loading.
A resumable checkpoint (`checkpoints/step_NNNNNNNN/`) adds
  training_state.pt   optimizer, scheduler and grad scaler states, every process's RNG states
  trainer_state.json  the loop's progress (step, micro-batch size, bad steps and samples, stream position) and
                      the global batch size; written last, so its presence marks a complete checkpoint.
The data position is the step: batches are a pure function of (seed, step) (vlm/training/batching.py).
`checkpoints/best.json` names the best evaluated step, which rotation keeps.

Writes go to a hidden directory renamed into place when complete, so a run killed mid-save (kill -9, node loss)
leaves the previous checkpoint intact and the partial one invisible; leftovers are removed at the next start.
A sharded checkpoint (`train.checkpoint.format=sharded`, the default under FSDP2) holds, instead of
model.safetensors and the optimizer part of training_state.pt,
  dcp/                each process's part of the weights and optimizer state (vlm/sharded_state.py), written in
                      parallel without gathering; any number of processes resumes from it, and every reader of model
                      directories takes its weights on one process.
A consolidated checkpoint under FSDP gathers the full tensors to process 0 (collectives, so every process calls
`save`), and loading hands each process its shard. `checkpoints/final` is always consolidated: the file people take
elsewhere. This module knows nothing of the loop: the trainer hands it its progress and gets it back on resume.
"""

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from vlm.compat import safetensors_device
from vlm.config import ConfigError
from vlm.data.chat_format import ChatFormat, check_chat_template
from vlm.data.formats import DataConfig, data_config
from vlm.data.tokenizer import build_tokenizer
from vlm.errors import UserError
from vlm.sharded_state import is_sharded, load_sharded, save_sharded, saved_names, start_saving_sharded

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
LM_CONFIG = "lm"
EXPORTED_LM = "language_model"
ADAPTER_BASE = "adapter_base.json"
TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
BEST = "best.json"
FINAL = "final"
STEP_DIR = re.compile(r"^step_(\d+)$")
HIGHER_IS_BETTER = {"val_accuracy": True, "val_loss": False}  # the metrics a best checkpoint can be chosen by
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ResumeMismatchError(UserError, ValueError):
    pass


class NotACheckpointError(UserError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class AdapterBase:
    """What a LoRA run's checkpoints store (`stored`: tensor names) and the fingerprint of the rest, the base."""

    stored: frozenset[str]
    fingerprint: str


def weights_mismatch(directory: Path, err: Exception) -> "ResumeMismatchError":
    return ResumeMismatchError(
        f"cannot load weights from {directory}: {err}. The model config must match the checkpoint's "
        "(compare its config.yaml). See TROUBLESHOOTING.md#resume-mismatch."
    )


def base_mismatch(directory: Path, saved: str, found: str) -> "ResumeMismatchError":
    return ResumeMismatchError(
        f"the adapters in {directory} were trained on another base model (base fingerprint {saved}, this one "
        f"{found}): the pretrained LM or vision weights, train.init_from or train.seed differ from the run that "
        "trained them. Use that run's config.yaml. See TROUBLESHOOTING.md#lora-adapters-on-another-base."
    )


# ----- model directories -----------------------------------------------------------------------


def save_pretrained(
    directory: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DictConfig,
    weights: dict[str, torch.Tensor] | None = None,
    adapter_base: AdapterBase | None = None,
) -> None:
    """`weights`: the full state dict when the model's own tensors are shards (FSDP). `adapter_base`: a LoRA run's,
    whose directories store only `adapter_base.stored`."""
    directory.mkdir(parents=True, exist_ok=True)
    if adapter_base is not None:
        state = weights if weights is not None else model.state_dict()
        kept = {name: tensor for name, tensor in state.items() if name in adapter_base.stored}
        save_file(_unshared(kept), str(directory / WEIGHTS), metadata={"format": "pt"})
    elif weights is None:
        save_model(model, str(directory / WEIGHTS))
    else:
        save_file(_unshared(weights), str(directory / WEIGHTS), metadata={"format": "pt"})
    save_model_files(directory, model, tokenizer, cfg, adapter_base)


def save_model_files(directory: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig,
                     adapter_base: AdapterBase | None = None) -> None:  # fmt: skip
    """Everything of a model directory but its weights (a sharded checkpoint's are in dcp/)."""
    if adapter_base is not None:
        (directory / ADAPTER_BASE).write_text(json.dumps({"fingerprint": adapter_base.fingerprint}, indent=2))
    tokenizer.save_pretrained(directory / TOKENIZER)
    model.lm.config.save_pretrained(directory / LM_CONFIG)
    OmegaConf.save(cfg, directory / CONFIG, resolve=True)


def export_language_model(directory: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """The LM alone in transformers format (weights, config, tokenizer): `AutoModelForCausalLM.from_pretrained`
    loads it anywhere. Its vocabulary includes the image token, which text-only use never produces."""
    model.lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@dataclass
class SavedModel:
    """A model directory read back offline: its run config, rewritten to rebuild from the directory alone (the saved
    tokenizer and LM config, no pretrained weights to fetch), and the tokenizer and chat format it was trained with."""

    directory: Path
    config: DictConfig
    data: DataConfig
    tokenizer: PreTrainedTokenizerBase
    chat_format: ChatFormat
    adapter_base: AdapterBase | None = None  # a LoRA directory's: its model is rebuilt from the base's own sources

    def load_weights(self, model: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
        if self.adapter_base is None and not is_sharded(self.directory):
            load_model(model, str(self.directory / WEIGHTS), device=safetensors_device(device))
        else:
            load_directory_weights(model, self.directory, partial=self.adapter_base is not None)
        return model.to(device)


def stored_names(directory: Path) -> set[str]:
    """The names of the tensors in a model directory's weights, read from the file's header (or DCP's metadata)."""
    if is_sharded(directory):
        return saved_names(directory)
    with safe_open(directory / WEIGHTS, "pt") as weights:
        return set(weights.keys())


def read_model_directory(directory: Path) -> SavedModel:
    """A LoRA directory keeps the config's pretrained sources: its base is rebuilt from them (pretrained weights
    come from the hub cache or the local path they came from)."""
    directory = Path(directory)
    if not has_weights(directory):
        raise not_a_model_directory(directory)
    if not (directory / TOKENIZER).is_dir():  # the trained tokenizer: no other one gives the same ids
        raise NotACheckpointError(
            f"checkpoint={directory} has no {TOKENIZER}/ folder: a model is read with the tokenizer it was trained "
            f"with. Copy the run directory's {TOKENIZER}/ next to {WEIGHTS}, or use a checkpoint saved by training or "
            "vlm.export. See TROUBLESHOOTING.md#not-a-model-directory."
        )
    cfg = OmegaConf.load(directory / CONFIG)
    cfg.data.tokenizer.pretrained = str(directory / TOKENIZER)  # no hub access, no re-training of the tokenizer
    adapters = directory / ADAPTER_BASE
    adapter_base = None
    if adapters.is_file():
        adapter_base = AdapterBase(frozenset(stored_names(directory)), json.loads(adapters.read_text())["fingerprint"])
    else:
        cfg.model.lm.pretrained = None
        cfg.model.lm.config = AutoConfig.from_pretrained(directory / LM_CONFIG).to_dict()
        cfg.model.vision.pretrained = False
        cfg.model.vision.weights_path = None
    data = data_config(cfg)
    tokenizer = build_tokenizer(data.tokenizer, [], data.chat.special_tokens)
    chat_format = ChatFormat(data.chat, tokenizer)
    check_chat_template(chat_format)
    return SavedModel(directory, cfg, data, tokenizer, chat_format, adapter_base)


def has_weights(directory: Path) -> bool:
    return (directory / WEIGHTS).is_file() or is_sharded(directory)


def check_whole_model(directory: Path) -> None:
    """`train.init_from` needs a whole model's weights: not a LoRA directory's."""
    directory = Path(directory)
    if not has_weights(directory):
        raise not_a_model_directory(directory)
    if (directory / ADAPTER_BASE).is_file():
        raise ResumeMismatchError(
            f"{directory} holds LoRA adapters, not a whole model, so it cannot start a run (train.init_from). Merge "
            f"them first: python -m vlm.export checkpoint={directory} output_dir=OUT merge_lora=true, then "
            "train.init_from=OUT. See TROUBLESHOOTING.md#lora-adapters-on-another-base."
        )


def load_directory_weights(model: torch.nn.Module, directory: Path, partial: bool = False) -> None:
    """A model directory's weights (either kind) into a plain model; `partial`: a LoRA directory's."""
    if is_sharded(directory):
        load_sharded(directory, model, partial=partial)
    else:
        load_state(model, load_file(str(directory / WEIGHTS)), partial)


def load_initial_weights(model: torch.nn.Module, directory: Path) -> None:
    """`train.init_from`: a whole model's weights into a plain model (before adapters, compile and sharding)."""
    check_whole_model(directory)
    try:
        load_directory_weights(model, Path(directory))
    except RuntimeError as err:
        raise weights_mismatch(directory, err) from err


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], partial: bool = False) -> None:
    """`state` into a plain (unsharded) model. Every tensor of the model must be in `state` (tied repeats aside) unless
    `partial` (a LoRA directory: only what trained). No unexpected names."""
    missing, unexpected = _mismatched_names(model, state)
    missing = set() if partial else missing
    if missing or unexpected:
        raise RuntimeError(f"missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)


def _mismatched_names(model: torch.nn.Module, state: dict) -> tuple[set[str], set[str]]:
    """(missing, unexpected) names of `state` for `model`. Tied tensors are stored once, under any of their names
    (safetensors keeps one of them): a tied group is missing only when none of its names is there."""
    names = set(model.state_dict())
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    missing = names - {n for group in groups.values() if len(group) > 1 for n in group} - set(state)
    missing |= {group[0] for group in groups.values() if len(group) > 1 and not set(group) & set(state)}
    return missing, set(state) - names


def not_a_model_directory(path: Path) -> NotACheckpointError:
    """The error for a path that holds no model: what a model directory is, and those found just below the path
    (a run directory holds checkpoints/final and checkpoints/step_*)."""
    what = f"a model directory holds {WEIGHTS}, {CONFIG} and {TOKENIZER}/: a run's checkpoints/final or step_*"
    if not path.exists():
        return NotACheckpointError(
            f"checkpoint={path} does not exist ({what}). See TROUBLESHOOTING.md#not-a-model-directory."
        )
    found = sorted({weights.parent for depth in ("*/", "*/*/") for weights in path.glob(depth + WEIGHTS)})
    listing = f"model directories under it: {', '.join(map(str, found[:8]))}" if found else "none under it either"
    return NotACheckpointError(
        f"checkpoint={path} has no {WEIGHTS}: it is not a model directory ({what}); {listing}. "
        "See TROUBLESHOOTING.md#not-a-model-directory."
    )


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give repeats their own copy."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return out


# ----- RNG states ------------------------------------------------------------------------------


def rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ----- the checkpoint directory: atomic writes, rotation, the best step ---------------------------


def step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def is_complete(path: Path) -> bool:
    return (path / TRAINER_STATE).is_file() and (path / TRAINING_STATE).is_file()


class CheckpointDirectory:
    """`run_dir/checkpoints`. With several processes every one keeps the same view of the best evaluation (they all
    see the same merged metrics) but only the writer touches the disk."""

    def __init__(self, path: Path, keep_last: int, best_metric: str | None, writer: bool = True):
        self.path = Path(path)
        self.keep_last, self.best_metric, self.writer = keep_last, best_metric, writer
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob(".tmp-*"):  # partial writes of a killed run
                log.warning("removing partial checkpoint %s left by an interrupted save", stale)
                shutil.rmtree(stale, ignore_errors=True)
        path = self.path / BEST
        self._best = json.loads(path.read_text()) if path.exists() else None

    def checkpoints(self) -> list[Path]:
        """Complete step checkpoints, oldest first."""
        if not self.path.is_dir():
            return []
        found = [p for p in self.path.iterdir() if step_of(p) >= 0 and is_complete(p)]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def staging(self, step: int) -> Path:
        """Where `step`'s checkpoint is written before it is renamed into place; the writer clears it (a killed run's
        leftovers). Every process gets the same path: a sharded checkpoint is written there by all of them."""
        tmp = self.path / f".tmp-step_{step:08d}"
        if self.writer:
            shutil.rmtree(tmp, ignore_errors=True)
        return tmp

    def save(self, step: int, write: Callable[[Path], None], staged: Path | None = None) -> Path:
        """Write via `write(tmp_dir)` (which must write TRAINER_STATE last), then rename into place. `staged`: the
        `staging` directory, already holding what the other processes wrote."""
        final = self.path / f"step_{step:08d}"
        tmp = staged or self.staging(step)
        write(tmp)
        if final.exists():  # re-saving a step (e.g. a stop signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._rotate()
        return final

    def record_eval(self, step: int, metrics: dict, higher_is_better: dict[str, bool] = HIGHER_IS_BETTER) -> bool:
        """Remember the best step by `best_metric`; True if this step is the new best. `higher_is_better` says which
        way each metric improves (benchmark scores bring their own)."""
        if not self.best_metric or self.best_metric not in metrics:
            return False
        best, value = self.best(), metrics[self.best_metric]
        higher = higher_is_better[self.best_metric]
        if best is not None and (value <= best["value"] if higher else value >= best["value"]):
            return False
        self._best = {"step": step, "metric": self.best_metric, "value": value}
        if self.writer:
            tmp = self.path / f".tmp-{BEST}"
            tmp.write_text(json.dumps(self._best))
            os.replace(tmp, self.path / BEST)
        return True

    def best(self) -> dict | None:
        return self._best

    def _rotate(self) -> None:
        best = self.best()
        keep_step = best["step"] if best else None
        found = self.checkpoints()
        for path in found[: max(0, len(found) - self.keep_last)]:
            if step_of(path) != keep_step:
                shutil.rmtree(path, ignore_errors=True)

    def resume_path(self, resume: str | None) -> Path | None:
        """`train.resume`: null -> None; auto -> the newest complete checkpoint here (or None); else a path."""
        if not resume:
            return None
        if resume == "auto":
            found = self.latest()
            if found is None:
                log.info("train.resume=auto: no checkpoint in %s yet; starting from scratch", self.path)
            return found
        path = Path(resume)
        if not is_complete(path):
            raise NotACheckpointError(
                f"train.resume={resume!r} is not a complete checkpoint directory (it needs {TRAINING_STATE} and "
                f"{TRAINER_STATE}). See TROUBLESHOOTING.md#resume-mismatch."
            )
        return path


# ----- weights and optimizer state of a plain, DDP or FSDP model ---------------------------------


class ShardedState:
    """The same files whether the model is plain, DDP or FSDP: under FSDP, full tensors gathered to process 0 on
    save (collectives) and each process's shard taken from them on load."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.sharded = accelerator.is_fsdp2

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP a collective: the full weights, on process 0's CPU. None: save the module itself."""
        return get_model_state_dict(self.model, options=FULL) if self.sharded else None

    def load_weights(self, path: Path, partial: bool = False) -> None:
        """`partial`: the file holds only some tensors (a LoRA run's); the others keep their values."""
        if not self.sharded:
            load_state(self.accelerator.unwrap_model(self.model), load_file(str(path)), partial)
            return
        full = load_file(str(path))
        # Checked here, not by set_model_state_dict: with a full state dict it fills every key the file lacks with the
        # model's own tensors before loading, so its missing keys are always empty (torch 2.14). strict=False is for
        # tied weights, which the file stores once, and for the tensors a partial file leaves out.
        missing, unexpected = _mismatched_names(self.model, full)
        missing = set() if partial else missing
        if missing or unexpected:
            raise RuntimeError(f"missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self) -> dict:
        """Under FSDP a collective: the full state, keyed by parameter name, on process 0."""
        if not self.sharded:
            return self.optimizer.state_dict()
        return get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=FULL)

    def load_optimizer_state(self, state: dict) -> None:
        if not self.sharded:
            self.optimizer.load_state_dict(state)
            return
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer.optimizer, state, options=options)


# ----- what the trainer uses ---------------------------------------------------------------------


@dataclass
class PendingSave:
    """A checkpoint whose shards are being written in the background; the rest of it is already in `staged`."""

    step: int
    staged: Path
    writing: Future
    trainer_state: dict


def mark_complete(directory: Path, state: dict) -> None:
    """trainer_state.json, written last: its presence marks a complete checkpoint."""
    (directory / TRAINER_STATE).write_text(json.dumps(state, indent=2))


class Checkpointer:
    """Saves and restores everything a run needs to continue. The trainer hands over its own progress (a dict of
    JSON values) and gets it back on resume. Every process calls every method; only process 0 writes."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, model, optimizer, scheduler,
                 tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, global_batch_size: int,
                 keep_last: int, best_metric: str | None, adapter_base: AdapterBase | None = None,
                 checkpoint_format: str = "auto", async_save: bool = False):  # fmt: skip
        """`adapter_base`: a LoRA run's; its checkpoints store only what trains (and the buffers). `checkpoint_format`:
        sharded | consolidated | auto (sharded under FSDP2). `async_save`: sharded shards written in the background
        while training goes on; the checkpoint becomes visible once every process's part is on disk."""
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.tokenizer, self.cfg, self.global_batch_size = tokenizer, cfg, global_batch_size
        self.adapter_base = adapter_base
        self.sharded = checkpoint_format == "sharded" or (checkpoint_format == "auto" and accelerator.is_fsdp2)
        if async_save and not self.sharded:
            raise ConfigError(
                "train.checkpoint.async_save=true writes sharded checkpoints in the background, and this run's are "
                f"consolidated (train.checkpoint.format={checkpoint_format}, "
                f"{'FSDP2' if accelerator.is_fsdp2 else 'no FSDP'}): set train.checkpoint.format=sharded. "
                "See TROUBLESHOOTING.md#sharded-checkpoints."
            )
        # A collective when processes run: every one makes the group at the same point.
        self.async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.async_save, self.pending = async_save, None
        self.state = ShardedState(accelerator, model, optimizer)
        writer = accelerator.is_main_process
        self.directory = CheckpointDirectory(Path(run_dir) / "checkpoints", keep_last, best_metric, writer)

    def save(self, step: int, progress: dict) -> Path | None:
        """A resumable checkpoint of `step`; its path on process 0, None on the others and while it is written in
        the background (`finish_saving` puts it in place; the next save or the end of the run calls it)."""
        self.finish_saving()
        self.accelerator.wait_for_everyone()
        rng = gather_object([rng_states()])  # every process's, by rank
        staged, weights, optimizer, writing = None, None, None, None
        if self.sharded:  # every process writes its part; nothing is gathered
            staged = self.directory.staging(step)
            self.accelerator.wait_for_everyone()
            stored = self.adapter_base.stored if self.adapter_base else None
            if self.async_save:
                writing = start_saving_sharded(staged, self.model, self.optimizer.optimizer, stored, self.async_group)
            else:
                save_sharded(staged, self.model, self.optimizer.optimizer, stored)
        else:
            weights, optimizer = self.state.gather_weights(), self.state.optimizer_state()  # FSDP: gathered
        scaler = self.accelerator.scaler
        training_state = {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
        }
        trainer_state = {"global_batch_size": self.global_batch_size, **progress}

        def write_parts(directory: Path) -> None:
            if self.sharded:
                save_model_files(directory, self.accelerator.unwrap_model(self.model), self.tokenizer, self.cfg,
                                 self.adapter_base)  # fmt: skip
            else:
                self._save_model(directory, weights)
            torch.save(training_state, directory / TRAINING_STATE)

        if writing is not None:
            if self.accelerator.is_main_process:
                write_parts(staged)
            self.pending = PendingSave(step, staged, writing, trainer_state)
            return None

        def write(directory: Path) -> None:
            write_parts(directory)
            mark_complete(directory, trainer_state)

        path = self.directory.save(step, write, staged) if self.accelerator.is_main_process else None
        self.accelerator.wait_for_everyone()
        return path

    def finish_saving(self) -> Path | None:
        """The save running in the background, if any, waited for on every process and then put in place; its path
        on process 0. A run that dies first leaves it hidden: resume takes the checkpoint before it."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        pending.writing.result()  # this process's shards are on disk (or the error of writing them)
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            path = self.directory.save(
                pending.step, partial(mark_complete, state=pending.trainer_state), pending.staged
            )
        self.accelerator.wait_for_everyone()
        return path

    def save_final(self) -> None:
        """The trained model alone (`checkpoints/final`): a model directory, not resumable."""
        weights = self.state.gather_weights()
        if self.accelerator.is_main_process:
            self._save_model(self.directory.path / FINAL, weights)

    def final_size(self) -> int | None:
        """Bytes of the final model directory's weights file (a LoRA run's holds only what trained); None off
        process 0."""
        weights = self.directory.path / FINAL / WEIGHTS
        return weights.stat().st_size if weights.is_file() else None

    def _save_model(self, directory: Path, weights: dict | None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        save_pretrained(directory, model, self.tokenizer, self.cfg, weights, self.adapter_base)

    def _load_weights(self, directory: Path) -> None:
        try:
            self.state.load_weights(Path(directory) / WEIGHTS, partial=self.adapter_base is not None)
        except (RuntimeError, FileNotFoundError) as err:
            raise weights_mismatch(directory, err) from err

    def restore(self, directory: Path) -> dict:
        """Weights, optimizer, scheduler, grad scaler and RNG states of a resumable checkpoint; returns the progress
        the trainer handed to `save`."""
        progress = json.loads((directory / TRAINER_STATE).read_text())
        self._check_compatible(directory, progress)
        state = torch.load(directory / TRAINING_STATE, weights_only=True)
        if is_sharded(directory):  # any number of processes wrote it: DCP hands each its part
            try:
                load_sharded(directory, self.model, self.optimizer.optimizer, partial=self.adapter_base is not None)
            except RuntimeError as err:
                raise weights_mismatch(directory, err) from err
        else:
            self._load_weights(directory)
            self.state.load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self._restore_rng(state["rng"])
        log.info("resumed from %s at step %d", directory, progress["step"])
        return progress

    def _check_compatible(self, directory: Path, progress: dict) -> None:
        problems = []
        if progress["global_batch_size"] != self.global_batch_size:
            problems.append(f"train.global_batch_size {progress['global_batch_size']} -> {self.global_batch_size}")
        if AutoTokenizer.from_pretrained(directory / TOKENIZER).get_vocab() != self.tokenizer.get_vocab():
            problems.append("the tokenizer differs from the checkpoint's")
        self._check_same_base(directory, problems)
        if problems:
            raise ResumeMismatchError(
                f"cannot resume exactly from {directory}: {'; '.join(problems)}. Resume with the checkpoint's "
                "config, or start a new run with train.init_from. See TROUBLESHOOTING.md#resume-mismatch."
            )

    def _check_same_base(self, directory: Path, problems: list[str]) -> None:
        """A LoRA checkpoint resumes only onto the base its adapters were trained on, storing what this run trains."""
        adapters = directory / ADAPTER_BASE
        if adapters.is_file() != (self.adapter_base is not None):
            problems.append(f"train.lora.enabled={self.adapter_base is not None} but the checkpoint was "
                            f"{'' if adapters.is_file() else 'not '}trained with LoRA")  # fmt: skip
            return
        if self.adapter_base is None:
            return
        saved = json.loads(adapters.read_text())["fingerprint"]
        if saved != self.adapter_base.fingerprint:
            raise base_mismatch(directory, saved, self.adapter_base.fingerprint)
        stored = stored_names(directory)
        if stored != self.adapter_base.stored:
            different = sorted(stored ^ self.adapter_base.stored)
            problems.append(f"the checkpoint stores other trained tensors than this run trains ({different[:4]}): "
                            "train.lora (target_modules, vision, modules_to_save) or train.stage differ")  # fmt: skip

    def _restore_rng(self, saved: list[dict] | dict) -> None:
        saved = [saved] if isinstance(saved, dict) else saved  # checkpoints from before per-process RNG
        world_size, rank = self.accelerator.num_processes, self.accelerator.process_index
        if len(saved) != world_size:
            log.warning(
                "the checkpoint holds RNG states of %d process(es), this run has %d: dropout and sampling continue "
                "from process 0's state, so the run will not repeat the interrupted one exactly",
                len(saved),
                world_size,
            )
        restore_rng_states(saved[rank] if len(saved) == world_size else saved[0])
