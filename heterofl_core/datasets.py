"""Datasets: one registry entry per dataset says everything the rest of the library needs.

An entry (:class:`Dataset`) says what the data is (image or text, classes, channels,
normalisation, augmentation), where it lies under the data root, how it is read and
fetched, and how ``heterofl data status`` shows it. The model family follows from the
data (families.family_for_data: the CNN for grey images, the ResNet for colour ones,
the Transformer for text). Adding a dataset is one :func:`register_dataset` call; no
other module compares dataset names.

    MNIST FashionMNIST KMNIST EMNIST  <root>/<name>/raw/*-ubyte         torchvision's layout and reader
    CIFAR10                           <root>/CIFAR10/cifar-10-batches-py, or an image folder or archive of it
    CIFAR100                          <root>/CIFAR100/cifar-100-python  torchvision's layout and reader
    SVHN                              <root>/SVHN/{train,test}_32x32.mat
    WikiText2 SOTU                    <root>/<name>/{train,valid,test}.tokens, or parquet (text_files.py)
    a folder of your own              <root>/<name>/{train,test}/<class>/<image>  (:func:`image_folder`)
                                      <root>/<name>/{train,valid,test}.tokens     (:func:`text_corpus`)

A name that is not registered is looked for as a folder of one's own under the data root
(:func:`own_dataset`); anything else is refused with the list of datasets and a "did you mean".
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from . import image_files, text_files
from .data import (DATA_ROOT_LABEL, ROOT_HINT, DataError, FetchError, ImageData, TextData, normalise,
                   resolve_cache_dir, resolve_data_root)
from .image_files import Images, TorchvisionFiles

DATA_KINDS = ("image", "text")
Found = tuple[Path, list[Path]]  # where a dataset is (its folder or archive) and the files its reader reads


@dataclass(frozen=True)
class Dataset:
    """One dataset: what it is, where it lies under the data root, how it is read and fetched."""

    name: str  # --data, cfg.dataset (case-sensitive)
    kind: str  # "image" or "text"
    about: str  # one line: what it is
    folder: str  # its folder under the data root (where fetch puts it)
    layout: tuple[str, ...]  # the layouts it may have, relative to the data root, for messages
    find: Callable[[Path], Found | None]  # (data root) -> where it is, or None; names and sizes only, never decodes
    read: Callable[[Path, Path], Images | TextData]  # (data root, cache folder) -> the data
    classes: int | None = None  # image: classes; text: the vocabulary the paper's size tables count; None: from the data
    channels: int | None = None  # image: 1 grey, 3 colour (the family follows it)
    size: tuple[int, int] | None = None  # image (height, width), for the size tables; None: from the data
    mean: tuple[float, ...] | None = None  # normalisation per channel; None: the training images' own
    std: tuple[float, ...] | None = None
    augment: bool = False  # random crop (padding 4) and horizontal flip of training batches, as the authors' CIFAR10
    fetch: Callable[[Path, bool], None] | None = None  # (data root, progress) -> downloads it there; FetchError
    fetched_from: str = ""  # where fetch downloads from, for help texts
    describe: Callable[[Path, list[Path]], str] | None = None  # (where, files) -> what they are; default: by suffix

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"dataset {self.name!r}: unknown kind {self.kind!r}; valid: {', '.join(DATA_KINDS)}")
        if self.kind == "image" and self.channels not in (1, 3):
            raise ValueError(f"image dataset {self.name!r} needs channels 1 (grey) or 3 (colour), got {self.channels}")


DATASETS: dict[str, Dataset] = {}


def register_dataset(dataset: Dataset) -> Dataset:
    """Add ``dataset`` to the registry; its name must be new."""
    if dataset.name in DATASETS:
        raise ValueError(f"dataset {dataset.name!r} is already registered")
    DATASETS[dataset.name] = dataset
    return dataset


def unregister_dataset(name: str) -> None:
    """Remove a dataset added by :func:`register_dataset`."""
    DATASETS.pop(name)


def get_dataset(name: str, data_root: str | os.PathLike | None = None) -> Dataset:
    """The registered dataset ``name``, else a folder of one's own with that name under the data root
    (:func:`own_dataset`); DataError with the list of datasets and a "did you mean" otherwise."""
    if name in DATASETS:
        return DATASETS[name]
    root = resolve_data_root(data_root)
    own = own_dataset(name, root)
    if own is None:
        raise DataError(unknown_message(name, root))
    return own


def unknown_message(name: str, root: Path) -> str:
    """What an unknown dataset name is answered with: the known ones, and the nearest (wrong case first)."""
    own = own_folders(root)
    known = [*DATASETS, *own]
    near = [k for k in known if k.lower() == str(name).lower()] or difflib.get_close_matches(name, known, n=1)
    lines = [f"unknown dataset {name!r}" + (f": did you mean {near[0]}? (names are case-sensitive)" if near else ""),
             f"datasets: {', '.join(DATASETS)}"]
    if own:
        lines.append(f"folders of your own under {root}: {', '.join(own)}")
    lines.append(f"a folder of your own: {root}/<name>/{{train,test}}/<class>/<image> (images) or "
                 f"{root}/<name>/{{train,valid,test}}.tokens (text); `heterofl data status` lists what is there")
    return "\n".join(lines)


def dataset_names() -> list[str]:
    """The registered datasets' names."""
    return list(DATASETS)


