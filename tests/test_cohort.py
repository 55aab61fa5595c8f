"""Cohort training (clients of one width as one batched computation) equals one-by-one training."""

from __future__ import annotations

import pytest
import torch

from heterofl_core import cohort, federated
from heterofl_core.cohort import CohortRule, grouped_model, train_cohort
from heterofl_core.config import parse_control
from heterofl_core.data import ImageData
from heterofl_core.federated import Federation
from heterofl_core.losses import label_mask
from heterofl_core.machine import fast_layout, training_layout
from heterofl_core.training import train_client
from reference import LEVELS, TINY, builder
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

TOL = dict(rtol=1e-4, atol=1e-5)


def client_data(family: str, clients: int, steps: int, seed: int) -> tuple[list, list]:
    """Per client: its batches (batch 4; client 0 ends with a batch of 3, client 1 has one step
    fewer: the ragged ends of unequal data sizes) and a random label mask."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 28, 28) if family == "conv" else (3, 32, 32)
    batches = [[(torch.randn(4, *shape, generator=gen), torch.randint(0, 10, (4,), generator=gen))
                for _ in range(steps)] for _ in range(clients)]
    batches[0][-1] = (batches[0][-1][0][:3], batches[0][-1][1][:3])
    batches[1] = batches[1][:-1]
    masks = [label_mask(torch.randperm(10, generator=gen)[:6], 10) for _ in range(clients)]
    return batches, masks


def one_by_one(model, start, batches, masks, cfg) -> list[dict]:
    """``train_client`` per client; ``batches`` are all its steps (cfg.local_epochs must be 1)."""
    assert cfg.local_epochs == 1
    trained = []
    for client, mask in zip(batches, masks):
        model.load_state_dict(start)
        train_client(model, lambda client=client: iter(client), mask, cfg, cfg.lr)
        trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return trained


@pytest.mark.parametrize("family", ["conv", "resnet18"])
@pytest.mark.parametrize("level", list(LEVELS))
def test_cohort_equals_one_by_one(family, level):
    """Every client's trained parameters and the summed loss match, over ragged ends, masks,
    momentum, weight decay and gradient clipping (lr 0.5: large steps, where a wrong update would show)."""
    cfg = parse_control("1_100_0.1_iid_fix_a1-e1_bn_1_1", "MNIST", lr=0.5, local_epochs=1)
    torch.manual_seed(0)
    model = fast_layout(builder(family, **TINY[family])(LEVELS[level]))
    start = {k: v.clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    batches, masks = client_data(family, clients=3, steps=3, seed=1)
    expected = one_by_one(model, start, batches, masks, cfg)
    got, stats = train_cohort(grouped_model(model), start, batches, masks, cfg, cfg.lr)
    assert stats.count == sum(y.numel() for client in batches for _, y in client)
    for mine, theirs in zip(got, expected):
        assert set(mine) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], **TOL, msg=lambda m: f"{key}: {m}")
            assert not torch.equal(mine[key], start[key]) or key.endswith("bias"), key


OPTIMISER_OPTIONS = [dict(momentum=0.0, weight_decay=0.0, clip_norm=1e9), dict(momentum=0.9, weight_decay=0.0, clip_norm=1e9),
                     dict(momentum=0.0, weight_decay=5e-3, clip_norm=1e9), dict(momentum=0.5, weight_decay=5e-4, clip_norm=0.1),
                     dict(momentum=0.9, weight_decay=5e-4, clip_norm=1.0, mask_fill="-inf")]


@pytest.mark.parametrize("options", OPTIMISER_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_cohort_equals_one_by_one_for_every_optimiser_option(options):
    """Momentum on/off, weight decay on/off, clipping that bites or never does, either mask fill:
    the cohort's step is training.local_step, so every option reaches it."""
    cfg = parse_control("1_100_0.1_iid_fix_a1-e1_bn_1_1", "MNIST", lr=0.3, local_epochs=1, **options)
    torch.manual_seed(0)
    model = fast_layout(builder("conv", **TINY["conv"])(0.25))
    start = {k: v.clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    batches, masks = client_data("conv", clients=3, steps=3, seed=4)
    expected = one_by_one(model, start, batches, masks, cfg)
    got, _ = train_cohort(grouped_model(model), start, batches, masks, cfg, cfg.lr)
    for mine, theirs in zip(got, expected):
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], **TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("norm", ["in", "gn", "ln", "none"])
def test_cohort_equals_one_by_one_other_norms_without_mask(norm):
    cfg = parse_control(f"1_100_0.1_iid_fix_a1-e1_{norm}_1_0", "MNIST", local_epochs=1)
    model = builder("conv", norm=norm, **TINY["conv"])(0.25)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batches, _ = client_data("conv", clients=2, steps=2, seed=2)
    masks = [None, None]
    expected = one_by_one(model, start, batches, masks, cfg)
    got, _ = train_cohort(grouped_model(model), start, batches, masks, cfg, cfg.lr)
    for mine, theirs in zip(got, expected):
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], **TOL, msg=lambda m: f"{key}: {m}")


