"""Client splits: which training and test samples (and which labels) each user holds.

A split is index tensors into the dataset's tensors (a client's data is an index
tensor; a batch is `train_x[idx]`). Every random choice comes from one
torch.Generator, so a seed fixes the split. See spec section 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from heterofl_core.config import dirichlet_alpha, labels_per_user
from heterofl_core.data import ImageData, TextData


@dataclass(frozen=True, eq=False)  # eq=False: lists of tensors have no single truth value
class ClientSplit:
    """Per-user index tensors and label sets."""

    train: list[Tensor]  # per user, int64 indices into the training set (text: the user's row of batchify(train))
    test: list[Tensor]  # per user, int64 indices into the test set (text: empty, the test stream is shared)
    labels: list[Tensor]  # per user, sorted int64 label ids the user holds (text: token ids in its row)


def split_iid(train_y: Tensor, test_y: Tensor, num_users: int, generator: torch.Generator) -> ClientSplit:
    """Each user draws len(train) // num_users training and len(test) // num_users test indices without replacement.

    As the authors do, a user's labels are the distinct labels of its TRAINING indices.
    """
    train_y, test_y = train_y.cpu(), test_y.cpu()
    train = _deal_iid(len(train_y), num_users, generator, "training")
    test = _deal_iid(len(test_y), num_users, generator, "test")
    return ClientSplit(train=train, test=test, labels=[torch.unique(train_y[idx]) for idx in train])


def _deal_iid(n: int, num_users: int, generator: torch.Generator, what: str) -> list[Tensor]:
    """num_users disjoint random index sets of n // num_users each."""
    if num_users < 1 or n < num_users:
        raise ValueError(f"num_users must be between 1 and the {n} {what} samples, got {num_users}")
    per_user = n // num_users
    return list(torch.randperm(n, generator=generator)[: per_user * num_users].view(num_users, per_user))


def split_non_iid(
    train_y: Tensor, test_y: Tensor, num_users: int, labels_per_user: int, generator: torch.Generator
) -> ClientSplit:
    """Label-skewed split: every user holds `labels_per_user` distinct classes, one shard of each (spec section 6).

    Shards: each class's indices, in dataset order, are cut into
    shards_per_class = labels_per_user * num_users / num_classes contiguous pieces;
    the len % shards_per_class leftover indices go one each to the first shards.
    Labels: a deck holding every class shards_per_class times is shuffled and dealt,
    labels_per_user cards per user; each user then receives a random unused shard of
    each of its classes, from the training set and, with the same labels, from the test set.

    Unlike the authors' code, which keeps np.unique of a user's cards and so silently
    drops a shard whenever a user is dealt the same class twice, a repeated card is
    swapped with another user's card (chosen at random from the generator among the
    swaps that reduce the number of repeats; one always exists). So every user holds
    exactly labels_per_user distinct classes and every shard is used exactly once.
    num_classes is taken as max(train_y) + 1.
    """
    train_y, test_y = train_y.cpu(), test_y.cpu()
    num_classes = int(train_y.max()) + 1
    if not 1 <= labels_per_user <= num_classes:
        raise ValueError(f"labels_per_user must be between 1 and the {num_classes} classes, got {labels_per_user}")
    if num_users < 1 or (labels_per_user * num_users) % num_classes:
        raise ValueError(
            f"non-iid-{labels_per_user} with {num_users} users needs labels_per_user * num_users "
            f"({labels_per_user * num_users}) to be a positive multiple of the {num_classes} classes"
        )
    shards_per_class = labels_per_user * num_users // num_classes
    deck = torch.arange(num_classes).repeat(shards_per_class)
    hands = deck[torch.randperm(len(deck), generator=generator)].view(num_users, labels_per_user).tolist()
    _repair_repeats(hands, generator)
    labels = [torch.tensor(sorted(hand), dtype=torch.int64) for hand in hands]
    train = _deal_shards(train_y, labels, num_classes, shards_per_class, generator, "training")
    test = _deal_shards(test_y, labels, num_classes, shards_per_class, generator, "test")
    return ClientSplit(train=train, test=test, labels=labels)


