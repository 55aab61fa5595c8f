"""Client splits: sizes, disjointness, label sets, reproducibility, and the non-iid repeat repair."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heterofl_core import splits as splits_module
from heterofl_core.data import ImageData, TextData
from heterofl_core.datasets import load_dataset
from heterofl_core.splits import batchify
from heterofl_core.splits import ClientSplit, split_clients, split_iid, split_non_iid, split_text

SHARED_DATA = Path(
    os.environ.get("HETEROFL_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


def labels_like_mnist(n: int, num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    """Uneven class sizes in a shuffled order, as in a real dataset."""
    y = torch.arange(n) % num_classes
    y[: n // 7] = 3  # make class 3 bigger than the rest
    return y[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def toy_images(n_train: int = 1200, n_test: int = 400) -> ImageData:
    train_y, test_y = labels_like_mnist(n_train, seed=1), labels_like_mnist(n_test, seed=2)
    x_train, x_test = torch.zeros(n_train, 1, 1, 1), torch.zeros(n_test, 1, 1, 1)
    return ImageData("toy", "test", x_train, train_y, x_test, test_y, num_classes=10, augment=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same_split(a: ClientSplit, b: ClientSplit) -> None:
    for field in ("train", "test", "labels"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(a, field), getattr(b, field), strict=True))


# ---------------------------------------------------------------- iid


def test_iid_sizes_disjoint_and_labels_from_train():
    train_y, test_y = labels_like_mnist(1005), labels_like_mnist(203)
    s = split_iid(train_y, test_y, 10, gen())
    assert [len(t) for t in s.train] == [100] * 10 and [len(t) for t in s.test] == [20] * 10
    for part, n in ((s.train, 1005), (s.test, 203)):
        everything = torch.cat(part)
        assert everything.dtype == torch.int64 and everything.unique().numel() == everything.numel()  # disjoint
        assert everything.min() >= 0 and everything.max() < n
    for idx, labels in zip(s.train, s.labels):
        assert torch.equal(labels, torch.unique(train_y[idx])) and labels.dtype == torch.int64


def test_iid_reproducible_and_seed_dependent():
    train_y, test_y = labels_like_mnist(600), labels_like_mnist(100)
    assert_same_split(split_iid(train_y, test_y, 6, gen(7)), split_iid(train_y, test_y, 6, gen(7)))
    a, b = split_iid(train_y, test_y, 6, gen(7)), split_iid(train_y, test_y, 6, gen(8))
    assert not torch.equal(a.train[0], b.train[0])


def test_iid_refuses_more_users_than_samples():
    with pytest.raises(ValueError, match="num_users must be between 1 and the 5 test samples, got 6"):
        split_iid(torch.zeros(100, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), 6, gen())
    with pytest.raises(ValueError, match="num_users must be between 1"):
        split_iid(torch.zeros(100, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), 0, gen())


# ---------------------------------------------------------------- non-iid


@pytest.mark.parametrize("num_users, labels_per_user", [(100, 2), (20, 2), (10, 5), (30, 10), (10, 1), (5, 4)])
def test_non_iid_distinct_labels_and_every_shard_used_once(num_users, labels_per_user):
    train_y, test_y = labels_like_mnist(3001, seed=3), labels_like_mnist(1003, seed=4)
    s = split_non_iid(train_y, test_y, num_users, labels_per_user, gen(5))
    shards_per_class = labels_per_user * num_users // 10
    assert len(s.train) == len(s.test) == len(s.labels) == num_users
    assert Counter(c for labels in s.labels for c in labels.tolist()) == {c: shards_per_class for c in range(10)}
    for labels in s.labels:
        assert len(labels) == labels_per_user and torch.equal(labels, labels.unique())  # distinct, sorted
    for part, y in ((s.train, train_y), (s.test, test_y)):
        assert torch.equal(torch.cat(part).sort().values, torch.arange(len(y))), "every index used exactly once"
        for idx, labels in zip(part, s.labels):
            assert torch.equal(torch.unique(y[idx]), labels)
            for c in labels.tolist():  # one contiguous shard of class c, of the even size or one more
                class_idx = torch.nonzero(y == c).flatten()
                size = len(class_idx) // shards_per_class
                shard = idx[y[idx] == c]
                start = int(torch.nonzero(class_idx == shard[0]))
                assert len(shard) in (size, size + 1)
                assert torch.equal(shard[:size], class_idx[start : start + size]), "a shard is a contiguous run"


def test_non_iid_leftovers_go_to_the_first_shards():
    y = torch.tensor([0] * 7 + [1] * 6)  # class 0: 7 = 3 * 2 + 1 -> shards [0, 1, 6], [2, 3], [4, 5]
    s = split_non_iid(y, y, 3, 2, gen())
    shards_of_0 = sorted((idx[y[idx] == 0].tolist() for idx in s.train), key=lambda shard: shard[0])
    assert shards_of_0 == [[0, 1, 6], [2, 3], [4, 5]]


def test_non_iid_repairs_repeated_labels(monkeypatch):
    seen = []
    original = splits_module._repair_repeats

    def spy(hands, generator):
        seen.append(sum(len(hand) - len(set(hand)) for hand in hands))
        original(hands, generator)
        seen.append(sum(len(hand) - len(set(hand)) for hand in hands))

    monkeypatch.setattr(splits_module, "_repair_repeats", spy)
    s = split_non_iid(labels_like_mnist(2000), labels_like_mnist(500), 100, 2, gen(0))
    assert seen[0] > 0, "this deal has users dealt one class twice (the authors' code would drop those shards)"
    assert seen[1] == 0 and all(len(labels) == 2 for labels in s.labels)
    assert sum(len(idx) for idx in s.train) == 2000


def test_repair_repeats_smallest_case():
    hands = [[0, 0], [1, 1]]
    splits_module._repair_repeats(hands, gen())
    assert sorted(map(sorted, hands)) == [[0, 1], [0, 1]]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_repair_repeats_property(data):
    num_classes = data.draw(st.integers(1, 10), label="num_classes")
    labels_per_user = data.draw(st.integers(1, num_classes), label="labels_per_user")
    num_users = data.draw(st.integers(1, 6), label="k") * num_classes // math.gcd(num_classes, labels_per_user)
    shards_per_class = labels_per_user * num_users // num_classes
    g = gen(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    deck = torch.arange(num_classes).repeat(shards_per_class)
    deck = deck[torch.randperm(len(deck), generator=g)]
    hands = deck.view(num_users, labels_per_user).tolist()
    splits_module._repair_repeats(hands, g)
    assert all(len(set(hand)) == labels_per_user for hand in hands)
    assert Counter(c for hand in hands for c in hand) == Counter(deck.tolist()), "the same cards, only moved"


def test_non_iid_reproducible_and_seed_dependent():
    train_y, test_y = labels_like_mnist(1000), labels_like_mnist(200)
    a = split_non_iid(train_y, test_y, 20, 2, gen(1))
    assert_same_split(a, split_non_iid(train_y, test_y, 20, 2, gen(1)))
    b = split_non_iid(train_y, test_y, 20, 2, gen(2))
    assert any(not torch.equal(x, y) for x, y in zip(a.labels, b.labels))


@pytest.mark.parametrize("num_users, labels_per_user, message", [
    (10, 0, "labels_per_user must be between 1 and the 10 classes, got 0"),
    (10, 11, "labels_per_user must be between 1 and the 10 classes, got 11"),
    (3, 2, r"non-iid-2 with 3 users needs labels_per_user \* num_users \(6\) to be a positive multiple of the 10"),
    (0, 2, "positive multiple"),
    (500, 2, "class 0 has 10 test samples, fewer than the 100 shards"),
])
def test_non_iid_refuses_bad_values(num_users, labels_per_user, message):
    with pytest.raises(ValueError, match=message):
        split_non_iid(torch.arange(1000) % 10, torch.arange(100) % 10, num_users, labels_per_user, gen())


# ---------------------------------------------------------------- text and dispatch


def test_split_text_user_i_owns_row_i():
    stream = torch.tensor([5, 1, 1, 2, 9, 9, 3, 3, 0, 7])
    rows = batchify(stream, 3)  # [[5, 1, 1], [2, 9, 9], [3, 3, 0]]
    s = split_text(rows, 3)
    assert [t.tolist() for t in s.train] == [[0], [1], [2]]
    assert all(t.numel() == 0 and t.dtype == torch.int64 for t in s.test)
    assert [t.tolist() for t in s.labels] == [[1, 5], [2, 9], [0, 3]]
    with pytest.raises(ValueError, match="one row per user"):
        split_text(rows, 4)


def test_split_clients_dispatch_and_seed():
    d = toy_images()
    s = split_clients(d, "non-iid-2", 10, seed=3)
    assert all(len(labels) == 2 for labels in s.labels)
    assert_same_split(s, split_clients(d, "non-iid-2", 10, seed=3))
    assert_same_split(split_clients(d, "iid", 10, seed=4), split_iid(d.train_y, d.test_y, 10, gen(4)))
    assert_same_split(s, split_non_iid(d.train_y, d.test_y, 10, 2, gen(3)))

    vocab = [str(i) for i in range(10)]
    text = TextData("toy", "test", vocab, torch.arange(100) % 10, torch.arange(5), torch.arange(5))
    t = split_clients(text, "iid", 10, seed=0)
    assert [idx.tolist() for idx in t.train] == [[i] for i in range(10)]
    assert torch.equal(t.labels[0], torch.arange(10))


def test_split_none_is_one_user_holding_everything():
    data = toy_images(200, 50)
    split = split_clients(data, "none", 1, seed=0)
    assert [len(t) for t in split.train] == [200] and [len(t) for t in split.test] == [50]
    assert split.labels[0].tolist() == list(range(data.num_classes))


@pytest.mark.parametrize("bad", ["non-iid", "non-iid-0", "non-iid-x", "noniid-2", "IID", "dir", "dir0",
                                 "dir-1", "dirx", "dirnan", "dirinf"])
def test_split_clients_refuses_unknown_modes(bad):
    with pytest.raises(ValueError, match=f"data_split must be 'iid', 'non-iid-N' .*'dirALPHA' .*got '{bad}'"):
        split_clients(toy_images(), bad, 10, seed=0)


# ---------------------------------------------------------------- Dirichlet label skew


def label_shares(y: torch.Tensor, split: ClientSplit, num_classes: int = 10) -> torch.Tensor:
    """(users, classes): each user's share of its training samples per class."""
    counts = torch.stack([torch.bincount(y[idx], minlength=num_classes) for idx in split.train]).double()
    return counts / counts.sum(1, keepdim=True)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0, 100.0])
