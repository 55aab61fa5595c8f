"""Aggregation (client -> server) against a plain sum-and-count loop (spec section 5)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heterofl_core.aggregation import aggregate
from reference import (FAMILIES, LEVELS, RATES, SMALL_VOCAB, TINY, builder, coverage_mask, num_classes,
                       random_labels, random_state_like, reference_aggregate, reference_split, shapes_at,
                       slicer_for)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)


def random_round(family: str, global_rate: float, rates: list[float], seed: int, dtype=torch.float32, **options):
    """An old global state, one random trained state per client and random label sets."""
    gen = torch.Generator().manual_seed(seed)
    old = random_state_like(shapes_at(family, global_rate, **options), gen, dtype)
    clients = [random_state_like(shapes_at(family, r, **options), gen, dtype) for r in rates]
    labels = [random_labels(num_classes(family), gen) for _ in rates]
    return old, clients, labels


def clone_all(states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


def assert_states_close(got: dict, expected: dict, **tol) -> None:
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].shape == expected[key].shape, key
        assert got[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(got[key], expected[key], **tol, msg=lambda m: f"{key}: {m}")


def check_against_reference(family, global_level, levels, seed, dtype=torch.float32, **options):
    g = LEVELS[global_level]
    rates = [LEVELS[level] for level in levels]
    old, clients, labels = random_round(family, g, rates, seed, dtype, **options)
    got = aggregate(slicer_for(family, g, **options), old, clients, rates, labels)
    assert_states_close(got, reference_aggregate(family, old, clients, labels))


# ---------------------------------------------------------------- reference comparisons

def level_mixtures(global_levels, max_clients=10):
    @st.composite
    def draw(draw_):
        global_level = draw_(st.sampled_from(global_levels))
        allowed = [k for k, r in LEVELS.items() if r <= LEVELS[global_level]]
        levels = draw_(st.lists(st.sampled_from(allowed), min_size=1, max_size=max_clients))
        return global_level, levels
    return draw()


SIZES = st.sampled_from(["default", "tiny"])


def sized(family: str, size: str) -> dict:
    return TINY[family] if size == "tiny" else {}


@settings(max_examples=20, deadline=None)
@given(mix=level_mixtures(["a", "b"]), seed=st.integers(0, 2**31 - 1), size=SIZES)
def test_conv_matches_reference(mix, seed, size):
    check_against_reference("conv", *mix, seed, **sized("conv", size))


@settings(max_examples=15, deadline=None)
@given(mix=level_mixtures(["a", "b"], max_clients=8), seed=st.integers(0, 2**31 - 1), size=SIZES)
def test_transformer_matches_reference(mix, seed, size):
    check_against_reference("transformer", *mix, seed, **sized("transformer", size))


@settings(max_examples=5, deadline=None)
@given(mix=level_mixtures(["a", "b"], max_clients=4), seed=st.integers(0, 2**31 - 1))
def test_resnet18_matches_reference(mix, seed):
    check_against_reference("resnet18", *mix, seed, **TINY["resnet18"])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_level_once_matches_reference(family):
    """Deterministic companion to the hypothesis tests: one client of every level a..e, default widths
    (one transformer layer: every layer has the same rules, and that keeps the reference loop short)."""
    check_against_reference(family, "a", list(LEVELS), seed=7, **({"layers": 1} if family == "transformer" else {}))


def test_float64_matches_reference_and_keeps_dtype():
    check_against_reference("conv", "a", ["a", "c", "e", "e"], seed=11, dtype=torch.float64)


def test_real_vocabulary_matches_reference():
    """Default WikiText2 vocabulary: token-embedding and output rows by label, 33,279 embedding rows."""
    real = {"vocab_size": 33278, "layers": 1}
    slicer = slicer_for("transformer", **real)
    gen = torch.Generator().manual_seed(5)
    old = random_state_like(shapes_at("transformer", 1.0, **real), gen)
    rates = [1.0, 0.5, 0.0625]
    clients = [random_state_like(shapes_at("transformer", r, **real), gen) for r in rates]
    labels = [torch.randperm(33278, generator=gen)[:n] for n in (3000, 20000, 50)]
    got = aggregate(slicer, old, clients, rates, labels)
    assert_states_close(got, reference_aggregate("transformer", old, clients, labels))
    assert torch.equal(got["token_embedding.weight"][33278], old["token_embedding.weight"][33278])


# ---------------------------------------------------------------- properties

@pytest.mark.parametrize("family", FAMILIES)
def test_identical_values_come_back(family):
    """Clients that all hold slices of the same tensors W: the result is W (a full client covers everything)."""
    torch.manual_seed(0)
    options = {"layers": 2} if family == "transformer" else {}
    w = builder(family, **options)(1.0).state_dict()
    old = {k: torch.randn_like(v) for k, v in w.items()}
    slicer = slicer_for(family, **options)
    classes = torch.arange(num_classes(family))
    got = aggregate(slicer, old, [slicer.split(w, r) for r in RATES], list(RATES), [classes] * len(RATES))
    for key in w:
        if key == "token_embedding.weight":  # the mask token's row is nobody's label: it stays old
            torch.testing.assert_close(got[key][:-1], w[key][:-1])
            assert torch.equal(got[key][-1], old[key][-1])
        else:
            torch.testing.assert_close(got[key], w[key], msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_values_without_full_client(family):
    """Only c..e clients holding slices of W: covered entries are W, the rest keep their old values."""
    torch.manual_seed(1)
    w = builder(family, **TINY[family])(1.0).state_dict()
    old = {k: torch.randn_like(v) for k, v in w.items()}
    slicer = slicer_for(family, **TINY[family])
    rates = [0.25, 0.125, 0.0625, 0.0625]
    labels = [torch.arange(num_classes(family))] * len(rates)
    got = aggregate(slicer, old, [slicer.split(w, r) for r in rates], rates, labels)
    for key in w:
        covered = coverage_mask(family, key, w[key].shape, 0.25, labels[0])
        assert torch.equal(got[key][~covered], old[key][~covered]), key
        torch.testing.assert_close(got[key][covered], w[key][covered], msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rate_all_labels_is_fedavg(family):
    gen = torch.Generator().manual_seed(2)
    shapes = shapes_at(family, 1.0, **TINY[family])
    old = random_state_like(shapes, gen)
    clients = [random_state_like(shapes, gen) for _ in range(4)]
    classes = torch.arange(num_classes(family))
    got = aggregate(slicer_for(family, **TINY[family]), old, clients, [1.0] * 4, [classes] * 4)
    for key in shapes:
        mean = torch.stack([c[key] for c in clients]).mean(0)
        if key == "token_embedding.weight":
            torch.testing.assert_close(got[key][:-1], mean[:-1])
            assert torch.equal(got[key][-1], old[key][-1])  # mask token row: never a label
        else:
            torch.testing.assert_close(got[key], mean, msg=key)


def test_entry_covered_by_k_clients_is_their_mean():
    """Constant clients 1 (rate a), 2 (b), 3 (c): the c-corner is 2, b-corner minus c-corner 1.5, the rest 1."""
    slicer = slicer_for("conv")
    old = builder("conv")(1.0).state_dict()
    rates = [1.0, 0.5, 0.25]
    clients = [{k: torch.full(s, float(i + 1)) for k, s in shapes_at("conv", r).items()} for i, r in enumerate(rates)]
    got = aggregate(slicer, old, clients, rates, [torch.arange(10)] * 3)
    w = got["features.5.weight"]  # (128, 64, 3, 3)
    assert torch.all(w[:32, :16] == 2.0)
    assert torch.all(w[:64, :32][32:] == 1.5) and torch.all(w[:32, 16:32] == 1.5)
    assert torch.all(w[64:] == 1.0) and torch.all(w[:, 32:] == 1.0)
    first = got["features.0.weight"]  # (64, 1, 3, 3): input channels are never sliced
    assert torch.all(first[:16] == 2.0) and torch.all(first[16:32] == 1.5) and torch.all(first[32:] == 1.0)
    head = got["head.weight"]  # (10, 512): all rows, prefix columns
    assert torch.all(head[:, :128] == 2.0) and torch.all(head[:, 128:256] == 1.5) and torch.all(head[:, 256:] == 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_e_clients_leave_the_rest_unchanged(family):
    gen = torch.Generator().manual_seed(3)
    old = random_state_like(shapes_at(family, 1.0, **TINY[family]), gen)
    clients = [random_state_like(shapes_at(family, 0.0625, **TINY[family]), gen) for _ in range(3)]
    classes = torch.arange(num_classes(family))
    got = aggregate(slicer_for(family, **TINY[family]), old, clients, [0.0625] * 3, [classes] * 3)
    corner_of_result = reference_split(family, got, 0.0625)  # the e-corner, in the clients' layout
    for key in old:
        corner = coverage_mask(family, key, old[key].shape, 0.0625, classes)
        assert torch.equal(got[key][~corner], old[key][~corner]), key
        local_mean = torch.stack([c[key] for c in clients]).mean(0)
        rows = slice(0, len(classes)) if key == "token_embedding.weight" else slice(None)  # not the mask token
        torch.testing.assert_close(corner_of_result[key][rows], local_mean[rows], msg=key)


def test_label_rows_counted_only_for_client_labels_conv():
    slicer = slicer_for("conv")
    gen = torch.Generator().manual_seed(4)
    old = random_state_like(shapes_at("conv", 1.0), gen)
    a, b = (random_state_like(shapes_at("conv", 1.0), gen) for _ in range(2))
    got = aggregate(slicer, old, [a, b], [1.0, 1.0], [torch.tensor([1, 3]), torch.tensor([3, 5])])
    for key in ("head.weight", "head.bias"):
        assert torch.equal(got[key][1], a[key][1])
        torch.testing.assert_close(got[key][3], (a[key][3] + b[key][3]) / 2)
        assert torch.equal(got[key][5], b[key][5])
        for row in (0, 2, 4, 6, 7, 8, 9):
            assert torch.equal(got[key][row], old[key][row]), (key, row)
    # hidden layers are label-blind: plain mean of both
    torch.testing.assert_close(got["features.5.weight"], (a["features.5.weight"] + b["features.5.weight"]) / 2)


def test_label_rows_transformer_embedding_and_output():
    """Token-embedding rows and output rows by label; the mask token's row never changes."""
    slicer = slicer_for("transformer")
    gen = torch.Generator().manual_seed(6)
    old = random_state_like(shapes_at("transformer", 1.0), gen)
    clients = [random_state_like(shapes_at("transformer", r), gen) for r in (1.0, 0.25)]
    labels = [torch.tensor([0, 7, 7, 20]), torch.tensor([7, 49])]  # duplicates are harmless
    got = aggregate(slicer, old, clients, [1.0, 0.25], labels)
    emb, out_w, out_b = "token_embedding.weight", "output.weight", "output.bias"
    assert got[emb].shape == (SMALL_VOCAB + 1, 256)
    torch.testing.assert_close(got[emb][0], clients[0][emb][0])
    torch.testing.assert_close(got[emb][7, :64], (clients[0][emb][7, :64] + clients[1][emb][7]) / 2)
    torch.testing.assert_close(got[emb][7, 64:], clients[0][emb][7, 64:])
    torch.testing.assert_close(got[emb][49, :64], clients[1][emb][49])
    assert torch.equal(got[emb][49, 64:], old[emb][49, 64:])
    untouched = [r for r in range(SMALL_VOCAB + 1) if r not in (0, 7, 20, 49)]
    assert SMALL_VOCAB in untouched
    assert torch.equal(got[emb][untouched], old[emb][untouched])
    torch.testing.assert_close(got[out_b][7], (clients[0][out_b][7] + clients[1][out_b][7]) / 2)
    torch.testing.assert_close(got[out_w][20], clients[0][out_w][20])
    assert torch.equal(got[out_w][untouched[:-1]], old[out_w][untouched[:-1]])


