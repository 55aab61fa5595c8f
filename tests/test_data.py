"""Dataset loaders on small files in the real on-disk formats, plus the real offline data when present."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from heterofl_core import data as data_module, data_cli, datasets, image_files, text_files
from heterofl_core.data import DataError, ImageData, TextData, resolve_data_root
from heterofl_core.datasets import CIFAR10_CLASSES, get_dataset, load_dataset
from heterofl_core.splits import batchify
from heterofl_core.workloads import augment_batch
from fakes import (  # writers shared with other test modules
    unchecked_releases,  # noqa: F401  (a fixture, by name)
    TEST,
    TRAIN,
    VALID,
    hf_rows,
    write_corpus,
    write_idx,
    write_parquet_corpus,
    write_tiny_corpus,
    write_tiny_mnist,
    write_wikitext_zip,
)

CIFAR10_MEAN, CIFAR10_STD = get_dataset("CIFAR10").mean, get_dataset("CIFAR10").std




SHARED_DATA = Path(
    os.environ.get("HETEROFL_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


def pixels(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo normalisation: float (N, C, H, W) -> the uint8 pixel values it came from."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (x * s + m).mul(255).round().to(torch.uint8)


# ---------------------------------------------------------------- MNIST (IDX files)


@pytest.fixture
def mnist_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(50, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(20, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return tmp_path, arrays


def test_mnist_reads_raw_idx(mnist_root):
    root, arrays = mnist_root
    d = load_dataset("MNIST", root, download=False)
    assert isinstance(d, ImageData) and d.name == "MNIST" and d.num_classes == 10 and not d.augment
    assert d.train_x.shape == (50, 1, 28, 28) and d.test_x.shape == (20, 1, 28, 28)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    for x, name in ((d.train_x, "train-images-idx3-ubyte"), (d.test_x, "t10k-images-idx3-ubyte")):
        assert torch.equal(pixels(x, (0.1307,), (0.3081,))[:, 0], torch.from_numpy(arrays[name]))
    assert d.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert d.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert d.source == "MNIST (IDX files) at <data root>/MNIST", "the root is named, not its machine path"
    assert d.class_names[0] == "0 - zero" and (d.mean, d.std) == ((0.1307,), (0.3081,))  # the authors' normalisation
    assert not (root / "MNIST" / "processed").exists(), "reading must not write next to the data"


def test_mnist_missing_names_dataset_paths_and_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("MNIST", tmp_path, download=False)
    msg = str(err.value)
    assert "MNIST not found" in msg
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg and "heterofl data fetch MNIST" in msg
    assert "HETEROFL_DATA" in msg and "--data-root" in msg


def test_mnist_failed_download_is_one_data_error(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", offline)
    with pytest.raises(DataError, match="(?s)MNIST not found.*Download failed: Error downloading"):
        load_dataset("MNIST", tmp_path, download=True)


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_mnist_truncated_idx_names_the_file(mnist_root, name):
    root, _ = mnist_root
    path = root / "MNIST" / "raw" / name
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=f"{name} is truncated"):
        load_dataset("MNIST", root, download=False)


def test_mnist_bad_magic_and_short_header(mnist_root):
    root, _ = mnist_root
    path = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        load_dataset("MNIST", root, download=False)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="shorter than its IDX header"):
        load_dataset("MNIST", root, download=False)


def test_mnist_image_and_label_counts_must_agree(mnist_root):
    root, arrays = mnist_root
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"][:49])
    with pytest.raises(DataError, match="different counts"):
        load_dataset("MNIST", root, download=False)


# ---------------------------------------------------------------- CIFAR10: pickled batches


def write_cifar_batches(folder: Path, rng: np.random.Generator, per_batch: int = 4, test: int = 5) -> dict:
    """torchvision's cifar-10-batches-py layout, tiny: data_batch_1..5, test_batch, batches.meta."""
    folder.mkdir(parents=True)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        entry = {
            "batch_label": name,
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = entry
    meta = {"num_cases_per_batch": per_batch, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar_pickled_batches(tmp_path, unchecked_releases):
    written = write_cifar_batches(tmp_path / "CIFAR10" / "cifar-10-batches-py", np.random.default_rng(1))
    d = load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")
    assert d.name == "CIFAR10" and d.augment and d.num_classes == 10 and d.class_names == CIFAR10_CLASSES
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (5, 3, 32, 32)
    assert d.train_x.dtype == torch.float32 and d.test_y.dtype == torch.int64
    train_data = np.concatenate([written[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    assert torch.equal(pixels(d.train_x, CIFAR10_MEAN, CIFAR10_STD), torch.from_numpy(train_data).view(20, 3, 32, 32))
    assert d.train_y.tolist() == sum((written[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert d.test_y.tolist() == written["test_batch"]["labels"]
    assert d.source == "CIFAR10 (pickled batches) at <data root>/CIFAR10"
    assert not (tmp_path / "cache").exists(), "pickled batches load fast and are not cached"


def test_cifar_truncated_pickle_names_the_folder(tmp_path, unchecked_releases):
    folder = tmp_path / "CIFAR10" / "cifar-10-batches-py"
    write_cifar_batches(folder, np.random.default_rng(2))
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:100])
    with pytest.raises(DataError, match="CIFAR10: torchvision.datasets.CIFAR10 could not read .*CIFAR10"):
        load_dataset("CIFAR10", tmp_path, download=False)


class _RunsCode:
    def __reduce__(self):
        return (print, ("a pickle can run code",))


def test_cifar_pickle_that_is_not_the_release_is_never_unpickled(tmp_path, capsys):
    """torchvision checks every file against the release's MD5 before it unpickles anything."""
    folder = tmp_path / "CIFAR10" / "cifar-10-batches-py"
    write_cifar_batches(folder, np.random.default_rng(3))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _RunsCode()}, protocol=2))
    with pytest.raises(DataError, match="(?s)could not read .*MD5s: a file that is not the release's is refused"):
        load_dataset("CIFAR10", tmp_path, download=False)
    assert "a pickle can run code" not in capsys.readouterr().out


# ---------------------------------------------------------------- CIFAR10: image folder and archive


def write_image_folder(folder: Path, suffix: str, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """folder/{train,test}/<class>/NNNN<suffix>: 2 training and 1 test image per class; returns the pixels written."""
    written: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, per_class in (("train", 2), ("test", 1)):
        for label in reversed(CIFAR10_CLASSES):  # written out of order on purpose
            (folder / split / label).mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / split / label / f"{i:04d}{suffix}")
    for split in ("train", "test"):  # expected order: class name, then file name
        for label in CIFAR10_CLASSES:
            for path in sorted((folder / split / label).iterdir()):
                written[split].append(np.asarray(Image.open(path).convert("RGB")))
    return written


def write_archive(folder: Path, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=split)


def test_cifar_png_folder_exact_pixels_and_class_order(tmp_path):
    written = write_image_folder(tmp_path / "CIFAR10", ".png", np.random.default_rng(5))
    d = load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (10, 3, 32, 32)
    assert d.train_y.tolist() == [c for c in range(10) for _ in range(2)]  # sorted folder names = CIFAR-10 order
    assert d.test_y.tolist() == list(range(10))
    expected = torch.from_numpy(np.stack(written["train"])).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    assert torch.equal(pixels(d.train_x, CIFAR10_MEAN, CIFAR10_STD), expected)
    assert d.source.startswith("CIFAR10 as PNG files from") and d.class_names == CIFAR10_CLASSES
    assert list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES)


def test_cifar_jpeg_archive_decodes_once_then_hits_cache(tmp_path, monkeypatch):
    written = write_image_folder(tmp_path / "src", ".jpg", np.random.default_rng(6))
    root = tmp_path / "root"
    archive = root / "archives" / "cifar10-jpeg.tar.gz"
    write_archive(tmp_path / "src", archive)
    before = sorted(root.rglob("*"))
    cache = tmp_path / "cache"

    first = load_dataset("CIFAR10", root, download=False, cache_dir=cache)
    assert first.source == f"CIFAR10 as JPEG files (a lossy re-encoding) from <data root>/{archive.relative_to(root)}"
    assert first.train_y.tolist() == [c for c in range(10) for _ in range(2)]
    expected = torch.from_numpy(np.stack(written["train"])).permute(0, 3, 1, 2)
    assert torch.equal(pixels(first.train_x, CIFAR10_MEAN, CIFAR10_STD), expected)
    assert sorted(root.rglob("*")) == before, "nothing is written under the (possibly read-only) data root"
    assert len(list(cache.iterdir())) == 1 and len(list(cache.glob("cifar10-*.pt"))) == 1, "one cache file, no temp left"

    def no_decoding(*args):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(image_files, "_decode_archive", no_decoding)
    again = load_dataset("CIFAR10", root, download=False, cache_dir=cache)
    assert torch.equal(again.train_x, first.train_x) and torch.equal(again.test_y, first.test_y)
    assert again.source == first.source

    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed archive is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("CIFAR10", root, download=False, cache_dir=cache)


def test_cifar_cache_from_env_and_unreadable_cache_rebuilt(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "CIFAR10", ".png", np.random.default_rng(7))
    monkeypatch.setenv("HETEROFL_CACHE", str(tmp_path / "envcache"))
    first = load_dataset("CIFAR10", tmp_path, download=False)
    (cached,) = (tmp_path / "envcache").glob("cifar10-*.pt")
    cached.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = load_dataset("CIFAR10", tmp_path, download=False)
    assert torch.equal(again.train_x, first.train_x)
    assert torch.load(cached, weights_only=True)["formats"] == ["PNG"], "the cache file was rewritten"


def test_cifar_unwritable_cache_still_loads(tmp_path):
    write_image_folder(tmp_path / "CIFAR10", ".png", np.random.default_rng(13))
    (tmp_path / "not-a-folder").write_text("")
    with pytest.warns(UserWarning, match="could not write cache file .*the next load decodes again"):
        d = load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "not-a-folder" / "cache")
    assert d.train_x.shape == (20, 3, 32, 32)


def test_cifar_folder_change_invalidates_cache(tmp_path):
    write_image_folder(tmp_path / "CIFAR10", ".png", np.random.default_rng(8))
    load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "CIFAR10" / "train" / "bird" / "9999.png")
    d = load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")
    assert d.train_x.shape[0] == 21 and len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_cifar_archive_in_cifar10_folder(tmp_path):
    write_image_folder(tmp_path / "src", ".jpeg", np.random.default_rng(9))
    write_archive(tmp_path / "src", tmp_path / "root" / "CIFAR10" / "mycopy.tar.gz")
    d = load_dataset("CIFAR10", tmp_path / "root", download=False, cache_dir=tmp_path / "cache")
    assert "JPEG files (a lossy re-encoding)" in d.source and "mycopy.tar.gz" in d.source


