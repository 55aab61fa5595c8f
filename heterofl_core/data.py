"""Real datasets as tensors: MNIST, CIFAR10 and word-level text corpora (WikiText2 and alike).

Everything a run needs lives in a few tensors (airbench style): images are one
normalised float32 tensor per split, text is one flat tensor of token ids per
split. A client's data is an index tensor into them (see splits.py); a batch is
`train_x[idx]`. Loaders return CPU tensors; `.to(device)` moves a whole dataset.

Where data is looked for (`root` = `resolve_data_root(...)`, whose docstring says how it is chosen):

    MNIST      root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
    CIFAR10    root/CIFAR10/cifar-10-batches-py   or  root/cifar-10-batches-py   (pickled batches)
               root/CIFAR10/{train,test}/<class>/*.jpg|jpeg|png                 (image folder)
               root/CIFAR10/*.tar.gz  or  root/archives/cifar10-jpeg.tar.gz      (archive of that folder)
    text       root/<name>/{wiki.,}{train,valid,test}.tokens  (WikiText2 also: root/wikitext-2/)
               root/<name>/{train,validation,test}-*.parquet    (a 'text' column, one row per line: Hugging Face)
               root/WikiText2/wikitext-2-v1.zip                 (the original archive, read as it is)

`fetch_dataset` downloads MNIST, CIFAR10 and WikiText2 into one of these layouts (checksummed,
staged in a hidden folder and moved in only when complete); `dataset_status` says, without
decoding anything, which datasets are where (the ``heterofl data`` command, data_cli.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# Sorted folder names give the standard CIFAR-10 label order, so an image folder needs no mapping.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_BLACK = tuple(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))  # a black pixel after normalisation
CROP_PADDING = 4  # CIFAR10 training augmentation: random crop 32 with padding 4 (+ horizontal flip)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
ROOT_HINT = "Point --data-root (or the HETEROFL_DATA environment variable) at a folder with that layout."
DATA_ROOT_LABEL = "<data root>"  # stands for the data root in the sources shown beside results

# WikiText-2 (Merity et al., "Pointer Sentinel Mixture Models", 2016), word level, as released in
# wikitext-2-v1.zip. Its original address (s3.amazonaws.com/research.metamind.io) refuses downloads
# since 2024 (pytorch/text#2247, #2255); the same data is published today in these layouts, which
# fetch tries in this order. Hugging Face: the Salesforce/wikitext dataset, config wikitext-2-v1,
# one parquet file per split, pinned to the commit that wrote them ("Convert dataset to Parquet
# (#8)"), so the checksums below stay true whatever happens on main later.
WIKITEXT2_HF_URL = ("https://huggingface.co/datasets/Salesforce/wikitext/resolve/"
                    "b08601e04326c79dfdd32d625aee71d232d685c3/wikitext-2-v1/{}")
WIKITEXT2_PARQUET_SHA256 = {  # SHA-256 as the Hub publishes them ("Git LFS Details" of each file's page)
    # huggingface.co/datasets/Salesforce/wikitext/blob/9f7c666b6370668ee2dd874330e917f2dbe2c45f/wikitext-2-v1/
    # train-00000-of-00001.parquet (6,068,114 bytes; the same oid in the parquet-converter's commit 9f50660)
    "train-00000-of-00001.parquet": "dfc27e4360c639dc1fba1e403bfffd53af4a5c75d5363b5724d49bf12d07cce6",
    # huggingface.co/datasets/Salesforce/wikitext/blob/main/wikitext-2-v1/validation-00000-of-00001.parquet
    "validation-00000-of-00001.parquet": "717de9a0c1c0b0b1dfdd8f1e6ad8a30ece618bbde81f5da8207277547d324215",
    # huggingface.co/datasets/Salesforce/wikitext/blob/9f7c666b6370668ee2dd874330e917f2dbe2c45f/wikitext-2-v1/
    # test-00000-of-00001.parquet
    "test-00000-of-00001.parquet": "e6b3913da714b63a60a571698b20ff15441fb015783ea1b5285f707d4f2f00a9",
}
WIKITEXT2_ZIP = "wikitext-2-v1.zip"  # members wikitext-2/wiki.{train,valid,test}.tokens
WIKITEXT2_ZIP_URL = "https://wikitext.smerity.com/wikitext-2-v1.zip"  # the dataset author's own mirror
WIKITEXT2_ZIP_MD5 = "542ccefacc6c27f945fb54453812b3cd"  # the original archive's, torchtext/datasets/wikitext2.py
USER_AGENT = "Mozilla/5.0 (compatible; heterofl data fetch)"  # the mirror answers 403 to urllib's default agent


class DataError(ValueError):
    """Dataset missing, corrupt or in the wrong layout; the message says which dataset, where we looked, the expected layout and how to get it."""


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


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder: the argument, else $HETEROFL_CACHE, else ~/.cache/heterofl."""
    if cache_dir is None:
        cache_dir = os.environ.get("HETEROFL_CACHE") or Path.home() / ".cache" / "heterofl"
    return Path(cache_dir).expanduser()


