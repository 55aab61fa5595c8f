"""Cohort training: clients of the same width trained together as one batched computation.

Clients of one width start a round from the same sub-model and have parameters of
the same shapes. A cohort stacks their parameters to (K, ...) and runs each local
step for all K at once, with the clients folded into the channel axis:

    one client:  x (B, C, H, W)      conv weight (C_out, C, 3, 3)
    cohort:      x (B, K*C, H, W)    conv weight (K*C_out, C, 3, 3), groups=K

Convolutions become grouped convolutions, BatchNorm and GroupNorm normalise K
times as many channels (each channel is one client's), linear layers become one
batched matmul; ReLU, pooling, the Scaler and residual sums need no change. Each
client so gets exactly its own step: its own batches in its own order, its masked
loss, its batch statistics, its gradient-norm clipping, and SGD with momentum and
weight decay from ``torch.optim``'s functional update (training.local_step). Results equal one-by-one training
within float rounding (tests/test_cohort.py).

One batched step replaces K small ones, which pays where a step is bound by
per-operation overhead rather than arithmetic: narrow models on a CPU, and nearly
every model on a GPU, where a batch of 10 leaves the device idle. Which widths
train as cohorts is a measured rule kept as data (:class:`CohortRule`), never a
timing taken during a run; ``heterofl bench`` times both ways per level to check it.
The step itself is training.local_step, the one definition of a local step, applied
here to stacked parameters.

Clients whose data sizes differ (non-iid shards) end at different steps or with a
smaller last batch: each step runs together the clients whose batches at that
step have the same shape (a subset gathered from the stack and written back).

Families with other parameterised layers (the transformer's embeddings, LayerNorm
and attention) train one by one: :func:`grouped_model` returns None for them.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .config import ExperimentConfig
from .losses import cross_entropy
from .machine import training_layout
from .training import Batch, TrainStats, correct_predictions, local_step

State = dict[str, torch.Tensor]

RULE_FILE = Path(__file__).with_name("cohort_rule.json")


@dataclass(frozen=True)
class CohortRule:
    """Which clients train as a cohort: at least two of one width, of rate at most ``max_rate``.

    A measured fact about a kind of device, kept as data (``cohort_rule.json``; ``heterofl
    bench`` measures it and prints the rule its numbers give). It only decides speed: a
    client's result is the same either way, up to float rounding (tests/test_cohort.py).
    """

    max_rate: float = 0.0  # 0: every client trains on its own
    source: str = ""  # where the number comes from

    def together(self, rate: float, clients: int) -> bool:
        """Do the ``clients`` clients of width ``rate`` train together?"""
        return clients >= 2 and rate <= self.max_rate

    @classmethod
    def measured(cls, device: torch.device) -> CohortRule:
        """The rule shipped for this kind of device (none: one by one)."""
        entry = json.loads(RULE_FILE.read_text())["devices"].get(device.type)
        return cls(**entry) if entry else cls(0.0, f"no measurement for {device.type}")

    @classmethod
    def from_speedups(cls, speedups: dict[float, float], source: str) -> CohortRule:
        """The widest rate up to which every measured width trained faster as a cohort
        (speedup = one-by-one time / cohort time)."""
        max_rate = 0.0
        for rate in sorted(speedups):
            if speedups[rate] <= 1.0:
                break
            max_rate = rate
        return cls(max_rate, source)


class _GroupedConv2d(nn.Module):
    """(B, K*C_in, H, W) -> (B, K*C_out, H', W') with weight (K, C_out, C_in, kh, kw)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        assert conv.padding_mode == "zeros", "grouped convolution supports zero padding only"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clients = self.weight.shape[0]
        bias = None if self.bias is None else self.bias.flatten()
        return F.conv2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation,
                        self.groups * clients)


class _GroupedBatchNorm2d(nn.Module):
    """Batch statistics per channel of (B, K*C, H, W): per client and channel."""

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        assert not norm.track_running_stats, "local training uses batch statistics only (sBN)"
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (None, None) if self.weight is None else (self.weight.flatten(), self.bias.flatten())
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)


