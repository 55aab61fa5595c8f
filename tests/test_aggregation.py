"""Aggregation (client -> server): the fast path against the library's plain rule, bit for bit, and
both against independent references: the index-grid loop of ``reference.py`` and, for any index
sets, a loop over entries (spec section 5)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heterofl_core import aggregation
from heterofl_core.aggregation import aggregate, aggregate_fast, aggregate_holdings, aggregate_plain
from heterofl_core.slicing import PREFIX, Heads, Holding, TensorSlice
from reference import (FAMILIES, LEVELS, RATES, SMALL, SMALL_LEVELS, SMALL_VOCAB, TINY, assert_states_equal,
                       builder, coverage_mask, num_classes, per_entry_mean, random_labels, random_state_like,
                       reference_aggregate, reference_split, shapes_at, slicer_for)
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


# ---------------------------------------------------------------- the plain rule is the fast path, bit for bit

def check_plain_equals_fast(family, global_level, levels, seed, **options):
    """The plain rule on the static holdings == the fast path, bit for bit; and close to reference.py's loop."""
    g = LEVELS[global_level]
    rates = [LEVELS[level] for level in levels]
    old, clients, labels = random_round(family, g, rates, seed, **options)
    slicer = slicer_for(family, g, **options)
    plain = aggregate_plain(old, clients, [slicer.holdings(rate) for rate in rates], labels)
    assert_states_equal(aggregate(slicer, old, clients, rates, labels), plain)
    assert_states_close(plain, reference_aggregate(family, old, clients, labels))


@settings(max_examples=20, deadline=None)
@given(family=st.sampled_from(FAMILIES), mix=level_mixtures(["a", "b"], max_clients=8),
       seed=st.integers(0, 2**31 - 1), size=SIZES)
def test_fast_path_is_the_plain_rule_bit_for_bit(family, mix, seed, size):
    check_plain_equals_fast(family, *mix, seed, **(TINY["resnet18"] if family == "resnet18" else sized(family, size)))


