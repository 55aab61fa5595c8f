"""Image datasets on disk -> uint8 tensors: torchvision's own classes, and folders of image files.

Every reader returns :class:`Images` (uint8 ``(N, C, H, W)`` and int64 labels per split, the
class names, and what the files are); datasets.py normalises them. Where torchvision has a
class for a dataset it reads it (and fetches it): MNIST, FashionMNIST, KMNIST and EMNIST from
their IDX files, CIFAR10 and CIFAR100 from their pickled batches, SVHN from its .mat files.
torchvision checks the CIFAR and SVHN files against the release's MD5s before it unpickles or
decodes anything, so a file that is not the release's is refused, never run.

A folder of one's own images (torchvision's ImageFolder layout: ``train/<class>/<image>`` and
``test/<class>/<image>``, classes in sorted folder-name order), or a tar.gz of one, is decoded
here with PIL, once: the tensors are cached (``data.cached``).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor

from .data import DataError, cached, staging

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_SPLITS = ("train", "test")
IDX_MAGIC = {3: 2051, 1: 2049}  # IDX dimensions -> magic number (uint8 images, labels)


@dataclass(frozen=True, eq=False)
class Images:
    """A labelled image dataset as uint8 tensors, before normalisation."""

    train_x: Tensor  # (N, C, H, W) uint8
    train_y: Tensor  # (N,) int64
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]  # class names, label i = classes[i]
    source: str  # what the files are, e.g. "FashionMNIST (IDX files) at <root>/FashionMNIST/raw"


# ---------------------------------------------------------------- torchvision's classes


@dataclass(frozen=True)
class TorchvisionFiles:
    """A dataset torchvision reads: its class, the folder it is given, the files it reads there."""

    cls: str  # the torchvision.datasets class, e.g. "FashionMNIST"
    folder: str  # the folder under the data root torchvision is given ("" = the data root itself)
    files: tuple[str, ...]  # the files it reads, relative to that folder
    split_arg: str = "train"  # how the class is told the split: train=True/False, or split="train"/"test"
    options: tuple[tuple[str, str], ...] = ()  # more constructor arguments, e.g. EMNIST's split="balanced"
    transposed: bool = False  # images stored transposed (EMNIST): turned upright when read
    label: str = ""  # what the files are, for sources, e.g. "IDX files"

    def paths(self, root: Path) -> list[Path]:
        return [root / self.folder / file for file in self.files]

    def present(self, root: Path) -> bool:
        """Every file torchvision reads is there."""
        return all(path.is_file() for path in self.paths(root))

    def dataset(self, root: Path, split: str, download: bool = False) -> torchvision.datasets.VisionDataset:
        """torchvision's dataset object for one split (``train`` or ``test``)."""
        which = {"train": split == "train"} if self.split_arg == "train" else {"split": split}
        return getattr(torchvision.datasets, self.cls)(str(root / self.folder), download=download,
                                                       **which, **dict(self.options))


def idx_files(cls: str, prefix: str = "", options: tuple[tuple[str, str], ...] = (),
              transposed: bool = False) -> TorchvisionFiles:
    """An MNIST-like dataset: four IDX files in ``<root>/<cls>/raw`` (``prefix`` names EMNIST's split)."""
    names = [f"{prefix}{split}-{kind}-ubyte" for split in (("train", "test") if prefix else ("train", "t10k"))
             for kind in ("images-idx3", "labels-idx1")]
    return TorchvisionFiles(cls, "", tuple(f"{cls}/raw/{name}" for name in names), options=options,
                            transposed=transposed, label="IDX files")


def read_torchvision(files: TorchvisionFiles, root: Path, name: str) -> Images:
    """Read both splits through torchvision's class; DataError naming the files when it cannot."""
    for path in files.paths(root):
        if path.name.endswith("-ubyte"):
            check_idx(path, name)
    splits, classes = [], ()
    for split in IMAGE_SPLITS:
        try:
            dataset = files.dataset(root, split)
        except (RuntimeError, ValueError, TypeError, AssertionError, OSError, EOFError, KeyError,
                pickle.UnpicklingError) as e:
            raise DataError(f"{name}: torchvision.datasets.{files.cls} could not read "
                            f"{root / files.folder or root}: {' '.join(str(e).split())}. torchvision checks the CIFAR "
                            f"and SVHN files against the release's MD5s: a file that is not the release's is refused. "
                            f"Delete them and run `heterofl data fetch {name}`") from e
        x, y = _as_tensors(dataset)
        if len(x) != len(y):
            raise DataError(f"{name}: the {split} images and labels in {root / files.folder} hold different counts: "
                            f"{len(x)} images, {len(y)} labels")
        splits += [x.transpose(2, 3).contiguous() if files.transposed else x, y]
        classes = tuple(getattr(dataset, "classes", ())) or tuple(str(c) for c in range(int(y.max()) + 1))
    where = root / (files.folder or files.files[0].split("/")[0])
    return Images(*splits, classes=classes, source=f"{name} ({files.label}) at {where}")