def _repair_repeats(hands: list[list[int]], generator: torch.Generator) -> None:
    """Swap cards between hands, in place, until no hand holds a class twice.

    A swap gives user u (holding class l twice) a card m it lacks from a user v that
    either holds m twice or lacks l, so the total number of repeats drops by at least
    one. Such a v exists: if every holder of every m missing from u held m once and
    also held l, then l would appear in at least (copies of m) + 2 places, more than
    the deck holds (every class appears equally often).
    """
    while (u := next((i for i, hand in enumerate(hands) if len(set(hand)) < len(hand)), None)) is not None:
        hand = hands[u]
        p = next(p for p, card in enumerate(hand) if card in hand[:p])  # the second copy of a repeated class
        repeated = hand[p]
        swaps = [
            (v, q)
            for v, other in enumerate(hands)
            if v != u
            for q, card in enumerate(other)
            if card not in hand and (other.count(card) > 1 or repeated not in other)
        ]
        assert swaps, "a repeat-reducing swap always exists when every class appears equally often"
        v, q = swaps[int(torch.randint(len(swaps), (1,), generator=generator))]
        hand[p], hands[v][q] = hands[v][q], repeated


def _deal_shards(
    y: Tensor, labels: list[Tensor], num_classes: int, shards_per_class: int, generator: torch.Generator, what: str
) -> list[Tensor]:
    """Cut each class into shards and give every user one random unused shard of each of its labels."""
    shards = []  # shards[c] = class c's shards in a random order; users take them front to back
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()  # dataset order
        if len(idx) < shards_per_class:
            raise ValueError(
                f"class {c} has {len(idx)} {what} samples, fewer than the {shards_per_class} shards it must be cut into"
            )
        size = len(idx) // shards_per_class
        pieces = idx[: size * shards_per_class].view(shards_per_class, size)  # (shards, size)
        leftover = idx[size * shards_per_class :]  # fewer than shards_per_class: one each to the first shards
        class_shards = [torch.cat([pieces[j], leftover[j : j + 1]]) for j in range(shards_per_class)]
        shards.append([class_shards[j] for j in torch.randperm(shards_per_class, generator=generator).tolist()])
    taken = [0] * num_classes
    users = []
    for user_labels in labels:
        parts = []
        for c in user_labels.tolist():
            parts.append(shards[c][taken[c]])
            taken[c] += 1
        users.append(torch.cat(parts))
    assert taken == [shards_per_class] * num_classes, "every shard is dealt exactly once"
    return users


def split_dirichlet(train_y: Tensor, test_y: Tensor, num_users: int, alpha: float,
                    generator: torch.Generator) -> ClientSplit:
    """Label skew drawn from Dirichlet(alpha) (Hsu et al., 2019, arXiv 1909.06335; the ``dirALPHA``
    split, e.g. ``dir0.3``): each class's share per user q_c ~ Dir(alpha, ..., alpha) over the users.

    Each class's training indices, in a random order, are cut at the cumulative shares
    (``round(cumsum(q_c) * n_c)``), so every sample goes to exactly one user. Small alpha gives
    each user few classes, large alpha near-uniform shares. A user the draw leaves without a
    training sample takes one random sample from the user holding the most (users in order, the
    largest first on ties): every user trains on at least one sample, and nothing is duplicated.
    The test set is cut with the same shares among the users holding each class, so a user's test
    labels are among its training labels (Local accuracy). A user's labels are the distinct labels
    of its training indices. The shares come from numpy's Dirichlet, seeded from ``generator``.
    """
    train_y, test_y = train_y.cpu(), test_y.cpu()
    if not alpha > 0:
        raise ValueError(f"a Dirichlet split needs alpha > 0, got {alpha}")
    if num_users < 1 or len(train_y) < num_users:
        raise ValueError(f"num_users must be between 1 and the {len(train_y)} training samples, got {num_users}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    shares = torch.from_numpy(rng.dirichlet(np.full(num_users, float(alpha)), size=num_classes))  # (classes, users)
    train = _cut_by_shares(train_y, shares, generator)
    _fill_empty_users(train, generator)
    held = torch.stack([torch.bincount(train_y[idx], minlength=num_classes) > 0 for idx in train], 1)  # (classes, users)
    among_holders = shares * held
    sums = among_holders.sum(1, keepdim=True)
    test = _cut_by_shares(test_y, torch.where(sums > 0, among_holders / sums.clamp(min=1e-300), shares), generator)
    return ClientSplit(train=train, test=test, labels=[torch.unique(train_y[idx]) for idx in train])


def share_counts(n: int, shares: Tensor) -> Tensor:
    """How many of a class's ``n`` samples each user gets under ``shares`` (one per user, summing to 1): the
    cuts ``round(cumsum(shares) * n)``, the last one at ``n``, differenced. Every sample is dealt once."""
    cuts = torch.round(torch.cumsum(shares, 0)[:-1] * n).long().clamp(max=n)
    return torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([n])]).diff()


