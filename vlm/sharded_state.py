"""Sharded checkpoints: each process writes and reads only its own part of the weights and the optimizer state,
with torch.distributed.checkpoint (DCP), so nothing is gathered whole onto one process (a 7B LM with Adam state is
about 84 GB).

A checkpoint's `dcp/` folder holds `{"model": ..., "optimizer": ...}` keyed by parameter name, whatever the
layout that wrote it: DCP reshards on load, so a checkpoint written by 2 FSDP processes resumes on 1 process (plain
tensors) or on any other number, and a model directory reader can take the weights alone on one process without a
process group (`python -m vlm.export`, `load_pretrained`). vlm/checkpoint.py decides when a checkpoint is sharded.
"""

from collections.abc import Collection
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

DCP_DIR = "dcp"
MODEL, OPTIMIZER = "model", "optimizer"


def is_sharded(directory: Path) -> bool:
    return (Path(directory) / DCP_DIR / ".metadata").is_file()


def saved_names(directory: Path) -> set[str]:
    """The names of the model tensors a sharded checkpoint holds (read from its metadata)."""
    metadata = dcp.FileSystemReader(str(Path(directory) / DCP_DIR)).read_metadata()
    prefix = f"{MODEL}."
    return {key.removeprefix(prefix) for key in metadata.state_dict_metadata if key.startswith(prefix)}


def save_sharded(directory: Path, model: torch.nn.Module, optimizer, stored: Collection[str] | None = None) -> None:
    """A collective: every process writes its shards into `directory/dcp`. `stored`: the model tensors to keep
    (a LoRA run's: what trains); default all."""
    dcp.save(_state(model, optimizer, stored), checkpoint_id=str(Path(directory) / DCP_DIR), no_dist=_alone())


def start_saving_sharded(
    directory: Path, model: torch.nn.Module, optimizer, stored: Collection[str] | None, group
) -> Future:
    """`save_sharded` in the background: every process copies its shards to CPU memory now (the training may
    change them from the next step on) and a thread writes the copy; the future completes when this process's part
    and, on process 0, the metadata are on disk. `group`: a gloo group of its own, so that the thread's collectives
    never interleave with the training's."""
    saving = dcp.async_save(
        _state(model, optimizer, stored), checkpoint_id=str(Path(directory) / DCP_DIR), process_group=group,
        no_dist=_alone(),
    )  # fmt: skip
    return getattr(saving, "upload_completion", saving)  # an AsyncSaveResponse when the stager is asynchronous


def _state(model: torch.nn.Module, optimizer, stored: Collection[str] | None) -> dict:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if stored is not None:
        model_state = {name: tensor for name, tensor in model_state.items() if name in stored}
    return {MODEL: model_state, OPTIMIZER: optimizer_state}


def load_sharded(directory: Path, model: torch.nn.Module, optimizer=None, partial: bool = False) -> None:
    """The checkpoint's weights (and optimizer state) into this run's layout: its own shards under FSDP, whole
    tensors otherwise. Every tensor of the model must be there unless `partial` (a LoRA checkpoint). A collective
    when a process group exists; without one (a tool reading a model directory) this process reads everything."""
    stored = saved_names(directory)
    if optimizer is None:
        model_state, optimizer_state = get_model_state_dict(model), None
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
    missing = sorted(set(model_state) - stored)
    if missing and not partial:
        raise RuntimeError(f"missing keys {missing[:5]} (TROUBLESHOOTING.md#sharded-checkpoints)")
    state = {MODEL: {name: tensor for name, tensor in model_state.items() if name in stored}}
    if optimizer_state is not None:
        state[OPTIMIZER] = optimizer_state
    dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR), no_dist=_alone())
    options = StateDictOptions(strict=not partial)
    if optimizer is None:
        set_model_state_dict(model, state[MODEL], options=options)
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state[OPTIMIZER], options=options
        )


def _alone() -> bool:
    """No process group (one process, or a tool): DCP reads and writes everything here, without collectives."""
    return not (dist.is_available() and dist.is_initialized())