def test_cifar_truncated_archive_names_the_file(tmp_path):
    write_image_folder(tmp_path / "src", ".jpg", np.random.default_rng(10))
    archive = tmp_path / "root" / "archives" / "cifar10-jpeg.tar.gz"
    write_archive(tmp_path / "src", archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="cifar10-jpeg.tar.gz is truncated or not a readable tar.gz"):
        load_dataset("CIFAR10", tmp_path / "root", download=False, cache_dir=tmp_path / "cache")
    assert not list(tmp_path.glob("cache/*.pt")), "nothing is cached from a broken archive"


def test_cifar_undecodable_image_names_the_file(tmp_path):
    write_image_folder(tmp_path / "CIFAR10", ".png", np.random.default_rng(11))
    (tmp_path / "CIFAR10" / "test" / "ship" / "0000.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot decode image .*test/ship/0000.png"):
        load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")


def test_cifar_wrong_image_size_or_classes(tmp_path):
    write_image_folder(tmp_path / "CIFAR10", ".png", np.random.default_rng(12))
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "CIFAR10" / "train" / "cat" / "0000.png")
    with pytest.raises(DataError, match="train/cat/0000.png is 28x28, the others 32x32: every image must have one size"):
        load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")
    (tmp_path / "CIFAR10" / "train" / "cat" / "0000.png").unlink()
    (tmp_path / "CIFAR10" / "test" / "truck").rename(tmp_path / "CIFAR10" / "test" / "lorry")
    with pytest.raises(DataError, match=r"test/ classes \['lorry'\] that train/ does not have"):
        load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")
    (tmp_path / "CIFAR10" / "train" / "truck").rename(tmp_path / "CIFAR10" / "train" / "lorry")
    with pytest.raises(DataError, match="CIFAR10: .* has class folders .*'lorry'.*; expected .*'truck'"):
        load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")