MIXTURES = [levels for n in (1, 2) for levels in itertools.combinations(LEVELS, n)] + [tuple(LEVELS)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("levels", MIXTURES, ids="-".join)
def test_fast_path_is_the_plain_rule_every_mixture(family, levels):
    """Every level alone, every pair (one client of the first level, two of the second), all five."""
    levels = levels[:1] + levels[1:] * 2
    check_plain_equals_fast(family, "a", levels, seed=len(levels), **TINY[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_is_the_plain_rule_default_widths(family):
    check_plain_equals_fast(family, "a", list(LEVELS), seed=17, **({"layers": 1} if family == "transformer" else {}))


def test_fast_path_is_the_plain_rule_real_vocabulary():
    """33,279 token-embedding rows and 33,278 output rows counted by label."""
    real = {"vocab_size": 33278, "layers": 1}
    slicer, gen = slicer_for("transformer", **real), torch.Generator().manual_seed(18)
    rates = [1.0, 0.5, 0.0625, 0.0625]
    old = random_state_like(shapes_at("transformer", 1.0, **real), gen)
    clients = [random_state_like(shapes_at("transformer", r, **real), gen) for r in rates]
    labels = [torch.randperm(33278, generator=gen)[:n] for n in (3000, 20000, 50, 0)]
    plain = aggregate_plain(old, clients, [slicer.holdings(r) for r in rates], labels)
    assert_states_equal(aggregate(slicer, old, clients, rates, labels), plain)


def test_plain_rule_keeps_a_non_finite_old_value_out_of_counted_rows():
    """An inf or nan in the old global state, in a row the clients count: the new row is their mean
    (the old value is not read: inf x 0 would be nan). The fast path multiplies there (documented)."""
    tiny = TINY["conv"]
    gen = torch.Generator().manual_seed(19)
    old = random_state_like(shapes_at("conv", 1.0, **tiny), gen)
    clients = [random_state_like(shapes_at("conv", r, **tiny), gen) for r in (1.0, 0.5)]
    old["head.weight"][3] = float("inf")
    old["head.bias"][3] = float("nan")
    old["features.0.weight"][0] = float("inf")  # a box entry the clients hold: not read by either path
    labels = [torch.tensor([3]), torch.tensor([3, 4])]
    slicer = slicer_for("conv", **tiny)
    plain = aggregate_plain(old, clients, [slicer.holdings(r) for r in (1.0, 0.5)], labels)
    assert torch.isfinite(plain["head.weight"][3]).all() and torch.isfinite(plain["head.bias"][3])
    assert torch.equal(plain["head.weight"][3, 64:], clients[0]["head.weight"][3, 64:])
    fast = aggregate(slicer, old, clients, [1.0, 0.5], labels)
    assert torch.equal(fast["features.0.weight"], plain["features.0.weight"])
    assert torch.isfinite(plain["features.0.weight"]).all()


def test_plain_rule_reads_no_row_outside_a_clients_labels():
    tiny = TINY["transformer"]
    slicer, gen = slicer_for("transformer", **tiny), torch.Generator().manual_seed(20)
    old = random_state_like(shapes_at("transformer", 1.0, **tiny), gen)
    client = random_state_like(shapes_at("transformer", 0.5, **tiny), gen)
    client["output.weight"][9] = float("inf")  # a token the client does not hold
    client["token_embedding.weight"][9] = float("nan")
    got = aggregate_plain(old, [client], [slicer.holdings(0.5)], [torch.tensor([1, 2])])
    for key in ("output.weight", "token_embedding.weight"):
        assert torch.equal(got[key][9], old[key][9]), key
        assert torch.equal(got[key][1, :64], client[key][1]), key


def test_plain_rule_inputs_untouched_integers_plain_and_no_clients():
    old, clients, labels = random_round("conv", 1.0, [1.0, 0.25], seed=21, **TINY["conv"])
    old = {**old, "counter": torch.tensor(0)}
    clients = [{**c, "counter": torch.tensor(n)} for c, n in zip(clients, (3, 4))]
    slicer = slicer_for("conv", **TINY["conv"])
    holdings = [{**slicer.holdings(r), "counter": None} for r in (1.0, 0.25)]  # non-float: no holding needed
    old_copy, clients_copy = clone_all([old])[0], clone_all(clients)
    got = aggregate_plain(old, clients, holdings, labels)
    assert all(torch.equal(old[k], old_copy[k]) for k in old)
    assert all(torch.equal(c[k], c_copy[k]) for c, c_copy in zip(clients, clients_copy) for k in c)
    assert got["counter"].dtype == torch.int64 and int(got["counter"]) == 4  # round(3.5): to even
    for key, tensor in got.items():
        assert tensor.untyped_storage().data_ptr() != old[key].untyped_storage().data_ptr(), key
    assert_states_equal(aggregate_plain(old, [], [], []), old)
    with pytest.raises(ValueError, match="client states"):
        aggregate_plain(old, clients, holdings[:1], labels)


# ---------------------------------------------------------------- any index sets (not prefixes)

def random_holdings(slicer, rate: float, generator: torch.Generator) -> dict[str, Holding]:
    """As many channels as the static slice of ``rate`` holds on every scaled axis (per head for
    ``Heads``), but a random set of them in a random order."""
    out = {}
    for key, static in slicer.holdings(rate).items():
        global_shape = slicer.holdings(slicer.global_rate)[key].shape
        index = []
        for rule, size, n in zip(static.static.rules, global_shape, static.shape):
            if isinstance(rule, Heads):
                per_head = size // rule.count
                index.append(torch.cat([h * per_head + torch.randperm(per_head, generator=generator)[:n // rule.count]
                                        for h in range(rule.count)]))
            elif rule == PREFIX:
                index.append(torch.randperm(size, generator=generator)[:n])
            else:
                index.append(torch.arange(size))
        out[key] = Holding(tuple(index), static.by_label)
    return out


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(FAMILIES), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_any_index_sets_match_a_per_entry_loop(family, seed, data):
    """Clients of random levels, each holding either its static slice or random channel sets:
    the index-set entry (fast path when all are static, else the plain rule) == the per-entry loop
    (float64: the same sums in the same order, so bit for bit)."""
    levels = data.draw(st.lists(st.sampled_from(SMALL_LEVELS[family]), min_size=1, max_size=5))
    random_sets = data.draw(st.lists(st.booleans(), min_size=len(levels), max_size=len(levels)))
    rates, gen = [LEVELS[level] for level in levels], torch.Generator().manual_seed(seed)
    slicer = slicer_for(family, **SMALL[family])
    old = random_state_like(shapes_at(family, 1.0, **SMALL[family]), gen, torch.float64)
    clients = [random_state_like(shapes_at(family, r, **SMALL[family]), gen, torch.float64) for r in rates]
    labels = [random_labels(num_classes(family, vocab_size=12), gen) for _ in rates]
    holdings = [random_holdings(slicer, r, gen) if drawn else slicer.holdings(r) for r, drawn in zip(rates, random_sets)]
    got = aggregate_holdings(old, clients, holdings, labels)
    assert_states_equal(got, per_entry_mean(old, clients, holdings, labels))
    if not any(random_sets):
        assert_states_equal(aggregate(slicer, old, clients, rates, labels), got)


def test_random_channel_sets_by_hand():
    """Two clients of a (4, 3) tensor: one holds rows {2, 0} x columns {1}, the other rows {0, 3} x
    columns {1, 2}: entry (0, 1) is their mean, each other held entry its one holder's value."""
    old = {"w": torch.zeros(4, 3)}
    a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0]])
    holdings = [{"w": Holding((torch.tensor([2, 0]), torch.tensor([1])))},
                {"w": Holding((torch.tensor([0, 3]), torch.tensor([1, 2])))}]
    got = aggregate_holdings(old, [{"w": a}, {"w": b}], holdings, [torch.tensor([])] * 2)["w"]
    assert torch.equal(got, torch.tensor([[0.0, 2.5, 4.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 5.0, 6.0]]))


def boxes_that_do_not_nest():
    """A (4, 4) tensor; one client holds the (4, 2) prefix box, the other the (2, 4) one."""
    old = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(22))}
    holdings = [{"w": Holding.of(TensorSlice((PREFIX, PREFIX), torch.Size(shape)), (4, 4))} for shape in ((4, 2), (2, 4))]
    clients = [{"w": torch.randn(shape, generator=torch.Generator().manual_seed(23))} for shape in ((4, 2), (2, 4))]
    return old, clients, holdings, [torch.tensor([])] * 2