def fetchable() -> list[str]:
    """The registered datasets `heterofl data fetch` can download."""
    return [d.name for d in DATASETS.values() if d.fetch is not None]


# ---------------------------------------------------------------- loading


def load_dataset(name: str, data_root: str | os.PathLike | None = None, download: bool = True,
                 cache_dir: str | os.PathLike | None = None) -> ImageData | TextData:
    """Dataset ``name`` as tensors; fetched first when missing and ``download`` allows (needs internet).

    DataError when the name is unknown (the list and a did-you-mean), when the data is not there
    (where we looked, the layouts, how to get it) or when its files cannot be read.
    """
    root = resolve_data_root(data_root)
    entry = get_dataset(name, root)
    if entry.find(root) is None:
        _fetch_or_refuse(entry, root, download)
    read = entry.read(root, resolve_cache_dir(cache_dir))
    data = read if isinstance(read, TextData) else image_data(entry, read)
    # The source is shown beside results and written into records others read: no machine's absolute path.
    return replace(data, name=entry.name, source=data.source.replace(str(root), DATA_ROOT_LABEL))


def image_data(entry: Dataset, images: Images) -> ImageData:
    """uint8 images -> ImageData, normalised by the entry's mean and std (or the training images' own)."""
    channels = images.train_x.shape[1]
    if channels != entry.channels:
        raise DataError(f"{entry.name}: its images have {channels} channels, the entry says {entry.channels}")
    classes = entry.classes or len(images.classes)
    labels = torch.cat([images.train_y, images.test_y])
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{entry.name}: labels run from {int(labels.min())} to {int(labels.max())}, "
                        f"but it has {classes} classes")
    if entry.mean is not None and entry.std is not None:
        mean, std = entry.mean, entry.std
    else:
        mean, std = pixel_mean_std(images.train_x)
    return ImageData(name=entry.name, source=images.source,
                     train_x=normalise(images.train_x, mean, std), train_y=images.train_y,
                     test_x=normalise(images.test_x, mean, std), test_y=images.test_y,
                     num_classes=classes, augment=entry.augment, mean=mean, std=std, class_names=images.classes)


def pixel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) standard deviation of uint8 ``(N, C, H, W)`` images on the 0-1 scale,
    from each channel's histogram of its 256 values: exact, and no float copy of the images."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean.append((counts * values).sum() / n)
        std.append(((counts * (values - mean[-1]) ** 2).sum() / (n - 1)).sqrt().clamp_min(1e-6))
    return tuple(m.item() for m in mean), tuple(s.item() for s in std)


def _fetch_or_refuse(entry: Dataset, root: Path, download: bool) -> None:
    """Fetch a missing dataset when ``download`` allows and it has a source, else refuse saying what to do."""
    lines = [f"{entry.name} not found under the data root {root}.", "Expected layout:",
             *(f"  {root}/{line}" for line in entry.layout), "How to get it:"]
    if entry.fetch is not None:
        lines.append(f"  `heterofl data fetch {entry.name}` or download enabled (needs internet), or copy the files "
                     f"there. {ROOT_HINT}")
    else:
        lines.append(f"  copy the files there ({entry.about}). {ROOT_HINT}")
    if not download or entry.fetch is None:
        raise DataError("\n".join(lines))
    try:
        entry.fetch(root, True)
    except FetchError as e:
        raise DataError("\n".join([*lines, f"Download failed: {e.summary}"])) from e


# ---------------------------------------------------------------- fetch and status


