"""Local training on a client and the server's sBN statistics pass (spec sections 4 and 7)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim.sgd import sgd

from .config import ExperimentConfig
from .losses import cross_entropy, masked_logits
from .models.layers import StaticBatchNorm2d

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

    def metrics(self) -> dict[str, float]:
        """``train_loss`` and ``train_accuracy`` (%): means over the samples trained on; NaN when there
        were none (every sampled client sat the round out), not a made-up 0."""
        if self.count == 0:
            return {"train_loss": math.nan, "train_accuracy": math.nan}
        return {"train_loss": (self.loss_sum / self.count).item(),
                "train_accuracy": (self.correct / self.count * 100).item()}


def scheduled_lr(cfg: ExperimentConfig, round_: int) -> float:
    """MultiStepLR stepped once per round: rounds 1..m1 at lr, then lr * gamma, ..."""
    return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if m < round_)


@torch.no_grad()
def clip_grad_norms_(grads: Sequence[torch.Tensor], max_norm: float, per_client: bool = False) -> None:
    """``nn.utils.clip_grad_norm_`` on gradients, in place: scale them by
    min(1, max_norm / (total norm + 1e-6)). ``per_client``: every tensor's axis 0 indexes
    clients (a cohort), and each client's gradients are clipped by its own total norm."""
    flat = [g.flatten(1) if per_client else g.flatten() for g in grads]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dim=-1) for g in flat]), dim=0)
    clip = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # () or (K,)
    for g in grads:
        g.mul_(clip.view(-1, *[1] * (g.dim() - 1)) if per_client else clip)


@torch.no_grad()
def local_step(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor | None],
               cfg: ExperimentConfig, lr: float, per_client: bool = False) -> None:
    """One local step after the gradients (spec section 7): clip the gradient norm, then
    ``torch.optim.SGD``'s update (its functional form: momentum, weight decay), in place.

    The one definition of a client's step: :func:`train_client` applies it to one model's
    parameters, cohort training (cohort.py) to K clients' stacked parameters
    (``per_client``: axis 0 indexes clients; the update is elementwise, the clipping per client).
    ``momentum_buffers`` start as None (or zeros) and are filled in place, as SGD's state.
    """
    clip_grad_norms_(grads, cfg.clip_norm, per_client)
    sgd(params, grads, momentum_buffers, weight_decay=cfg.weight_decay, momentum=cfg.momentum, lr=lr,
        dampening=0.0, nesterov=False, maximize=False)


def train_client(model: nn.Module, batches: Callable[[], Iterable[Batch]], mask: torch.Tensor | None,
                 cfg: ExperimentConfig, lr: float) -> TrainStats:
    """``cfg.local_epochs`` passes of :func:`local_step` over a client's batches (masked
    cross-entropy; a fresh optimiser state every round). ``batches()`` gives one epoch's batches."""
    model.train()
    params = list(model.parameters())
    buffers: list[torch.Tensor | None] = [None] * len(params)
    stats = TrainStats.zero(params[0].device)
    for _ in range(cfg.local_epochs):
        for x, y in batches():
            logits = model(x)
            loss = cross_entropy(logits, y, mask, cfg.mask_fill)
            grads = list(torch.autograd.grad(loss, params))
            local_step(params, grads, buffers, cfg, lr)
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
    (the training batch size): each input chunk counts as consecutive batches of that
    size (its last may be smaller), exactly as if they were fed one by one. Models built
    with :class:`~heterofl_core.models.layers.StaticBatchNorm2d` do that in one forward
    pass per chunk (ghost batches); others are fed the batches one by one. ``None``:
    every input chunk is one batch.

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
    ghost = batch_size is not None and all(isinstance(module, StaticBatchNorm2d) for module in norms)
    try:
        for module in norms if ghost else ():
            module.ghost_batch = batch_size
        for x in inputs:
            for part in (x,) if ghost or batch_size is None else x.split(batch_size):
                model(part)
    finally:
        for module in norms if ghost else ():
            module.ghost_batch = None
    return model.eval()


def sbn_sums(model: nn.Module) -> dict[str, torch.Tensor]:
    """The statistics an sBN pass (:func:`sbn_statistics`) left in ``model`` as sums over its
    batches: per BatchNorm, the sum of the batch means, of the batch variances, and the number of
    batches. Passes over disjoint data (clients' own) combine by adding these (:func:`load_sbn_sums`)."""
    sums = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            batches = module.num_batches_tracked
            sums[f"{name}.running_mean"] = module.running_mean * batches
            sums[f"{name}.running_var"] = module.running_var * batches
            sums[f"{name}.num_batches_tracked"] = batches.clone()
    return sums


@torch.no_grad()
def load_sbn_sums(model: nn.Module, sums: dict[str, torch.Tensor]) -> nn.Module:
    """Set ``model``'s sBN statistics from added :func:`sbn_sums`: each the average over every
    batch of every pass, as one :func:`sbn_statistics` pass over all those batches gives (up to
    float rounding). Returns the model in eval mode."""
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            batches = sums[f"{name}.num_batches_tracked"]
            module.running_mean.copy_(sums[f"{name}.running_mean"] / batches.clamp(min=1))
            module.running_var.copy_(sums[f"{name}.running_var"] / batches.clamp(min=1))
            module.num_batches_tracked.copy_(batches)
    return model.eval()
