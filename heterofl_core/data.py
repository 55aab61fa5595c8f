"""Data in memory, and where it lives on disk.

Everything a run needs lives in a few tensors (airbench style): images are one
normalised float32 tensor per split (:class:`ImageData`), text is one flat tensor
of token ids per split (:class:`TextData`). A client's data is an index tensor
into them (see splits.py); a batch is ``train_x[idx]``. Which datasets exist, how
each is read and fetched: datasets.py, the registry. Where they lie: the data root
(:func:`resolve_data_root`); decoded tensors are cached under the cache folder
(:func:`cached`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

ROOT_HINT = "Point --data-root (or the HETEROFL_DATA environment variable) at a folder with that layout."
DATA_ROOT_LABEL = "<data root>"  # stands for the data root in the sources shown beside results


class DataError(ValueError):
    """Dataset unknown, missing, corrupt or in the wrong layout; the message says which dataset, where we looked, the expected layout and how to get it."""


class FetchError(DataError):
    """No source of a dataset could be downloaded; ``attempts`` names each source and why it failed."""

    def __init__(self, attempts: list[tuple[str, str]]) -> None:
        self.attempts = attempts  # (source, why it failed), in the order tried
        super().__init__(self.summary)

    @property
    def summary(self) -> str:
        """The failures on one line."""
        return "; ".join(f"{why} (from {source})" for source, why in self.attempts)

DATA_ROOT_RULE = ("default: $HETEROFL_DATA, else ../shared/data beside the checkout when it exists, "
                  "else <checkout>/data; never the working directory (heterofl_core.data.resolve_data_root)")
INSTALLED_DATA_ROOT = Path("~/.cache/heterofl/data")  # the last fallback of a package installed outside a checkout


def repo_root() -> Path:
    """The checkout this package lives in: the folder above ``heterofl_core`` (for a copy installed
    into site-packages, site-packages itself: :func:`resolve_data_root` tells them apart by pyproject.toml)."""
    return Path(__file__).resolve().parent.parent


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data root, the one rule for the CLI (``heterofl run``, ``bench``, ``reproduce``) and the notebooks.

    The first of:

    1. ``data_root``, when given (not None or "");
    2. ``$HETEROFL_DATA``, when set and not empty;
    3. ``../shared/data`` beside the checkout (the offline copy this project ships there), when that folder exists;
    4. ``<checkout>/data``.

    The checkout is the folder above the ``heterofl_core`` package (:func:`repo_root`). A package
    installed outside a checkout (site-packages, no pyproject.toml beside it) has neither 3 nor 4
    and falls back to ``~/.cache/heterofl/data``. No step depends on the working directory, so a
    notebook opened from ``notebooks/`` finds the same data as ``heterofl run`` from the repository
    root. The answer is absolute (``~`` expanded; a relative argument or $HETEROFL_DATA is taken
    from the working directory, as typed); whether it exists is for the loaders to say.
    """
    chosen = data_root if data_root not in (None, "") else os.environ.get("HETEROFL_DATA")
    if chosen:
        return Path(os.path.abspath(Path(chosen).expanduser()))
    checkout = repo_root()
    if not (checkout / "pyproject.toml").is_file():  # installed into site-packages: no checkout
        return INSTALLED_DATA_ROOT.expanduser()
    shared = checkout.parent / "shared" / "data"
    return shared if shared.is_dir() else checkout / "data"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder: the argument, else $HETEROFL_CACHE, else ~/.cache/heterofl."""
    if cache_dir is None:
        cache_dir = os.environ.get("HETEROFL_CACHE") or Path.home() / ".cache" / "heterofl"
    return Path(cache_dir).expanduser()



@dataclass(frozen=True, eq=False)  # eq=False: compare by identity, tensors have no single truth value
class ImageData:
    """An image classification dataset as normalised tensors."""

    name: str  # its registry name (datasets.py)
    source: str  # where the data came from, shown next to results (e.g. "offline JPEG copy")
    train_x: Tensor = field(repr=False)  # (N, C, H, W) float32, normalised
    train_y: Tensor = field(repr=False)  # (N,) int64
    test_x: Tensor = field(repr=False)
    test_y: Tensor = field(repr=False)
    num_classes: int
    augment: bool  # random crop and flip of training batches (workloads.augment_batch), as the authors' CIFAR10
    mean: tuple[float, ...] = (0.0,)  # the per-channel normalisation applied: (x / 255 - mean) / std
    std: tuple[float, ...] = (1.0,)
    class_names: tuple[str, ...] = ()  # label i is class_names[i], when the files name the classes

    @property
    def black(self) -> tuple[float, ...]:
        """A black pixel after normalisation, per channel (what augmentation pads with)."""
        return tuple(-m / s for m, s in zip(self.mean, self.std))

    def to(self, device: torch.device | str) -> ImageData:
        """The same dataset with every tensor on `device`."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )


@dataclass(frozen=True, eq=False)
class TextData:
    """A word-level corpus as flat token-id streams; the vocabulary comes from the training split."""

    name: str  # its registry name (datasets.py)
    source: str
    vocab: list[str] = field(repr=False)  # id -> word, in order of first appearance in train
    train: Tensor = field(repr=False)  # (T,) int64 token ids, one <eos> per line
    valid: Tensor = field(repr=False)
    test: Tensor = field(repr=False)

    @property
    def vocab_size(self) -> int:
        """Number of words; the models add one more row for the mask token."""
        return len(self.vocab)

    def to(self, device: torch.device | str) -> TextData:
        """The same corpus with every tensor on `device`."""
        return replace(self, train=self.train.to(device), valid=self.valid.to(device), test=self.test.to(device))


def normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return images.float().mul_(1 / (255 * s)).sub_(m / s)  # one float copy, updated in place



def cached(cache_dir: Path, prefix: str, ident: list, build: Callable[[], dict]) -> dict:
    """Load build()'s tensors from cache_dir/<prefix>-<hash of ident>.pt, or build and save them atomically."""
    digest = hashlib.sha256(repr(ident).encode()).hexdigest()[:16]
    path = cache_dir / f"{prefix}-{digest}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            warnings.warn(f"ignoring unreadable cache file {path} ({e}); rebuilding it", stacklevel=4)
    value = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(value, f)
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"could not write cache file {path} ({e}); the next load decodes again", stacklevel=4)
    return value



@contextlib.contextmanager
def staging(root: Path) -> Iterator[Path]:
    """A fresh hidden folder inside root for downloads, removed afterwards: a failed fetch leaves nothing behind."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=root, prefix=".fetch-"))
    except OSError as e:
        raise DataError(f"Cannot write into the data root {root} ({e}); choose a writable folder with "
                        "--data-root or $HETEROFL_DATA") from e
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)

