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
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# Sorted folder names give the standard CIFAR-10 label order, so an image folder needs no mapping.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_BLACK = tuple(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))  # a black pixel after normalisation
CROP_PADDING = 4  # CIFAR10 training augmentation: random crop 32 with padding 4 (+ horizontal flip)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EOS = "<eos>"
UNK = "<unk>"
WIKITEXT2_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"
WIKITEXT2_MD5 = "542ccefacc6c27f945fb54453812b3cd"  # torchtext's checksum of that archive
SPLITS = ("train", "valid", "test")
ROOT_HINT = "Point --data-root (or the HETEROFL_DATA environment variable) at a folder with that layout."


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
        return _load_mnist(root, download)
    if name == "CIFAR10":
        return _load_cifar10(root, download, _resolve_cache_dir(cache_dir))
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise DataError(
            f"Unknown dataset name {name!r}: use MNIST, CIFAR10, WikiText2 or the name of a text corpus folder."
        )
    return _load_text(name, root, download)


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


def _load_mnist(root: Path, download: bool) -> ImageData:
    """MNIST through torchvision, which reads root/MNIST/raw/*-ubyte as they are."""
    raw = root / "MNIST" / "raw"
    paths = [raw / f for f in MNIST_FILES]
    if not all(p.is_file() for p in paths):
        layout = ["MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte   (the four uncompressed IDX files)"]
        how = f"run with download enabled (needs internet), or copy the four IDX files there. {ROOT_HINT}"
        if not download:
            raise _missing("MNIST", paths, layout, how)
        try:
            torchvision.datasets.MNIST(str(root), train=True, download=True)
        except (RuntimeError, OSError) as e:
            raise _missing("MNIST", paths, layout, how, cause=str(e).strip()) from e
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
        source=f"MNIST (IDX files) at {raw.parent}",
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


def _load_cifar10(root: Path, download: bool, cache_dir: Path) -> ImageData:
    """CIFAR10 from the first of: pickled batches, an image folder, a tar.gz of one, a torchvision download."""
    looked: list[str] = []
    for batches in (root / "CIFAR10" / "cifar-10-batches-py", root / "cifar-10-batches-py"):
        looked.append(f"{batches}/   (torchvision's pickled batches)")
        if batches.is_dir():
            return _cifar10(*_read_cifar_batches(batches), source=f"CIFAR-10 (pickled batches) at {batches}")

    folder = root / "CIFAR10"
    looked.append(f"{folder}/{{train,test}}/<class>/*.jpg|jpeg|png   (image folder)")
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        files = _list_image_folder(folder)
        key = [(str(p.relative_to(folder)), st.st_size, st.st_mtime_ns) for p, st in files]
        arrays = _cached(cache_dir, "cifar10", [str(folder.resolve()), key], partial(_read_image_folder, folder, files))
        return _cifar10(*arrays["splits"], source=_copy_label(arrays["formats"], f"from {folder}"))

    archives = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
    archives.append(root / "archives" / "cifar10-jpeg.tar.gz")
    looked.append(f"{folder}/*.tar.gz   (archive of such a folder)")
    looked.append(f"{archives[-1]}")
    for archive in archives:
        if archive.is_file():
            st = archive.stat()
            ident = [str(archive.resolve()), st.st_size, st.st_mtime_ns]
            arrays = _cached(cache_dir, "cifar10", ident, partial(_read_image_archive, archive))
            return _cifar10(*arrays["splits"], source=_copy_label(arrays["formats"], f"from {archive}"))

    layout = [
        "CIFAR10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}   (torchvision's download), or",
        "CIFAR10/{train,test}/<class>/<image>.jpg|jpeg|png   (class folders named airplane ... truck), or",
        "CIFAR10/<any>.tar.gz or archives/cifar10-jpeg.tar.gz holding such train/ and test/ folders",
    ]
    how = f"run with download enabled (needs internet), or provide one of these layouts under {root}. {ROOT_HINT}"
    if not download:
        raise _missing("CIFAR10", looked, layout, how)
    try:
        torchvision.datasets.CIFAR10(str(folder), train=True, download=True)
    except (RuntimeError, OSError, tarfile.TarError) as e:
        raise _missing("CIFAR10", looked, layout, how, cause=str(e).strip()) from e
    batches = folder / "cifar-10-batches-py"
    return _cifar10(*_read_cifar_batches(batches), source=f"CIFAR-10 (pickled batches) at {batches}")


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


