"""Weights and optimizer state to save and load, the same files whether the model is plain, DDP or FSDP.

Under FSDP each process holds a shard of every parameter and of its optimizer state. Saving gathers
the full tensors to process 0 (collectives: every process calls these functions), so a checkpoint is
the same consolidated `model.safetensors` + `training_state.pt` as without FSDP and loads on one
process; loading hands each process its shard of the full tensors.
"""

from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ModelState:
    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.sharded = accelerator.is_fsdp2

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP a collective: the full weights, on process 0's CPU. None: save the module itself."""
        return get_model_state_dict(self.model, options=FULL) if self.sharded else None

    def load_weights(self, path: Path) -> None:
        if not self.sharded:
            device = self.accelerator.device  # safetensors takes "cpu", not the "cpu:0" of a multi-process CPU run
            load_model(
                self.accelerator.unwrap_model(self.model),
                str(path),
                device="cpu" if device.type == "cpu" else str(device),
            )
            return
        full = load_file(str(path))
        tied = {n for n, _ in self.model.named_parameters(remove_duplicate=False)} - {
            n for n, _ in self.model.named_parameters()
        }
        missing, unexpected = set_model_state_dict(
            self.model, full, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        missing = set(missing) - tied  # a tied weight is stored once
        if missing or unexpected:
            raise RuntimeError(f"missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")

    def optimizer_state(self) -> dict:
        """Under FSDP a collective: the full state, keyed by parameter name, on process 0."""
        if not self.sharded:
            return self.optimizer.state_dict()
        return get_optimizer_state_dict(self.model, self.optimizer.optimizer, options=FULL)

    def load_optimizer_state(self, state: dict) -> None:
        if not self.sharded:
            self.optimizer.load_state_dict(state)
            return
        set_optimizer_state_dict(
            self.model, self.optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