def test_models_with_strided_convolutions_train_nchw():
    """NHWC weight gradients of strided 1x1 convolutions corrupt the heap in PyTorch 2.14 (machine.training_layout)."""
    resnet, conv = builder("resnet18", **TINY["resnet18"])(0.5), builder("conv", **TINY["conv"])(0.5)
    assert training_layout(resnet) == training_layout(grouped_model(resnet)) == torch.contiguous_format
    assert training_layout(conv) == training_layout(grouped_model(conv)) == torch.channels_last


def test_transformer_has_no_grouped_form():
    assert grouped_model(builder("transformer", **TINY["transformer"])(0.5)) is None


def test_rule_is_data_per_kind_of_device():
    cpu, cuda = CohortRule.measured(torch.device("cpu")), CohortRule.measured(torch.device("cuda"))
    assert not cpu.together(0.0625, 1), "one client is never a cohort"
    assert [cpu.together(rate, 5) for rate in LEVELS.values()] == [r <= cpu.max_rate for r in LEVELS.values()]
    assert 0 < cpu.max_rate < 1 and cpu.source, "the shipped CPU rule says where its number comes from"
    assert all(cuda.together(rate, 2) for rate in LEVELS.values())
    assert CohortRule.measured(torch.device("meta")).max_rate == 0, "unmeasured devices train one by one"


def test_rule_from_measured_speedups_stops_at_the_first_width_that_does_not_pay():
    speedups = {0.0625: 3.1, 0.125: 2.5, 0.25: 1.4, 0.5: 0.97, 1.0: 1.2}
    assert CohortRule.from_speedups(speedups, "test").max_rate == 0.25
    assert CohortRule.from_speedups({0.0625: 0.9}, "test").max_rate == 0


def synthetic_mnist(n_train: int = 400, n_test: int = 100) -> ImageData:
    gen = torch.Generator().manual_seed(0)
    return ImageData("MNIST", "synthetic", torch.randn(n_train, 1, 28, 28, generator=gen), torch.arange(n_train) % 10,
                     torch.randn(n_test, 1, 28, 28, generator=gen), torch.arange(n_test) % 10, 10, False)


def test_round_with_cohorts_equals_round_one_by_one(monkeypatch):
    """A whole round (d and e clients, non-iid so that data sizes differ) with cohorts for every
    width and with none: the same new global state and metrics within float rounding."""
    cfg = parse_control("1_20_0.5_non-iid-2_fix_d1-e1_bn_1_1", "MNIST", local_epochs=2)
    outcomes = []
    for max_rate in (0.0, 1.0):
        federation = Federation.assemble(cfg, synthetic_mnist(), torch.device("cpu"), eval_batch_size=100,
                                         cohort_rule=CohortRule(max_rate))
        outcomes.append(federation.run_round(federation.initial_state(), 1))
    (state_a, metrics_a), (state_b, metrics_b) = outcomes
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], **TOL, msg=lambda m: f"{key}: {m}")
    for name in ("global_accuracy", "train_loss", "train_accuracy"):
        assert metrics_a[name] == pytest.approx(metrics_b[name], rel=1e-4, abs=1e-3), name


def test_cohort_path_is_taken_in_a_round(monkeypatch):
    calls = []
    real = cohort.train_cohort
    monkeypatch.setattr(federated, "train_cohort", lambda *args, **kw: calls.append(len(args[2])) or real(*args, **kw))
    cfg = parse_control("1_20_0.5_iid_fix_d1-e1_bn_1_1", "MNIST", local_epochs=1)
    federation = Federation.assemble(cfg, synthetic_mnist(), torch.device("cpu"), eval_batch_size=100,
                                     cohort_rule=CohortRule(0.125))
    federation.run_round(federation.initial_state(), 1)
    assert sum(calls) == cfg.active_users, "both widths (d, e) train as cohorts under a rule up to d"
