"""Tuning for the machine a run is on, kept apart from the method: memory layouts, CPU threads,
the host heap, and workarounds for known PyTorch bugs. None of it changes a result.

Layouts are per model (:func:`fast_layout`); threads and the heap are process-wide, so only a
program's entry point sets them (``heterofl run``, ``reproduce``, ``bench``), never a library call.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn

NEVER_TRIM, NO_MMAP = 2**31 - 1, 0  # reuse_host_memory's two glibc settings: trim threshold, mmap count
# ... in glibc's environment spelling, for child processes (notebook kernels)
HOST_MEMORY_ENV = {"MALLOC_TRIM_THRESHOLD_": str(NEVER_TRIM), "MALLOC_MMAP_MAX_": str(NO_MMAP)}


def fast_layout(model: nn.Module, training: bool = True) -> nn.Module:
    """Channels-last weights (in place) where safe: oneDNN and cuDNN run convolution, BatchNorm
    and pooling fastest on NHWC activations, which channels-last weights select (measured: a
    batch-10 step of the MNIST CNN at width a takes 10 ms instead of 15 on a 2-core CPU).
    A no-op for models without 4-D weights; see :func:`training_layout` for training."""
    return model.to(memory_format=training_layout(model) if training else torch.channels_last)


def training_layout(model: nn.Module) -> torch.memory_format:
    """NHWC for training unless the model has a strided convolution.

    PyTorch 2.14's CPU weight gradient of a strided 1x1 convolution on NHWC activations
    corrupts the heap for odd batch sizes with 2 threads (ResNet18's shortcuts, non-iid
    clients' last batches); forward passes are unaffected, so evaluation is always NHWC.
    """
    strided = any(getattr(m, "stride", (1, 1)) != (1, 1) for m in model.modules()
                  if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 4)
    return torch.contiguous_format if strided else torch.channels_last


def set_cpu_threads(threads: int | None) -> None:
    """Torch's intra-op CPU threads (None: torch's choice). On a CPU shared with other busy
    processes, 1 thread is often faster: a parallel region waits for its slowest thread."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)


def reuse_host_memory() -> None:
    """Keep freed host memory in the process for reuse (glibc only; elsewhere a no-op).

    A process-wide setting: only a program's entry point opts in (``heterofl run``, ``bench``; on
    by default there), never a library call.

    By default glibc serves blocks above 128 KiB to 32 MiB with fresh pages from the OS
    and hands them back when freed, so every batch's activations and every new state
    tensor arrive as fresh pages: hundreds of page faults per MNIST sample, as costly as
    the convolutions, and 13 ms to allocate one 34 MB embedding. Serving every block
    from the heap and never trimming it reuses the pages (as PyTorch's CUDA allocator
    caches blocks); the process keeps its peak memory until it exits.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    mallopt(m_trim_threshold, ctypes.c_int(NEVER_TRIM))
    mallopt(m_mmap_max, ctypes.c_int(NO_MMAP))
