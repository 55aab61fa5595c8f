"""The dataset registry: every kind of entry on small files in its real on-disk layout, read end to end."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from heterofl_core import datasets
from heterofl_core.cli import main
from heterofl_core.config import parse_control
from heterofl_core.data import DataError, ImageData
from heterofl_core.datasets import get_dataset, image_folder, load_dataset, register_dataset
from heterofl_core.federated import Federation, run_experiment
from heterofl_core.sizes import level_size
from fakes import unchecked_releases, write_idx  # noqa: F401  (a fixture, by name)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

TINY_RESNET = "1_2_1_iid_fix_e1_bn_1_1"  # two users, both every round, the narrowest ResNet: cheap end to end




@pytest.fixture
def registry():
    """The registry as it was before the test (a CLI run registers a folder of one's own for its process)."""
    saved = dict(datasets.DATASETS)
    yield datasets.DATASETS
    datasets.DATASETS.clear()
    datasets.DATASETS.update(saved)


def run_one_round(name: str, root: Path, control: str = TINY_RESNET):
    cfg = parse_control(control, name, rounds=1, local_epochs=1, batch_size_train=5, sbn_samples=20)
    data = load_dataset(name, root, download=False, cache_dir=root / ".cache")
    frame = run_experiment(cfg, data=data, device="cpu", quiet=True)
    test = frame[frame["split"] == "test"].set_index("metric")["value"]
    return cfg, data, test


# ---------------------------------------------------------------- MNIST-like: IDX files through torchvision


@pytest.mark.parametrize("name, files, classes", [
    ("FashionMNIST", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                      "t10k-labels-idx1-ubyte"], 10),
    ("KMNIST", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"], 10),
    ("EMNIST", ["emnist-balanced-train-images-idx3-ubyte", "emnist-balanced-train-labels-idx1-ubyte",
                "emnist-balanced-test-images-idx3-ubyte", "emnist-balanced-test-labels-idx1-ubyte"], 47),
])
def test_idx_datasets_read_through_torchvision(tmp_path, name, files, classes):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), np.arange(40, dtype=np.uint8) % classes,
              rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12, dtype=np.uint8) % classes]
    (tmp_path / name / "raw").mkdir(parents=True)
    for file, array in zip(files, arrays):
        write_idx(tmp_path / name / "raw" / file, array)
    d = load_dataset(name, tmp_path, download=False)
    assert isinstance(d, ImageData) and d.num_classes == classes and not d.augment
    assert d.source == f"{name} (IDX files) at <data root>/{name}"
    images = torch.from_numpy(arrays[0]).unsqueeze(1)
    if name == "EMNIST":  # stored transposed: turned upright
        images = images.transpose(2, 3)
    raw = (d.train_x * torch.tensor(d.std).view(1, -1, 1, 1) + torch.tensor(d.mean).view(1, -1, 1, 1)) * 255
    assert torch.equal(raw.round().to(torch.uint8), images)
    # normalised by the training images' own mean and standard deviation
    assert abs(d.train_x.mean().item()) < 1e-4 and abs(d.train_x.std().item() - 1) < 1e-3
    assert d.train_y.tolist() == arrays[1].tolist() and len(d.class_names) == classes
    assert parse_control("1_100_0.1_iid_fix_a1_bn_1_1", name).model == "conv", "grey images take the CNN"


# ---------------------------------------------------------------- CIFAR-100 and SVHN: torchvision's files