class _GroupedGroupNorm(nn.Module):
    """K clients' G groups of (B, K*C, H, W) are K*G groups."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.num_groups = norm.weight, norm.bias, norm.eps, norm.num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clients = self.weight.shape[0]
        return F.group_norm(x, self.num_groups * clients, self.weight.flatten(), self.bias.flatten(), self.eps)


class _GroupedLinear(nn.Module):
    """(..., K*in) -> (..., K*out) with weight (K, out, in): one batched matmul."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clients = self.weight.shape[0]
        out = torch.einsum("...ki,koi->...ko", x.unflatten(-1, (clients, -1)), self.weight)  # (..., K, out)
        if self.bias is not None:
            out = out + self.bias
        return out.flatten(-2)


_GROUPED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: _GroupedConv2d, nn.BatchNorm2d: _GroupedBatchNorm2d, nn.GroupNorm: _GroupedGroupNorm,
    nn.Linear: _GroupedLinear,
}


def grouped_model(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` that runs K clients folded into the channel axis (parameter names
    unchanged, each parameter stacked to (K, ...) by the caller), or None when a layer with
    parameters has no grouped form."""
    grouped = copy.deepcopy(model)
    for name, module in list(grouped.named_modules()):
        if type(module) in _GROUPED:
            parent, _, child = name.rpartition(".")
            setattr(grouped.get_submodule(parent), child, _GROUPED[type(module)](module))
        elif any(True for _ in module.parameters(recurse=False)):
            return None
    return grouped


def train_cohort(grouped: nn.Module, state: State, client_batches: Sequence[Sequence[Batch]],
                 masks: Sequence[torch.Tensor | None], cfg: ExperimentConfig, lr: float) -> tuple[list[State], TrainStats]:
    """Train K clients that start from the same sub-model ``state``, with ``grouped = grouped_model(model)``.

    ``client_batches[k]`` are all of client k's local steps in order (every epoch's batches),
    ``masks[k]`` its label mask or None. Returns each client's trained state (views into the
    stacked parameters) and the summed training statistics.
    """
    grouped.train()
    count = len(client_batches)
    params = {name: value.detach().expand(count, *value.shape).clone().requires_grad_() for name, value in state.items()}
    momentum = {name: torch.zeros_like(value) for name, value in params.items()}
    stacked_masks = torch.stack(list(masks)) if masks[0] is not None else None  # (K, classes)
    device = next(iter(params.values())).device
    layout = training_layout(grouped)  # activations NHWC where safe, as in one-by-one training
    stats = TrainStats.zero(device)
    for t in range(max(len(batches) for batches in client_batches)):
        groups: dict[torch.Size, list[int]] = defaultdict(list)  # clients whose batch at step t has this shape
        for k, batches in enumerate(client_batches):
            if t < len(batches):
                groups[batches[t][0].shape].append(k)
        for members in groups.values():
            x = torch.stack([client_batches[k][t][0] for k in members], dim=1).flatten(1, 2)  # (B, G*C, H, W)
            y = torch.stack([client_batches[k][t][1] for k in members], dim=1)  # (B, G)
            everyone = len(members) == count
            index = None if everyone else torch.tensor(members, device=device)
            sub = params if everyone else {name: value[index].detach().requires_grad_() for name, value in params.items()}
            bufs = momentum if everyone else {name: value[index] for name, value in momentum.items()}
            mask = None if stacked_masks is None else (stacked_masks if everyone else stacked_masks[index])
            x = x.contiguous(memory_format=layout)
            logits = functional_call(grouped, sub, (x,)).unflatten(-1, (len(members), -1))  # (B, G, classes)
            losses = _client_losses(logits, y, mask, cfg.mask_fill)
            grads = list(torch.autograd.grad(losses.sum(), list(sub.values())))
            local_step(list(sub.values()), grads, [bufs[name] for name in sub], cfg, lr, per_client=True)
            if not everyone:
                with torch.no_grad():
                    for name in params:
                        params[name][index] = sub[name]
                        momentum[name][index] = bufs[name]
            batch_mask = None if mask is None else mask[None]
            stats = stats.add(TrainStats(losses.detach().sum() * y.shape[0],
                                         correct_predictions(logits.detach(), y, batch_mask, cfg.mask_fill), y.numel()))
    return [{name: value.detach()[k] for name, value in params.items()} for k in range(count)], stats


def _client_losses(logits: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None, fill: str) -> torch.Tensor:
    """Each client's mean masked cross-entropy: logits (B, G, classes), target (B, G), masks (G, classes) -> (G,)."""
    per_sample = cross_entropy(logits, target, None if masks is None else masks[None], fill, reduction="none")
    return per_sample.view(target.shape).mean(0)
