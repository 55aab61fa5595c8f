"""Split (server -> client) against a hand-built index reference, every family and level (spec section 5)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heterofl_core.families import build_model
from heterofl_core.slicing import FULL, LABELS, PREFIX, Heads, Slicer
from reference import axis_indices, grid
from reference import (FAMILIES, HEADS, LEVELS, RATES, builder, reference_local_size, reference_rules,
                       reference_split, shapes_at, slicer_for)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from reference import NUM_HEADS, SMALL_VOCAB, reference_transformer_forward

NORMS = ("bn", "in", "ln", "gn", "none")


def global_state(family: str, global_rate: float = 1.0, seed: int = 0, **options: object) -> dict:
    torch.manual_seed(seed)
    return builder(family, global_rate=global_rate, **options)(global_rate).state_dict()


def as_reference_rule(rule):
    return HEADS if isinstance(rule, Heads) and rule.count == HEADS[1] else {PREFIX: "prefix", FULL: "full",
                                                                             LABELS: "labels"}.get(rule, rule)


@pytest.mark.parametrize("family", FAMILIES)
def test_width_axes_match_the_spec_rules(family):
    """Each family's declared rules equal the rules written out by hand from the spec."""
    slicer = slicer_for(family)
    shapes = shapes_at(family, 1.0)
    assert set(slicer.axes) >= set(shapes)
    for key, shape in shapes.items():
        got = tuple(as_reference_rule(r) for r in slicer.axes[key])
        assert got == reference_rules(family, key, len(shape)), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", list(LEVELS))
def test_widths_are_ceil_rate_times_base(family, level):
    """Local shapes: each scaled axis is rate x the global size; classes, inputs, positions never scale."""
    rate = LEVELS[level]
    full, local = shapes_at(family, 1.0), shapes_at(family, rate)
    assert set(full) == set(local)
    for key, shape in full.items():
        rules = reference_rules(family, key, len(shape))
        expected = tuple(reference_local_size(rule, size, rate) for rule, size in zip(rules, shape))
        assert tuple(local[key]) == expected, key


