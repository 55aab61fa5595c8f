"""What the round loop needs from a dataset family: client batches, sBN inputs, evaluation.

The federated loop (federated.py) is written once; an image classification task
and a masked-token language-modelling task plug into it through these classes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Iterable, Iterator, Protocol

import torch
from torch import Tensor, nn

from .config import ExperimentConfig
from .data import ImageData, TextData
from .evaluation import image_metrics, perplexity_summary, text_window_metrics
from .losses import label_mask
from .models import mask_tokens
from .splits import ClientSplit, batchify
from .training import Batch


class Workload(Protocol):
    num_classes: int  # classes, or the vocabulary size for text
    higher_is_better: bool
    headline: str  # the metric that picks the best round, e.g. "global_accuracy"
    user_masks: torch.Tensor  # (users, classes) bool: the label set of each user

    def client_batches(self, user: int, generator: torch.Generator) -> Callable[[], Iterable[Batch]]: ...
    def stats_inputs(self, generator: torch.Generator) -> Iterable[torch.Tensor]: ...
    def user_stats_inputs(self, user: int, generator: torch.Generator) -> Iterable[torch.Tensor]: ...
    def evaluate(self, model: nn.Module, generator: torch.Generator) -> dict[str, float]: ...


class ImageWorkload:
    """Image classification: a client's data is an index tensor into the training tensors."""

    higher_is_better = True
    headline = "global_accuracy"

    def __init__(self, data: ImageData, split: ClientSplit, cfg: ExperimentConfig, eval_batch_size: int) -> None:
        self.data, self.split, self.cfg = data, split, cfg
        self.num_classes = data.num_classes
        self.eval_batch_size = eval_batch_size
        device = data.train_x.device
        self.user_masks = torch.stack([label_mask(labels.to(device), self.num_classes) for labels in split.labels])

    def client_batches(self, user: int, generator: torch.Generator) -> Callable[[], Iterator[Batch]]:
        index, size = self.split.train[user], self.cfg.batch_size_train

        def epoch() -> Iterator[Batch]:  # shuffled, last batch may be smaller (DataLoader(shuffle=True))
            order = index[torch.randperm(len(index), generator=generator, device=index.device)]
            for start in range(0, len(order), size):
                batch = order[start:start + size]
                x = self.data.train_x[batch]
                yield (augment_batch(x, self.data.black, generator) if self.data.augment else x), self.data.train_y[batch]
        return epoch

    def stats_inputs(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """The training set (or ``cfg.sbn_samples`` random samples of it) in a random order
        (the authors' shuffled loader), with its training augmentation, in large chunks of
        whole sBN batches."""
        images = self.data.train_x
        order = torch.randperm(len(images), generator=generator, device=images.device)
        if 0 < self.cfg.sbn_samples < len(images):
            order = order[:self.cfg.sbn_samples]
        return self._stats_chunks(order, generator)

    def user_stats_inputs(self, user: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """The same over one user's training images: its part of the clients' sBN pass."""
        index = self.split.train[user]
        return self._stats_chunks(index[torch.randperm(len(index), generator=generator, device=index.device)], generator)

    def _stats_chunks(self, order: torch.Tensor, generator: torch.Generator) -> Iterator[torch.Tensor]:
        batch = self.cfg.sbn_batch
        for index in order.split(max(batch, self.eval_batch_size // batch * batch)):
            x = self.data.train_x[index]
            yield augment_batch(x, self.data.black, generator) if self.data.augment else x

    @torch.no_grad()
    def evaluate(self, model: nn.Module, generator: torch.Generator) -> dict[str, float]:
        model.eval()
        logits = torch.cat([model(x) for x in self.data.test_x.split(self.eval_batch_size)])
        return image_metrics(logits, self.data.test_y, self.split.test, self.user_masks, self.cfg.mask_fill)


class TextWorkload:
    """Masked-token language modelling (spec section 3): user i owns row i of the training stream."""

    higher_is_better = False
    headline = "global_perplexity"

    def __init__(self, data: TextData, split: ClientSplit, cfg: ExperimentConfig, eval_batch_size: int) -> None:
        self.cfg = cfg
        self.num_classes = data.vocab_size
        self.train_rows = batchify(data.train, cfg.batch_size_train)  # (rows = users, tokens per user)
        self.test_rows = batchify(data.test, cfg.batch_size_test)  # (10, tokens / 10)
        self.windows_per_batch = max(1, eval_batch_size // (cfg.batch_size_test * cfg.bptt))
        device = data.train.device
        self.user_masks = torch.stack([label_mask(labels.to(device), self.num_classes) for labels in split.labels])

    def _masked(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return mask_tokens(tokens, self.num_classes, self.cfg.token_mask_rate, generator)

    def client_batches(self, user: int, generator: torch.Generator) -> Callable[[], Iterator[Batch]]:
        row = self.train_rows[user:user + 1]  # (1, L): windows of bptt tokens, in order

        def epoch() -> Iterator[Batch]:
            for window in row.split(self.cfg.bptt, dim=1):
                yield self._masked(window, generator), window
        return epoch

    def stats_inputs(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        return iter(())  # LayerNorm only: no sBN statistics

    def user_stats_inputs(self, user: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        return iter(())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, generator: torch.Generator) -> dict[str, float]:
        """Windows of (10 rows x bptt) tokens, several per forward pass; exp(loss) averaged over windows."""
        model.eval()
        rows, length = self.test_rows.shape
        whole = length // self.cfg.bptt * self.cfg.bptt
        windows = self.test_rows[:, :whole].unflatten(1, (-1, self.cfg.bptt)).transpose(0, 1)  # (W, rows, bptt)
        batches = list(windows.split(self.windows_per_batch))
        if whole < length:
            batches.append(self.test_rows[None, :, whole:])  # the last, shorter window
        global_losses, local_losses = [], []
        for batch in batches:  # (windows, rows, S)
            logits = model(self._masked(batch.flatten(0, 1), generator)).unflatten(0, batch.shape[:2])
            for window_logits, window in zip(logits, batch):
                g, l = text_window_metrics(window_logits, window, self.user_masks, self.cfg.mask_fill)
                global_losses.append(g)
                local_losses.append(l)
        return perplexity_summary(global_losses, local_losses)


def make_workload(data: ImageData | TextData, split: ClientSplit, cfg: ExperimentConfig,
                  eval_batch_size: int = 1000) -> Workload:
    """The workload for this kind of data."""
    if isinstance(data, ImageData):
        return ImageWorkload(data, split, cfg, eval_batch_size)
    return TextWorkload(data, split, cfg, eval_batch_size)


CROP_PADDING = 4  # the authors' CIFAR10 training augmentation: random crop with padding 4 (+ horizontal flip)


def augment_batch(x: Tensor, fill: tuple[float, ...], generator: torch.Generator | None = None) -> Tensor:
    """Random crop (padding 4) and random horizontal flip of every image, vectorised over the batch.

    The authors' torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip pad the raw
    image with black; ``fill`` is black after normalisation (``ImageData.black``: -mean/std
    per channel), so the result is the same. The random draws come from
    ``generator`` (on its device) and are moved to x's device, so it runs on CPU and
    CUDA batches alike.
    """
    n, c, h, w = x.shape
    device = generator.device if generator is not None else x.device
    shift = torch.randint(0, 2 * CROP_PADDING + 1, (2, n), generator=generator, device=device).to(x.device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).to(x.device).bool()
    border = _constant(fill, x.dtype, x.device).view(1, -1, 1, 1)
    padded = border.expand(n, c, h + 2 * CROP_PADDING, w + 2 * CROP_PADDING).clone()  # (N, C, H+8, W+8)
    padded[:, :, CROP_PADDING:-CROP_PADDING, CROP_PADDING:-CROP_PADDING] = x
    rows = shift[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(0), cols) + shift[1, :, None]  # (N, W); flipped crop = reversed columns
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # (N, C, H, W)


@lru_cache(maxsize=None)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, copied to its device once (a host-to-device copy waits for the GPU)."""
    return torch.tensor(values, dtype=dtype, device=device)
