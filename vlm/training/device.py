"""Device facts the trainer needs: allocator settings, memory in use."""

import ctypes
import ctypes.util
import logging
import os
import resource
import sys

import torch

log = logging.getLogger(__name__)


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


# glibc mallopt parameters (malloc.h), the largest mmap threshold glibc accepts on 64-bit, and the
# largest value mallopt's C int takes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAX_MMAP_THRESHOLD = 32 << 20
_MAX_INT = 2**31 - 1


def configure_cpu_allocator(keep_freed_bytes: int) -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS after every step.

    By default glibc serves each block over ~128 KiB-32 MiB with its own mmap and returns the top
    of the heap once 128 KiB are free. A training step frees all its activations, so the next step
    maps them again and the kernel zero-fills every page on first touch: on a 2-core VM that cost
    10-30% of a CPU step (bench_small 0.94 s -> 0.77 s). Raising both thresholds keeps the pages in
    the heap. `keep_freed_bytes` = 0 leaves glibc's defaults. Returns whether it took effect
    (Linux with glibc only; other allocators such as jemalloc/tcmalloc already cache memory).
    """
    if keep_freed_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, min(keep_freed_bytes, _MAX_INT))
    if not ok:
        log.warning(
            "glibc rejected the allocator settings (train.cpu_keep_freed_bytes=%d); CPU steps may page-fault. "
            "See TROUBLESHOOTING.md#slow-cpu-steps-from-page-faults",
            keep_freed_bytes,
        )
    return bool(ok)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last call, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