def test_widths_by_hand():
    """A few numbers straight from spec section 3."""
    conv_e = shapes_at("conv", 0.0625)
    assert [conv_e[f"features.{i}.weight"][0] for i in (0, 5, 10, 15)] == [4, 8, 16, 32]
    assert tuple(conv_e["head.weight"]) == (10, 32)
    tr_c = shapes_at("transformer", 0.25)
    assert tuple(tr_c["token_embedding.weight"]) == (51, 64)  # vocab + mask token, 256 * 0.25
    assert tuple(tr_c["layers.0.linear1.weight"]) == (128, 64)
    assert tuple(tr_c["position_embedding.weight"]) == (64, 64)
    res_b = shapes_at("resnet18", 0.5)
    assert tuple(res_b["stem.weight"]) == (32, 3, 3, 3)
    assert tuple(res_b["stages.1.0.shortcut.weight"]) == (64, 32, 1, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_at_full_rate_is_identity(family):
    state = global_state(family)
    before = {k: v.clone() for k, v in state.items()}
    out = slicer_for(family).split(state, 1.0)
    assert set(out) == set(state)
    for key, tensor in state.items():
        assert torch.equal(out[key], tensor), key
        assert out[key].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr(), key
        out[key].add_(1.0)  # writing to the split must not reach the global state
        assert torch.equal(state[key], before[key]), key


@pytest.mark.parametrize("family", ["conv", "transformer"])
def test_split_at_global_rate_b_is_identity(family):
    state = global_state(family, global_rate=0.5)
    out = slicer_for(family, 0.5).split(state, 0.5)
    for key, tensor in state.items():
        assert torch.equal(out[key], tensor), key
        assert out[key].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr(), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", list(LEVELS))
def test_split_matches_index_reference(family, level):
    """Every tensor of the split equals the hand-built index grid gather; the input is untouched."""
    rate = LEVELS[level]
    state = global_state(family, seed=1)
    before = {k: v.clone() for k, v in state.items()}
    out = slicer_for(family).split(state, rate)
    expected = reference_split(family, state, rate)
    assert set(out) == set(expected)
    for key in expected:
        assert out[key].shape == expected[key].shape, key
        assert torch.equal(out[key], expected[key]), key
        assert out[key].is_contiguous(), key
        assert torch.equal(state[key], before[key]), key
    build_model(family, rate, **({"vocab_size": 50} if family == "transformer" else {})).load_state_dict(out, strict=True)


@pytest.mark.parametrize("family", ["conv", "transformer"])
@pytest.mark.parametrize("level", ["b", "c", "d", "e"])
def test_split_matches_index_reference_global_b(family, level):
    scale = LEVELS[level] / 0.5
    state = global_state(family, global_rate=0.5, seed=2)
    out = slicer_for(family, 0.5).split(state, LEVELS[level])
    expected = reference_split(family, state, scale)
    for key in expected:
        assert torch.equal(out[key], expected[key]), key


@pytest.mark.parametrize("family", ["conv", "resnet18"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("global_level", ["a", "b"])
def test_split_loads_strict_every_norm(family, norm, global_level):
    g = LEVELS[global_level]
    state = global_state(family, global_rate=g, norm=norm)
    slicer = slicer_for(family, g, norm=norm)
    build = builder(family, global_rate=g, norm=norm)
    for rate in [r for r in RATES if r <= g]:
        sub = slicer.split(state, rate)
        model = build(rate)
        model.load_state_dict(sub, strict=True)
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, sub[key]), key


@pytest.mark.parametrize("global_level", ["a", "b"])
def test_split_loads_strict_resnet_2222(global_level):
    g = LEVELS[global_level]
    state = global_state("resnet18", global_rate=g, blocks=(2, 2, 2, 2))
    slicer = slicer_for("resnet18", g, blocks=(2, 2, 2, 2))
    for rate in [r for r in RATES if r <= g]:
        sub = slicer.split(state, rate)
        builder("resnet18", global_rate=g, blocks=(2, 2, 2, 2))(rate).load_state_dict(sub, strict=True)
        expected = reference_split("resnet18", state, rate / g)
        for key in expected:
            assert torch.equal(sub[key], expected[key]), key


HEAD_AXIS = {"q.weight": 0, "k.weight": 0, "v.weight": 0, "q.bias": 0, "k.bias": 0, "v.bias": 0, "o.weight": 1}


def first_of_each_head(tensor: torch.Tensor, axis: int, keep: int) -> torch.Tensor:
    """Axis ``axis`` (E entries) viewed as (8 heads, E/8): the first ``keep`` of each head, flattened back."""
    return tensor.unflatten(axis, (NUM_HEADS, -1)).narrow(axis + 1, 0, keep).flatten(axis, axis + 1)


@pytest.mark.parametrize("global_level", ["a", "b"])
def test_split_loads_strict_transformer(global_level):
    """Every parameter of a split transformer is its global tensor cut by view: q/k/v rows and o's
    columns keep the first E_local/8 entries of each of the 8 heads, every other axis a prefix (whole
    for the vocabulary and positions); the index-grid reference agrees; and the loaded sub-model
    (eval) computes the spec's forward on those tensors, finite, (N, S, vocab)."""
    g = LEVELS[global_level]
    gen = torch.Generator().manual_seed(0)
    # Random entries: at init the layers are copies of one another and the norms are all ones.
    state = {k: torch.randn(v.shape, generator=gen) * 0.2
             for k, v in global_state("transformer", global_rate=g).items()}
    slicer = slicer_for("transformer", g)
    build = builder("transformer", global_rate=g)
    tokens = torch.randint(0, SMALL_VOCAB, (2, 64), generator=gen)
    for rate in [r for r in RATES if r <= g]:
        sub = slicer.split(state, rate)
        model = build(rate)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        e = shapes["token_embedding.weight"][1]
        assert e == 256 * rate and shapes["token_embedding.weight"][0] == SMALL_VOCAB + 1
        expected = {}
        for key, tensor in state.items():
            axis = HEAD_AXIS.get(key.split(".attention.")[-1]) if ".attention." in key else None
            cut = first_of_each_head(tensor, axis, e // NUM_HEADS) if axis is not None else tensor
            expected[key] = cut[tuple(slice(0, n) for n in shapes[key])]
            assert expected[key].shape == shapes[key], key
            assert torch.equal(sub[key], expected[key]), key
        if rate < g:  # per head is not a plain prefix: the test tells them apart
            q = state["layers.0.attention.q.weight"]
            assert not torch.equal(expected["layers.0.attention.q.weight"], q[:e, :e])
        reference = reference_split("transformer", state, rate / g)
        assert all(torch.equal(sub[key], reference[key]) for key in reference)

        model.load_state_dict(sub, strict=True)
        model.eval()
        with torch.no_grad():
            logits = model(tokens)
        assert logits.shape == (2, 64, SMALL_VOCAB) and torch.isfinite(logits).all()
        torch.testing.assert_close(logits, reference_transformer_forward(expected, tokens, 1.0), rtol=1e-4, atol=1e-4)


def test_split_real_vocabulary():
    """The default WikiText2 vocabulary (33,278 words + mask token), every level."""
    build = lambda rate: build_model("transformer", rate)  # noqa: E731
    slicer = Slicer(build)
    torch.manual_seed(3)
    state = build(1.0).state_dict()
    assert state["token_embedding.weight"].shape[0] == 33279
    for rate in RATES:
        sub = slicer.split(state, rate)
        build(rate).load_state_dict(sub, strict=True)
        expected = reference_split("transformer", state, rate)
        for key in expected:
            assert torch.equal(sub[key], expected[key]), key


def test_per_head_attention_slicing_at_half_rate():
    """q/k/v rows and o's input columns keep, for each of the 8 heads, the first half of that head."""
    state = global_state("transformer")
    e = state["layers.0.attention.q.weight"].shape[0]
    assert e == 256
    rows = torch.arange(e * e, dtype=torch.float32).view(e, e)  # entry (i, j) = i * e + j
    for key in list(state):
        if ".attention." in key:
            state[key] = rows.clone() if state[key].dim() == 2 else torch.arange(e, dtype=torch.float32)
    out = slicer_for("transformer").split(state, 0.5)
    kept = [h * 32 + j for h in range(8) for j in range(16)]
    assert kept[:18] == list(range(16)) + [32, 33]
    kept_t, prefix = torch.tensor(kept), torch.arange(128)
    for layer in range(4):
        for proj in "qkv":
            w = out[f"layers.{layer}.attention.{proj}.weight"]
            assert torch.equal(w, (kept_t[:, None] * e + prefix[None, :]).float())
            assert torch.equal(out[f"layers.{layer}.attention.{proj}.bias"], kept_t.float())
        o = out[f"layers.{layer}.attention.o.weight"]
        assert torch.equal(o, (prefix[:, None] * e + kept_t[None, :]).float())
        assert torch.equal(out[f"layers.{layer}.attention.o.bias"], prefix.float())


def test_split_keeps_dtype_and_device():
    state = {k: v.double() for k, v in global_state("conv").items()}
    out = slicer_for("conv").split(state, 0.25)
    assert all(v.dtype == torch.float64 and v.device == state[k].device for k, v in out.items())


@settings(max_examples=10, deadline=None)
@given(family=st.sampled_from(["conv", "transformer"]), global_level=st.sampled_from(["a", "b", "c"]),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_split_random_states_match_reference(family, global_level, seed, data):
    g = LEVELS[global_level]
    level = data.draw(st.sampled_from([k for k, r in LEVELS.items() if r <= g]))
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) for k, s in shapes_at(family, g).items()}
    out = slicer_for(family, g).split(state, LEVELS[level])
    expected = reference_split(family, state, LEVELS[level] / g)
    for key in expected:
        assert torch.equal(out[key], expected[key]), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("global_level", ["a", "b"])
def test_holdings_are_the_reference_indices(family, global_level):
    """``Slicer.holdings``: per axis, the hand-built reference's global indices; gathering the global
    tensor through them is the split; label rows are flagged; the static slice rides along; cached."""
    g = LEVELS[global_level]
    slicer = slicer_for(family, g)
    state = global_state(family, global_rate=g, seed=4)
    for rate in [r for r in RATES if r <= g]:
        holdings, slices, split = slicer.holdings(rate), slicer.slices(rate), slicer.split(state, rate)
        assert set(holdings) == set(state)
        for key, held in holdings.items():
            rules = reference_rules(family, key, state[key].dim())
            expected = [axis_indices(rule, size, reference_local_size(rule, size, rate / g))
                        for rule, size in zip(rules, state[key].shape)]
            assert len(held.index) == len(expected) and all(map(torch.equal, held.index, expected)), key
            assert held.shape == tuple(split[key].shape), key
            assert held.by_label == (rules[0] == "labels"), key
            assert held.static == slices[key], key
            assert torch.equal(state[key][grid(held.index)], split[key]), key
            assert slicer.holdings(rate)[key] is held, key
