"""The three families at every level (spec section 3), Scaler and sBN (section 4), and the losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heterofl_core.config import parse_control
from heterofl_core.losses import cross_entropy, label_mask, masked_logits
from heterofl_core.families import build_model, model_builder
from heterofl_core.models import Conv, PreActResNet18, Transformer, mask_tokens
from heterofl_core.models.layers import Scaler, make_norm, make_scaler, width
from reference import (FAMILIES, LEVELS, RATES, SMALL_VOCAB, builder, reference_conv_forward,
                       reference_resnet_forward, reference_transformer_forward)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

NORMS = ("bn", "in", "ln", "gn", "none")


def sample_input(family: str, n: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    if family == "conv":
        return torch.randn(n, 1, 28, 28, generator=generator)
    if family == "resnet18":
        return torch.randn(n, 3, 32, 32, generator=generator)
    return torch.randint(0, SMALL_VOCAB, (n, 64), generator=generator)


def output_shape(family: str, n: int = 2) -> tuple[int, ...]:
    return (n, 64, SMALL_VOCAB) if family == "transformer" else (n, 10)


# ---------------------------------------------------------------- every family, every level

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", list(LEVELS))
def test_forward_backward_every_level(family, level):
    torch.manual_seed(0)
    model = builder(family)(LEVELS[level])
    x = sample_input(family)
    logits = model(x)
    assert logits.shape == output_shape(family)
    target = torch.randint(0, 10, output_shape(family)[:-1])
    cross_entropy(logits, target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    model.eval()
    with torch.no_grad():
        assert model(x).shape == output_shape(family)


NORM_LAYERS = {"conv": 4, "resnet18": 11}  # conv: one per block; resnet18 (1,1,1,2): two per block + the last
NORM_GROUPS = {"in": lambda c: c, "ln": lambda c: 1, "gn": lambda c: 4}  # GroupNorm groups for c channels


@pytest.mark.parametrize("family", ["conv", "resnet18"])
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_runs_at_e(family, norm):
    """At level e (1/16 width): the norm layers are the named kind with the right groups and the
    affine init, a train-mode forward really normalises (bn per channel over the batch; in, ln, gn
    per sample and group), the logits have their shape and every parameter gets a finite gradient."""
    torch.manual_seed(0)
    model = builder(family, norm=norm)(0.0625)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))]
    if norm == "none":
        assert norms == []
    else:
        assert len(norms) == NORM_LAYERS[family]
    for layer in norms:
        if norm == "bn":
            assert type(layer) is nn.BatchNorm2d and not layer.track_running_stats, "client bn: batch statistics"
            channels = layer.num_features
        else:
            assert type(layer) is nn.GroupNorm
            channels = layer.num_channels
            assert layer.num_groups == NORM_GROUPS[norm](channels), (norm, layer)
        assert channels in (4, 8, 16, 32), "1/16 of the widths 64, 128, 256, 512"
        assert torch.equal(layer.weight, torch.ones(channels)) and torch.equal(layer.bias, torch.zeros(channels))

    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, out: outputs.append((m, out.detach().clone()))) for layer in norms]
    logits = model(sample_input(family, n=4))
    for hook in hooks:
        hook.remove()
    assert logits.shape == output_shape(family, n=4) and torch.isfinite(logits).all()
    assert len(outputs) == len(norms)
    for layer, out in outputs:
        n, c = out.shape[:2]
        if norm == "bn":  # (C, N*H*W): per channel over batch and space
            groups = out.transpose(0, 1).reshape(c, -1)
        else:  # (N*G, C/G*H*W): per sample and group
            groups = out.reshape(n * layer.num_groups, -1)
        torch.testing.assert_close(groups.mean(1), torch.zeros(len(groups)), atol=1e-4, rtol=0)
        torch.testing.assert_close(groups.var(1, unbiased=False), torch.ones(len(groups)), atol=2e-2, rtol=0)

    cross_entropy(logits, torch.arange(4)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_conv_spatial_sizes():
    model = Conv(0.5)
    assert model.features(torch.randn(3, 1, 28, 28)).shape == (3, 256, 3, 3)  # 28 -> 14 -> 7 -> 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3


def test_transformer_vocab_and_mask_token():
    model = Transformer(0.25, vocab_size=SMALL_VOCAB)
    assert model.token_embedding.weight.shape == (SMALL_VOCAB + 1, 64)
    assert model.output.weight.shape == (SMALL_VOCAB, 64)
    assert model.mask_token == SMALL_VOCAB
    tokens = torch.full((2, 64), SMALL_VOCAB)  # all mask tokens is a valid input
    assert model(tokens).shape == (2, 64, SMALL_VOCAB)
    assert model(tokens[:, :10]).shape == (2, 10, SMALL_VOCAB)  # shorter than bptt


def test_real_vocabulary_transformer_runs():
    model = Transformer(0.0625)
    assert model.vocab_size == 33278 and model.token_embedding.num_embeddings == 33279
    assert model(torch.randint(0, 33278, (1, 64))).shape == (1, 64, 33278)


def test_widths_ceil():
    assert [width(r, 64) for r in RATES] == [64, 32, 16, 8, 4]
    assert width(0.3, 10) == 3 and width(0.01, 10) == 1 and width(0.25, 10) == 3


def test_unknown_model_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("batch", 4, False)


# ---------------------------------------------------------------- against the spec's formulas

CONV_REFERENCES = {"conv": reference_conv_forward, "resnet18": reference_resnet_forward}


@pytest.mark.parametrize("family", ["conv", "resnet18"])
@pytest.mark.parametrize("global_level, level", [("a", "a"), ("a", "c"), ("a", "e"), ("b", "b"), ("b", "e")])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("norm", ["bn", "none"])
def test_image_models_match_spec_formulas(family, level, global_level, training, norm):
    """Scaler divides by rate / global rate in training only; sBN uses batch statistics.
    (Right before BN the Scaler cancels out, so norm 'none' is what checks it.)"""
    rate, g = LEVELS[level], LEVELS[global_level]
    gen = torch.Generator().manual_seed(1)
    model = builder(family, global_rate=g, norm=norm)(rate)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    model.train(training)
    x = sample_input(family, n=4, generator=gen)
    with torch.no_grad():
        got = model(x)
    expected = CONV_REFERENCES[family](state, x, rate / g if training else 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_resnet_2222_matches_spec_formulas():
    gen = torch.Generator().manual_seed(2)
    model = PreActResNet18(0.125, blocks=(2, 2, 2, 2))
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    x = sample_input("resnet18", n=4, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_resnet_forward(state, x, 0.125, blocks=(2, 2, 2, 2)),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("global_level, level", [("a", "a"), ("a", "b"), ("a", "e"), ("b", "b"), ("b", "d")])
@pytest.mark.parametrize("training", [True, False])
def test_transformer_matches_spec_formulas(level, global_level, training):
    rate, g = LEVELS[level], LEVELS[global_level]
    gen = torch.Generator().manual_seed(3)
    model = builder("transformer", global_rate=g, dropout=0.0)(rate)
    state = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    model.train(training)
    tokens = sample_input("transformer", n=3, generator=gen)
    with torch.no_grad():
        got = model(tokens)
    expected = reference_transformer_forward(state, tokens, rate / g if training else 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Scaler

def test_scaler_train_and_eval():
    scaler = Scaler(0.25)
    x = torch.randn(5)
    torch.testing.assert_close(scaler(x), x / 0.25)
    assert torch.equal(scaler.eval()(x), x)
    assert make_scaler(True, 0.25, 0.5).scaler_rate == 0.5
    assert isinstance(make_scaler(False, 0.25, 0.5), nn.Identity)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("global_level", ["a", "b"])
def test_scaler_rate_is_client_over_global(family, global_level):
    g = LEVELS[global_level]
    for rate in [r for r in RATES if r <= g]:
        scalers = [m for m in builder(family, global_rate=g)(rate).modules() if isinstance(m, Scaler)]
        assert scalers and all(m.scaler_rate == rate / g for m in scalers)
        assert not any(isinstance(m, Scaler) for m in builder(family, global_rate=g, scale=False)(rate).modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_flag_changes_training_only(family):
    """Same weights with and without the Scaler: equal in eval, different in training (rate < global rate)."""
    torch.manual_seed(4)
    on = builder(family, dropout=0.0) if family == "transformer" else builder(family, norm="none")
    off = builder(family, dropout=0.0, scale=False) if family == "transformer" else builder(family, norm="none", scale=False)
    a, b = on(0.25), off(0.25)
    b.load_state_dict(a.state_dict())
    x = sample_input(family)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))
        assert not torch.allclose(a.train()(x), b.train()(x))


def test_conv_scaler_is_homogeneous_with_zero_biases():
    """No norm, zero biases: four scaled conv blocks divide the logits by (rate / global rate) ** 4."""
    torch.manual_seed(5)
    on, off = Conv(0.5, norm="none"), Conv(0.5, norm="none", scale=False)
    with torch.no_grad():
        for module in on.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.bias.zero_()
    off.load_state_dict(on.state_dict())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(on.train()(x), off.train()(x) / 0.5 ** 4, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- sBN and norms

@pytest.mark.parametrize("family", ["conv", "resnet18"])
def test_sbn_training_model_has_no_running_stats(family):
    train_model = builder(family)(0.5)
    eval_model = builder(family, track_running_stats=True)(0.5)
    bns = [m for m in train_model.modules() if isinstance(m, nn.BatchNorm2d)]
    tracked = [m for m in eval_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and len(bns) == len(tracked)
    assert all(m.running_mean is None and m.running_var is None and m.momentum is None for m in bns)
    assert all(m.track_running_stats and m.running_mean is not None and m.momentum is None for m in tracked)
    assert not any("running" in k or "num_batches" in k for k in train_model.state_dict())
    assert sum("running_mean" in k for k in eval_model.state_dict()) == len(tracked)
    # the travelling state is the tracked state minus the statistics
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert set(train_model.state_dict()) == {k for k in eval_model.state_dict() if not k.endswith(stats)}


def test_sbn_statistics_are_a_cumulative_average():
    torch.manual_seed(6)
    model = Conv(0.25, track_running_stats=True).train()
    seen = []
    model.features[2].register_forward_hook(lambda m, i, o: seen.append(i[0].mean(dim=(0, 2, 3))))
    with torch.no_grad():
        for scale in (1.0, 3.0, -2.0):
            model(torch.randn(8, 1, 28, 28) * scale + scale)
    torch.testing.assert_close(model.features[2].running_mean, torch.stack(seen).mean(0))
    assert int(model.features[2].num_batches_tracked) == 3


def test_model_builder_from_config():
    cfg = parse_control("1_100_0.1_iid_fix_b1-e1_bn_1_1", "CIFAR10", resnet_blocks=(2, 2, 2, 2))
    build = model_builder(cfg, 10)
    model = build(0.0625)
    assert isinstance(model, PreActResNet18) and len(model.stages[0]) == 2
    assert all(m.scaler_rate == 0.125 for m in model.modules() if isinstance(m, Scaler))
    assert model.stem.in_channels == 3
    tracked = model_builder(cfg, 10, track_running_stats=True)(0.5)
    assert all(m.track_running_stats for m in tracked.modules() if isinstance(m, nn.BatchNorm2d))
    conv = model_builder(parse_control("1_100_0.1_iid_fix_a1_in_0_1", "MNIST"), 10)(1.0)
    assert isinstance(conv, Conv) and conv.features[0].in_channels == 1
    assert not any(isinstance(m, Scaler) for m in conv.modules())
    assert isinstance(conv.features[2], nn.GroupNorm) and conv.features[2].num_groups == 64
    text = model_builder(parse_control("1_100_0.1_iid_fix_a1_none_1_1", "WikiText2"), 60)(0.5)
    assert isinstance(text, Transformer) and text.output.out_features == 60 and text.dropout.p == 0.2


@pytest.mark.parametrize("norm, groups", [("in", 32), ("ln", 1), ("gn", 4)])
def test_group_norms(norm, groups):
    module = make_norm(norm, 32, False)
    assert isinstance(module, nn.GroupNorm) and module.num_groups == groups and module.num_channels == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_initialisation(family):
    torch.manual_seed(7)
    model = builder(family)(1.0)
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
        if isinstance(module, nn.Linear):
            assert torch.all(module.bias == 0), name
    if family == "transformer":
        for layer in model.layers:
            for linear in (layer.linear1, layer.linear2):
                assert abs(linear.weight.std().item() - 0.02) < 0.001
                assert abs(linear.weight.mean().item()) < 0.001


def test_resnet_structure_and_parameter_counts():
    """Spec section 8 counts: weight and bias entries, (1, 1, 1, 2) and (2, 2, 2, 2)."""
    def count(model):
        return sum(p.numel() for n, p in model.named_parameters() if n.endswith(("weight", "bias")))
    paper = {"a": "9.6M", "b": "2.4M", "c": "604K", "d": "152K", "e": "38K"}
    for level, text in paper.items():
        n = count(PreActResNet18(LEVELS[level]))
        shown = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{round(n / 1e3)}K"
        assert shown == text, (level, n)
    assert round(count(PreActResNet18(1.0, blocks=(2, 2, 2, 2))) / 1e4) / 100 == 11.17
    model = PreActResNet18(1.0)
    assert [block.shortcut is not None for stage in model.stages for block in stage] == [False, True, True, True, False]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_mask_tokens():
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 50, (100, 64), generator=gen)
    assert torch.equal(mask_tokens(tokens, 50, 0.0, gen), tokens)
    masked = mask_tokens(tokens, 50, 0.15, gen)
    hit = masked == 50
    assert 0.13 < hit.float().mean().item() < 0.17
    assert torch.equal(masked[~hit], tokens[~hit])
    assert torch.equal(mask_tokens(tokens, 50, 0.15, torch.Generator().manual_seed(1)),
                       mask_tokens(tokens, 50, 0.15, torch.Generator().manual_seed(1)))


# ---------------------------------------------------------------- losses

def hand_cross_entropy(logits: list[float], target: int, held: set[int], fill: float) -> float:
    row = [z if c in held else fill for c, z in enumerate(logits)]
    return -row[target] + math.log(sum(math.exp(z) for z in row))


@pytest.mark.parametrize("fill", ["zero", "-inf"])
def test_masked_cross_entropy_by_hand(fill):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    held = {1, 3, 5, 8}
    target = torch.tensor([1, 3, 5, 8, 1, 3])
    mask = label_mask(torch.tensor(sorted(held)), 10)
    assert mask.tolist() == [c in held for c in range(10)]
    fill_value = 0.0 if fill == "zero" else float("-inf")
    per_sample = [hand_cross_entropy(row, int(t), held, fill_value) for row, t in zip(logits.tolist(), target)]
    got = cross_entropy(logits, target, mask, fill=fill, reduction="none")
    torch.testing.assert_close(got, torch.tensor(per_sample, dtype=torch.float64))
    torch.testing.assert_close(cross_entropy(logits, target, mask, fill=fill), torch.tensor(per_sample).double().mean())
    plain = [hand_cross_entropy(row, int(t), set(range(10)), 0.0) for row, t in zip(logits.tolist(), target)]
    torch.testing.assert_close(cross_entropy(logits, target, reduction="none"), torch.tensor(plain, dtype=torch.float64))


def test_zero_fill_differs_from_minus_inf():
    logits = torch.tensor([[2.0, -1.0, 5.0]])
    mask = torch.tensor([True, True, False])
    assert masked_logits(logits, mask).tolist() == [[2.0, -1.0, 0.0]]
    assert masked_logits(logits, mask, "-inf").tolist() == [[2.0, -1.0, float("-inf")]]
    target = torch.tensor([0])
    zero, minus_inf = cross_entropy(logits, target, mask), cross_entropy(logits, target, mask, "-inf")
    assert math.isclose(zero.item(), -2 + math.log(math.exp(2) + math.exp(-1) + 1), rel_tol=1e-6)
    assert math.isclose(minus_inf.item(), -2 + math.log(math.exp(2) + math.exp(-1)), rel_tol=1e-6)
    # a target outside the mask: finite with zero fill, infinite with -inf fill
    assert math.isfinite(cross_entropy(logits, torch.tensor([2]), mask).item())
    assert cross_entropy(logits, torch.tensor([2]), mask, "-inf").item() == float("inf")


def test_masked_cross_entropy_sequence_logits():
    """(N, S, vocab) logits against (N, S) targets, the transformer's layout."""
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(2, 5, 7, generator=gen)
    target = torch.randint(0, 3, (2, 5), generator=gen)
    mask = label_mask(torch.tensor([0, 1, 2]), 7)
    flat = cross_entropy(logits.reshape(10, 7), target.reshape(10), mask)
    torch.testing.assert_close(cross_entropy(logits, target, mask), flat)
    manual = F.cross_entropy(logits.masked_fill(~mask, 0.0).reshape(10, 7), target.reshape(10))
    torch.testing.assert_close(flat, manual)


def test_unknown_fill_is_refused():
    with pytest.raises(ValueError):
        masked_logits(torch.zeros(1, 3), torch.tensor([True, False, True]), fill="Zero")
