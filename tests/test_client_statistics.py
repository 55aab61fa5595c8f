"""The alternative to sBN that a reader tries first: clients' BatchNorms keep running statistics
(PyTorch's default, momentum 0.1) while they train, and the server averages them by the count rule
(``Federation.local_update_tracking``, ``Federation.averaged_statistics_model``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from heterofl_core.aggregation import aggregate
from heterofl_core.cohort import CohortRule
from heterofl_core.config import parse_control
from heterofl_core.federated import Federation, is_statistic, round_generator
from heterofl_core.models.layers import track_running_statistics
from fakes import mnist_data_root, tiny_mnist  # noqa: F401  (fixtures)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

CONTROL = "1_10_0.5_iid_fix_d1-e1_bn_1_1"  # global model at d; 5 of 10 users a round, of both levels


def federation(tiny_mnist, control: str = CONTROL, **overrides) -> Federation:
    cfg = parse_control(control, "MNIST", **{"rounds": 2, "local_epochs": 1, **overrides})
    return Federation.assemble(cfg, tiny_mnist, torch.device("cpu"), cohort_rule=CohortRule(0.0))


def statistics(state: dict) -> dict:
    return {key: value for key, value in state.items() if is_statistic(key)}


def test_track_running_statistics_gives_pytorchs_default_batch_norm():
    """Against nn.BatchNorm2d(C) as PyTorch builds it: the same outputs and the same statistics after
    the same train-mode batches, and the same outputs as the batch-statistics-only layer it replaced."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(2, 4, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(4, momentum=None, track_running_stats=False))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2, generator=generator)
        model[1].bias.uniform_(-1, 1, generator=generator)
    untracked = nn.Sequential(conv, nn.BatchNorm2d(4, momentum=None, track_running_stats=False))
    untracked.load_state_dict(model.state_dict())
    reference = nn.Sequential(conv, nn.BatchNorm2d(4))
    reference.load_state_dict(model.state_dict(), strict=False)
    assert track_running_statistics(model) is model
    norm = model[1]
    assert type(norm) is nn.BatchNorm2d and norm.momentum == 0.1 and norm.track_running_stats
    assert torch.equal(norm.weight, untracked[1].weight) and torch.equal(norm.bias, untracked[1].bias)
    assert torch.equal(norm.running_mean, torch.zeros(4)) and torch.equal(norm.running_var, torch.ones(4))
    for _ in range(3):
        x = torch.randn(5, 2, 3, 3, generator=generator)
        out = model(x)
        assert torch.equal(out, reference(x)) and torch.equal(out, untracked(x))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert int(norm.num_batches_tracked) == 3


@pytest.mark.parametrize("model", ["conv", "resnet18"])
def test_local_update_tracking_trains_the_same_weights_and_tracks_statistics(tiny_mnist, model):
    """Bit for bit: the tracking model is built in the same memory layout as the training model."""
    fed = federation(tiny_mnist, model=model)
    state = fed.initial_state()
    for user, rate in [(0, 0.125), (7, 0.0625)]:
        sub = fed.slicer.split(state, rate)
        plain, plain_stats = fed.local_update(sub, user, rate, 2)
        tracked, tracked_stats = fed.local_update_tracking(sub, user, rate, 2)
        assert all(torch.equal(tracked[key], value) for key, value in plain.items()), f"user {user}"
        assert (tracked_stats.loss_sum, tracked_stats.count) == (plain_stats.loss_sum, plain_stats.count)
        extra = set(tracked) - set(plain)
        norms = {name for name, m in fed.tracking_model(rate).named_modules() if isinstance(m, nn.BatchNorm2d)}
        assert extra == {f"{name}.{stat}" for name in norms
                         for stat in ("running_mean", "running_var", "num_batches_tracked")}
        steps = math.ceil(len(fed.workload.split.train[user]) / fed.cfg.batch_size_train) * fed.cfg.local_epochs
        assert all(int(tracked[f"{name}.num_batches_tracked"]) == steps for name in norms)
        assert all(tracked[f"{name}.running_mean"].abs().sum() > 0 for name in norms)
        again, _ = fed.local_update_tracking(sub, user, rate, 2)  # statistics start afresh every call
        assert all(torch.equal(again[key], value) for key, value in tracked.items())


def reference_average(initial: dict, client_states: list[dict]) -> dict:
    """Per statistic and channel, the mean over the clients whose tensor reaches that channel; the
    initial value where none does; the layer's batch counter: the rounded mean over all clients."""
    out = {}
    for key, start in initial.items():
        if key.endswith("num_batches_tracked"):
            counts = [int(state[key]) for state in client_states]
            out[key] = torch.tensor(round(sum(counts) / len(counts)) if counts else int(start))
            continue
        values = []
        for channel in range(len(start)):
            total, holders = 0.0, 0
            for state in client_states:
                if channel < len(state[key]):
                    total += float(state[key][channel])
                    holders += 1
            values.append(total / holders if holders else float(start[channel]))
        out[key] = torch.tensor(values)
    return out


