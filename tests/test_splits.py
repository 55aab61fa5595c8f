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
from heterofl_core.data import ImageData, TextData, batchify, load_dataset
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


@pytest.mark.parametrize("bad", ["none", "non-iid", "non-iid-0", "non-iid-x", "noniid-2", "IID"])
def test_split_clients_refuses_unknown_modes(bad):
    with pytest.raises(ValueError, match=f"data_split must be 'iid' or 'non-iid-N' .*got '{bad}'"):
        split_clients(toy_images(), bad, 10, seed=0)


def test_split_clients_text_is_iid_only():
    text = TextData("toy", "test", ["a"], torch.zeros(100, dtype=torch.int64), torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="data_split for text data must be 'iid', got 'non-iid-2'"):
        split_clients(text, "non-iid-2", 10, seed=0)


def test_real_mnist_paper_splits():
    if not (SHARED_DATA / "MNIST" / "raw").exists():
        pytest.skip(f"real MNIST not found at {SHARED_DATA / 'MNIST' / 'raw'} (set HETEROFL_SHARED_DATA)")
    d = load_dataset("MNIST", SHARED_DATA, download=False)
    iid = split_clients(d, "iid", 100, seed=0)
    assert {len(t) for t in iid.train} == {600} and {len(t) for t in iid.test} == {100}
    non_iid = split_clients(d, "non-iid-2", 100, seed=0)
    assert all(len(labels) == 2 for labels in non_iid.labels)
    assert torch.cat(non_iid.train).sort().values.equal(torch.arange(60000))
    assert torch.cat(non_iid.test).sort().values.equal(torch.arange(10000))
    sizes = [len(t) for t in non_iid.train]
    assert 500 < min(sizes) <= max(sizes) < 700  # two shards of ~300 samples
