"""Label masks and masked cross-entropy (spec section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FILLS = {"zero": 0.0, "-inf": float("-inf")}  # what replaces the logits of classes a client does not hold


def label_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Bool (num_classes,): True for the classes in ``labels``."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
    mask[labels] = True
    return mask


def masked_logits(logits: torch.Tensor, mask: torch.Tensor, fill: str = "zero") -> torch.Tensor:
    """Replace logits of classes outside ``mask`` (last axis) by 0 (the authors' choice) or -inf."""
    if fill not in FILLS:
        raise ValueError(f"unknown mask fill {fill!r}; valid: {', '.join(FILLS)}")
    return logits.masked_fill(~mask, FILLS[fill])


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                  fill: str = "zero", reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (..., classes) logits against (...) targets, masked when ``mask`` is given."""
    if mask is not None:
        logits = masked_logits(logits, mask, fill)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction=reduction)