@dataclass(frozen=True, eq=False)  # eq=False: compare by identity, tensors have no single truth value
class ImageData:
    """An image classification dataset as normalised tensors."""

    name: str  # "MNIST" | "CIFAR10"
    source: str  # where the data came from, shown next to results (e.g. "offline JPEG copy")
    train_x: Tensor = field(repr=False)  # (N, C, H, W) float32, normalised
    train_y: Tensor = field(repr=False)  # (N,) int64
    test_x: Tensor = field(repr=False)
    test_y: Tensor = field(repr=False)
    num_classes: int
    augment: bool  # apply augment_batch to training batches (CIFAR10)

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

    name: str  # "WikiText2" | "SOTU" | any corpus folder name
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


def augment_batch(x: Tensor, generator: torch.Generator | None = None,
                  fill: tuple[float, ...] = CIFAR10_BLACK) -> Tensor:
    """Random crop (padding 4) and random horizontal flip of every image, vectorised over the batch.

    The authors' torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip pad the raw
    image with black; ``fill`` is black after normalisation (-mean/std per channel,
    CIFAR10's by default), so the result is the same. The random draws come from
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


def batchify(stream: Tensor, rows: int) -> Tensor:
    """Lay a token stream out as `rows` contiguous rows, dropping the tail that does not fit.

    As pytorch/examples word_language_model, without its transpose: row i is the
    i-th contiguous piece of the text (in HeteroFL, user i owns row i).
    The stream a b c d e f g h i j k l m with rows = 4 (m does not fit, dropped):

        ┌ a b c ┐  row 0
        │ d e f │  row 1
        │ g h i │  row 2
        └ j k l ┘  row 3
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    length = stream.numel() // rows
    if length < 1:
        raise ValueError(f"a stream of {stream.numel()} tokens cannot fill {rows} rows")
    return stream[: rows * length].view(rows, length)  # (rows, length)


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None = None,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ImageData | TextData:
    """Load MNIST, CIFAR10 or a word-level text corpus (any other name: the folder data_root/<name>)."""
    root = resolve_data_root(data_root)
    if name == "MNIST":
        data = _load_mnist(root, download)
    elif name == "CIFAR10":
        data = _load_cifar10(root, download, _resolve_cache_dir(cache_dir))
    elif not name or name.startswith(".") or "/" in name or os.sep in name:
        raise DataError(
            f"Unknown dataset name {name!r}: use MNIST, CIFAR10, WikiText2 or the name of a text corpus folder."
        )
    else:
        data = _load_text(name, root, download)
    # The source is shown beside results and written into records others read: no machine's absolute path.
    return replace(data, source=data.source.replace(str(root), DATA_ROOT_LABEL))


def _missing(name: str, looked: Iterable[Path | str], layout: list[str], how: str, cause: str = "") -> DataError:
    """One message for a dataset that is not there: what, where we looked, the layout, how to get it."""
    lines = [f"{name} not found.", "Looked for:", *(f"  {p}" for p in looked), "Expected layout:"]
    lines += [f"  {line}" for line in layout]
    lines += ["How to get it:", f"  {how}"]
    if cause:
        lines += [f"Download failed: {cause}"]
    return DataError("\n".join(lines))


def _normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return images.float().mul_(1 / (255 * s)).sub_(m / s)  # one float copy, updated in place


# ---------------------------------------------------------------- MNIST

MNIST_FILES = {  # file -> (magic number, number of dimensions)
    "train-images-idx3-ubyte": (2051, 3),
    "train-labels-idx1-ubyte": (2049, 1),
    "t10k-images-idx3-ubyte": (2051, 3),
    "t10k-labels-idx1-ubyte": (2049, 1),
}


MNIST_LAYOUT = ["MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   (the four uncompressed IDX files)"]
MNIST_SOURCE = "MNIST (IDX files)"


