"""Global and Local evaluation (spec section 7), computed from one pass over the test set.

- Global: the global model on the whole test set, no mask.
- Local: for every user, the global model on that user's test data with that
  user's label mask; a sample-weighted mean over users. For images a user's test
  data is its own test split; for text (as in the authors' code) every user sees
  the whole test stream, so the Local loss of a position is needed for every user:
  :func:`masked_log_partition` gets it for all users at once with one matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import FILLS, masked_logits


def image_metrics(logits: torch.Tensor, target: torch.Tensor, user_index: list[torch.Tensor],
                  user_masks: torch.Tensor, fill: str = "zero") -> dict[str, float]:
    """Global and Local accuracy (%) and loss from the test set's logits (N, classes).

    ``user_index[u]`` are user u's test indices, ``user_masks[u]`` its label mask (classes,).
    """
    index = torch.cat(user_index)
    owner = torch.repeat_interleave(torch.arange(len(user_index), device=logits.device),
                                    torch.tensor([len(i) for i in user_index], device=logits.device))
    local_logits = masked_logits(logits[index], user_masks[owner], fill)
    metrics = {
        "global_loss": F.cross_entropy(logits, target),
        "global_accuracy": (logits.argmax(1) == target).float().mean() * 100,
        "local_loss": F.cross_entropy(local_logits, target[index]),
        "local_accuracy": (local_logits.argmax(1) == target[index]).float().mean() * 100,
    }
    return {k: v.item() for k, v in metrics.items()}


def global_chance(target: torch.Tensor) -> float:
    """The chance level of Global accuracy (%): always guessing the test set's most frequent class."""
    return float(torch.bincount(target).max() / len(target) * 100)


def local_chance(user_masks: torch.Tensor, test_counts: torch.Tensor | list[int]) -> float:
    """The chance level of Local accuracy (%): each user guesses uniformly among its own classes (its label
    mask, the classes a masked prediction chooses among), weighted by its test samples as Local accuracy
    is. Two classes per user (non-iid-2): 50 %; every class (iid): 100 / classes."""
    counts = torch.as_tensor(test_counts, dtype=torch.float64)
    held = user_masks.sum(1).to(torch.float64).cpu()
    return float((counts / held).sum() / counts.sum() * 100)


def masked_log_partition(logits: torch.Tensor, masks: torch.Tensor, fill: str = "zero") -> torch.Tensor:
    """log-sum-exp of (P, V) logits after each of U masks (U, V): returns (U, P).

    With fill 0, masked-out classes contribute exp(0) each:
    logsumexp = m + log(sum_{v in mask} exp(z_v - m) + (V - |mask|) exp(-m)), m = max_v z_v.
    """
    top = logits.max(dim=1, keepdim=True).values  # (P, 1)
    if fill == "zero":  # the zeros are part of every masked row: shifting by max(top, 0) keeps exp(-top) finite
        top = top.clamp(min=0)
    held = masks.to(logits.dtype) @ torch.exp(logits - top).T  # (U, P)
    if fill == "zero":
        absent = (masks.shape[1] - masks.sum(1, keepdim=True)).to(logits.dtype)  # (U, 1)
        held = held + absent * torch.exp(-top.T)
    out = top.T + torch.log(held)
    # Underflow: a user's held logits all lie far below the row's max. Redo those few pairs directly.
    users, positions = torch.nonzero(~torch.isfinite(out), as_tuple=True)
    if len(users):
        out[users, positions] = torch.logsumexp(masked_logits(logits[positions], masks[users], fill), dim=1)
    return out


def text_window_metrics(logits: torch.Tensor, target: torch.Tensor, user_masks: torch.Tensor,
                        fill: str = "zero") -> tuple[torch.Tensor, torch.Tensor]:
    """Global and Local cross-entropy of one evaluation window.

    ``logits`` (R, S, V), ``target`` (R, S). Returns the window's Global mean loss
    (scalar) and each user's Local mean loss (U,).
    """
    flat, labels = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    global_loss = F.cross_entropy(flat, labels)
    picked = flat.gather(1, labels[:, None]).squeeze(1)  # (P,)
    held = user_masks[:, labels]  # (U, P): is the target among the user's tokens?
    target_logit = torch.where(held, picked, torch.full_like(picked, FILLS[fill]))
    local_loss = (masked_log_partition(flat, user_masks, fill) - target_logit).mean(1)
    return global_loss, local_loss


def perplexity_summary(global_losses: list[torch.Tensor], local_losses: list[torch.Tensor]) -> dict[str, float]:
    """The authors' perplexity: exp(loss) per window, averaged over windows (and users for Local)."""
    g, l = torch.stack(global_losses), torch.stack(local_losses)  # (W,), (W, U)
    return {"global_loss": g.mean().item(), "global_perplexity": g.exp().mean().item(),
            "local_loss": l.mean().item(), "local_perplexity": l.exp().mean().item()}