def fetch_dataset(name: str, data_root: str | os.PathLike | None = None, progress: bool = True) -> DatasetStatus:
    """Download dataset ``name`` into the data root unless it is there already; returns its status.

    Downloads land in a hidden folder under the root and move into place only when complete.
    DataError when the dataset has no download source, or when no source worked (e.g. offline):
    the message names each source, why it failed and what to do instead.
    """
    root = resolve_data_root(data_root)
    entry = get_dataset(name, root)
    if entry.fetch is None:
        raise DataError(f"{name} has no download source ({entry.about}): fetch knows {', '.join(fetchable())}. "
                        f"Copy it into {root} as {entry.layout[0]}; `heterofl data status` lists what is there")
    if not status_of(name, root).found:
        try:
            entry.fetch(root, progress)
        except FetchError as e:
            lines = [f"{name}: could not download it. Tried:"]
            lines += [f"  {i}. {source}: {why}" for i, (source, why) in enumerate(e.attempts, 1)]
            lines += ["What to do (the usual cause: no internet on this machine):",
                      f"  - on a machine with internet run `heterofl data fetch {name} --data-root DIR`, "
                      f"then copy DIR/{entry.folder} to {root / entry.folder}",
                      f"  - or copy the files into {root} yourself, in one of these layouts:",
                      *(f"      {line}" for line in entry.layout),
                      "  - or point --data-root or $HETEROFL_DATA at a folder that already has them"]
            raise DataError("\n".join(lines)) from e
    return status_of(name, root)


@dataclass(frozen=True)
class DatasetStatus:
    """One dataset as `heterofl data status` shows it."""

    name: str
    found: bool
    path: Path  # where it is, or where fetch puts it
    source: str  # what it is, e.g. "CIFAR10 as JPEG files (lossy)"; "" if not found
    size_mb: float  # the files the loader reads, in MB (10^6 bytes)
    fetchable: bool = True  # `heterofl data fetch` can download it


def status_of(name: str, data_root: str | os.PathLike | None = None) -> DatasetStatus:
    """Whether dataset ``name`` is under the data root, where, what it is, and its size; from file names and
    sizes only, never decoding."""
    root = resolve_data_root(data_root)
    entry = get_dataset(name, root)
    found = entry.find(root)
    if found is None:
        return DatasetStatus(name, False, root / entry.folder, "", 0.0, entry.fetch is not None)
    where, files = found
    return DatasetStatus(name, True, where, _files_label(entry, where, files),
                         sum(p.stat().st_size for p in files) / 1e6, entry.fetch is not None)


def dataset_status(data_root: str | os.PathLike | None = None) -> list[DatasetStatus]:
    """Every registered dataset, then every folder of one's own under the data root."""
    root = resolve_data_root(data_root)
    return [status_of(name, root) for name in [*DATASETS, *own_folders(root)]]


def _files_label(entry: Dataset, where: Path, files: list[Path]) -> str:
    """What a dataset's files are, from their names only: an image copy is named by its files' formats."""
    if entry.describe is not None:
        return entry.describe(where, files)
    if entry.kind == "text":
        return f"{entry.name} ({text_files.find_text([where], True)[0] if where.is_dir() else 'original archive'})"
    return _copy_label(entry.name, where, files)


def _copy_label(name: str, where: Path, files: list[Path]) -> str:
    """An image folder or archive named by its files' formats (an archive: its first image's)."""
    return image_files.copy_label(name, image_files.suffix_formats(where if where.is_file() else None, files))


# ---------------------------------------------------------------- kinds of entries


def torchvision_dataset(name: str, about: str, files: TorchvisionFiles, *, classes: int, channels: int,
                        size: tuple[int, int], mean: tuple[float, ...] | None = None,
                        std: tuple[float, ...] | None = None, augment: bool = False) -> Dataset:
    """A dataset torchvision reads and fetches, in torchvision's own layout under the data root."""
    folder = files.folder or files.files[0].split("/")[0]

    def find(root: Path) -> Found | None:
        return (root / folder, files.paths(root)) if files.present(root) else None

    return Dataset(
        name=name, kind="image", about=about, folder=folder, classes=classes, channels=channels, size=size,
        mean=mean, std=std, augment=augment, find=find,
        layout=tuple(f"{'/'.join(filter(None, [files.folder, file]))}" for file in files.files)[:-1] + (
            f"{'/'.join(filter(None, [files.folder, files.files[-1]]))}   (torchvision.datasets.{files.cls}'s layout)",),
        read=lambda root, cache: image_files.read_torchvision(files, root, name),
        fetch=lambda root, progress: _fetch_torchvision(files, root),
        fetched_from=f"torchvision.datasets.{files.cls} (its mirrors, MD5-checked)",
        describe=lambda where, found: f"{name} ({files.label})")


