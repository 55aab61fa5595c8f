"""The server's steps of a round (heterofl_core/server.py), which the in-process loop and Flower's
strategy both drive: the plan among available users, what each client receives, the count rule over
the replies that came back, the reply counts and the short-round threshold."""

from __future__ import annotations

import pytest
import torch

from fakes import tiny_mnist, mnist_data_root  # noqa: F401  (fixtures)
from heterofl_core.aggregation import aggregate
from heterofl_core.cohort import CohortRule
from heterofl_core.config import parse_control
from heterofl_core.federated import Federation
from heterofl_core.seeds import round_generator
from heterofl_core.server import RoundSteps, check_required, is_reply_count, reply_counts
from heterofl_core.training import TrainStats
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

CONTROL = "1_10_0.5_iid_fix_a1-e1_bn_1_1"  # 5 of 10 users a round, levels a and e


def federation(data, **overrides) -> Federation:
    cfg = parse_control(CONTROL, "MNIST", **{"rounds": 3, "local_epochs": 1, **overrides})
    return Federation.assemble(cfg, data, torch.device("cpu"), cohort_rule=CohortRule(0.0))


def plan(fed: Federation, round_: int, available=None):
    return fed.plan_round(round_, round_generator(fed.cfg.seed, round_, fed.device), available)


@pytest.mark.parametrize("split", ["fix", "dynamic"])
def test_with_every_user_available_the_plan_is_the_plan_without_availability(tiny_mnist, split):
    fed = federation(tiny_mnist, model_split=split)
    for round_ in range(1, 6):
        assert plan(fed, round_, available=set(range(10))) == plan(fed, round_)


def test_the_plan_samples_only_available_users_and_names_the_skipped(tiny_mnist):
    fed = federation(tiny_mnist)
    for round_ in range(1, 6):
        full = plan(fed, round_)
        odd = set(range(1, 10, 2))  # the node of partition 0 of 2 is down: its users 0, 2, 4, ... are not
        partial = plan(fed, round_, available=odd)
        assert set(partial.users) <= odd and len(partial.users) == len(odd) == fed.cfg.active_users
        assert partial.skipped and not set(partial.skipped) & odd
        assert [u for u in full.users if u in odd] == partial.users[:len([u for u in full.users if u in odd])], \
            "the available users of the full plan come first, in its order"
        assert partial.lr == full.lr
    assert plan(fed, 1, available=set()).users == []


def test_configure_shares_a_static_widths_sub_model_and_gives_rolling_clients_their_own(tiny_mnist):
    static = federation(tiny_mnist)
    state = static.initial_state()
    setup = RoundSteps(static).configure(state, 1)
    assert [task.user for task in setup.tasks] == setup.plan.users
    assert sorted(i for group in setup.groups for i in group) == list(range(len(setup.tasks)))
    for group in setup.groups:
        assert len({id(setup.tasks[i].sub_state) for i in group}) == 1, "one sub-model per width"
        assert len({setup.tasks[i].rate for i in group}) == 1
    assert all(task.holding is None for task in setup.tasks)

    rolling = federation(tiny_mnist, extraction="rolling")
    setup = RoundSteps(rolling).configure(state, 3)
    assert setup.groups == [[i] for i in range(len(setup.tasks))]
    for task in setup.tasks:
        assert {key: tuple(value.shape) for key, value in task.sub_state.items()} == \
            {key: held.shape for key, held in task.holding.items()}


def test_aggregate_is_the_count_rule_over_the_replies_that_came_back(tiny_mnist):
    fed = federation(tiny_mnist)
    steps = RoundSteps(fed)
    state = fed.initial_state()
    setup = steps.configure(state, 1)
    trained, _ = fed.train(setup)
    gone = setup.plan.users[0]
    replies = {user: client for user, client in trained.items() if user != gone}
    kept = [task for task in setup.tasks if task.user != gone]
    expected = aggregate(fed.slicer, state, [replies[t.user] for t in kept], [t.rate for t in kept],
                         [fed.labels[t.user] for t in kept])
    got = steps.aggregate(state, setup, replies)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    untouched = steps.aggregate(state, setup, {})
    assert all(torch.equal(untouched[key], state[key]) for key in state), "no reply: the model stays as it was"


def test_the_training_sums_add_group_after_group_in_the_plans_order(tiny_mnist):
    fed = federation(tiny_mnist)
    setup = RoundSteps(fed).configure(fed.initial_state(), 1)
    per_user = {task.user: TrainStats(torch.tensor(float(task.user)), torch.tensor(1.0), 10) for task in setup.tasks}
    total = RoundSteps.add_stats(setup, per_user, fed.device)
    assert total.count == 10 * len(setup.tasks) and total.loss_sum.item() == sum(setup.plan.users)
    _, in_process = fed.train(setup)
    trained_one_by_one = {}
    for task in setup.tasks:
        trained_one_by_one[task.user] = fed.local_update(task.sub_state, task.user, task.rate, 1)[1]
    assert torch.equal(RoundSteps.add_stats(setup, trained_one_by_one, fed.device).loss_sum, in_process.loss_sum), \
        "Flower's sum of per-client sums is the in-process loop's, bit for bit"


def test_reply_counts_per_level_and_the_short_round_threshold(tiny_mnist):
    fed = federation(tiny_mnist)
    setup = RoundSteps(fed).configure(fed.initial_state(), 1)
    wide = [t.user for t in setup.tasks if t.rate == 1.0]
    narrow = [t.user for t in setup.tasks if t.rate != 1.0]
    assert wide and narrow, "the seed gives this round both levels"
    every = reply_counts(setup, wide + narrow)
    assert every == {"users_asked": 5, "users_replied": 5, "users_skipped": 0, "asked_a": len(wide),
                     "replied_a": len(wide), "asked_e": len(narrow), "replied_e": len(narrow), "short_round": 0.0}
    assert all(is_reply_count(name) for name in every)
    no_wide = reply_counts(setup, narrow)
    assert no_wide["replied_a"] == 0 and no_wide["short_round"] == 1.0, "no client of the widest level came back"
    assert reply_counts(setup, wide)["short_round"] == 0.0
    assert reply_counts(setup, wide, "all")["short_round"] == 1.0
    assert reply_counts(setup, (wide + narrow)[:3], "0.6")["short_round"] == 0.0
    assert reply_counts(setup, (wide + narrow)[:2], "0.6")["short_round"] == 1.0


@pytest.mark.parametrize("bad", ["most", "0", "1.5", "-1", ""])
def test_a_bad_threshold_is_refused_with_the_valid_ones(bad):
    with pytest.raises(ValueError, match="valid: widest"):
        check_required(bad)


def test_the_in_process_round_records_no_reply_counts(tiny_mnist):
    fed = federation(tiny_mnist)
    _, metrics = fed.run_round(fed.initial_state(), 1)
    assert not [name for name in metrics if is_reply_count(name)]
    assert metrics["clients_trained"] == fed.cfg.active_users

