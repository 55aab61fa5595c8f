"""Sub-model extraction (static, rolling, random): holdings against hand-written references, the
sub-models as real networks, and aggregation's paths against the plain rule and a per-entry loop."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from heterofl_core import aggregation, extraction
from heterofl_core.aggregation import aggregate, aggregate_fast, aggregate_holdings, aggregate_plain
from heterofl_core.slicing import roll_channels
from reference import (FAMILIES, FULL, LABELS, LEVELS, PREFIX, RATES, SMALL, SMALL_LEVELS, SMALL_VOCAB, TINY,
                       assert_states_equal, builder, grid, num_classes, per_entry_mean, random_labels,
                       random_state_like, reference_local_size, reference_rules, shapes_at, slicer_for)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

ROUNDS = (1, 2, 7, 130)  # 130: past every width of the tiny models, so the windows wrap more than once


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_global(family: str, seed: int, **options) -> dict:
    """Random global entries (at init the transformer's layers are copies and the norms all ones)."""
    return {k: torch.randn(s, generator=seeded(seed)) * 0.2 for k, s in shapes_at(family, 1.0, **options).items()}


def model_input(family: str, generator: torch.Generator) -> torch.Tensor:
    if family == "transformer":
        return torch.randint(0, SMALL_VOCAB, (2, 16), generator=generator)
    return torch.randn((4, 1, 28, 28) if family == "conv" else (4, 3, 32, 32), generator=generator)


def forward(family: str, state: dict, rate: float, x: torch.Tensor, **options) -> torch.Tensor:
    """The family's rate-``rate`` model on ``state``, in eval mode (Scaler and dropout off)."""
    model = builder(family, **options)(rate)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(x)


def scaled(rule) -> bool:
    return rule not in (FULL, LABELS)


def heads_of(rule) -> int:
    return 1 if rule == PREFIX else rule[1]


# ---------------------------------------------------------------- references

def reference_window(rule, size: int, n: int, shift: int) -> torch.Tensor:
    """FedRolex's window on one axis: local position j holds (j - shift) mod size; per head on heads axes."""
    if not scaled(rule):
        return torch.arange(size)
    per_head, local = size // heads_of(rule), n // heads_of(rule)
    return torch.tensor([c * per_head + (j - shift) % per_head for c in range(heads_of(rule)) for j in range(local)])


def relabelled(family: str, state: dict, holdings: dict) -> dict:
    """The global state with the channels of every scaled axis reordered: those the client holds first
    (in its order), then the rest (in order); within each head on heads axes. When the holdings are
    coupled soundly, this is one reordering per group of axes that must agree: the same network."""
    out = {}
    for key, tensor in state.items():
        orders = []
        for rule, size, held in zip(reference_rules(family, key, tensor.dim()), tensor.shape, holdings[key].index):
            if not scaled(rule):
                orders.append(torch.arange(size))
                continue
            per_head, order = size // heads_of(rule), []
            for c in range(heads_of(rule)):
                mine = [int(i) for i in held if c * per_head <= i < (c + 1) * per_head]
                order += mine + [i for i in range(c * per_head, (c + 1) * per_head) if i not in mine]
            orders.append(torch.tensor(order))
        out[key] = tensor[grid(orders)]
    return out


def zeroed_outside(state: dict, holdings: dict) -> dict:
    """The global state with every entry the client does not hold set to 0."""
    out = {}
    for key, tensor in state.items():
        held = torch.zeros_like(tensor, dtype=torch.bool)
        held[grid(holdings[key].index)] = True
        out[key] = torch.where(held, tensor, 0.0)
    return out


# ---------------------------------------------------------------- holdings and split

@pytest.mark.parametrize("family", FAMILIES)
def test_static_is_the_slicers_holdings_and_split(family):
    slicer, state = slicer_for(family, **TINY[family]), random_global(family, 0, **TINY[family])
    for rate in RATES:
        held = extraction.holdings(slicer, rate, "static", round_=5)
        assert held == slicer.holdings(rate)  # the very same Holding objects
        assert_states_equal(extraction.split(state, held), slicer.split(state, rate))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("round_", ROUNDS)
def test_rolling_matches_the_reference_window(family, round_):
    """Every axis is FedRolex's window; the split gathers it; it is the static slice of the rolled tensor."""
    slicer, state = slicer_for(family, **TINY[family]), random_global(family, 1, **TINY[family])
    for rate in RATES:
        held = extraction.holdings(slicer, rate, "rolling", round_)
        split = extraction.split(state, held)
        for key, tensor in state.items():
            rules = reference_rules(family, key, tensor.dim())
            expected = [reference_window(rule, size, reference_local_size(rule, size, rate), round_ - 1)
                        for rule, size in zip(rules, tensor.shape)]
            assert all(map(torch.equal, held[key].index, expected)), key
            assert torch.equal(split[key], tensor[grid(expected)]), key
            assert held[key].shift == round_ - 1 and held[key].static == slicer.slices(rate)[key], key
            rolled = roll_channels(tensor, slicer.axes[key], round_ - 1)
            assert torch.equal(held[key].static.take(rolled), split[key]), key


def test_rolling_window_is_the_reference_window_and_the_holdings_of_a_prefix_axis():
    """The one-axis form (notebook 12's exercise) against the reference and against holdings on the conv model."""
    gen = seeded(3)
    for _ in range(50):
        size = int(torch.randint(1, 300, (1,), generator=gen))
        n, round_ = int(torch.randint(1, size + 1, (1,), generator=gen)), int(torch.randint(1, 700, (1,), generator=gen))
        assert torch.equal(extraction.rolling_window(size, n, round_), reference_window(PREFIX, size, n, round_ - 1))
    slicer = slicer_for("conv", **TINY["conv"])
    key = next(k for k in slicer.global_shapes if k.endswith("weight"))  # the first convolution: outputs on axis 0
    size = slicer.global_shapes[key][0]
    for rate in RATES:
        for round_ in ROUNDS:
            held = extraction.holdings(slicer, rate, "rolling", round_)[key].index[0]
            assert torch.equal(extraction.rolling_window(size, len(held), round_), held)
    with pytest.raises(ValueError, match="holds 1 to 8"):
        extraction.rolling_window(8, 9, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_rolling_in_round_one_is_static(family):
    slicer, state = slicer_for(family, **TINY[family]), random_global(family, 2, **TINY[family])
    for rate in RATES:
        held, static = extraction.holdings(slicer, rate, "rolling", 1), slicer.holdings(rate)
        for key in state:
            assert all(map(torch.equal, held[key].index, static[key].index)), key
            assert held[key].static == static[key].static and held[key].shift == 0, key
        assert_states_equal(extraction.split(state, held), slicer.split(state, rate))


@pytest.mark.parametrize("family", FAMILIES)
def test_random_sets_are_coupled_by_rule_and_width(family):
    """Sorted, distinct, n per axis (n / h in each head); every axis of one (rule, width) holds the same
    set (the same first channels when narrower); vocabulary, classes, inputs and positions all rows."""
    slicer = slicer_for(family, **TINY[family])
    for rate in RATES:
        held, sets = extraction.holdings(slicer, rate, "random", 3, seeded(4)), {}
        for key, shape in shapes_at(family, 1.0, **TINY[family]).items():
            for rule, size, index in zip(reference_rules(family, key, len(shape)), shape, held[key].index):
                n = reference_local_size(rule, size, rate)
                if not scaled(rule):
                    assert torch.equal(index, torch.arange(size)), key
                    continue
                assert len(index) == n and torch.equal(index, index.unique()), key  # unique: sorted, distinct
                per_head = torch.bincount(index // (size // heads_of(rule)), minlength=heads_of(rule))
                assert torch.all(per_head == n // heads_of(rule)), key
                assert torch.equal(sets.setdefault((rule, size), index), index), key
        assert rate == 1.0 or any(not torch.equal(i, torch.arange(len(i))) for i in sets.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_random_draws_are_reproducible_and_differ_between_clients(family):
    slicer = slicer_for(family, **TINY[family])
    same = [extraction.holdings(slicer, 0.5, "random", 2, seeded(9)) for _ in range(2)]
    gen = seeded(9)
    first, second = (extraction.holdings(slicer, 0.5, "random", 2, gen) for _ in range(2))
    narrower = extraction.holdings(slicer, 0.25, "random", 2, seeded(9))  # the draws do not depend on the rate
    for key in same[0]:
        assert all(map(torch.equal, same[0][key].index, same[1][key].index)), key
        assert all(map(torch.equal, same[0][key].index, first[key].index)), key
        assert all(set(small.tolist()) <= set(wide.tolist())
                   for small, wide in zip(narrower[key].index, first[key].index)), key
    assert any(not torch.equal(a, b) for key in first for a, b in zip(first[key].index, second[key].index))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["rolling", "random"])
def test_a_sub_model_is_the_static_sub_model_of_the_same_network_relabelled(family, strategy):
    """Reordering each group of coupled channels so the client's come first changes nothing the model
    computes (checked at full width); the client's sub-model is that model's static (HeteroFL) sub-model.
    Under-coupled sets would reorder connected axes differently, and the forward pass would change."""
    options = TINY[family]
    slicer, state, gen = slicer_for(family, **options), random_global(family, 5, **options), seeded(6)
    x = model_input(family, gen)
    for rate in (0.5, 0.125):
        held = extraction.holdings(slicer, rate, strategy, 4, gen)
        same_network = relabelled(family, state, held)
        assert_states_equal(extraction.split(state, held), slicer.split(same_network, rate))
        torch.testing.assert_close(forward(family, same_network, 1.0, x, **options),
                                   forward(family, state, 1.0, x, **options), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["conv", "resnet18"])
@pytest.mark.parametrize("strategy", extraction.EXTRACTIONS)
def test_a_sub_model_computes_the_global_model_with_the_other_channels_zeroed(family, strategy):
    """In eval mode (the Scaler is the identity there; sBN uses batch statistics, and a zeroed channel
    stays 0 through it), the rate-r sub-model's logits are the global model's with every entry the
    client does not hold set to 0. Not for the Transformer: its LayerNorms average over all embedding
    channels and its attention divides by the square root of the head size, both of which change."""
    options = TINY[family]
    slicer, state, gen = slicer_for(family, **options), random_global(family, 7, **options), seeded(8)
    x = model_input(family, gen)
    for rate in (0.5, 0.0625):
        held = extraction.holdings(slicer, rate, strategy, 3, gen)
        torch.testing.assert_close(forward(family, extraction.split(state, held), rate, x, **options),
                                   forward(family, zeroed_outside(state, held), 1.0, x, **options),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", extraction.EXTRACTIONS)
def test_a_sub_model_loads_strict_and_trains(family, strategy):
    options = TINY[family]
    slicer, state, gen = slicer_for(family, **options), random_global(family, 10, **options), seeded(11)
    model = builder(family, **options)(0.25)
    model.load_state_dict(extraction.split(state, extraction.holdings(slicer, 0.25, strategy, 6, gen)), strict=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = model_input(family, gen)
    target = x if family == "transformer" else torch.randint(0, 10, (len(x),), generator=gen)
    loss = F.cross_entropy(model.train()(x).flatten(0, -2), target.flatten())
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_arguments_are_refused():
    slicer = slicer_for("conv", **TINY["conv"])
    with pytest.raises(ValueError, match="valid: static, rolling, random"):
        extraction.holdings(slicer, 0.5, "dropout", 1)
    with pytest.raises(ValueError, match="generator"):
        extraction.holdings(slicer, 0.5, "random", 1)
    with pytest.raises(ValueError, match="counted from 1"):
        extraction.holdings(slicer, 0.5, "rolling", 0)


# ---------------------------------------------------------------- aggregation

def round_of(family: str, levels: str, strategy: str, round_: int, seed: int, options: dict, dtype=torch.float32):
    """An old state, clients of these levels with random trained states, their labels and holdings."""
    slicer, gen = slicer_for(family, **options), seeded(seed)
    rates = [LEVELS[level] for level in levels]
    old = random_state_like(shapes_at(family, 1.0, **options), gen, dtype)
    clients = [random_state_like(shapes_at(family, r, **options), gen, dtype) for r in rates]
    vocab = options.get("vocab_size", SMALL_VOCAB)
    labels = [random_labels(num_classes(family, vocab), gen) for _ in rates]
    holdings = [extraction.holdings(slicer, r, strategy, round_, gen) for r in rates]
    return old, clients, holdings, labels


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("round_", ROUNDS)
@pytest.mark.parametrize("levels", ["abcde", "bdd", "ee"])
def test_rolling_fast_path_is_the_plain_rule_bit_for_bit(family, round_, levels):
    old, clients, holdings, labels = round_of(family, levels, "rolling", round_, seed=round_, options=TINY[family])
    assert aggregation.fast_path_applies(old, holdings)
    assert_states_equal(aggregate_holdings(old, clients, holdings, labels),
                        aggregate_plain(old, clients, holdings, labels))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["rolling", "random"])
def test_aggregation_is_the_per_entry_mean(family, strategy):
    """Small models in float64: every client entry added where its holding puts it, bit for bit."""
    for round_, seed in ((1, 0), (3, 1), (20, 2)):
        old, clients, holdings, labels = round_of(family, SMALL_LEVELS[family], strategy, round_, seed,
                                                  SMALL[family], torch.float64)
        assert aggregation.fast_path_applies(old, holdings) == (strategy == "rolling")
        assert_states_equal(aggregate_holdings(old, clients, holdings, labels),
                            per_entry_mean(old, clients, holdings, labels))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", extraction.EXTRACTIONS)
def test_every_strategy_is_static_when_every_client_has_rate_one(family, strategy):
    """Rate-1 clients sent W_m by any strategy and sending back what they got: the aggregate is the static
    one of the W_m, bit for bit (rolling reorders the channels, random holds them all)."""
    options = TINY[family]
    slicer, gen = slicer_for(family, **options), seeded(12)
    old = random_global(family, 13, **options)
    sent = [random_global(family, 14 + m, **options) for m in range(3)]
    labels = [random_labels(num_classes(family), gen) for _ in sent]
    holdings = [extraction.holdings(slicer, 1.0, strategy, 5, gen) for _ in sent]
    clients = [extraction.split(w, held) for w, held in zip(sent, holdings)]
    assert_states_equal(aggregate_holdings(old, clients, holdings, labels),
                        aggregate(slicer, old, sent, [1.0] * len(sent), labels))


def test_windows_of_different_rounds_take_the_plain_rule():
    old, clients, _, labels = round_of("conv", "bc", "rolling", 2, seed=15, options=TINY["conv"])
    slicer = slicer_for("conv", **TINY["conv"])
    holdings = [extraction.holdings(slicer, 0.5, "rolling", 2), extraction.holdings(slicer, 0.25, "rolling", 3)]
    with pytest.raises(ValueError, match="different shifts"):
        aggregate_fast(old, clients, holdings, labels)
    assert_states_equal(aggregate_holdings(old, clients, holdings, labels),
                        aggregate_plain(old, clients, holdings, labels))


# ----------------------------------------------------------------------------- in the round loop

@pytest.mark.parametrize("strategy", extraction.EXTRACTIONS)
def test_every_extraction_runs_in_the_round_loop_reproducibly(tmp_path, strategy):
    from fakes import write_tiny_mnist
    from heterofl_core.config import parse_control
    from heterofl_core.federated import run_experiment
    write_tiny_mnist(tmp_path / "data", n_train=200, n_test=50)
    cfg = parse_control("1_10_0.5_iid_fix_a1-e9_bn_1_1", "MNIST", rounds=2, local_epochs=1, extraction=strategy)
    runs = [run_experiment(cfg, data_root=tmp_path / "data", quiet=True) for _ in range(2)]
    tested = [frame[frame["split"] == "test"].drop(columns="elapsed_s").reset_index(drop=True) for frame in runs]
    assert sorted(runs[0]["round"].unique()) == [1, 2] and tested[0]["value"].notna().all()
    pd.testing.assert_frame_equal(tested[0], tested[1], check_exact=True)


@pytest.mark.parametrize("strategy", extraction.EXTRACTIONS)
def test_channels_held_are_the_channels_the_round_trains(tmp_path, strategy):
    """channels_held draws what run_round draws: after the round, exactly the held output channels
    of the first convolution moved (the others keep their values), each client holding ceil(rate K)."""
    import math
    from fakes import write_tiny_mnist
    from heterofl_core.config import parse_control
    from heterofl_core.datasets import load_dataset
    from heterofl_core.federated import Federation
    write_tiny_mnist(tmp_path / "data", n_train=200, n_test=50)
    cfg = parse_control("1_10_0.5_iid_fix_a1-e9_bn_1_1", "MNIST", rounds=3, local_epochs=1, extraction=strategy)
    federation = Federation.assemble(cfg, load_dataset("MNIST", tmp_path / "data"), torch.device("cpu"))
    key = next(k for k in federation.slicer.global_shapes if k.endswith("weight"))  # the first convolution
    state = federation.initial_state()
    for round_ in (1, 2, 3):
        plan, held = federation.channels_held(round_, key)
        width = held.shape[1]
        assert held.sum(1).tolist() == [math.ceil(rate * width) for rate in plan.rates]
        if strategy != "random":
            shift = 0 if strategy == "static" else round_ - 1
            for row, rate in zip(held, plan.rates):
                assert row.nonzero().flatten().tolist() == sorted(reference_window(PREFIX, width, row.sum().item(), shift).tolist())
        new, _ = federation.run_round(state, round_)
        moved = (new[key] != state[key]).flatten(1).any(1)
        assert torch.equal(moved, held.any(0)), f"round {round_}"
        state = new