def _cut_by_shares(y: Tensor, shares: Tensor, generator: torch.Generator) -> list[Tensor]:
    """Each class's indices, shuffled, cut by :func:`share_counts`: per user, its indices (sorted)."""
    parts: list[list[Tensor]] = [[] for _ in range(shares.shape[1])]
    for c in range(shares.shape[0]):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        for user, piece in enumerate(torch.split(idx, share_counts(len(idx), shares[c]).tolist())):
            parts[user].append(piece)
    return [torch.sort(torch.cat(user)).values for user in parts]


def _fill_empty_users(train: list[Tensor], generator: torch.Generator) -> None:
    """Give each user without training samples one random sample of the largest user, in place."""
    for user in range(len(train)):
        if len(train[user]):
            continue
        donor = max(range(len(train)), key=lambda u: (len(train[u]), -u))
        pick = int(torch.randint(len(train[donor]), (1,), generator=generator))
        train[user] = train[donor][pick].view(1)
        train[donor] = torch.cat([train[donor][:pick], train[donor][pick + 1:]])


def split_text(train_rows: Tensor, num_users: int) -> ClientSplit:
    """User i owns row i of batchify(train, num_users); its labels are the token ids in that row.

    train[i] = tensor([i]) indexes the rows. test[i] is empty: the test stream is shared
    and evaluated as a whole (the authors' iid split of the 10 test rows gives each of
    100 users int(10 / 100) = 0 rows).
    """
    if train_rows.dim() != 2 or train_rows.size(0) != num_users:
        raise ValueError(
            f"train_rows must be batchify(train, {num_users}), one row per user; got shape {tuple(train_rows.shape)}"
        )
    rows = train_rows.cpu()
    return ClientSplit(
        train=[torch.tensor([i]) for i in range(num_users)],
        test=[torch.empty(0, dtype=torch.int64) for _ in range(num_users)],
        labels=[torch.unique(rows[i]) for i in range(num_users)],
    )


def split_clients(data: ImageData | TextData, data_split: str, num_users: int, seed: int) -> ClientSplit:
    """Split a dataset over num_users users: "iid", "non-iid-N" or "dirALPHA" for images, "iid" for text;
    "none" (centralised training, fed=0): one user holds all the data."""
    generator = torch.Generator().manual_seed(seed)
    if data_split == "none":
        return centralised_split(data)
    if isinstance(data, TextData):
        if data_split != "iid":
            raise ValueError(f"data_split for text data must be 'iid', got {data_split!r}")
        return split_text(batchify(data.train, num_users), num_users)
    if data_split == "iid":
        return split_iid(data.train_y, data.test_y, num_users, generator)
    if (labels := labels_per_user(data_split)) is not None:
        return split_non_iid(data.train_y, data.test_y, num_users, labels, generator)
    if (alpha := dirichlet_alpha(data_split)) is not None:
        return split_dirichlet(data.train_y, data.test_y, num_users, alpha, generator)
    raise ValueError(
        f"data_split must be 'iid', 'non-iid-N' with N a positive integer (e.g. 'non-iid-2') or 'dirALPHA' with "
        f"ALPHA > 0 (e.g. 'dir0.3'), got {data_split!r}"
    )


def label_counts(split: ClientSplit, train_y: Tensor, num_classes: int) -> Tensor:
    """(users, classes) int64: how many training samples of each class every user holds."""
    return torch.stack([torch.bincount(train_y.cpu()[idx.cpu()], minlength=num_classes) for idx in split.train])


def centralised_split(data: ImageData | TextData) -> ClientSplit:
    """fed=0: a single client that holds all the data."""
    if isinstance(data, TextData):
        raise ValueError("centralised training (fed=0) is only implemented for image data")
    everything = torch.arange(data.num_classes)
    return ClientSplit(train=[torch.arange(len(data.train_y))], test=[torch.arange(len(data.test_y))], labels=[everything])


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