def test_mask_token_row_never_changes_even_with_every_label():
    tiny = TINY["transformer"]
    slicer = slicer_for("transformer", **tiny)
    gen = torch.Generator().manual_seed(8)
    old = random_state_like(shapes_at("transformer", 1.0, **tiny), gen)
    clients = [random_state_like(shapes_at("transformer", r, **tiny), gen) for r in RATES]
    got = aggregate(slicer, old, clients, list(RATES), [torch.arange(SMALL_VOCAB)] * len(RATES))
    assert torch.equal(got["token_embedding.weight"][SMALL_VOCAB], old["token_embedding.weight"][SMALL_VOCAB])
    assert not torch.equal(got["token_embedding.weight"][:SMALL_VOCAB], old["token_embedding.weight"][:SMALL_VOCAB])


def test_per_head_aggregation_touches_only_head_prefixes():
    """A rate-.5 client writes the first half of each of the 8 heads of q/k/v and o's inputs, nothing else."""
    slicer = slicer_for("transformer")
    gen = torch.Generator().manual_seed(9)
    old = random_state_like(shapes_at("transformer", 1.0), gen)
    client = random_state_like(shapes_at("transformer", 0.5), gen)
    got = aggregate(slicer, old, [client], [0.5], [torch.arange(SMALL_VOCAB)])
    kept = torch.tensor([h * 32 + j for h in range(8) for j in range(16)])
    other = torch.tensor([h * 32 + j for h in range(8) for j in range(16, 32)])
    for proj in "qkv":
        w, b = f"layers.1.attention.{proj}.weight", f"layers.1.attention.{proj}.bias"
        assert torch.equal(got[w][kept][:, :128], client[w])
        assert torch.equal(got[w][other], old[w][other]) and torch.equal(got[w][:, 128:], old[w][:, 128:])
        assert torch.equal(got[b][kept], client[b]) and torch.equal(got[b][other], old[b][other])
    o = "layers.1.attention.o.weight"
    assert torch.equal(got[o][:128][:, kept], client[o])
    assert torch.equal(got[o][:, other], old[o][:, other]) and torch.equal(got[o][128:], old[o][128:])