def test_dirichlet_deals_every_sample_once_and_every_user_trains(alpha):
    d = toy_images()
    s = split_clients(d, f"dir{alpha:g}", 20, seed=1)
    assert torch.cat(s.train).sort().values.equal(torch.arange(len(d.train_y))), "every training sample once"
    assert torch.cat(s.test).sort().values.equal(torch.arange(len(d.test_y))), "every test sample once"
    assert all(len(idx) >= 1 for idx in s.train), "every user has a training sample"
    for idx, labels in zip(s.train, s.labels):
        assert torch.equal(labels, torch.unique(d.train_y[idx]))


def test_dirichlet_is_seeded():
    d = toy_images()
    assert_same_split(split_clients(d, "dir0.3", 10, seed=2), split_clients(d, "dir0.3", 10, seed=2))
    assert not torch.equal(split_clients(d, "dir0.3", 10, seed=2).train[0], split_clients(d, "dir0.3", 10, seed=3).train[0])


def test_dirichlet_large_alpha_is_near_uniform_and_small_alpha_gives_few_labels():
    d = toy_images(n_train=6000, n_test=1000)
    near_iid = label_shares(d.train_y, split_clients(d, "dir1000", 10, seed=0))
    overall = torch.bincount(d.train_y, minlength=10).double() / len(d.train_y)
    assert (near_iid - overall).abs().max() < 0.05, "alpha large: every user's label shares close to the dataset's"
    skewed = split_clients(d, "dir0.05", 10, seed=0)
    shares = label_shares(d.train_y, skewed)
    assert shares.max(1).values.mean() > 0.6, "alpha small: most of a user's samples are one class"
    assert sum(len(labels) for labels in skewed.labels) / 10 < 5, "few labels per user"