def write_cifar100(folder: Path, rng: np.random.Generator, train: int = 200, test: int = 100) -> dict:
    """torchvision's cifar-100-python layout, tiny: train, test (fine and coarse labels), meta."""
    folder.mkdir(parents=True)
    written = {}
    for name, n in (("train", train), ("test", test)):
        written[name] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": (np.arange(n) % 100).tolist(), "coarse_labels": (np.arange(n) % 20).tolist(),
                         "filenames": [f"img_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(written[name], protocol=2))
    meta = {"fine_label_names": [f"class{i:02d}" for i in range(100)],
            "coarse_label_names": [f"group{i:02d}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar100_end_to_end_with_a_hundred_label_rows(tmp_path, unchecked_releases):
    written = write_cifar100(tmp_path / "CIFAR100" / "cifar-100-python", np.random.default_rng(1))
    cfg, data, test = run_one_round("CIFAR100", tmp_path)
    assert cfg.model == "resnet18" and cfg.lr == 0.1, "colour images take the ResNet and CIFAR10's recipe"
    assert data.num_classes == 100 and data.augment and data.class_names[:2] == ("class00", "class01")
    assert data.source == "CIFAR100 (pickled batches) at <data root>/CIFAR100"
    expected = torch.from_numpy(written["train"]["data"]).view(-1, 3, 32, 32)
    raw = (data.train_x * torch.tensor(data.std).view(1, 3, 1, 1) + torch.tensor(data.mean).view(1, 3, 1, 1)) * 255
    assert torch.equal(raw.round().to(torch.uint8), expected)
    assert 0 <= test["global_accuracy"] <= 100 and np.isfinite(test["global_loss"])
    federation = Federation.assemble(cfg, data, torch.device("cpu"))
    head = federation.build(cfg.global_rate).head.weight
    assert head.shape[0] == 100, "every client keeps all 100 label rows (the label-row rule)"


def test_cifar100_that_is_not_the_release_is_refused(tmp_path):
    write_cifar100(tmp_path / "CIFAR100" / "cifar-100-python", np.random.default_rng(2))
    with pytest.raises(DataError, match="CIFAR100: torchvision.datasets.CIFAR100 could not read .*MD5"):
        load_dataset("CIFAR100", tmp_path, download=False)


def test_svhn_end_to_end_from_its_mat_files(tmp_path, unchecked_releases):
    rng = np.random.default_rng(3)
    (tmp_path / "SVHN").mkdir()
    labels = {}
    for split, n in (("train", 60), ("test", 20)):
        labels[split] = np.arange(n) % 10 + 1  # SVHN writes digit 0 as label 10
        scipy.io.savemat(tmp_path / "SVHN" / f"{split}_32x32.mat",
                         {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": labels[split][:, None]})
    cfg, data, test = run_one_round("SVHN", tmp_path)
    assert cfg.model == "resnet18" and data.num_classes == 10 and not data.augment, "digits are not flipped"
    assert data.train_y.tolist() == (labels["train"] % 10).tolist(), "label 10 is the digit 0"
    assert data.source == "SVHN (.mat files) at <data root>/SVHN"
    assert 0 <= test["global_accuracy"] <= 100


# ---------------------------------------------------------------- a folder of one's own images


def write_pets(folder: Path, mode: str = "RGB", size: int = 16, per_class: tuple[int, int] = (6, 2)) -> None:
    rng = np.random.default_rng(4)
    for split, n in zip(("train", "test"), per_class):
        for label in ("dog", "cat", "bird"):  # out of order on purpose: classes are sorted folder names
            (folder / split / label).mkdir(parents=True)
            for i in range(n):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    folder / split / label / f"{i}.png")


def test_image_folder_of_ones_own_runs_from_the_command_line(tmp_path, registry, capsys):
    write_pets(tmp_path / "root" / "Pets")
    out = tmp_path / "run"
    assert main(["run", "--data", "Pets", "--control", TINY_RESNET, "--rounds", "1", "--local-epochs", "1",
                 "--set", "sbn_samples=10", "--data-root", str(tmp_path / "root"), "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    assert "global_accuracy" in capsys.readouterr().out
    entry = registry["Pets"]
    assert (entry.kind, entry.channels, entry.classes) == ("image", 3, None)
    data = load_dataset("Pets", tmp_path / "root", download=False, cache_dir=tmp_path / "cache")
    assert data.class_names == ("bird", "cat", "dog") and data.num_classes == 3
    assert data.train_x.shape == (18, 3, 16, 16) and data.train_y.tolist() == [0] * 6 + [1] * 6 + [2] * 6


def test_grey_image_folder_takes_the_cnn_and_an_entry_can_be_registered(tmp_path, registry):
    write_pets(tmp_path / "Sketches", mode="L", size=28)
    assert get_dataset("Sketches", tmp_path).channels == 1  # found as a folder of one's own
    register_dataset(image_folder("Sketches", channels=1, classes=3, size=(28, 28), about="pencil sketches"))
    cfg, data, test = run_one_round("Sketches", tmp_path, "1_2_1_iid_fix_a1-e1_bn_1_1")
    assert cfg.model == "conv" and cfg.lr == 0.01, "grey images take the CNN and MNIST's recipe"
    assert data.train_x.shape == (18, 1, 28, 28) and 0 <= test["global_accuracy"] <= 100
    assert level_size("conv", "a", dataset="Sketches").params < level_size("conv", "a").params, "3 label rows, not 10"
    register_dataset(image_folder("Wrong", channels=1, classes=4))
    write_pets(tmp_path / "Wrong", mode="L")
    with pytest.raises(DataError, match=r"Wrong: .* has 3 class folders \['bird', 'cat', 'dog'\], expected 4"):
        load_dataset("Wrong", tmp_path, download=False, cache_dir=tmp_path / "cache")


def test_an_entry_needs_a_kind_and_image_channels(registry):
    with pytest.raises(ValueError, match="unknown kind 'audio'"):
        datasets.Dataset("X", "audio", "", "X", (), find=lambda root: None, read=lambda root, cache: None)
    with pytest.raises(ValueError, match="needs channels 1 \\(grey\\) or 3 \\(colour\\)"):
        image_folder("X", channels=4)
    with pytest.raises(ValueError, match="'MNIST' is already registered"):
        register_dataset(image_folder("MNIST"))


def test_sizes_for_any_registered_dataset(capsys):
    assert main(["sizes", "--data", "CIFAR100", "--mode", "a", "--json"]) == 0
    cifar100 = capsys.readouterr().out
    assert main(["sizes", "--model", "resnet18", "--mode", "a", "--json"]) == 0
    cifar10 = capsys.readouterr().out
    import json
    (a100,), (a10,) = json.loads(cifar100), json.loads(cifar10)
    head_in = a100["params"] - a10["params"]
    assert head_in > 0 and head_in % 90 == 0, "90 more label rows (weights and biases), nothing else"
    assert main(["sizes", "--data", "fashionmnist"]) == 2
    assert "did you mean FashionMNIST?" in capsys.readouterr().err


# ---------------------------------------------------------------- the real data, when it is there


@pytest.mark.slow
def test_real_fashion_mnist_from_debians_package(tmp_path):
    """Debian's dataset-fashion-mnist ships the four IDX files gzipped; laid out as torchvision's, they load."""
    import gzip
    source = Path("/usr/share/datasets/fashion-mnist")
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in source.glob("*-ubyte.gz"):
        (raw / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    d = load_dataset("FashionMNIST", tmp_path, download=False)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.train_y.bincount().tolist() == [6000] * 10 and d.class_names[0] == "T-shirt/top"