def tracking_round(fed, state, round_):
    """A round as notebook 04 writes it by hand: every client trains with local_update_tracking; the weights
    aggregate by the count rule. (new state, the clients' states with their statistics, the plan)."""
    plan = fed.plan_round(round_, round_generator(fed.cfg.seed, round_, fed.device))
    subs = {rate: fed.slicer.split(state, rate) for rate in set(plan.rates)}
    clients = [fed.local_update_tracking(subs[rate], user, rate, round_)[0] for user, rate in zip(plan.users, plan.rates)]
    weights = [{key: client[key] for key in state} for client in clients]
    return aggregate(fed.slicer, state, weights, plan.rates, [fed.labels[u] for u in plan.users]), clients, plan


@pytest.mark.parametrize("model", ["conv", "resnet18"])
def test_averaged_statistics_are_the_count_rule_over_the_clients_that_hold_each_channel(tiny_mnist, model):
    fed = federation(tiny_mnist, model=model)
    state, clients, plan = tracking_round(fed, fed.initial_state(), 1)
    assert len(set(plan.rates)) == 2, "the seed gives this round both levels"
    initial = statistics(fed.evaluation_copy(state).state_dict())
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in initial.items() if k.endswith("running_mean"))
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in initial.items() if k.endswith("running_var"))
    narrow = [i for i, rate in enumerate(plan.rates) if rate < fed.cfg.global_rate]
    for chosen in (list(range(len(clients))), narrow, []):  # everyone; only narrow ones (wide channels unheld); nobody
        model = fed.averaged_statistics_model(state, [clients[i] for i in chosen], [plan.rates[i] for i in chosen])
        got, expected = statistics(model.state_dict()), reference_average(initial, [clients[i] for i in chosen])
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value.to(got[key].dtype), rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{key}: {m}")
        assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
        assert not any(m.training for m in model.modules())
    wide = next(k for k in initial if k.endswith("running_var"))
    only_narrow = fed.averaged_statistics_model(state, [clients[i] for i in narrow], [plan.rates[i] for i in narrow])
    held = len(clients[narrow[0]][wide])
    assert held < len(initial[wide]) and torch.equal(only_narrow.state_dict()[wide][held:],
                                                     torch.ones(len(initial[wide]) - held))


def test_sbn_and_averaged_statistics_both_evaluate_and_differ(tiny_mnist):
    fed = federation(tiny_mnist)
    state, clients, plan = tracking_round(fed, fed.initial_state(), 1)
    sbn = fed.evaluation_model(state, round_generator(fed.cfg.seed, 1, fed.device), 1)
    averaged = fed.averaged_statistics_model(state, clients, plan.rates)
    key = next(k for k in statistics(sbn.state_dict()) if k.endswith("running_mean"))
    assert not torch.allclose(sbn.state_dict()[key], averaged.state_dict()[key])
    results = [fed.workload.evaluate(model, torch.Generator().manual_seed(0)) for model in (sbn, averaged)]
    assert all(math.isfinite(value) for metrics in results for value in metrics.values())
    assert results[0]["global_loss"] != results[1]["global_loss"]


def test_a_round_of_tracking_clients_is_the_one_by_one_round(tiny_mnist):
    fed = federation(tiny_mnist)
    start = fed.initial_state()
    tracked, _, _ = tracking_round(fed, start, 2)
    plain, _ = fed.run_round(start, 2)
    assert tracked.keys() == plain.keys() and all(torch.equal(tracked[k], plain[k]) for k in plain)


def test_refusals(tiny_mnist):
    no_bn = federation(tiny_mnist, "1_10_0.5_iid_fix_d1-e1_gn_1_1")
    sub = no_bn.slicer.split(no_bn.initial_state(), 0.125)
    with pytest.raises(ValueError, match="needs BatchNorm layers.*norm 'gn'"):
        no_bn.local_update_tracking(sub, 0, 0.125, 1)
    with pytest.raises(ValueError, match="needs BatchNorm layers"):
        no_bn.averaged_statistics_model(no_bn.initial_state(), [], [])
    rolling = federation(tiny_mnist, extraction="rolling")
    with pytest.raises(ValueError, match="static extraction.*'rolling'"):
        rolling.averaged_statistics_model(rolling.initial_state(), [], [])
    fed = federation(tiny_mnist)
    state = fed.initial_state()
    untracked, _ = fed.local_update(fed.slicer.split(state, 0.125), 0, 0.125, 1)
    with pytest.raises(ValueError, match="no running statistics.*local_update_tracking"):
        fed.averaged_statistics_model(state, [untracked], [0.125])