def test_dirichlet_test_labels_follow_training_labels():
    d = toy_images(n_train=6000, n_test=2000)
    s = split_clients(d, "dir0.1", 10, seed=0)
    for train_idx, test_idx in zip(s.train, s.test):
        held = set(torch.unique(d.train_y[train_idx]).tolist())
        assert set(torch.unique(d.test_y[test_idx]).tolist()) <= held, "no test class the user never trained on"


def test_dirichlet_gives_an_emptied_user_a_sample_of_the_largest():
    empty = torch.empty(0, dtype=torch.int64)
    train = [torch.arange(12), empty, torch.arange(12, 15), empty]
    splits_module._fill_empty_users(train, gen(0))
    assert [len(t) for t in train] == [10, 1, 3, 1]
    assert torch.cat(train).sort().values.equal(torch.arange(15)), "moved, not copied"
    assert int(train[1]) < 12 and int(train[3]) < 12, "from the largest user"


def test_real_mnist_dirichlet_split():
    if not (SHARED_DATA / "MNIST" / "raw").exists():
        pytest.skip(f"real MNIST not found at {SHARED_DATA / 'MNIST' / 'raw'} (set HETEROFL_SHARED_DATA)")
    d = load_dataset("MNIST", SHARED_DATA, download=False)
    s = split_clients(d, "dir0.3", 100, seed=0)
    assert torch.cat(s.train).sort().values.equal(torch.arange(60000))
    assert torch.cat(s.test).sort().values.equal(torch.arange(10000))
    assert min(len(t) for t in s.train) >= 1
    assert 1 < sum(len(labels) for labels in s.labels) / 100 < 10, "skewed, not one class each, not all ten"