def _load_mnist(root: Path, download: bool) -> ImageData:
    """MNIST through torchvision, which reads root/MNIST/raw/*-ubyte as they are."""
    raw = root / "MNIST" / "raw"
    paths = [raw / f for f in MNIST_FILES]
    if not all(p.is_file() for p in paths):
        how = (f"`heterofl data fetch MNIST` or download enabled (needs internet), or copy the four IDX files "
               f"there. {ROOT_HINT}")
        _download_or_refuse("MNIST", root, download, paths, MNIST_LAYOUT, how)
    counts = {f: _check_idx(raw / f, magic, ndim)[0] for f, (magic, ndim) in MNIST_FILES.items()}
    for split in ("train", "t10k"):
        if counts[f"{split}-images-idx3-ubyte"] != counts[f"{split}-labels-idx1-ubyte"]:
            raise DataError(f"MNIST: the {split} images and labels in {raw} hold different counts: {counts}")
    try:
        train = torchvision.datasets.MNIST(str(root), train=True, download=False)
        test = torchvision.datasets.MNIST(str(root), train=False, download=False)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise DataError(f"MNIST: torchvision could not read the IDX files in {raw}: {e}") from e
    return ImageData(
        name="MNIST",
        source=f"{MNIST_SOURCE} at {raw.parent}",
        train_x=_normalise(train.data.unsqueeze(1), MNIST_MEAN, MNIST_STD),  # (N, 1, 28, 28)
        train_y=train.targets.long(),
        test_x=_normalise(test.data.unsqueeze(1), MNIST_MEAN, MNIST_STD),
        test_y=test.targets.long(),
        num_classes=10,
        augment=False,
    )


def _check_idx(path: Path, magic: int, ndim: int) -> list[int]:
    """Check an IDX file's header and size (torchvision would fail with a bare assert); returns its dims."""
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    size = path.stat().st_size
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"MNIST: {path} is truncated ({size} bytes, shorter than its IDX header)")
    found = int.from_bytes(header[:4], "big")
    if found != magic:
        raise DataError(f"MNIST: {path} is not an IDX file of the expected kind (magic number {found}, "
                        f"expected {magic})")
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = len(header) + int(np.prod(dims))
    if size != expected:
        raise DataError(f"MNIST: {path} is truncated or corrupt: {size} bytes, its header {dims} needs {expected}")
    return dims


# ---------------------------------------------------------------- CIFAR10


CIFAR10_LAYOUT = [
    "CIFAR10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}   (torchvision's download), or",
    "CIFAR10/{train,test}/<class>/<image>.jpg|jpeg|png   (class folders named airplane ... truck), or",
    "CIFAR10/<any>.tar.gz or archives/cifar10-jpeg.tar.gz holding such train/ and test/ folders",
]
CIFAR10_BATCHES_SOURCE = "CIFAR-10 (pickled batches)"


def _find_cifar10(root: Path) -> tuple[str, Path] | None:
    """The first CIFAR10 layout present, as (kind, path), kind "batches" | "folder" | "archive"; None if none is."""
    folder = root / "CIFAR10"
    for batches in (folder / "cifar-10-batches-py", root / "cifar-10-batches-py"):
        if batches.is_dir():
            return "batches", batches
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        return "folder", folder
    archives = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
    for archive in archives + [root / "archives" / "cifar10-jpeg.tar.gz"]:
        if archive.is_file():
            return "archive", archive
    return None


def _load_cifar10(root: Path, download: bool, cache_dir: Path) -> ImageData:
    """CIFAR10 from the first of: pickled batches, an image folder, a tar.gz of one, a torchvision download."""
    found = _find_cifar10(root)
    if found is None:
        folder = root / "CIFAR10"
        looked = [
            f"{folder / 'cifar-10-batches-py'}/   (torchvision's pickled batches)",
            f"{root / 'cifar-10-batches-py'}/   (torchvision's pickled batches)",
            f"{folder}/{{train,test}}/<class>/*.jpg|jpeg|png   (image folder)",
            f"{folder}/*.tar.gz   (archive of such a folder)",
            f"{root / 'archives' / 'cifar10-jpeg.tar.gz'}",
        ]
        how = (f"`heterofl data fetch CIFAR10` or download enabled (needs internet), or provide one of these "
               f"layouts under {root}. {ROOT_HINT}")
        _download_or_refuse("CIFAR10", root, download, looked, CIFAR10_LAYOUT, how)
        found = ("batches", folder / "cifar-10-batches-py")

    kind, path = found
    if kind == "batches":
        return _cifar10(*_read_cifar_batches(path), source=f"{CIFAR10_BATCHES_SOURCE} at {path}")
    if kind == "folder":
        files = _list_image_folder(path)
        key = [(str(p.relative_to(path)), st.st_size, st.st_mtime_ns) for p, st in files]
        arrays = _cached(cache_dir, "cifar10", [str(path.resolve()), key], partial(_read_image_folder, path, files))
    else:
        st = path.stat()
        ident = [str(path.resolve()), st.st_size, st.st_mtime_ns]
        arrays = _cached(cache_dir, "cifar10", ident, partial(_read_image_archive, path))
    return _cifar10(*arrays["splits"], source=f"{_copy_label(arrays['formats'])} from {path}")