# ---------------------------------------------------------------- purity, dtype, device, misc

@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_untouched_and_outputs_fresh(family):
    rates = [1.0, 0.5, 0.0625]
    old, clients, labels = random_round(family, 1.0, rates, seed=10, **TINY[family])
    old_copy, clients_copy, labels_copy = dict(clone_all([old])[0]), clone_all(clients), [l.clone() for l in labels]
    got = aggregate(slicer_for(family, **TINY[family]), old, clients, rates, labels)
    assert all(torch.equal(old[k], old_copy[k]) for k in old)
    for c, c_copy in zip(clients, clients_copy):
        assert all(torch.equal(c[k], c_copy[k]) for k in c)
    assert all(torch.equal(l, l_copy) for l, l_copy in zip(labels, labels_copy))
    for key, tensor in got.items():
        assert tensor.untyped_storage().data_ptr() != old[key].untyped_storage().data_ptr(), key


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_keeps_dtype_and_device(dtype):
    old, clients, labels = random_round("transformer", 1.0, [0.5, 0.125], seed=12, dtype=dtype, **TINY["transformer"])
    got = aggregate(slicer_for("transformer", **TINY["transformer"]), old, clients, [0.5, 0.125], labels)
    for key, tensor in got.items():
        assert tensor.dtype == dtype and tensor.device == old[key].device, key


