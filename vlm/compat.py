"""Every workaround for a dependency's version or bug, in one place.

Each says which versions it is for, the upstream issue or the symptom that needed it, and how we will know it can
go: `tests/test_compat.py` has a test per workaround that fails once the dependency no longer needs it (where a test
can tell in seconds), or a version gate turns it off. Nothing else in vlm patches, probes or works around a
library; code that needs one of these calls it from here.
"""

import logging

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, fsdp_utils
from torch import nn
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


# ----- torch ---------------------------------------------------------------------------------------


def tolerate_unbound_cache_guards() -> None:
    """A cached graph whose shape guards cannot be evaluated is a cache miss, not a crash (torch 2.14 inductor).

    Inductor can store a backward graph in its FX graph cache with a guard on a symbol that is not among the
    backward's inputs, written with the forward argument's name (packed batches: `L['attention_mask'].size()[0]`,
    the row count). A later lookup of that entry, in a process whose AOTAutograd cache misses (a changed forward,
    another run sharing the cache directory), evaluates the guard with the backward's inputs only and fails the
    compile with `KeyError: 'attention_mask'`. Such a guard can never hold for the arguments given, so the entry
    does not match and the graph is compiled anew. Process-wide and idempotent. Found on 2.14.1 (2.12.0 stores no
    such guard: `make test-torch`; 2.13 not checked); the code involved
    (`evaluate_guards_expression`, the FX graph cache lookup, the guard printer's fallback to the forward's source
    names) is the same in 2.15.0; no upstream issue found. Still needed while the packing compile test
    (tests/test_packing.py) sees the KeyError with this patch removed. See
    TROUBLESHOOTING.md#keyerror-from-inductors-graph-cache.
    """
    shape_env = torch.fx.experimental.symbolic_shapes.ShapeEnv
    evaluate = shape_env.evaluate_guards_expression
    if getattr(evaluate, "tolerates_unbound", False):
        return

    def evaluate_or_miss(self, code: str, args) -> bool:
        try:
            return evaluate(self, code, args)
        except (KeyError, NameError):
            return False

    evaluate_or_miss.tolerates_unbound = True
    evaluate_or_miss.unpatched = evaluate  # tests show the patch is still needed with it
    shape_env.evaluate_guards_expression = evaluate_or_miss


def is_out_of_memory(err: BaseException) -> bool:
    """torch raises `torch.OutOfMemoryError` for CUDA but a plain RuntimeError ("DefaultCPUAllocator: can't allocate
    memory", a CAFFE_ENFORCE in c10's alloc_cpu.cpp) when the CPU allocator fails (2.14.1; the same code in 2.15.0),
    and CUDA builds before the error class (pytorch/pytorch#83146) said "out of memory" in a RuntimeError: the message
    is all there is to go by. Still needed while tests/test_compat.py sees a CPU allocation failure as RuntimeError."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def safetensors_device(device: str | torch.device) -> str:
    """safetensors' `load_model(device=...)` takes "cpu" but refuses the indexed "cpu:0" that a multi-process CPU
    run's accelerator reports ("device cpu:0 is invalid", safetensors 0.8.0). Still needed while tests/test_compat.py
    sees that error."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


# ----- transformers --------------------------------------------------------------------------------