def _as_tensors(dataset: torchvision.datasets.VisionDataset) -> tuple[Tensor, Tensor]:
    """A torchvision dataset's images as uint8 (N, C, H, W) and labels as int64, whatever it stores them as."""
    data = torch.as_tensor(np.asarray(dataset.data))
    if data.ndim == 3:  # MNIST-like: (N, H, W)
        data = data.unsqueeze(1)
    elif data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):  # CIFAR: (N, H, W, C)
        data = data.permute(0, 3, 1, 2)
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels  # SVHN
    return data.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def check_idx(path: Path, name: str) -> None:
    """An IDX file's header and size (torchvision would fail with a bare assert)."""
    ndim = 3 if "-images-" in path.name else 1
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    size = path.stat().st_size
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{name}: {path} is truncated ({size} bytes, shorter than its IDX header)")
    found = int.from_bytes(header[:4], "big")
    if found != IDX_MAGIC[ndim]:
        raise DataError(f"{name}: {path} is not an IDX file of the expected kind (magic number {found}, "
                        f"expected {IDX_MAGIC[ndim]})")
    dims = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = len(header) + int(np.prod(dims))
    if size != expected:
        raise DataError(f"{name}: {path} is truncated or corrupt: {size} bytes, its header {dims} needs {expected}")


def fetch_torchvision(files: TorchvisionFiles, root: Path, name: str) -> None:
    """Download through torchvision (its mirrors, its MD5s) into a hidden folder, then move the files
    it reads into place. :class:`data.FetchError`-style DataError when every mirror failed."""
    with staging(root) as stage:
        try:
            for split in IMAGE_SPLITS:
                files.dataset(stage, split, download=True)
        except (RuntimeError, OSError, tarfile.TarError, ValueError) as e:  # RuntimeError: every mirror failed
            raise DataError(" ".join(str(e).split())) from e
        for file in files.files:
            target = root / files.folder / file
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / files.folder / file, target)


# ---------------------------------------------------------------- a folder of images (ImageFolder's layout)


def image_folder_layout(where: str) -> list[str]:
    return [f"{where}/{{train,test}}/<class>/<image>.jpg|jpeg|png   (torchvision's ImageFolder layout, one folder "
            "per class; classes in sorted name order), or",
            f"{where}/<any>.tar.gz holding such train/ and test/ folders"]


def find_image_folder(folder: Path) -> Path | None:
    """``folder`` when it has train/ and test/ class folders, else its first tar.gz; None if neither."""
    if all((folder / split).is_dir() for split in IMAGE_SPLITS):
        return folder
    archives = sorted(folder.glob("*.tar.gz")) if folder.is_dir() else []
    return archives[0] if archives else None


def read_image_folder(found: Path, name: str, cache_dir: Path, mode: str) -> Images:
    """An image folder or a tar.gz of one -> :class:`Images` in PIL mode ``mode`` ("L" grey, "RGB" colour),
    decoded once and cached by the files' names, sizes and times."""
    if found.is_dir():
        files = list_image_folder(found)
        ident = [str(found.resolve()), mode, [(str(p.relative_to(found)), st.st_size, st.st_mtime_ns) for p, st in files]]
        build: Callable[[], dict] = partial(_decode_folder, found, files, mode, name)
    else:
        st = found.stat()
        ident = [str(found.resolve()), mode, st.st_size, st.st_mtime_ns]
        build = partial(_decode_archive, found, mode, name)
    arrays = cached(cache_dir, name.lower(), ident, build)
    return Images(*arrays["splits"], classes=tuple(arrays["classes"]),
                  source=f"{copy_label(name, arrays['formats'])} from {found}")


def copy_label(name: str, formats: list[str]) -> str:
    """Name an image copy for what it is: JPEG is a lossy re-encoding."""
    if "JPEG" in formats:
        return f"{name} as JPEG files (a lossy re-encoding)"
    return f"{name} as {'+'.join(formats) or 'image'} files"