def _fetch_torchvision(files: TorchvisionFiles, root: Path) -> None:
    try:
        image_files.fetch_torchvision(files, root, files.cls)
    except DataError as e:
        raise FetchError([(f"torchvision.datasets.{files.cls}", str(e))]) from e


def image_folder(name: str, *, channels: int = 3, classes: int | None = None, size: tuple[int, int] | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 augment: bool = False, about: str = "a folder of your own images") -> Dataset:
    """Images of one's own in torchvision's ImageFolder layout under ``<data root>/<name>``: ``train/<class>/``
    and ``test/<class>/`` (classes from the folder names, sorted), or a tar.gz of those folders. Every image
    is read as grey (``channels=1``) or colour (3) and must have one size; normalised by the training images'
    own mean and std unless given."""
    return Dataset(
        name=name, kind="image", about=about, folder=name, classes=classes, channels=channels, size=size,
        mean=mean, std=std, augment=augment, layout=tuple(image_files.image_folder_layout(name)),
        find=partial(_find_image_folder, name),
        read=lambda root, cache: _read_image_folder(name, channels, classes, root, cache))


def _find_image_folder(folder: str, root: Path) -> Found | None:
    return _image_copy_found(image_files.find_image_folder(root / folder))


def _image_copy_found(found: Path | None) -> Found | None:
    """An image folder with its image files, or an archive as its one file; None for None."""
    if found is None:
        return None
    return (found, [p for p, _ in image_files.list_image_folder(found)]) if found.is_dir() else (found, [found])


def _read_image_folder(name: str, channels: int, classes: int | None, root: Path, cache: Path) -> Images:
    images = image_files.read_image_folder(image_files.find_image_folder(root / name), name, cache,
                                           "L" if channels == 1 else "RGB")
    if classes is not None and len(images.classes) != classes:
        raise DataError(f"{name}: {root / name} has {len(images.classes)} class folders "
                        f"{list(images.classes)}, expected {classes}")
    return images


def text_corpus(name: str, *, about: str = "a word-level text corpus of your own", classes: int | None = None,
                folders: tuple[str, ...] = (), wikitext_zip: bool = False,
                fetch: Callable[[Path, bool], None] | None = None, fetched_from: str = "") -> Dataset:
    """A word-level corpus under ``<data root>/<name>`` (or the other ``folders``) in a text_files layout."""
    where = (name, *folders)

    def find(root: Path) -> Found | None:
        found = text_files.find_text([root / folder for folder in where], wikitext_zip)
        return None if found is None else (found[1], sorted({p for paths in found[2] for p in paths}))

    def read(root: Path, cache: Path) -> TextData:
        return text_files.read_corpus(name, *text_files.find_text([root / folder for folder in where], wikitext_zip))

    return Dataset(name=name, kind="text", about=about, folder=name, classes=classes, find=find, read=read,
                   layout=tuple(text_files.text_layout(name, wikitext_zip)), fetch=fetch, fetched_from=fetched_from)


def own_dataset(name: str, root: Path) -> Dataset | None:
    """An unregistered folder ``<root>/<name>`` with an image folder (grey or colour from its first image) or a
    text corpus in it, as an entry; None when there is neither (or the name is not a plain folder name)."""
    if not name or name.startswith(".") or "/" in name or os.sep in name or not (root / name).is_dir():
        return None
    if all((root / name / split).is_dir() for split in image_files.IMAGE_SPLITS):
        mode = image_files.first_image_mode(root / name)
        return image_folder(name, channels=1 if mode in ("L", "1", "I;16") else 3) if mode else None
    if text_files.find_text([root / name]) is not None:
        return text_corpus(name)
    return None


def own_folders(root: Path) -> list[str]:
    """Folders of one's own under the data root (:func:`own_dataset`), by name, beside the registered ones."""
    taken = {folder for d in DATASETS.values() for folder in (d.name, d.folder)}
    names = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    return [n for n in names if n not in taken and own_dataset(n, root) is not None]


# ---------------------------------------------------------------- the datasets we know


def _cifar10_read(root: Path, cache: Path) -> Images:
    """CIFAR10 from torchvision's pickled batches, else from an image folder or archive of the 60,000 images."""
    if CIFAR10_BATCHES.present(root):
        return image_files.read_torchvision(CIFAR10_BATCHES, root, "CIFAR10")
    found = _cifar10_copy(root)
    images = image_files.read_image_folder(found, "CIFAR10", cache, "RGB")
    if images.classes != CIFAR10_CLASSES:
        raise DataError(f"CIFAR10: {found} has class folders {list(images.classes)}; expected "
                        f"{list(CIFAR10_CLASSES)} (train/<class>/<image>)")
    return images


