"""torch.compile policy: which parts of the model compile, and how shapes stay dynamic.

Modes (`train.compile`):
- `off`: eager.
- `core`: `VisionLanguageModel._forward_core` compiles whole, `fullgraph=True` (merge, vision, projector, LM,
  loss in one graph; any graph break is an error, not a silent slowdown).
- `regional`: each vision block and each LM decoder layer compiles on its own (`fullgraph=True`). Identical
  blocks share one compiled graph, so the first step compiles one block, not the model: much lower latency.

Batch and sequence dimensions are marked dynamic on the tensors that cross each compiled boundary, from
eager code (marking inside a compiled frame is an error), so changing batch size or sequence length reuses
the graph instead of recompiling; hidden and head sizes stay static so kernels specialise on them.
Compiling swaps `forward` functions on the existing modules instead of wrapping modules, so parameter
names, state dicts and checkpoints never gain an `_orig_mod.` prefix.
"""

import logging
from typing import Any, Iterable

import torch
from torch import nn

from vlm.compat import tolerate_unbound_cache_guards
from vlm.config import ConfigError

log = logging.getLogger(__name__)

MODES = ("off", "core", "regional")
# Inductor's CPU layout optimisation makes convolutions channels-last, but fake tensors cannot predict a
# convolution's output strides over an unbacked (or dynamic) image count (see mark_image_count_unbacked), and the
# compiled code's stride check then fails at run time: for every graph that holds the vision tower's convolutions.
CONV_OPTIONS = {"layout_optimization": False}


def mark_batch_and_sequence_dynamic(*tensors: torch.Tensor | None) -> None:
    """[batch, seq, ...] tensors: dims 0 and 1 dynamic (a no-op in eager mode)."""
    for tensor in tensors:
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
            if tensor.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(tensor, 1)


def mark_image_count_unbacked(pixel_values: torch.Tensor) -> None:
    """[num_images, C, H, W]: the image count becomes an unbacked size, one the graph never guards on.

    A backed (merely dynamic) image count gets guarded by the CPU convolution's backend choice, which
    tests `num_images >= 16` for stride-1 convs (one graph below 16 images, another from 16 on) and
    `num_images > 1`. Unbacked, the compiled core serves any image count; `min=1` (torch >= 2.12) because an
    unbacked size is otherwise assumed >= 2 and a batch of one image would fail.
    """
    torch._dynamo.decorators.mark_unbacked(pixel_values, 0, min=1)


def _mark_block_inputs(hidden: torch.Tensor, args: Iterable[Any], kwargs: dict, sequence: bool) -> None:
    """Mark what enters a block: dim 0 (batch) of every tensor; with `sequence`, also the dims as long
    as the hidden states' sequence: positions [B, T], hidden [B, T, H] and rotary cos/sin [B, T, D]
    (their last dim, a feature size, stays static) and a mask [B, 1, T, T] (query and key length)."""
    seq_len = hidden.shape[1] if sequence and hidden.dim() >= 3 else None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, tuple):  # rotary (cos, sin)
            tensors += [v for v in value if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        if tensor.dim() == 0:
            continue
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
        last = tensor.dim() - 1 if tensor.dim() == 3 else tensor.dim()
        for dim in range(1, last):
            if tensor.shape[dim] == seq_len:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


def _compile_block(block: nn.Module, sequence: bool, options: dict | None = None) -> None:
    """Compile `block.forward` in place; inputs are marked dynamic first, in eager code.

    Without gradients (generation, with its KV cache objects) the block runs eagerly: decoding is
    not what the compiled training step is for, and cache updates would break the full graph.
    """
    eager_forward = block.forward
    compiled_forward = torch.compile(eager_forward, fullgraph=True, options=options)

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled() or kwargs.get("past_key_values") is not None:
            return eager_forward(*args, **kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        _mark_block_inputs(hidden, args, kwargs, sequence)
        return compiled_forward(*args, **kwargs)

    block.forward = forward


def compilable_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The vision blocks regional compile compiles: a container's members rather than the container, because dynamo
    does not compile a torch.nn.Sequential's own forward (torch's code): a ResNet's `layer1` would stay eager."""
    return [m for block in vision_blocks(backbone) for m in (block if isinstance(block, nn.Sequential) else [block])]


def vision_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a timm backbone: ViT-style `blocks`, `stages`, or ResNet `layer1..4`."""
    for name in ("blocks", "stages"):
        container = getattr(backbone, name, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            return list(container)
    layers = [getattr(backbone, f"layer{i}", None) for i in range(1, 5)]
    return [layer for layer in layers if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity)]


def lm_layers(lm: nn.Module) -> list[nn.Module]:
    layers = getattr(lm.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"train.compile=regional: cannot find the decoder layers of {type(lm).__name__} (base_model.layers)"
        )
    return list(layers)


def missing_cpu_compiler() -> str | None:
    """Why inductor cannot build its C++ CPU kernels on this machine (no C++ compiler found), or None."""
    from torch._inductor import cpp_builder  # imported here: loading inductor is slow and eager runs never need it

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as err:  # InvalidCxxCompiler, or a platform-specific compiler check
        return f"{type(err).__name__}: {err}".strip()
    return None


def mode_for_device(mode: str, device: torch.device) -> str:
    """`mode`, or `off` with a warning when compiling for the CPU is impossible here, so a default config that
    compiles still trains on a machine without a C++ compiler instead of failing at the first step."""
    if mode == "off" or mode not in MODES or device.type != "cpu":
        return mode  # an unknown mode is reported by apply_compile
    reason = missing_cpu_compiler()
    if reason is None:
        return mode
    log.warning(
        "train.compile=%s needs a C++ compiler for CPU kernels and none was found (%s); training eager instead. "
        "Install g++ (or set CXX), or set train.compile=off to silence this. "
        "See TROUBLESHOOTING.md#no-c-compiler-for-cpu-compile.", mode, reason.splitlines()[0],
    )  # fmt: skip
    return "off"


def apply_compile(model: nn.Module, mode: str) -> dict[str, int]:
    """Apply `mode` to a VisionLanguageModel in place; returns what was compiled, per part (`regional`: the vision
    blocks its feature layer runs, or the whole tower when it runs none, and the LM layers; `core`: the one core).
    No part is left to run eager unseen."""
    if mode not in MODES:
        raise ConfigError(f"train.compile={mode!r} is not one of: {', '.join(MODES)}")
    if mode != "off":
        tolerate_unbound_cache_guards()
    if mode == "core":
        model._forward_core = torch.compile(model._forward_core, fullgraph=True, options=CONV_OPTIONS)
        return {"core": 1}
    if mode == "off":
        return {}
    blocks, layers = model.vision.blocks_in_use(), lm_layers(model.lm)
    for layer in layers:
        _compile_block(layer, sequence=True)
    if not blocks:  # a tower that runs no repeated block is one region itself
        _compile_block(model.vision, sequence=False, options=CONV_OPTIONS)
        return {"vision_tower": 1, "lm_layers": len(layers)}
    for block in blocks:
        _compile_block(block, sequence=False)
    return {"vision_blocks": len(blocks), "lm_layers": len(layers)}
