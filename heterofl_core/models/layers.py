"""Building blocks shared by the three model families: width, Scaler, norms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def width(rate: float, base: int) -> int:
    """Channels of a rate-``rate`` model for a layer of ``base`` channels at rate 1: ceil(rate * base)."""
    return max(1, math.ceil(rate * base - 1e-9))


class Scaler(nn.Module):
    """Divide by (client rate / global rate) in training, identity in eval (spec section 4).

    A sub-model of rate r sees roughly r times fewer inputs per unit, so its
    activations are smaller; the Scaler makes them match the global model's.
    """

    def __init__(self, scaler_rate: float) -> None:
        super().__init__()
        self.scaler_rate = scaler_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scaler_rate if self.training else x

    def extra_repr(self) -> str:
        return f"scaler_rate={self.scaler_rate:g}"


def make_scaler(scale: bool, rate: float, global_rate: float) -> nn.Module:
    """A Scaler when ``scale`` is on, else identity."""
    return Scaler(rate / global_rate) if scale else nn.Identity()


def make_norm(norm: str, channels: int, track_running_stats: bool) -> nn.Module:
    """Normalisation layer by name (spec section 2).

    ``bn`` is static batch norm: batch statistics only while training
    (``track_running_stats=False``); the server's evaluation copy tracks a
    cumulative average (``momentum=None``) over the training set.
    """
    if norm == "bn":
        if track_running_stats:
            return StaticBatchNorm2d(channels)
        return nn.BatchNorm2d(channels, momentum=None, track_running_stats=False)
    if norm == "in":
        return nn.GroupNorm(channels, channels)
    if norm == "ln":
        return nn.GroupNorm(1, channels)
    if norm == "gn":
        return nn.GroupNorm(4, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; valid: bn, in, ln, gn, none")


CLIENT_BN_MOMENTUM = 0.1  # PyTorch's default BatchNorm momentum: what a client keeps without sBN


def track_running_statistics(model: nn.Module, momentum: float = CLIENT_BN_MOMENTUM) -> nn.Module:
    """``model`` with every BatchNorm2d replaced, in place, by PyTorch's default kind: tracking running
    statistics as an exponential average with ``momentum`` (``nn.BatchNorm2d(C)``); the affine weights
    are kept, the statistics start at mean 0, variance 1.

    Not sBN: the clients' own statistics, which the alternative to sBN averages on the server
    (federated.Federation.local_update_tracking). A train-mode forward normalises with batch statistics
    either way, so training computes the same; :func:`make_norm`'s two kinds are left as they are.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                like = {"device": child.weight.device, "dtype": child.weight.dtype} if child.affine else {}
                tracking = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=momentum, affine=child.affine,
                                          track_running_stats=True, **like)
                tracking.load_state_dict(child.state_dict(), strict=False)  # affine weights (and any statistics)
                setattr(parent, name, tracking.train(child.training))
    return model


class StaticBatchNorm2d(nn.BatchNorm2d):
    """The server's sBN copy of a BatchNorm (spec section 4): running statistics as a cumulative
    average (``momentum=None``), and optionally over ghost batches.

    With ``ghost_batch = n`` set, a train-mode forward treats its input as consecutive batches
    of n samples (the last may be smaller): each is normalised with its own statistics and
    counted as one batch of the cumulative average, exactly as if the batches came one by one.
    One large forward pass then gives the statistics of the authors' batch-by-batch loop
    (training.sbn_statistics); the layers between BatchNorms run on the whole input.
    """

    ghost_batch: int | None = None
    ghost_batches_seen = 0  # num_batches_tracked of the ghost-batch pass, on the host: no device sync
    # Write each batch's output in place through aten's out= kernel (private; measured: the public
    # F.batch_norm plus a copy makes the MNIST sBN pass 14% slower); False: the public path.
    native_out = hasattr(torch.ops.aten.native_batch_norm, "out")

    def __init__(self, channels: int) -> None:
        super().__init__(channels, momentum=None, track_running_stats=True)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self.ghost_batches_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.ghost_batch):
            return super().forward(x)
        out = torch.empty_like(x)  # keeps channels-last
        saved = x.new_empty(2, x.shape[1])  # the kernel's saved mean and inverse std (unused)
        for part, dest in zip(x.split(self.ghost_batch), out.split(self.ghost_batch)):  # (n, C, H, W) each
            self.ghost_batches_seen += 1
            momentum = 1.0 / self.ghost_batches_seen
            if self.native_out and not torch.is_grad_enabled():  # out= kernels have no autograd
                torch.ops.aten.native_batch_norm.out(part, self.weight, self.bias, self.running_mean, self.running_var,
                                                     True, momentum, self.eps, out=dest, save_mean=saved[0],
                                                     save_invstd=saved[1])
            else:
                dest.copy_(F.batch_norm(part, self.running_mean, self.running_var, self.weight, self.bias,
                                        training=True, momentum=momentum, eps=self.eps))
        self.num_batches_tracked.fill_(self.ghost_batches_seen)
        return out


def init_norms(model: nn.Module) -> None:
    """Affine norm weights 1, biases 0; linear biases 0 (the authors' init, by type)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