def _cifar10_copy(root: Path) -> Path | None:
    """An image folder or archive of CIFAR10: <root>/CIFAR10 or the offline copy <root>/archives/cifar10-jpeg.tar.gz."""
    found = image_files.find_image_folder(root / "CIFAR10")
    archive = root / "archives" / "cifar10-jpeg.tar.gz"
    return found or (archive if archive.is_file() else None)


def _cifar10_find(root: Path) -> Found | None:
    if CIFAR10_BATCHES.present(root):
        return root / "CIFAR10", CIFAR10_BATCHES.paths(root)
    return _image_copy_found(_cifar10_copy(root))


def _cifar10_describe(where: Path, files: list[Path]) -> str:
    if files == CIFAR10_BATCHES.paths(where.parent):
        return "CIFAR10 (pickled batches)"
    return _copy_label("CIFAR10", where, files)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_BATCHES = TorchvisionFiles(
    "CIFAR10", "CIFAR10", tuple(f"cifar-10-batches-py/{f}" for f in
                                (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
    label="pickled batches")

register_dataset(torchvision_dataset(
    "MNIST", "handwritten digits, 28x28 grey, 10 classes (LeCun et al. 1998)", image_files.idx_files("MNIST"),
    classes=10, channels=1, size=(28, 28), mean=(0.1307,), std=(0.3081,)))  # the authors' normalisation
register_dataset(torchvision_dataset(
    "FashionMNIST", "Zalando's clothing images, 28x28 grey, 10 classes (Xiao et al. 2017)",
    image_files.idx_files("FashionMNIST"), classes=10, channels=1, size=(28, 28)))
register_dataset(torchvision_dataset(
    "KMNIST", "Kuzushiji (cursive Japanese) characters, 28x28 grey, 10 classes (Clanuwat et al. 2018)",
    image_files.idx_files("KMNIST"), classes=10, channels=1, size=(28, 28)))
register_dataset(torchvision_dataset(
    "EMNIST", "handwritten digits and letters, EMNIST's 'balanced' split: 28x28 grey, 47 classes (Cohen et al. 2017)",
    image_files.idx_files("EMNIST", "emnist-balanced-", options=(("split", "balanced"),), transposed=True),
    classes=47, channels=1, size=(28, 28)))
register_dataset(replace(
    torchvision_dataset("CIFAR10", "tiny photographs, 32x32 colour, 10 classes (Krizhevsky 2009)", CIFAR10_BATCHES,
                        classes=10, channels=3, size=(32, 32), augment=True,
                        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),  # the authors' normalisation
    find=_cifar10_find, read=_cifar10_read, describe=_cifar10_describe,
    layout=("CIFAR10/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}   (torchvision's layout), or",
            *image_files.image_folder_layout("CIFAR10"), "archives/cifar10-jpeg.tar.gz   (this project's offline copy)")))
register_dataset(torchvision_dataset(
    "CIFAR100", "tiny photographs, 32x32 colour, 100 classes (Krizhevsky 2009)",
    TorchvisionFiles("CIFAR100", "CIFAR100", ("cifar-100-python/train", "cifar-100-python/test",
                                              "cifar-100-python/meta"), label="pickled batches"),
    classes=100, channels=3, size=(32, 32), augment=True))
register_dataset(torchvision_dataset(
    "SVHN", "house numbers from Street View, 32x32 colour, 10 classes (Netzer et al. 2011)",
    TorchvisionFiles("SVHN", "SVHN", ("train_32x32.mat", "test_32x32.mat"), split_arg="split", label=".mat files"),
    classes=10, channels=3, size=(32, 32)))
register_dataset(text_corpus(
    "WikiText2", about="Wikipedia articles, word level (Merity et al. 2016)", folders=("wikitext-2",),
    wikitext_zip=True, fetch=lambda root, progress: text_files.fetch_wikitext2(root / "WikiText2", progress),
    fetched_from="Hugging Face Salesforce/wikitext (parquet, SHA-256-checked), else wikitext-2-v1.zip from its "
                 "author's mirror (MD5-checked)",
    # The authors' vocabulary (datasets/lang.py: Vocab): their '<ukn>' and '<eos>', then every word of the
    # training split (which holds the corpus's own '<unk>'): 33,279 words. The size tables count models with it.
    classes=33279))
register_dataset(text_corpus(
    "SOTU", about="US State of the Union addresses 1790-2021 in WikiText's format: this project's offline text "
                  "corpus (no download)"))