def _copy_label(formats: list[str], where: str) -> str:
    """Name an image copy for what it is; JPEG is a lossy re-encoding of CIFAR-10."""
    if "JPEG" in formats:
        return f"CIFAR-10 offline JPEG copy (lossy re-encoding) {where}"
    return f"CIFAR-10 offline {'+'.join(formats)} copy {where}"


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


def _load_text(name: str, root: Path, download: bool) -> TextData:
    """A corpus folder with {wiki.,}{train,valid,test}.tokens; WikiText2 can be downloaded."""
    folders = [root / name] + ([root / "wikitext-2"] if name == "WikiText2" else [])
    candidates = [
        [folder / f"{prefix}{split}.tokens" for split in SPLITS] for folder in folders for prefix in ("wiki.", "")
    ]
    for paths in candidates:
        if all(p.is_file() for p in paths):
            return _read_corpus(name, paths)

    looked = [f"{paths[0].parent}/{paths[0].name.replace('train', '{train,valid,test}')}" for paths in candidates]
    layout = [
        f"{root}/{name}/{{train,valid,test}}.tokens   (or wiki.train.tokens, ...)",
        "UTF-8 text, tokens separated by whitespace (the loader adds <eos> at the end of every line)",
    ]
    if name == "WikiText2":
        how = (
            f"run with download enabled (needs internet; fetches {WIKITEXT2_URL}), "
            f"or unpack that archive into {root}. {ROOT_HINT}"
        )
        if download:
            try:
                folder = _download_wikitext2(root)
            except (OSError, zipfile.BadZipFile) as e:
                raise _missing(name, looked, layout, how, cause=str(e)) from e
            return _read_corpus(name, [folder / f"wiki.{split}.tokens" for split in SPLITS])
    else:
        how = (
            "put the three token files there; the built-in dataset names are MNIST, CIFAR10 and WikiText2 "
            f"(case-sensitive). {ROOT_HINT}"
        )
    raise _missing(name, looked, layout, how)


def _download_wikitext2(root: Path) -> Path:
    """Fetch and verify wikitext-2-v1.zip (torchtext's URL and MD5) and unpack it to root/wikitext-2."""
    archive = root / "wikitext-2-v1.zip"
    if not archive.is_file():
        root.mkdir(parents=True, exist_ok=True)
        part = archive.with_name(archive.name + ".part")
        with urllib.request.urlopen(WIKITEXT2_URL, timeout=60) as response, open(part, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        if (md5 := hashlib.md5(part.read_bytes()).hexdigest()) != WIKITEXT2_MD5:
            part.unlink()
            raise DataError(f"WikiText2: the download from {WIKITEXT2_URL} has MD5 {md5}, expected {WIKITEXT2_MD5}")
        os.replace(part, archive)
    if (md5 := hashlib.md5(archive.read_bytes()).hexdigest()) != WIKITEXT2_MD5:
        raise DataError(f"WikiText2: {archive} has MD5 {md5}, expected {WIKITEXT2_MD5}; delete it and download again")
    with zipfile.ZipFile(archive) as z:
        z.extractall(root)  # members: wikitext-2/wiki.{train,valid,test}.tokens
    return root / "wikitext-2"


def _tokenise(path: Path, name: str) -> list[str]:
    """Words of a token file as pytorch/examples word_language_model reads them: line.split() + ['<eos>']."""
    try:
        with open(path, encoding="utf-8") as f:
            return [word for line in f for word in line.split() + [EOS]]
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e


def _read_corpus(name: str, paths: list[Path]) -> TextData:
    """Token files (train, valid, test) -> TextData with the vocabulary of the training split."""
    train_words = _tokenise(paths[0], name)
    vocab = list(dict.fromkeys(train_words))  # order of first appearance
    index = {word: i for i, word in enumerate(vocab)}
    streams = [torch.tensor([index[w] for w in train_words], dtype=torch.int64)]
    for path in paths[1:]:
        words = _tokenise(path, name)
        unknown = {w for w in words if w not in index}
        if unknown and UNK not in index:
            raise DataError(
                f"{name}: {path} has {len(unknown)} words not in the training vocabulary (e.g. {sorted(unknown)[:5]}) "
                f"and the training split has no {UNK} token to map them to"
            )
        unk = index.get(UNK)
        streams.append(torch.tensor([index.get(w, unk) for w in words], dtype=torch.int64))
    return TextData(name=name, source=f"{name} (token files) at {paths[0].parent}", vocab=vocab,
                    train=streams[0], valid=streams[1], test=streams[2])
