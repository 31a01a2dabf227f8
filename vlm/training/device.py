"""Device facts the trainer needs: moving batches, allocator settings, memory in use."""

import logging
import os
import resource

import torch

log = logging.getLogger(__name__)


def move_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def configure_cuda_allocator(settings: str) -> None:
    """Set PYTORCH_CUDA_ALLOC_CONF (e.g. expandable_segments:True) unless the user already did.

    Must run before CUDA initialises. Expandable segments let the caching allocator grow blocks
    in place, which avoids the fragmentation that makes long runs OOM with free memory left.
    """
    if not settings or "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        log.warning("CUDA is already initialised; train.cuda_alloc_conf=%r cannot take effect", settings)
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = settings


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last call, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
