"""Tiny datasets written in the real on-disk formats, shared by the test modules.

- MNIST: the four uncompressed IDX files under ``root/MNIST/raw`` (what ``load_dataset("MNIST", root)`` reads);
- text: a corpus folder ``root/<name>/{train,valid,test}.tokens`` (what ``load_dataset(name, root)`` reads);
  the same lines as Hugging Face parquet files (``write_parquet_corpus``) or as the original
  ``wikitext-2-v1.zip`` (``write_wikitext_zip``), the layouts ``heterofl data fetch`` produces;
- module-scoped fixtures of a tiny MNIST: ``mnist_data_root`` and ``tiny_mnist`` (import them by name);
- ``unchecked_releases``: torchvision's MD5 comparison skipped for small files in CIFAR's and SVHN's layouts.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# A corpus with a title line, blank line, repeated spaces and an <unk> token (see test_data.py).
TRAIN = "\n = Title = \n\nthe cat sat\n  the dog  sat on <unk> \n"
VALID = "the cat\nbird sat\n"
TEST = "dog\n"


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file: magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_corpus(folder: Path, prefix: str = "", train: str = TRAIN, valid: str = VALID, test: str = TEST) -> None:
    """A text corpus folder: ``{prefix}{train,valid,test}.tokens``."""
    folder.mkdir(parents=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{prefix}{split}.tokens").write_text(text, encoding="utf-8")


def write_tiny_mnist(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-format IDX files under ``root/MNIST/raw``: balanced labels in a shuffled order, and
    images whose brightness pattern depends on the label (so a model can learn something)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 64, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):  # a bright horizontal band whose row depends on the label
            images[i, 2 + 2 * int(label): 4 + 2 * int(label), 4:24] = 255
        arrays[f"{split}-images-idx3-ubyte"] = images
        arrays[f"{split}-labels-idx1-ubyte"] = labels
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


@pytest.fixture(scope="module")
def mnist_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test module's data root holding a tiny MNIST (200 train / 50 test): ``from fakes import mnist_data_root``."""
    root = tmp_path_factory.mktemp("data")
    write_tiny_mnist(root, n_train=200, n_test=50)
    return root


@pytest.fixture(scope="module")
def tiny_mnist(mnist_data_root: Path):  # -> ImageData
    """That tiny MNIST, loaded: ``from fakes import mnist_data_root, tiny_mnist``."""
    from heterofl_core.datasets import load_dataset
    return load_dataset("MNIST", mnist_data_root, download=False)


def tiny_text(n_tokens: int, seed: int, vocab: int = 30, line: int = 12) -> str:
    """Random words w0..w{vocab-1}, ``line`` per line (the loader adds <eos> per line)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in rng.integers(0, vocab, n_tokens)]
    return "".join(" ".join(words[i:i + line]) + "\n" for i in range(0, n_tokens, line))


def write_tiny_corpus(root: Path, name: str = "TINY", n_train: int = 600, n_test: int = 160) -> Path:
    """A word-level corpus ``root/<name>/{train,valid,test}.tokens``; every word of valid/test
    occurs in train (the first line of train lists the whole vocabulary)."""
    vocabulary = " ".join(f"w{i}" for i in range(30)) + "\n"
    write_corpus(root / name, train=vocabulary + tiny_text(n_train, 1), valid=tiny_text(n_test, 2),
                 test=tiny_text(n_test, 3))
    return root / name


def hf_rows(text: str) -> list[str]:
    """The rows Hugging Face's wikitext builder made of a token file: one per line, the line with its
    newline, a blank line as "" (Salesforce/wikitext, the script before its parquet conversion)."""
    return [line if line.strip() else "" for line in io.StringIO(text)]  # lines as iterating the file gives them


def write_parquet_corpus(folder: Path, train: str = TRAIN, valid: str = VALID, test: str = TEST,
                         train_shards: int = 1) -> None:
    """A corpus as Hugging Face publishes one: ``{train,validation,test}-0000i-of-0000n.parquet``, a ``text`` column."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("validation", valid), ("test", test)):
        rows = hf_rows(text)
        shards = train_shards if split == "train" else 1
        size = -(-len(rows) // shards)  # rows per shard, rounded up
        for i in range(shards):
            part = pd.DataFrame({"text": rows[i * size:(i + 1) * size]})
            part.to_parquet(folder / f"{split}-{i:05d}-of-{shards:05d}.parquet", index=False)


def write_wikitext_zip(path: Path, train: str = TRAIN, valid: str = VALID, test: str = TEST) -> None:
    """The layout of ``wikitext-2-v1.zip``: members ``wikitext-2/wiki.{train,valid,test}.tokens``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for split, text in (("train", train), ("valid", valid), ("test", test)):
            z.writestr(f"wikitext-2/wiki.{split}.tokens", text.encode("utf-8"))


@pytest.fixture
def unchecked_releases(monkeypatch):
    """torchvision compares CIFAR's and SVHN's files with the release's MD5s before reading them; a test's small
    files in the same layout are not the release's bytes, so that one comparison is skipped (nothing else)."""
    for name in ("CIFAR10", "CIFAR100", "SVHN"):
        monkeypatch.setattr(f"torchvision.datasets.{name}._check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: os.path.isfile(path))
