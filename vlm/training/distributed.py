"""Processes: how a run is launched, and what its processes must agree on to stay in step.

torchrun or `accelerate launch` start the processes; accelerate tells each its rank. On top of that:
- `build_accelerator`: without CUDA, processes use gloo on CPU (accelerate only does so when asked
  for the CPU), and FSDP comes from accelerate's plugin (on CPU too: vlm/compat.py);
- `prepare`: wraps model and optimizer; DDP broadcasts no buffers in the forward, so a forward issues
  no collective and a forward OOM on one process cannot leave the others waiting;
- `builds_empty_model`: under FSDP2 with accelerate's `fsdp_cpu_ram_efficient_loading`, processes other than 0
  build the model without its values and `prepare` fills their shards from process 0's tensors;
- `check_launch`: a launch that asked for N processes but runs alone is an error, not a quiet single run;
- `Agreement`: the small decisions every process must take alike, or their collectives stop matching
  and the job hangs: how many micro-batches a step has, and whether any process ran out of memory.
  They go over a gloo group, so the flags never wait for (or stall) the GPU stream.
"""

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils.modeling import get_non_persistent_buffers
from torch.nn.parallel import DistributedDataParallel

from vlm.compat import enable_fsdp_on_cpu, load_unsharded_buffers_from_process_0
from vlm.config import ConfigError
from vlm.errors import UserError
from vlm.models.lora import LoraSettings

log = logging.getLogger(__name__)


class LaunchError(UserError, RuntimeError):
    pass


def build_accelerator(device: str, mixed_precision: str) -> Accelerator:
    """`train.device` and `train.mixed_precision`, checked against this machine."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if mixed_precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("train.mixed_precision=fp16 needs CUDA (its grad scaler); use bf16 on CPU")
    cpu = device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    check_launch(accelerator)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        enable_fsdp_on_cpu(accelerator)
    return accelerator


def check_quantized_base(lora: LoraSettings, accelerator: Accelerator) -> None:
    """QLoRA runs on one process or under DDP: FSDP would have to shard bitsandbytes' packed weights."""
    if lora.quantize_base and accelerator.is_fsdp2:
        raise ConfigError(
            f"train.lora.quantize_base={lora.quantize_base} with FSDP: the quantized base is not sharded here. Launch "
            "QLoRA with DDP (--config_file configs/accelerate/ddp.yaml): a 4-bit base is an eighth of its fp32 size "
            "on each process. See TROUBLESHOOTING.md#qlora-needs-bitsandbytes."
        )


def loads_from_first_process(accelerator: Accelerator) -> bool:
    """FSDP2 with accelerate's `fsdp_cpu_ram_efficient_loading` (configs/accelerate/fsdp.yaml) on several processes:
    process 0 alone builds (or loads) the whole model, and `prepare` hands each process its shard of it."""
    return (
        accelerator.is_fsdp2
        and accelerator.num_processes > 1
        and bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading)
    )


def builds_empty_model(accelerator: Accelerator) -> bool:
    """Whether this process builds the model without its values (vlm/build.py), to receive process 0's."""
    return loads_from_first_process(accelerator) and not accelerator.is_main_process


def prepare(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Wrap (DDP) or shard (FSDP) the model, after compile and before training; returns (model, optimizer).

    When process 0 alone built the model, accelerate broadcasts its parameters and persistent buffers tensor by
    tensor while sharding them, but keeps each process's own non-persistent buffers (rotary frequencies): those
    come from process 0 first."""
    if loads_from_first_process(accelerator):
        broadcast_non_persistent_buffers(model, accelerator.device)
        load_unsharded_buffers_from_process_0()
    model, optimizer = accelerator.prepare(model, optimizer)
    if isinstance(model, DistributedDataParallel):
        # Buffers are synced once, at wrapping; re-broadcasting them at each forward would put a collective
        # in the forward. Only BatchNorm statistics change later, and those are per process by nature.
        model.broadcast_buffers = False
    return model, optimizer


def broadcast_non_persistent_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Process 0's values of the buffers a state dict leaves out, into every process's model."""
    for name in sorted(get_non_persistent_buffers(model, recurse=True, fqns=True)):
        buffer = model.get_buffer(name)
        sent = buffer.to(device)  # NCCL sends CUDA tensors only
        dist.broadcast(sent, src=0)
        buffer.copy_(sent)


def per_process_share(global_batch_size: int, world_size: int) -> int:
    """Samples each process takes of a step."""
    if global_batch_size % world_size:
        raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by {world_size} processes")
    return global_batch_size // world_size


def check_launch(accelerator: Accelerator) -> None:
    """Refuse a launch that asked for several processes and got one, or processes that each run alone."""
    asked = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate's simple launcher (`--cpu`, or no `--multi_gpu` on a machine without GPUs) starts one
    # process whatever --num_processes says; it sets MASTER_ADDR only when more were asked for.
    simple_launch = (
        "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ
    )
    if simple_launch or asked != accelerator.num_processes:
        got = accelerator.num_processes
        raise LaunchError(
            f"this launch asked for {'several' if simple_launch else asked} processes but runs as {got} "
            f"({accelerator.distributed_type}). On a machine without GPUs `accelerate launch --cpu` starts one process: "
            "use `torchrun --nproc_per_node N train.py ...` or `accelerate launch --multi_gpu --num_processes N "
            "train.py ...`. See TROUBLESHOOTING.md#launch-runs-one-process."
        )


def describe(accelerator: Accelerator) -> str:
    backend = accelerator.state.backend or "none"
    return (f"world_size {accelerator.num_processes}: process {accelerator.process_index} (local process "
            f"{accelerator.local_process_index} on its machine; {accelerator.distributed_type}, backend {backend}, "
            f"device {accelerator.device})")  # fmt: skip


def log_to_own_file(run_dir: Path, rank: int) -> None:
    """Processes other than the first write their log to train_rank<N>.log instead of sharing the main one."""
    if rank == 0:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        if Path(handler.baseFilename).parent == Path(run_dir).resolve():
            own = logging.FileHandler(Path(handler.baseFilename).with_name(f"train_rank{rank}.log"))
            own.setFormatter(handler.formatter)
            own.setLevel(handler.level)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(own)


class Agreement:
    """Decisions every process takes alike: all-gathered integers over a gloo group (no GPU sync)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.group = None
        if world_size > 1:  # a collective call: every process builds its Agreement at the same point
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def gather(self, value: int) -> list[int]:
        """Every process's value, by rank."""
        if self.world_size == 1:
            return [value]
        mine = torch.tensor([value], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        return [int(v) for v in everyone]

    def max(self, value: int) -> int:
        return max(self.gather(value))