def suffix_formats(archive: Path | None, files: list[Path]) -> list[str]:
    """The image formats file names say (.png: PNG, .jpg/.jpeg: JPEG), as PIL names them; for an archive,
    its first image's name. Nothing is decoded."""
    names = [p.name for p in files]
    if archive is not None:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                names = [next((m.name for m in tar if m.isfile() and is_image(Path(m.name).name)), "")]
        except (tarfile.TarError, EOFError, zlib.error, OSError):
            return ["unreadable archive"]
    return sorted({"PNG" if n.lower().endswith(".png") else "JPEG" for n in names if is_image(Path(n).name)})


def list_image_folder(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """All image files folder/{train,test}/<class>/*, sorted, with their stat (for the cache key)."""
    return [(path, path.stat()) for split in IMAGE_SPLITS for path in sorted((folder / split).glob("*/*"))
            if is_image(path.name)]


def is_image(filename: str) -> bool:
    """A .jpg/.jpeg/.png file that is not hidden (e.g. macOS ._ files)."""
    return filename.lower().endswith(IMAGE_SUFFIXES) and not filename.startswith(".")


def first_image_mode(folder: Path) -> str:
    """PIL's mode ("L", "RGB", ...) of the first training image of an image folder ("" if it has none), read
    from its header alone."""
    first = next((path for path in sorted((folder / "train").glob("*/*")) if is_image(path.name)), None)
    if first is None:
        return ""
    with Image.open(first) as image:
        return image.mode


def _decode_folder(folder: Path, files: list[tuple[Path, os.stat_result]], mode: str, name: str) -> dict:
    return _assemble([(p.relative_to(folder).parts, p.read_bytes()) for p, _ in files], str(folder), mode, name)


def _decode_archive(archive: Path, mode: str, name: str) -> dict:
    """Decode a tar.gz of an image folder straight from the stream (nothing is unpacked to disk)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = []
            for m in tar:
                parts = Path(m.name).parts
                if m.isfile() and len(parts) >= 3 and parts[-3] in IMAGE_SPLITS and is_image(parts[-1]):
                    members.append((parts[-3:], tar.extractfile(m).read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{name}: {archive} is truncated or not a readable tar.gz ({type(e).__name__}: {e})") from e
    return _assemble(members, str(archive), mode, name)


def _assemble(items: list[tuple[tuple[str, ...], bytes]], where: str, mode: str, name: str) -> dict:
    """(split, class, file) path parts and encoded bytes per image -> uint8 tensors, classes in sorted-name
    order (as torchvision's ImageFolder numbers them). Every image must have the first one's size.

    Decoded one by one with PIL (~60-100 us per 32x32 JPEG here; a thread pool was
    slower, and torchvision.io's faster decoder is deprecated since torchvision 0.29).
    """
    by_split: dict[str, list[tuple[str, str, bytes]]] = {split: [] for split in IMAGE_SPLITS}
    for parts, encoded in items:
        split, label, filename = parts[-3:]
        by_split[split].append((label, filename, encoded))
    classes = tuple(sorted({label for label, _, _ in by_split["train"]}))
    if not classes:
        raise DataError(f"{name}: {where} has no images in train/<class>/ (.jpg, .jpeg or .png)")
    if {label for label, _, _ in by_split["test"]} - set(classes):
        extra = sorted({label for label, _, _ in by_split["test"]} - set(classes))
        raise DataError(f"{name}: {where} has test/ classes {extra} that train/ does not have")
    formats, splits, size = set(), [], None
    for split in IMAGE_SPLITS:
        entries = sorted(by_split[split], key=lambda e: (e[0], e[1]))
        images = []
        for label, filename, encoded in entries:
            shown = f"{where}: {split}/{label}/{filename}"
            try:
                with Image.open(io.BytesIO(encoded)) as image:
                    size = size or image.size
                    if image.size != size:
                        raise DataError(f"{name}: image {shown} is {image.size[0]}x{image.size[1]}, the others "
                                        f"{size[0]}x{size[1]}: every image must have one size (resize them first)")
                    formats.add(image.format)
                    images.append(np.asarray(image.convert(mode)))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"{name}: cannot decode image {shown} ({type(e).__name__}: {e})") from e
        stacked = np.stack(images) if images else np.empty((0, size[1], size[0], len(mode)), np.uint8)
        x = torch.from_numpy(stacked.reshape(len(images), size[1], size[0], -1)).permute(0, 3, 1, 2).contiguous()
        splits += [x, torch.tensor([classes.index(label) for label, _, _ in entries], dtype=torch.int64)]
    return {"splits": splits, "classes": list(classes), "formats": sorted(formats)}