def enable_lm_activation_checkpointing(lm: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model's layers. transformers 5.23.0 renamed
    `gradient_checkpointing_enable` to `activation_checkpointing_enable`; the old name is an alias that warns
    (FutureWarning) and goes in 6.0, and 5.0-5.22 have only the old name. A feature gate: drop the fallback once
    pyproject.toml asks for transformers >= 5.23."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable({"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def encode_plain_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of `text` with special-token strings kept as characters (`split_special_tokens=True`), fast.

    transformers (5.x; `TokenizersBackend._encode_plus` in 5.24) implements `split_special_tokens` by setting the Rust
    backend's `encode_special_tokens` flag before each encode; going to the backend directly with that flag gives the
    same ids in about a third of the time (0.042 -> 0.015 ms per short string; measured in a whole sample's encoding:
    0.27 -> 0.15 ms), most of the data preparation of short samples. The flag stays set on the backend, which is
    harmless: transformers sets it again on each of its own calls. A tokenizer without a Rust backend (custom code)
    takes the documented call. tests/test_compat.py checks that both give the same ids and that transformers resets
    the flag; it can go when transformers' own call costs no more (measure with bench/batching.py)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    backend.encode_special_tokens = True
    return backend.encode(text, add_special_tokens=False).ids


# ----- accelerate ----------------------------------------------------------------------------------


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """FSDP2 on CPU processes (gloo), through accelerate's own FSDP plugin.

    accelerate (every release up to 1.15.0, the newest) turns `ACCELERATE_USE_FSDP` into DistributedType.FSDP only
    for accelerator devices (`AcceleratorState.__init__`: the FSDP switch sits in a branch for MULTI_GPU, MULTI_XPU,
    ... that leaves out MULTI_CPU), so a CPU launch stays MULTI_CPU and `prepare` would wrap the model in DDP. torch's
    FSDP2 shards on CPU over gloo too: switching the process state to FSDP, with the plugin built from the launcher's
    FSDP_* environment as accelerate builds it, makes `prepare` shard the model exactly as on GPUs, so CPU runs test
    the same path. Still needed while tests/test_compat.py sees a 2-process CPU launch left MULTI_CPU.
    """
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # Both shared states: a later AcceleratorState() copies PartialState's distributed type over its own.
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    log.info("FSDP%d on CPU (gloo) through accelerate's FSDP plugin", plugin.fsdp_version)


def load_unsharded_buffers_from_process_0() -> None:
    """accelerate's FSDP2 loading from process 0 (`fsdp_cpu_ram_efficient_loading`) for models with buffers.

    accelerate (1.15.0, the newest; `fsdp2_load_full_state_dict`) takes every entry of the sharded model's state dict
    for a DTensor and reads its `device_mesh`, but FSDP2 shards parameters only: a persistent buffer (BatchNorm's
    running statistics in a ResNet tower) stays a plain tensor and the load fails on every process with
    `AttributeError: 'Tensor' object has no attribute 'device_mesh'`. This loader does what accelerate's does for
    parameters (process 0 broadcasts each full tensor, every process keeps its shard, in the model's dtype) and
    broadcasts buffers whole. Process-wide and idempotent. Still needed while tests/test_compat.py sees accelerate's
    own loader fail on a BatchNorm model.
    """
    if fsdp_utils.fsdp2_load_full_state_dict is _load_full_state_dict:
        return
    fsdp_utils.fsdp2_load_full_state_dict = _load_full_state_dict


def _load_full_state_dict(accelerator, model: nn.Module, full_sd: dict, cpu_offload: bool = False) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    loaded = {}
    for name, target in model.state_dict().items():  # the same order on every process
        sharded = isinstance(target, DTensor)
        device = target.device_mesh.device_type if sharded else accelerator.device
        if accelerator.is_main_process:
            full = full_sd[name].detach().to(device=device, dtype=target.dtype).contiguous()
        else:
            full = torch.empty(target.shape, dtype=target.dtype, device=device)
        dist.broadcast(full, src=0)
        value = distribute_tensor(full, target.device_mesh, target.placements) if sharded else full
        loaded[name] = value.to("cpu") if cpu_offload else value
    model.load_state_dict(loaded, assign=True)


# ----- bitsandbytes --------------------------------------------------------------------------------

# bitsandbytes 0.50, on CPUs with AVX512-BF16, warns at import that the `kernels` package (which would download its
# CPU inference kernel from the hub) is missing; peft imports bitsandbytes whenever it is installed, so every run
# printed it. That kernel is kept off (`keep_4bit_layout`). Set here, before anything imports peft (vlm/__init__
# imports vlm.checkpoint, which imports this module, first).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def keep_4bit_layout(layer: nn.Module) -> None:
    """A bitsandbytes 0.50 Linear4bit never repacks its weights for the CPU inference kernel. On CPUs with
    AVX512-BF16 the first call in eval mode without gradients replaces the weight's data and statistics in place by
    that kernel's layout, which has no backward (training after an evaluation would then run on it) and fails on
    layers narrower than a 64-value block ("shape '[32, 0]' is invalid"). Still needed while tests/test_compat.py
    sees the layout change."""
    layer.support_avx512bf16_for_cpu = False


# ----- wandb ---------------------------------------------------------------------------------------


def log_table_with_images(run, table_key: str, table, images_key: str, images: list, step: int) -> None:
    """A wandb table and its rows' images, logged beside it as a list instead of in an image column: wandb (0.19 to
    0.31, the newest) writes a table's media cells as the bare string "Image" in the run's files (`Table.bind_to_run`;
    offline, the real table only reaches a staging folder outside the run directory until `wandb sync`;
    wandb/wandb#4611). Still needed while tests/test_compat.py finds "Image" in an offline run's table file."""
    run.log({table_key: table, images_key: images}, step=step)
