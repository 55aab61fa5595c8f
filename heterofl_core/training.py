"""Local training on a client and the server's sBN statistics pass (spec sections 4 and 7)."""

from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .config import ExperimentConfig
from .losses import cross_entropy, masked_logits

Batch = tuple[torch.Tensor, torch.Tensor]  # (input, target)


@dataclass
class TrainStats:
    """Sums over a client's local steps, kept as tensors so nothing waits on the device."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: int

    @classmethod
    def zero(cls, device: torch.device) -> TrainStats:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device), 0)

    def add(self, other: TrainStats) -> TrainStats:
        return TrainStats(self.loss_sum + other.loss_sum, self.correct + other.correct, self.count + other.count)


def make_optimizer(params: Iterable[nn.Parameter], cfg: ExperimentConfig, lr: float) -> torch.optim.Optimizer:
    """A fresh SGD for one client and round, at the server's current learning rate."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def scheduled_lr(cfg: ExperimentConfig, round_: int) -> float:
    """MultiStepLR stepped once per round: rounds 1..m1 at lr, then lr * gamma, ..."""
    return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if m < round_)


def train_client(model: nn.Module, batches: Callable[[], Iterable[Batch]], mask: torch.Tensor | None,
                 cfg: ExperimentConfig, lr: float) -> TrainStats:
    """``cfg.local_epochs`` passes of SGD over a client's batches (masked cross-entropy,
    gradient-norm clipping every step). ``batches()`` gives one epoch's batches."""
    model.train()
    optimizer = make_optimizer(model.parameters(), cfg, lr)
    stats = TrainStats.zero(next(model.parameters()).device)
    for _ in range(cfg.local_epochs):
        for x, y in batches():
            logits = model(x)
            loss = cross_entropy(logits, y, mask, cfg.mask_fill)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optimizer.step()
            with torch.no_grad():
                stats = stats.add(TrainStats(loss.detach() * y.numel(), correct_predictions(logits, y, mask, cfg.mask_fill), y.numel()))
    return stats


def correct_predictions(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, fill: str) -> torch.Tensor:
    """How many (masked) predictions hit their target, as a tensor (no host round trip)."""
    if mask is not None:
        logits = masked_logits(logits, mask, fill)
    return (logits.argmax(-1) == target).sum()


@torch.inference_mode()
def sbn_statistics(model: nn.Module, inputs: Iterable[torch.Tensor], batch_size: int | None = None) -> nn.Module:
    """Static BN (spec section 4): fill the running statistics of a fresh full-width model
    (built with ``track_running_stats=True``, ``momentum=None``) with the cumulative
    average of per-batch statistics over ``inputs`` (the whole training set), in train
    mode without gradients; return it in eval mode.

    ``batch_size``: the batch size of the statistics, as the authors' loader gives it
    (the training batch size). Each input chunk then counts as ``len(x) // batch_size``
    batches, each normalised and counted on its own, exactly as if they were fed one
    by one, in one large forward pass (a chunk's last ``len(x) % batch_size`` samples
    form one more, smaller batch). ``None``: every input chunk is one batch.

    Only the BatchNorm layers are put in train mode: they are the layers whose train
    mode collects statistics, and every other layer of the global model computes the
    same either way (its Scaler divides by 1, the image models have no dropout), so
    the statistics are the same and the Scaler's pass over the activations is saved.
    """
    model.eval()
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for module in norms:
        assert module.momentum is None and module.track_running_stats, "sBN needs a tracking, momentum=None BN"
        module.reset_running_stats()
        module.train()
    with _batch_statistics(norms, batch_size):
        for x in inputs:
            model(x)
    return model.eval()


@contextmanager
def _batch_statistics(norms: list[nn.BatchNorm2d], batch_size: int | None) -> Iterator[None]:
    """Within the block, ``norms`` treat their input as batches of ``batch_size`` (ghost batches)."""
    if batch_size is None:
        yield
        return
    for norm in norms:
        norm.forward = _GhostBatches(norm, batch_size)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


class _GhostBatches:
    """Train-mode forward of a momentum-None BatchNorm over consecutive batches of ``batch_size``
    given as one tensor: BatchNorm's own kernel on each batch, with the factor 1 / (batches so
    far) that momentum None uses, so the statistics and outputs are those of feeding the
    batches one by one. Only the small per-batch calls remain; the layers between run on the
    whole tensor (and each batch's activations stay in cache for its BatchNorm)."""

    def __init__(self, norm: nn.BatchNorm2d, batch_size: int) -> None:
        self.norm, self.batch_size, self.seen = norm, batch_size, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        out = torch.empty_like(x)  # keeps channels-last
        save_mean = x.new_empty(x.shape[1])
        save_invstd = x.new_empty(x.shape[1])
        for part, dest in zip(x.split(self.batch_size), out.split(self.batch_size)):
            self.seen += 1
            torch.ops.aten.native_batch_norm.out(part, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                                 True, 1.0 / self.seen, norm.eps,
                                                 out=dest, save_mean=save_mean, save_invstd=save_invstd)
        norm.num_batches_tracked.fill_(self.seen)
        return out


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
    mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1))
    mallopt(m_mmap_max, ctypes.c_int(0))