def test_no_clients_returns_old_values():
    old, _, _ = random_round("conv", 1.0, [], seed=13)
    got = aggregate(slicer_for("conv"), old, [], [], [])
    assert set(got) == set(old) and all(torch.equal(got[k], old[k]) for k in old)


def test_mismatched_lengths_are_refused():
    old, clients, labels = random_round("conv", 1.0, [1.0, 0.5], seed=14)
    with pytest.raises(ValueError, match="client states"):
        aggregate(slicer_for("conv"), old, clients, [1.0], labels)


def test_integer_entries_are_averaged_plainly():
    """Non-float entries (counters) get the plain rounded mean, whatever their slicing rule."""
    old, clients, labels = random_round("conv", 1.0, [1.0, 0.25, 0.25], seed=15)
    old = {**old, "counter": torch.tensor(0)}
    clients = [{**c, "counter": torch.tensor(n)} for c, n in zip(clients, (3, 4, 8))]
    got = aggregate(slicer_for("conv"), old, clients, [1.0, 0.25, 0.25], labels)
    assert got["counter"].dtype == torch.int64 and int(got["counter"]) == 5


def test_rows_outside_a_clients_labels_cannot_leak():
    tiny = TINY["conv"]
    gen = torch.Generator().manual_seed(16)
    old = random_state_like(shapes_at("conv", 1.0, **tiny), gen)
    a = random_state_like(shapes_at("conv", 1.0, **tiny), gen)
    b = random_state_like(shapes_at("conv", 0.5, **tiny), gen)
    a["head.weight"][9] = float("inf")  # row of a class client a does not hold
    labels = [torch.tensor([0, 1]), torch.tensor([9])]
    got = aggregate(slicer_for("conv", **tiny), old, [a, b], [1.0, 0.5], labels)
    expected = reference_aggregate("conv", old, [a, b], labels)
    torch.testing.assert_close(got["head.weight"], expected["head.weight"])