def test_the_fast_path_refuses_what_it_cannot_do_and_the_entry_falls_back():
    old, clients, holdings, labels = boxes_that_do_not_nest()
    with pytest.raises(ValueError, match="do not nest"):
        aggregate_fast(old, clients, holdings, labels)
    expected = per_entry_mean(old, clients, holdings, labels)
    assert_states_close(aggregate_holdings(old, clients, holdings, labels), expected)
    old, clients, labels = random_round("conv", 1.0, [0.5], seed=24, **SMALL["conv"])
    gen = torch.Generator().manual_seed(24)
    with pytest.raises(ValueError, match="not a static slice"):
        aggregate_fast(old, clients, [random_holdings(slicer_for("conv", **SMALL["conv"]), 0.5, gen)], labels)


def test_the_index_set_entry_takes_the_fast_path_exactly_when_it_applies(monkeypatch):
    called = []
    for name in ("aggregate_plain", "aggregate_fast"):
        real = getattr(aggregation, name)
        monkeypatch.setattr(aggregation, name, lambda *args, real=real, name=name: called.append(name) or real(*args))
    slicer, gen = slicer_for("conv", **SMALL["conv"]), torch.Generator().manual_seed(25)
    old, clients, labels = random_round("conv", 1.0, [1.0, 0.25], seed=25, **SMALL["conv"])
    aggregation.aggregate_holdings(old, clients, [slicer.holdings(1.0), slicer.holdings(0.25)], labels)
    aggregation.aggregate_holdings(old, clients, [slicer.holdings(1.0), random_holdings(slicer, 0.25, gen)], labels)
    aggregation.aggregate_holdings(*boxes_that_do_not_nest())
    assert called == ["aggregate_fast", "aggregate_plain", "aggregate_plain"]