def test_cifar_missing_lists_everything_tried(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_dataset("CIFAR10", tmp_path, download=False, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert msg.startswith(f"CIFAR10 not found under the data root {tmp_path}.")
    for path in [
        tmp_path / "CIFAR10" / "cifar-10-batches-py",
        tmp_path / "CIFAR10" / "{train,test}",
        tmp_path / "CIFAR10" / "<any>.tar.gz",
        tmp_path / "archives" / "cifar10-jpeg.tar.gz",
    ]:
        assert str(path) in msg
    assert "HETEROFL_DATA" in msg

    def offline(self):
        raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", offline)
    with pytest.raises(DataError, match="(?s)CIFAR10 not found.*archives.*Download failed: <urlopen error"):
        load_dataset("CIFAR10", tmp_path, download=True, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- augmentation and batchify


def test_augment_batch_is_a_shifted_and_maybe_flipped_crop():
    x = torch.randn(64, 3, 32, 32)
    out = augment_batch(x, (-1.0, 0.5, 2.0), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.cat([torch.nn.functional.pad(x[:, i:i + 1], (4, 4, 4, 4), value=v)
                        for i, v in enumerate((-1.0, 0.5, 2.0))], dim=1)
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert len(matches) == 1, f"image {i} is not one crop of the padded image"
        seen.add(matches[0])
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 20, "offsets vary over the batch"


def test_augment_batch_reproducible_with_a_generator():
    x = torch.randn(16, 3, 32, 32)
    black = (0.0, 0.0, 0.0)
    a = augment_batch(x, black, torch.Generator().manual_seed(1))
    b = augment_batch(x, black, torch.Generator().manual_seed(1))
    c = augment_batch(x, black, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_batch(x, black).shape == x.shape  # global RNG when no generator


@pytest.mark.cuda
def test_augment_batch_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(8, 3, 32, 32)
    cpu = augment_batch(x, (0.0, 0.0, 0.0), torch.Generator().manual_seed(3))
    gpu = augment_batch(x.cuda(), (0.0, 0.0, 0.0), torch.Generator().manual_seed(3))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


def test_batchify_rows_are_contiguous_and_tail_dropped():
    stream = torch.arange(13)
    rows = batchify(stream, 4)
    assert rows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert batchify(torch.arange(10), 10).shape == (10, 1)
    with pytest.raises(ValueError, match="cannot fill 11 rows"):
        batchify(torch.arange(10), 11)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        batchify(stream, 0)


def test_to_moves_every_tensor_and_keeps_the_rest():
    d = ImageData("toy", "here", torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 1, 2, 2),
                  torch.zeros(1, dtype=torch.int64), 10, False)
    moved = d.to("meta")
    assert all(t.is_meta for t in (moved.train_x, moved.train_y, moved.test_x, moved.test_y))
    assert (moved.name, moved.source, moved.num_classes) == ("toy", "here", 10) and not d.train_x.is_meta
    t = TextData("toy", "here", ["a", "<eos>"], torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0]))
    assert t.vocab_size == 2 and t.to("meta").test.is_meta and "tensor" not in repr(t)


# ---------------------------------------------------------------- text corpora


def reference_tokens(text: str) -> list[str]:
    """pytorch/examples word_language_model: line.split() + ['<eos>'] for every line."""
    return [w for line in io.StringIO(text) for w in line.split() + ["<eos>"]]


@pytest.mark.parametrize("name, folder, prefix", [
    ("SOTU", "SOTU", ""),
    ("WikiText2", "WikiText2", "wiki."),
    ("WikiText2", "wikitext-2", "wiki."),
    ("MyCorpus", "MyCorpus", "wiki."),
])
def test_text_tokenised_like_pytorch_examples(tmp_path, name, folder, prefix):
    write_corpus(tmp_path / folder, prefix)
    d = load_dataset(name, tmp_path, download=False)
    assert isinstance(d, TextData) and d.name == name and d.source.endswith(f"at <data root>/{folder}")
    words = reference_tokens(TRAIN)
    assert d.vocab == list(dict.fromkeys(words)) and d.vocab[:4] == ["<eos>", "=", "Title", "the"]
    assert d.vocab_size == len(set(words))
    assert [d.vocab[i] for i in d.train.tolist()] == words
    assert [d.vocab[i] for i in d.valid.tolist()] == ["the", "cat", "<eos>", "<unk>", "sat", "<eos>"]  # bird -> <unk>
    assert [d.vocab[i] for i in d.test.tolist()] == ["dog", "<eos>"]
    assert all(t.dtype == torch.int64 and t.dim() == 1 for t in (d.train, d.valid, d.test))


def test_text_unknown_word_without_unk_is_an_error(tmp_path):
    write_corpus(tmp_path / "Tiny", train="a b\n", valid="a zebra\n", test="b\n")
    unknown = r"valid.tokens has 1 words not in the training vocabulary \(e.g. \['zebra'\]\)"
    with pytest.raises(DataError, match=unknown):
        load_dataset("Tiny", tmp_path, download=False)


def test_text_not_utf8_names_the_file(tmp_path):
    write_corpus(tmp_path / "Tiny")
    (tmp_path / "Tiny" / "test.tokens").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="test.tokens is not UTF-8 text"):
        load_dataset("Tiny", tmp_path, download=False)


def test_unknown_name_lists_the_datasets_and_folders_of_ones_own(tmp_path):
    write_corpus(tmp_path / "Tiny")
    with pytest.raises(DataError) as err:
        load_dataset("ImageNet", tmp_path, download=True)
    msg = str(err.value)
    assert msg.startswith("unknown dataset 'ImageNet'\ndatasets: MNIST, FashionMNIST, KMNIST, EMNIST, CIFAR10, CIFAR100")
    assert f"folders of your own under {tmp_path}: Tiny" in msg
    assert str(tmp_path / "<name>" / "{train,test}" / "<class>" / "<image>") in msg
    with pytest.raises(DataError, match="unknown dataset 'tiny': did you mean Tiny?"):
        load_dataset("tiny", tmp_path)
    for bad in ("", "../x", ".hidden"):
        with pytest.raises(DataError, match="unknown dataset"):
            load_dataset(bad, tmp_path)


def test_text_partial_folder_is_not_a_corpus(tmp_path):
    write_corpus(tmp_path / "Tiny")
    (tmp_path / "Tiny" / "valid.tokens").unlink()
    with pytest.raises(DataError, match="unknown dataset 'Tiny'"):
        load_dataset("Tiny", tmp_path)


def test_wikitext2_download_offline_and_bad_checksum(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_dataset("WikiText2", tmp_path, download=False)
    assert "unpacked as wikitext-2/wiki.{train,valid,test}.tokens" in str(err.value)
    assert "wikitext-2-v1.zip" in str(err.value)

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(text_files.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="(?s)WikiText2 not found.*Download failed: .*Name or service not known"):
        load_dataset("WikiText2", tmp_path, download=True)

    monkeypatch.setattr(text_files.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the archive"))
    with pytest.raises(DataError, match="(?s)train-00000-of-00001.parquet has SHA256 .*, expected dfc27e43.*"
                                       "wikitext-2-v1.zip has MD5 .*, expected 542ccefacc6c27f945fb54453812b3cd"):
        load_dataset("WikiText2", tmp_path, download=True)
    assert not list(tmp_path.iterdir()), "a download that fails its checksum is not kept"

    (tmp_path / "WikiText2").mkdir()
    (tmp_path / "WikiText2" / "wikitext-2-v1.zip").write_bytes(b"a stale copy")
    with pytest.raises(DataError, match="wikitext-2-v1.zip is not a readable wikitext-2-v1.zip .*; delete it"):
        load_dataset("WikiText2", tmp_path, download=True)


# ---------------------------------------------------------------- every layout `heterofl data fetch` produces


@pytest.mark.parametrize("layout, kind", [
    ("parquet", "parquet files"),
    ("parquet in 2 training shards", "parquet files"),
    ("zip", "original archive"),
])
def test_wikitext2_layouts_give_the_token_files_streams(tmp_path, layout, kind):
    """Hugging Face's parquet files (one row per line) and the zip read in place give what the .tokens give."""
    write_corpus(tmp_path / "tokens" / "WikiText2", "wiki.")
    reference = load_dataset("WikiText2", tmp_path / "tokens", download=False)
    root = tmp_path / "other"
    if layout == "zip":
        write_wikitext_zip(root / "WikiText2" / "wikitext-2-v1.zip")
    else:
        write_parquet_corpus(root / "WikiText2", train_shards=2 if "2 training shards" in layout else 1)
    d = load_dataset("WikiText2", root, download=False)
    assert d.vocab == reference.vocab and [d.vocab[i] for i in d.train.tolist()] == reference_tokens(TRAIN)
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(d, split), getattr(reference, split)), split
    assert d.source.startswith(f"WikiText2 ({kind}) at <data root>/WikiText2")


def test_any_corpus_in_parquet_files_named_by_split(tmp_path):
    folder = tmp_path / "MyCorpus"
    folder.mkdir()
    for split, text in (("train", TRAIN), ("valid", VALID), ("test", TEST)):  # {split}.parquet, "valid" spelled so
        pd.DataFrame({"text": hf_rows(text)}).to_parquet(folder / f"{split}.parquet")
    d = load_dataset("MyCorpus", tmp_path, download=False)
    assert [d.vocab[i] for i in d.valid.tolist()] == ["the", "cat", "<eos>", "<unk>", "sat", "<eos>"]
    assert d.source == f"MyCorpus (parquet files) at <data root>/{folder.relative_to(tmp_path)}"


def test_parquet_that_is_not_a_text_table_names_the_file(tmp_path):
    write_parquet_corpus(tmp_path / "Tiny")
    test_file = tmp_path / "Tiny" / "test-00000-of-00001.parquet"
    pd.DataFrame({"words": [1, 2]}).to_parquet(test_file)
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet has no 'text' column of strings \(its columns: "
                                        r"words \(int64\)"):
        load_dataset("Tiny", tmp_path, download=False)
    test_file.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="test-00000-of-00001.parquet is not a readable parquet file"):
        load_dataset("Tiny", tmp_path, download=False)


# ---------------------------------------------------------------- fetch: the network replaced by fakes


def serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """urlopen answering from `files` (URL -> bytes), any other URL unreachable as offline; returns the URLs asked."""
    asked = []

    def urlopen(request, timeout):
        asked.append(request.full_url)
        assert request.get_header("User-agent") == text_files.USER_AGENT  # the mirror refuses urllib's own agent
        if request.full_url not in files:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return io.BytesIO(files[request.full_url])

    monkeypatch.setattr(text_files.urllib.request, "urlopen", urlopen)
    return asked


def with_digests_of(monkeypatch, files: dict[str, bytes]) -> None:
    """The real WikiText2 sources (URLs, file names, hash kinds), expecting the digests of the fake files."""
    sources = [(source, [(url, file, algo, hashlib.new(algo, files.get(url, b"")).hexdigest())
                         for url, file, algo, _ in entries]) for source, entries in text_files.WIKITEXT2_SOURCES]
    monkeypatch.setattr(text_files, "WIKITEXT2_SOURCES", sources)


def test_wikitext2_sources_are_pinned_and_checksummed():
    (_, parquet), (_, archive) = text_files.WIKITEXT2_SOURCES  # Hugging Face first, then the zip
    splits = ("train", "validation", "test")
    assert [file for _, file, _, _ in parquet] == [f"{s}-00000-of-00001.parquet" for s in splits]
    for url, file, algo, digest in parquet + archive:
        assert url.startswith("https://") and url.endswith(f"/{file}")
        assert len(digest) == {"sha256": 64, "md5": 32}[algo] and int(digest, 16) >= 0
    assert all("/resolve/b08601e04326c79dfdd32d625aee71d232d685c3/wikitext-2-v1/" in url for url, *_ in parquet)
    assert archive[0][1:3] == ("wikitext-2-v1.zip", "md5")


def test_fetch_wikitext2_from_hugging_face(tmp_path, capsys, monkeypatch):
    write_parquet_corpus(tmp_path / "src")
    (_, parquet), _ = text_files.WIKITEXT2_SOURCES
    files = {url: (tmp_path / "src" / file).read_bytes() for url, file, _, _ in parquet}
    with_digests_of(monkeypatch, files)
    asked = serve(monkeypatch, files)
    root = tmp_path / "root"
    status = datasets.fetch_dataset("WikiText2", root)
    assert asked == list(files), "the three parquet files, nothing else"
    assert status == datasets.status_of("WikiText2", root) and status.source == "WikiText2 (parquet files)"
    assert sorted(os.listdir(root)) == ["WikiText2"], "the staging folder is gone"
    assert sorted(os.listdir(root / "WikiText2")) == sorted(file for _, file, _, _ in parquet)
    assert "train-00000-of-00001.parquet" in capsys.readouterr().err, "a progress bar per file"
    d = load_dataset("WikiText2", root, download=False)
    assert [d.vocab[i] for i in d.train.tolist()] == reference_tokens(TRAIN)


def test_fetch_wikitext2_falls_back_to_the_zip(tmp_path, monkeypatch):
    write_wikitext_zip(tmp_path / "wikitext-2-v1.zip")
    (_, parquet), (_, archive) = text_files.WIKITEXT2_SOURCES
    files = {archive[0][0]: (tmp_path / "wikitext-2-v1.zip").read_bytes()}
    with_digests_of(monkeypatch, files)
    asked = serve(monkeypatch, files)
    d = load_dataset("WikiText2", tmp_path / "root", download=True)  # the loader downloads through the same code
    assert asked == [parquet[0][0], archive[0][0]], "Hugging Face tried first, then the zip"
    assert d.source.startswith("WikiText2 (original archive) at <data root>/WikiText2")
    assert [d.vocab[i] for i in d.test.tolist()] == ["dog", "<eos>"]
    assert sorted(os.listdir(tmp_path / "root")) == ["WikiText2"]


def test_fetch_offline_exits_2_naming_the_sources_and_what_to_do(tmp_path, monkeypatch, capsys):
    from heterofl_core.cli import main

    serve(monkeypatch, {})
    assert main(["data", "fetch", "WikiText2", "--data-root", str(tmp_path), "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("heterofl data: error: WikiText2: could not download it. Tried:\n  1. Hugging Face")
    for _, entries in text_files.WIKITEXT2_SOURCES:
        assert f"{entries[0][0]}: <urlopen error [Errno -3] Temporary failure in name resolution>" in err
    assert f"then copy DIR/WikiText2 to {tmp_path / 'WikiText2'}" in err
    assert "WikiText2/{train,validation,test}-*.parquet" in err and "$HETEROFL_DATA" in err
    assert captured.out == "" and list(tmp_path.iterdir()) == [], "nothing half-written is left"


def test_fetch_through_torchvision_offline_and_unknown_names(tmp_path, monkeypatch, capsys):
    from heterofl_core.cli import main

    def offline(self):  # torchvision's message once every mirror failed, several lines
        raise RuntimeError("Error downloading x.gz:\nTried https://mirror/, got:\n<urlopen error [Errno -3] ...>\n")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", offline)
    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", offline)
    assert main(["data", "fetch", "MNIST", "CIFAR10", "SOTU", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("MNIST: could not download it. Tried:\n  1. torchvision.datasets.MNIST: Error downloading x.gz: "
            "Tried https://mirror/, got: <urlopen error") in err
    assert f"copy DIR/MNIST to {tmp_path / 'MNIST'}" in err and "MNIST/raw/train-images-idx3-ubyte" in err
    assert "CIFAR10: could not download it" in err and f"copy DIR/CIFAR10 to {tmp_path / 'CIFAR10'}" in err
    assert "SOTU has no download source" in err and "fetch knows MNIST, FashionMNIST" in err
    assert list(tmp_path.iterdir()) == []


def test_fetch_mnist_lands_in_the_loader_layout_once(tmp_path, monkeypatch, capsys):
    from heterofl_core.cli import main

    monkeypatch.setattr("torchvision.datasets.MNIST.download", lambda self: write_tiny_mnist(Path(self.root)))
    assert main(["data", "fetch", "MNIST", "--data-root", str(tmp_path)]) == 0
    size = sum(p.stat().st_size for p in (tmp_path / "MNIST" / "raw").iterdir()) / 1e6
    assert capsys.readouterr().out == f"MNIST: fetched: MNIST (IDX files), {size:.1f} MB at {tmp_path / 'MNIST'}\n"
    assert sorted(os.listdir(tmp_path)) == ["MNIST"], "the staging folder is gone"
    assert load_dataset("MNIST", tmp_path, download=False).train_x.shape == (200, 1, 28, 28)

    monkeypatch.setattr("torchvision.datasets.MNIST.download", lambda self: pytest.fail("downloaded again"))
    assert main(["data", "fetch", "MNIST", "--data-root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("MNIST: already present: MNIST (IDX files)")


# ---------------------------------------------------------------- heterofl data status


def test_data_status_lists_each_dataset_without_decoding_it(tmp_path, monkeypatch, capsys):
    from heterofl_core.cli import main

    root = tmp_path / "root"
    write_tiny_mnist(root)
    write_tiny_corpus(root, "TINY")
    write_parquet_corpus(root / "WikiText2")
    write_image_folder(tmp_path / "src", ".jpg", np.random.default_rng(0))
    write_archive(tmp_path / "src", root / "archives" / "cifar10-jpeg.tar.gz")
    write_image_folder(root / "Pets", ".png", np.random.default_rng(1))  # a folder of one's own images
    (root / "notes").mkdir()  # neither images nor text: not listed
    readers = [(text_files, "read_corpus"), (image_files, "_assemble"), (image_files, "read_torchvision")]
    for module, name in readers:
        monkeypatch.setattr(module, name, lambda *args: pytest.fail("status decoded a dataset"))

    assert main(["data", "status", "--data-root", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data_root"] == str(root) and report["rule"] == data_module.DATA_ROOT_RULE
    rows = {row["name"]: row for row in report["datasets"]}
    assert list(rows) == [*datasets.DATASETS, "Pets", "TINY"]
    assert rows["MNIST"] == {"name": "MNIST", "found": True, "path": str(root / "MNIST"), "source": "MNIST (IDX files)",
                             "size_mb": sum(p.stat().st_size for p in (root / "MNIST" / "raw").iterdir()) / 1e6,
                             "fetchable": True}
    archive = root / "archives" / "cifar10-jpeg.tar.gz"
    assert (rows["CIFAR10"]["path"], rows["CIFAR10"]["size_mb"]) == (str(archive), archive.stat().st_size / 1e6)
    assert rows["CIFAR10"]["source"] == "CIFAR10 as JPEG files (a lossy re-encoding)"
    assert (rows["WikiText2"]["source"], rows["TINY"]["source"]) == ("WikiText2 (parquet files)", "TINY (token files)")
    assert (rows["Pets"]["source"], rows["Pets"]["fetchable"]) == ("Pets as PNG files", False)
    assert [name for name, row in rows.items() if not row["found"]] == ["FashionMNIST", "KMNIST", "EMNIST",
                                                                        "CIFAR100", "SVHN", "SOTU"]

    assert main(["data", "status", "--data-root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"data root: {root}" and data_module.DATA_ROOT_RULE in lines[1]
    assert lines[3].split() == ["dataset", "found", "MB", "source", "path"]
    assert lines[11].split() == ["WikiText2", "yes", f"{rows['WikiText2']['size_mb']:.1f}", "WikiText2", "(parquet",
                                 "files)", str(root / "WikiText2")]
    assert lines[-1] == "missing: heterofl data fetch FashionMNIST KMNIST EMNIST CIFAR100 SVHN   (needs internet; " \
                        "or copy the files to the path shown)", "SOTU cannot be fetched: not offered"

    monkeypatch.undo()
    for row in rows.values():  # the label status shows is the loader's
        if row["found"]:
            data = load_dataset(row["name"], root, download=False, cache_dir=tmp_path / "cache")
            assert data.source.startswith(row["source"]), (data.source, row["source"])


def test_data_status_of_an_empty_root_says_how_to_get_each(tmp_path, capsys):
    from heterofl_core.cli import main

    assert main(["data", "status", "--data-root", str(tmp_path / "none")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[4:-1]] == [[name, "no", "-"] for name in datasets.DATASETS]
    assert lines[4].endswith(str(tmp_path / "none" / "MNIST"))
    assert lines[-1].startswith(f"missing: heterofl data fetch {' '.join(data_cli.FETCHABLE)}   (needs internet")
    assert data_cli.FETCHABLE == [name for name in datasets.DATASETS if name != "SOTU"]


def test_data_commands_say_the_data_root_rule():
    from heterofl_core.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    actions = next(a for a in commands["data"]._actions if a.dest == "action").choices
    for name in ("status", "fetch"):
        (option,) = [a for a in actions[name]._actions if "--data-root" in a.option_strings]
        assert data_module.DATA_ROOT_RULE in option.help, name


# ---------------------------------------------------------------- the data root: one rule for every command


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A fake checkout <tmp>/work/main (pyproject.toml beside the package) that resolve_data_root sees
    as its own; no $HETEROFL_DATA; the working directory elsewhere."""
    root = tmp_path / "work" / "main"
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'heterofl'\n")
    monkeypatch.setattr(data_module, "repo_root", lambda: root)
    monkeypatch.delenv("HETEROFL_DATA", raising=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return root


def test_resolve_data_root_order(checkout, tmp_path, monkeypatch):
    shared = checkout.parent / "shared" / "data"
    assert resolve_data_root() == resolve_data_root(None) == resolve_data_root("") == checkout / "data"
    shared.mkdir(parents=True)
    assert resolve_data_root() == shared, "the shared copy beside the checkout beats <checkout>/data"
    monkeypatch.setenv("HETEROFL_DATA", "")
    assert resolve_data_root() == shared, "an empty $HETEROFL_DATA counts as unset"
    monkeypatch.setenv("HETEROFL_DATA", str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env", "$HETEROFL_DATA beats the shared copy"
    assert resolve_data_root(tmp_path / "arg") == resolve_data_root(str(tmp_path / "arg")) == tmp_path / "arg", \
        "the argument beats $HETEROFL_DATA"
    assert resolve_data_root("~/x") == Path.home() / "x"
    assert resolve_data_root("rel") == tmp_path / "elsewhere" / "rel", "a relative argument is taken as typed"
    assert resolve_data_root("rel").is_absolute()


def test_resolve_data_root_outside_a_checkout(checkout, monkeypatch):
    (checkout / "pyproject.toml").unlink()  # the package as installed into site-packages
    (checkout.parent / "shared" / "data").mkdir(parents=True)
    assert resolve_data_root() == Path.home() / ".cache" / "heterofl" / "data"
    monkeypatch.setenv("HETEROFL_DATA", "/some/where")
    assert resolve_data_root() == Path("/some/where")


def test_resolve_data_root_ignores_the_working_directory(tmp_path, monkeypatch):
    """The real checkout: the same answer from the repository root, notebooks/ and an unrelated folder."""
    monkeypatch.delenv("HETEROFL_DATA", raising=False)
    checkout = data_module.repo_root()
    assert (checkout / "pyproject.toml").is_file() and (checkout / "heterofl_core" / "data.py").is_file()
    answers = []
    for folder in (checkout, checkout / "notebooks", tmp_path):
        (tmp_path / "data").mkdir(exist_ok=True)  # a ./data in the working directory must not be picked
        monkeypatch.chdir(folder)
        answers.append(resolve_data_root())
    shared = checkout.parent / "shared" / "data"
    assert answers == [shared if shared.is_dir() else checkout / "data"] * 3


def test_run_reproduce_and_notebooks_share_the_data_root(checkout, tmp_path, monkeypatch, capsys):
    """`heterofl run`, `heterofl reproduce` and a notebook's parameters all go through resolve_data_root."""
    from heterofl_core import experiments as ex
    from heterofl_core import reproduce as rp
    from heterofl_core.cli import main

    shared = checkout.parent / "shared" / "data"
    (shared / "SOTU").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (shared / "SOTU" / f"{split}.tokens").write_text("a b\n")
    resolved = []
    real = data_module.resolve_data_root

    def spy(data_root=None):
        resolved.append(real(data_root))
        return resolved[-1]

    monkeypatch.setattr(datasets, "resolve_data_root", spy)
    monkeypatch.setattr(rp, "resolve_data_root", spy)
    monkeypatch.setattr(ex, "resolve_data_root", spy)

    loaded = []

    def no_mnist(root, cache):
        loaded.append(root)
        raise DataError("stop here: no training in this test")

    mnist = dataclasses.replace(datasets.DATASETS["MNIST"], find=lambda root: (root, []), read=no_mnist)
    monkeypatch.setitem(datasets.DATASETS, "MNIST", mnist)
    assert main(["run", "--data", "MNIST", "--control", "1_10_0.5_iid_fix_d1-e1_bn_1_1", "--rounds", "1",
                 "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert loaded == resolved == [shared], "heterofl run reads the data root from resolve_data_root"

    executed = []
    monkeypatch.setattr(rp, "execute", lambda notebook, params, out_dir, log_output=False:
                        executed.append(params) or out_dir / f"{notebook}.ipynb")
    resolved.clear()
    assert main(["reproduce", "--profile", "smoke", "--only", "03", "--out", str(tmp_path / "out")]) == 0
    assert resolved == [shared] and executed[0]["data_root"] == str(shared), \
        "heterofl reproduce hands the notebooks resolve_data_root's answer"

    resolved.clear()
    assert ex.notebook_paths(None, None, None)[0] == shared  # a notebook run by hand, from any folder
    assert ex.text_corpus()[0] == "SOTU"
    assert len(resolved) >= 2 and set(resolved) == {shared}


def test_data_root_help_texts_say_the_one_rule():
    from heterofl_core.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("run", "reproduce", "bench"):
        (option,) = [a for a in commands[name]._actions if "--data-root" in a.option_strings]
        assert data_module.DATA_ROOT_RULE in option.help, name
    assert "resolve_data_root" in data_module.DATA_ROOT_RULE


# ---------------------------------------------------------------- the real offline data (skipped when absent)


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set HETEROFL_SHARED_DATA to the shared data folder)")
    return path


def test_real_mnist():
    shared("MNIST", "raw")
    d = load_dataset("MNIST", SHARED_DATA, download=False)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.train_y[:5].tolist() == [5, 0, 4, 1, 9]
    mean = d.train_x.double().mean().item()
    assert (mean * 0.3081 + 0.1307) * 255 == pytest.approx(33.318, abs=1e-3)  # the README's pixel mean
    assert abs(mean) < 0.01 and d.train_x.std().item() == pytest.approx(1.0, abs=0.01)


def test_real_sotu():
    shared("SOTU")
    d = load_dataset("SOTU", SHARED_DATA, download=False)
    assert d.vocab_size == 15804 and "<unk>" in d.vocab and "<eos>" in d.vocab  # 15,803 words + <eos>
    assert (d.train.numel(), d.valid.numel(), d.test.numel()) == (1652771, 161811, 201520)
    assert d.vocab[: 5] == ["<eos>", "=", "1790", "George", "Washington"]


@pytest.mark.slow
def test_real_cifar10_jpeg_copy(tmp_path):
    shared("archives", "cifar10-jpeg.tar.gz")
    d = load_dataset("CIFAR10", SHARED_DATA, download=False, cache_dir=tmp_path)
    assert "JPEG files (a lossy re-encoding)" in d.source
    assert d.train_x.shape == (50000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32)
    assert d.train_y.bincount().tolist() == [5000] * 10 and d.test_y.bincount().tolist() == [1000] * 10
    assert d.train_x.mean(dim=(0, 2, 3)).abs().max().item() < 0.01


def test_augment_batch_pads_with_normalised_black():
    """torchvision pads the raw image with black; after normalisation that is -mean/std (ImageData.black)."""
    x = torch.zeros(256, 3, 32, 32)
    data = ImageData("CIFAR10", "memory", x, torch.zeros(256, dtype=torch.int64), x, torch.zeros(256, dtype=torch.int64),
                     num_classes=10, augment=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    out = augment_batch(x, data.black, torch.Generator().manual_seed(0))
    black = torch.tensor([-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD)]).view(1, 3, 1, 1)
    border = (out - black).abs() < 1e-6
    assert border.any() and ((out == 0) | border).all()