def _cifar10(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, source: str) -> ImageData:
    """uint8 CIFAR10 tensors -> ImageData, normalised, with training augmentation on."""
    return ImageData(
        name="CIFAR10",
        source=source,
        train_x=_normalise(train_x, CIFAR10_MEAN, CIFAR10_STD),
        train_y=train_y,
        test_x=_normalise(test_x, CIFAR10_MEAN, CIFAR10_STD),
        test_y=test_y,
        num_classes=len(CIFAR10_CLASSES),
        augment=True,
    )


def _copy_label(formats: list[str]) -> str:
    """Name an image copy for what it is; JPEG is a lossy re-encoding of CIFAR-10."""
    if "JPEG" in formats:
        return "CIFAR-10 offline JPEG copy (lossy re-encoding)"
    return f"CIFAR-10 offline {'+'.join(formats)} copy"


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain containers only (a pickle can otherwise run code)."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """One CIFAR batch file (a latin-1 pickled dict), or DataError naming it."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as e:
        raise DataError(f"CIFAR10: {path} is missing from the pickled batches folder") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as e:
        raise DataError(f"CIFAR10: {path} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(entry, dict):
        raise DataError(f"CIFAR10: {path} holds a {type(entry).__name__}, expected a dict")
    return entry


def _read_cifar_batches(folder: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's cifar-10-batches-py folder -> uint8 (N, 3, 32, 32) images and int64 labels."""
    meta = _unpickle(folder / "batches.meta")
    if tuple(meta.get("label_names", ())) != CIFAR10_CLASSES:
        found = meta.get("label_names")
        raise DataError(f"CIFAR10: {folder / 'batches.meta'} lists classes {found}, expected {list(CIFAR10_CLASSES)}")

    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for batch_name in names:
            path = folder / batch_name
            entry = _unpickle(path)
            data, labels = entry.get("data"), entry.get("labels")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"CIFAR10: {path} has no uint8 'data' array of shape (N, 3072)")
            if labels is None or len(labels) != len(data):
                count = None if labels is None else len(labels)
                raise DataError(f"CIFAR10: {path} has {len(data)} images but {count} 'labels'")
            xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # (N, 3072) -> (N, C, H, W)
            ys.append(torch.as_tensor(np.asarray(labels), dtype=torch.int64))
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return train_x, train_y, test_x, test_y


def _list_image_folder(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """All image files folder/{train,test}/<class>/*, sorted, with their stat (for the cache key)."""
    files = []
    for split in ("train", "test"):
        for path in sorted((folder / split).glob("*/*")):
            if _is_image(path.name):
                files.append((path, path.stat()))
    return files


def _read_image_folder(folder: Path, files: list[tuple[Path, os.stat_result]]) -> dict:
    """Decode an image folder (see _assemble)."""
    return _assemble([(p.relative_to(folder).parts, p.read_bytes()) for p, _ in files], where=str(folder))


def _read_image_archive(archive: Path) -> dict:
    """Decode a tar.gz of an image folder straight from the stream (nothing is unpacked to disk)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for m in tar:
                parts = Path(m.name).parts
                if m.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test") and _is_image(parts[-1]):
                    members.append((parts[-3:], tar.extractfile(m).read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"CIFAR10: {archive} is truncated or not a readable tar.gz ({type(e).__name__}: {e})") from e
    return _assemble(members, where=str(archive))


def _is_image(filename: str) -> bool:
    """A .jpg/.jpeg/.png file that is not hidden (e.g. macOS ._ files)."""
    return filename.lower().endswith(IMAGE_SUFFIXES) and not filename.startswith(".")


def _assemble(items: list[tuple[tuple[str, ...], bytes]], where: str) -> dict:
    """(split, class, file) path parts and encoded bytes per image -> uint8 tensors, classes in sorted-name order.

    Decoded one by one with PIL (~60-100 us per 32x32 JPEG here; a thread pool was
    slower, and torchvision.io's faster decoder is deprecated since torchvision 0.29).
    """
    by_split: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for parts, encoded in items:
        split, label, filename = parts[-3:]
        by_split[split].append((label, filename, encoded))
    for split, entries in by_split.items():
        classes = tuple(sorted({label for label, _, _ in entries}))
        if classes != CIFAR10_CLASSES:
            raise DataError(
                f"CIFAR10: {where} has {split}/ class folders {list(classes)}; expected {list(CIFAR10_CLASSES)} "
                f"({split}/<class>/<image>.jpg|jpeg|png)"
            )
    formats = set()
    splits = []
    for split in ("train", "test"):
        entries = sorted(by_split[split], key=lambda e: (e[0], e[1]))
        images = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
        for i, (label, filename, encoded) in enumerate(entries):
            name = f"{where}: {split}/{label}/{filename}"
            try:
                with Image.open(io.BytesIO(encoded)) as image:
                    size, kind = image.size, image.format
                    if size == (32, 32):
                        images[i] = image.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"CIFAR10: cannot decode image {name} ({type(e).__name__}: {e})") from e
            if size != (32, 32):
                raise DataError(f"CIFAR10: image {name} is {size[0]}x{size[1]}, expected 32x32")
            formats.add(kind)
        labels = torch.tensor([CIFAR10_CLASSES.index(label) for label, _, _ in entries], dtype=torch.int64)
        splits += [torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels]  # (N, C, H, W)
    return {"splits": splits, "formats": sorted(formats)}


def _cached(cache_dir: Path, prefix: str, ident: list, build: Callable[[], dict]) -> dict:
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


# ---------------------------------------------------------------- text


PARQUET_STEMS = {"train": ("train",), "valid": ("validation", "valid"), "test": ("test",)}  # Hugging Face: "validation"
TOKENS, PARQUET, ARCHIVE = "token files", "parquet files", "original archive"  # the text layouts, as sources name them


def _text_layout(name: str) -> list[str]:
    """The layouts a corpus may have under the data root, for messages."""
    layout = [
        f"{name}/{{train,valid,test}}.tokens or {name}/wiki.{{train,valid,test}}.tokens   (UTF-8 text, tokens "
        "separated by whitespace; the loader adds <eos> at the end of every line), or",
        f"{name}/{{train,validation,test}}-*.parquet   (a 'text' column, one row per line, as Hugging Face has it)",
    ]
    if name == "WikiText2":
        layout[-1] += ", or"
        layout.append(f"WikiText2/{WIKITEXT2_ZIP} as it is, or unpacked as wikitext-2/wiki.{{train,valid,test}}.tokens")
    return layout


def _find_text(name: str, root: Path) -> tuple[str, Path, list[list[Path]]] | None:
    """The first layout of corpus `name` under root: (kind, folder or archive, files of train, valid, test)."""
    folders = [root / name] + ([root / "wikitext-2"] if name == "WikiText2" else [])
    for folder in folders:
        for prefix in ("wiki.", ""):
            paths = [folder / f"{prefix}{split}.tokens" for split in SPLITS]
            if all(p.is_file() for p in paths):
                return TOKENS, folder, [[p] for p in paths]
    shards = [_parquet_shards(root / name, split) for split in SPLITS]
    if all(shards):
        return PARQUET, root / name, shards
    archive = root / name / WIKITEXT2_ZIP
    if name == "WikiText2" and archive.is_file():
        return ARCHIVE, archive, [[archive]] * len(SPLITS)
    return None


def _parquet_shards(folder: Path, split: str) -> list[Path]:
    """A split's parquet files in folder: <stem>-*.parquet (e.g. train-00000-of-00001.parquet) or <stem>.parquet."""
    for stem in PARQUET_STEMS[split]:
        shards = sorted(folder.glob(f"{stem}-*.parquet")) + sorted(folder.glob(f"{stem}.parquet"))
        if shards:
            return shards
    return []


def _load_text(name: str, root: Path, download: bool) -> TextData:
    """A word-level corpus in any layout of _find_text; WikiText2 can be downloaded."""
    found = _find_text(name, root)
    if found is None:
        folders = [root / name] + ([root / "wikitext-2"] if name == "WikiText2" else [])
        looked = [f"{folder}/{prefix}{{train,valid,test}}.tokens" for folder in folders for prefix in ("wiki.", "")]
        looked.append(f"{root / name}/{{train,validation,test}}-*.parquet")
        if name != "WikiText2":
            how = ("put the three split files there; the built-in dataset names are MNIST, CIFAR10 and WikiText2 "
                   f"(case-sensitive). {ROOT_HINT}")
            raise _missing(name, looked, _text_layout(name), how)
        looked.append(str(root / name / WIKITEXT2_ZIP))
        how = (f"`heterofl data fetch WikiText2` or download enabled (needs internet), or copy one of these "
               f"layouts under {root}. {ROOT_HINT}")
        if not download:
            raise _missing(name, looked, _text_layout(name), how)
        try:
            _fetch_wikitext2(root, progress=True)
        except FetchError as e:
            raise _missing(name, looked, _text_layout(name), how, cause=e.summary) from e
        found = _find_text(name, root)
    return _read_corpus(name, *found)


def _words(lines: Iterable[str]) -> list[str]:
    """Words as pytorch/examples word_language_model reads a token file: line.split() + ['<eos>'] per line."""
    return [word for line in lines for word in line.split() + [EOS]]


def _split_words(name: str, kind: str, paths: list[Path], split: str) -> list[str]:
    """The words of one split in any text layout (a parquet row is one line of the token file)."""
    try:
        if kind == PARQUET:
            return _words(line for path in paths for line in _parquet_lines(path, name))
        if kind == ARCHIVE:
            return _archive_words(paths[0], split, name)
        with open(paths[0], encoding="utf-8") as f:
            return _words(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: {_split_file(kind, paths, split)} is not UTF-8 text "
                        f"(byte {e.start}: {e.reason})") from e


def _split_file(kind: str, paths: list[Path], split: str) -> str:
    """A split's file(s), for messages."""
    if kind == ARCHIVE:
        return f"{paths[0]} (member wikitext-2/wiki.{split}.tokens)"
    return ", ".join(str(p) for p in paths)


def _parquet_lines(path: Path, name: str) -> list[str]:
    """The 'text' column of a parquet file, one line per row (a missing value is an empty line)."""
    import pyarrow as pa  # only this layout needs pyarrow, which takes a while to import
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DataError(f"{name}: {path} is not a readable parquet file ({type(e).__name__}: {e})") from e
    kind = table.schema.field("text").type if "text" in table.column_names else None
    if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        found = ", ".join(f"{f.name} ({f.type})" for f in table.schema)
        raise DataError(f"{name}: {path} has no 'text' column of strings (its columns: {found})")
    return [line or "" for line in table.column("text").to_pylist()]


def _archive_words(archive: Path, split: str, name: str) -> list[str]:
    """The words of wikitext-2/wiki.<split>.tokens read from the zip itself (line ends as open() reads them)."""
    try:
        with zipfile.ZipFile(archive) as z, z.open(f"wikitext-2/wiki.{split}.tokens") as member:
            return _words(io.TextIOWrapper(member, encoding="utf-8"))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: {archive} is not a readable {WIKITEXT2_ZIP} ({type(e).__name__}: {e}); "
                        "delete it and run `heterofl data fetch WikiText2` again") from e


def _read_corpus(name: str, kind: str, where: Path, files: list[list[Path]]) -> TextData:
    """The train, valid and test files of a text layout -> TextData with the vocabulary of the training split."""
    train_words = _split_words(name, kind, files[0], SPLITS[0])
    vocab = list(dict.fromkeys(train_words))  # order of first appearance
    index = {word: i for i, word in enumerate(vocab)}
    streams = [torch.tensor([index[w] for w in train_words], dtype=torch.int64)]
    for paths, split in zip(files[1:], SPLITS[1:]):
        words = _split_words(name, kind, paths, split)
        unknown = {w for w in words if w not in index}
        if unknown and UNK not in index:
            raise DataError(
                f"{name}: {_split_file(kind, paths, split)} has {len(unknown)} words not in the training vocabulary "
                f"(e.g. {sorted(unknown)[:5]}) and the training split has no {UNK} token to map them to"
            )
        unk = index.get(UNK)
        streams.append(torch.tensor([index.get(w, unk) for w in words], dtype=torch.int64))
    return TextData(name=name, source=f"{name} ({kind}) at {where}", vocab=vocab,
                    train=streams[0], valid=streams[1], test=streams[2])


# ---------------------------------------------------------------- fetch: download into a layout the loaders read

FETCHABLE = ("MNIST", "CIFAR10", "WikiText2")  # each lands in <root>/<name>
WIKITEXT2_SOURCES = [  # (source, [(url, file name, hash, published digest)]), in the order fetch tries them
    ("Hugging Face Salesforce/wikitext, config wikitext-2-v1 (parquet)",
     [(WIKITEXT2_HF_URL.format(file), file, "sha256", digest) for file, digest in WIKITEXT2_PARQUET_SHA256.items()]),
    (f"{WIKITEXT2_ZIP} from the author's mirror", [(WIKITEXT2_ZIP_URL, WIKITEXT2_ZIP, "md5", WIKITEXT2_ZIP_MD5)]),
]


class FetchError(DataError):
    """No source of a dataset could be downloaded; the message names each source, why it failed and what to do."""

    def __init__(self, name: str, root: Path, attempts: list[tuple[str, str]]) -> None:
        self.attempts = attempts  # (source, why it failed), in the order tried
        layout = {"MNIST": MNIST_LAYOUT, "CIFAR10": CIFAR10_LAYOUT}.get(name) or _text_layout(name)
        lines = [f"{name}: could not download it. Tried:"]
        lines += [f"  {i}. {source}: {why}" for i, (source, why) in enumerate(attempts, 1)]
        lines += [
            "What to do (the usual cause: no internet on this machine):",
            f"  - on a machine with internet run `heterofl data fetch {name} --data-root DIR`, "
            f"then copy DIR/{name} to {root / name}",
            f"  - or copy the files into {root} yourself, in one of these layouts:",
            *(f"      {line}" for line in layout),
            "  - or point --data-root or $HETEROFL_DATA at a folder that already has them",
        ]
        super().__init__("\n".join(lines))

    @property
    def summary(self) -> str:
        """The failures on one line, for a loader's message."""
        return "; ".join(f"{why} (from {source})" for source, why in self.attempts)


def fetch_dataset(name: str, data_root: str | os.PathLike | None = None, progress: bool = True) -> DatasetStatus:
    """Download MNIST, CIFAR10 or WikiText2 into the data root unless it is there already; returns its status.

    MNIST and CIFAR10 come through torchvision (its mirrors, its MD5s) as the IDX files and the
    pickled batches; WikiText2 from the first of WIKITEXT2_SOURCES that serves it, checked against
    the published checksum, with a progress bar over the bytes. Everything is downloaded into a
    hidden folder under the root and moved into place only when complete. FetchError (a DataError)
    when no source worked, e.g. offline.
    """
    root = resolve_data_root(data_root)
    if name not in FETCHABLE:
        raise DataError(f"No download source for {name!r}: fetch knows {', '.join(FETCHABLE)} (case-sensitive). "
                        f"A corpus of your own goes into {root / name} as {{train,valid,test}}.tokens "
                        "(or Hugging Face parquet files); `heterofl data status` lists what is there")
    if not status_of(name, root).found:
        if name == "WikiText2":
            _fetch_wikitext2(root, progress)
        else:
            _fetch_with_torchvision(name, root)
    return status_of(name, root)


@contextlib.contextmanager
def _staging(root: Path) -> Iterator[Path]:
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


def _download(url: str, dest: Path, algorithm: str, digest: str, progress: bool) -> None:
    """Stream url into dest with a progress bar over its bytes; DataError when its checksum is not `digest`."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    check = hashlib.new(algorithm)
    with (urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as f,
          tqdm(total=getattr(response, "length", None), unit="B", unit_scale=True, unit_divisor=1024,
               desc=dest.name, disable=not progress) as bar):
        while chunk := response.read(1 << 16):
            f.write(chunk)
            check.update(chunk)
            bar.update(len(chunk))
    if check.hexdigest() != digest:
        raise DataError(f"{dest.name} has {algorithm.upper()} {check.hexdigest()}, expected {digest}")


def _fetch_wikitext2(root: Path, progress: bool) -> None:
    """Download WikiText-2 from the first source that serves it into root/WikiText2 (parquet files or the zip)."""
    attempts = []
    with _staging(root) as stage:
        for source, files in WIKITEXT2_SOURCES:
            try:
                for url, file, algorithm, digest in files:
                    _download(url, stage / file, algorithm, digest, progress)
            except (OSError, http.client.HTTPException, DataError) as e:  # URLError and timeouts are OSErrors
                attempts.append((source, f"{url}: {e}"))
                continue
            (root / "WikiText2").mkdir(exist_ok=True)
            for _, file, _, _ in files:
                os.replace(stage / file, root / "WikiText2" / file)
            return
    raise FetchError("WikiText2", root, attempts)


def _download_or_refuse(name: str, root: Path, download: bool, looked: Iterable[Path | str], layout: list[str],
                        how: str) -> None:
    """Fetch a missing image dataset through torchvision when ``download`` allows, else refuse
    with a message naming where it looked, the layout and how to get it."""
    if not download:
        raise _missing(name, looked, layout, how)
    try:
        _fetch_with_torchvision(name, root)
    except FetchError as e:
        raise _missing(name, looked, layout, how, cause=e.summary) from e


def _fetch_with_torchvision(name: str, root: Path) -> None:
    """MNIST or CIFAR10 through torchvision's own download, moved into the layout the loader reads."""
    with _staging(root) as stage:
        try:
            getattr(torchvision.datasets, name)(str(stage), train=True, download=True)
        except (RuntimeError, OSError, tarfile.TarError) as e:  # RuntimeError: torchvision tried every mirror
            raise FetchError(name, root, [(f"torchvision.datasets.{name}", " ".join(str(e).split()))]) from e
        if name == "MNIST":
            (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            for file in MNIST_FILES:
                os.replace(stage / "MNIST" / "raw" / file, root / "MNIST" / "raw" / file)
        else:
            (root / "CIFAR10").mkdir(exist_ok=True)
            os.replace(stage / "cifar-10-batches-py", root / "CIFAR10" / "cifar-10-batches-py")


# ---------------------------------------------------------------- status: which datasets are where


@dataclass(frozen=True)
class DatasetStatus:
    """One dataset as `heterofl data status` shows it."""

    name: str
    found: bool
    path: Path  # where it is, or where fetch puts it
    source: str  # what the loader calls it, e.g. "CIFAR-10 offline JPEG copy (lossy re-encoding)"; "" if not found
    size_mb: float  # the files the loader reads, in MB (10^6 bytes)


def dataset_status(data_root: str | os.PathLike | None = None) -> list[DatasetStatus]:
    """MNIST, CIFAR10, WikiText2 and every text corpus folder under the data root, from names and sizes only."""
    root = resolve_data_root(data_root)
    skip = {*FETCHABLE, "wikitext-2", "cifar-10-batches-py", "archives"}
    folders = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    corpora = [status_of(n, root) for n in folders if n not in skip and not n.startswith(".")]
    return [status_of(name, root) for name in FETCHABLE] + [s for s in corpora if s.found]


def status_of(name: str, data_root: str | os.PathLike | None = None) -> DatasetStatus:
    """Whether dataset `name` is under the data root, where, what the loader would call it, and its size.

    Looks at file names and sizes only (an image archive: the name of its first image), never decodes.
    """
    root = resolve_data_root(data_root)
    if name == "MNIST":
        files = [root / "MNIST" / "raw" / f for f in MNIST_FILES]
        if not all(p.is_file() for p in files):
            return DatasetStatus(name, False, root / "MNIST", "", 0.0)
        return DatasetStatus(name, True, root / "MNIST", MNIST_SOURCE, _size_mb(files))
    if name == "CIFAR10":
        return _cifar10_status(root)
    found = _find_text(name, root)
    if found is None:
        return DatasetStatus(name, False, root / name, "", 0.0)
    kind, where, files = found
    return DatasetStatus(name, True, where, f"{name} ({kind})", _size_mb({p for paths in files for p in paths}))


def _cifar10_status(root: Path) -> DatasetStatus:
    """CIFAR10's status; an image copy is named by its files' suffixes, as the loader names it by their format."""
    found = _find_cifar10(root)
    if found is None:
        return DatasetStatus("CIFAR10", False, root / "CIFAR10", "", 0.0)
    kind, path = found
    if kind == "batches":
        return DatasetStatus("CIFAR10", True, path, CIFAR10_BATCHES_SOURCE,
                             _size_mb(p for p in path.iterdir() if p.is_file()))
    if kind == "folder":
        files = _list_image_folder(path)
        label = _copy_label(sorted({_suffix_format(p.name) for p, _ in files}))
        return DatasetStatus("CIFAR10", True, path, label, sum(st.st_size for _, st in files) / 1e6)
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = next((m.name for m in tar if m.isfile() and _is_image(Path(m.name).name)), None)
        label = _copy_label([_suffix_format(first)]) if first else "archive with no .jpg/.jpeg/.png image"
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        label = f"unreadable archive ({type(e).__name__}: {e})"
    return DatasetStatus("CIFAR10", True, path, label, _size_mb([path]))


def _suffix_format(filename: str) -> str:
    """The image format a file name says (.png: PNG, .jpg/.jpeg: JPEG), as PIL names it."""
    return "PNG" if filename.lower().endswith(".png") else "JPEG"


def _size_mb(paths: Iterable[Path]) -> float:
    """Total size of the files in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in paths) / 1e6
