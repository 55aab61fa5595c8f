"""FedAvg baselines as configurations of the same round: ``participants=widest`` (only the sampled
clients at the global model's level train, the others sit out), rounds where nobody trains, the
field through the config, the CLI and Flower, and ``experiments.baseline_experiments``."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from heterofl_core.cli import main
from heterofl_core.config import LEVEL_RATES, ConfigError, ExperimentConfig, parse_control, parse_override
from heterofl_core.experiments import DataSpec, Scale, baseline_experiments
from heterofl_core.federated import Federation, _round_line, round_generator, run_experiment
from heterofl_core.server import is_reply_count
from heterofl_core.runs import read_metrics
from heterofl_core.training import scheduled_lr
from fakes import mnist_data_root, tiny_mnist  # noqa: F401  (fixtures)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

CONTROL = "1_10_0.5_iid_fix_d1-e9_bn_1_1"  # user 0 at d (the global level), users 1-9 at e; 5 sampled a round


def config(control: str = CONTROL, **overrides) -> ExperimentConfig:
    return parse_control(control, "MNIST", **{"rounds": 3, "local_epochs": 1, **overrides})


def reference_plan(cfg: ExperimentConfig, fixed: list[str], round_: int) -> tuple[list[int], list[float]]:
    """The server's draws written out: a seeded permutation of the users, its first ceil(frac * users),
    their levels (fixed, or drawn from the same generator after the permutation under dynamic)."""
    generator = round_generator(cfg.seed, round_, torch.device("cpu"))
    users = torch.randperm(cfg.num_users, generator=generator)[:cfg.active_users].tolist()
    levels = fixed
    if cfg.model_split == "dynamic":
        shares = torch.tensor([float(share) for _, share in cfg.model_mode])
        picks = torch.multinomial(shares / shares.sum(), cfg.num_users, replacement=True, generator=generator)
        levels = [cfg.model_mode[i][0] for i in picks.tolist()]
    return users, [LEVEL_RATES[levels[u]] for u in users]


def empty_round(cfg: ExperimentConfig, data, rounds: range = range(1, 30)) -> int:
    """The first round in which no sampled user is at the global level (so under widest nobody trains)."""
    fed = Federation.assemble(cfg.replace(participants="widest"), data, torch.device("cpu"))
    return next(r for r in rounds if not fed.plan_round(r, round_generator(cfg.seed, r, fed.device)).users)


# ---------------------------------------------------------------- the config field


def test_participants_is_a_validated_serialised_field():
    assert ExperimentConfig().participants == "all"
    cfg = config(participants="widest")
    assert cfg.to_dict()["participants"] == "widest" and ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in config().to_dict().items() if k != "participants"}  # a run.json from before the field
    assert ExperimentConfig.from_dict(old).participants == "all"
    with pytest.raises(ConfigError, match=r"unknown participants 'some'; valid: all .*widest"):
        config(participants="some")
    assert parse_override("participants=widest") == ("participants", "widest")


def test_cli_set_participants(tmp_path, mnist_data_root, capsys):
    argv = ["run", "--data", "MNIST", "--control", CONTROL, "--rounds", "2", "--local-epochs", "1",
            "--data-root", str(mnist_data_root), "--device", "cpu", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--set", "participants=widest"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["participants"] == "widest"
    assert "clients_trained" in set(read_metrics(tmp_path / "run")["metric"])
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "bad"), "--set", "participants=most"]) == 2
    assert "unknown participants 'most'; valid: all" in capsys.readouterr().err


# ---------------------------------------------------------------- who trains


@pytest.mark.parametrize("control", [CONTROL, "1_10_0.5_iid_dynamic_d1-e1_bn_1_1", "1_10_0.5_iid_fix_d2-e3_bn_1_1"])
def test_widest_trains_exactly_the_sampled_users_at_the_global_level(tiny_mnist, control):
    cfg = config(control)
    every = Federation.assemble(cfg, tiny_mnist, torch.device("cpu"))
    widest = Federation.assemble(cfg.replace(participants="widest"), tiny_mnist, torch.device("cpu"))
    for round_ in range(1, 11):
        users, rates = reference_plan(cfg, every.fixed_levels, round_)
        plan = every.plan_round(round_, round_generator(cfg.seed, round_, every.device))
        assert (plan.users, plan.rates, plan.sat_out) == (users, rates, []), "all: the draws as before"
        assert plan.lr == scheduled_lr(cfg, round_)
        fedavg = widest.plan_round(round_, round_generator(cfg.seed, round_, widest.device))
        assert fedavg.users == [u for u, r in zip(users, rates) if r == cfg.global_rate]
        assert fedavg.sat_out == [u for u, r in zip(users, rates) if r != cfg.global_rate]
        assert fedavg.rates == [cfg.global_rate] * len(fedavg.users) and fedavg.lr == plan.lr


def test_widest_on_a_single_level_is_all_bit_for_bit(tiny_mnist):
    """Every client holds the global model: nobody sits out, and the run is the same."""
    all_ = run_experiment(config("1_10_0.5_iid_fix_d1_bn_1_1", rounds=2), data=tiny_mnist, device="cpu", quiet=True)
    widest = run_experiment(config("1_10_0.5_iid_fix_d1_bn_1_1", rounds=2, participants="widest"), data=tiny_mnist,
                            device="cpu", quiet=True)
    untimed = lambda f: f[f.split != "time"].drop(columns="elapsed_s").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(untimed(all_), untimed(widest), check_exact=True)
    trained = all_[all_.metric == "clients_trained"]
    assert (trained.value == 5).all() and (trained.split == "train").all()


# ---------------------------------------------------------------- a round where nobody trains


@pytest.mark.parametrize("extraction", ["static", "rolling"])
def test_a_round_with_nobody_keeps_the_state_and_reports_nan_training(tiny_mnist, extraction):
    cfg = config(participants="widest", extraction=extraction)
    fed = Federation.assemble(cfg, tiny_mnist, torch.device("cpu"))
    round_ = empty_round(cfg, tiny_mnist)
    plan = fed.plan_round(round_, round_generator(cfg.seed, round_, fed.device))
    assert plan.users == [] and len(plan.sat_out) == cfg.active_users
    state = fed.initial_state()
    new_state, metrics = fed.run_round(state, round_)
    assert new_state.keys() == state.keys() and all(torch.equal(new_state[k], state[k]) for k in state)
    assert math.isnan(metrics["train_loss"]) and math.isnan(metrics["train_accuracy"])
    assert metrics["clients_trained"] == 0 and metrics["lr"] == cfg.lr
    assert all(math.isfinite(metrics[m]) for m in ("global_accuracy", "local_accuracy", "global_loss"))
    assert "train loss nan" in _round_line(round_, cfg.rounds, metrics, "global_accuracy")


def test_runs_with_empty_rounds_write_resume_and_print(tmp_path, tiny_mnist, capsys):
    base = config(participants="widest")
    last = empty_round(base, tiny_mnist) + 1  # a run that has an empty round and one after it
    cfg = base.replace(rounds=last)
    whole = run_experiment(cfg, data=tiny_mnist, device="cpu", quiet=True)
    out = tmp_path / "run"
    capsys.readouterr()
    run_experiment(cfg.replace(rounds=last - 1), data=tiny_mnist, out_dir=out, device="cpu", quiet=False)
    printed = capsys.readouterr()
    assert f"round {last - 1}/{last - 1}: global_accuracy" in printed.out + printed.err
    assert "train loss nan" in printed.out + printed.err
    resumed = run_experiment(cfg, data=tiny_mnist, out_dir=out, device="cpu", quiet=True, resume=True)
    untimed = lambda f: f[f.split != "time"].drop(columns="elapsed_s").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(untimed(resumed), untimed(whole), check_exact=True)
    pd.testing.assert_frame_equal(read_metrics(out), resumed, check_exact=True)  # NaN survives metrics.csv
    by_round = whole.pivot_table(index="round", columns="metric", values="value", dropna=False)
    assert by_round.loc[last - 1, "clients_trained"] == 0 and math.isnan(by_round.loc[last - 1, "train_loss"])
    trained = by_round["clients_trained"] > 0
    assert by_round.loc[trained, "train_loss"].map(math.isfinite).all()
    assert by_round["global_accuracy"].map(math.isfinite).all()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["run"]["round"] == last


def test_flower_runs_widest_as_the_in_process_loop(tmp_path, mnist_data_root, tiny_mnist):
    """Through heterofl_flower's strategy on a local grid: only the planned clients get messages,
    an empty round sends none, and the numbers equal the in-process loop's (one by one) bit for bit."""
    pytest.importorskip("flwr", reason="the flower extra is not installed")
    from heterofl_core.cohort import CohortRule
    from heterofl_flower.client_app import app as client_app
    from heterofl_flower.local_grid import LocalGrid
    from heterofl_flower.messages import TRAIN
    from heterofl_flower.server_app import FlowerRun, serve

    cfg = config(participants="widest", rounds=3)
    run_experiment(cfg, data_root=mnist_data_root, out_dir=tmp_path / "in-process", quiet=True,
                   cohort_rule=CohortRule(0.0))
    with LocalGrid(client_app, 3, {"data-root": str(mnist_data_root)}) as grid:
        serve(grid, FlowerRun(cfg, str(tmp_path / "flower"), 3, data_root=str(mnist_data_root), quiet=True))
    ours, theirs = (read_metrics(tmp_path / name) for name in ("flower", "in-process"))
    untimed = lambda f: f[f.split != "time"].drop(columns="elapsed_s").sort_values(  # noqa: E731
        ["round", "metric"]).reset_index(drop=True)
    ours, theirs = untimed(ours), untimed(theirs)
    pd.testing.assert_frame_equal(ours[~ours.metric.map(is_reply_count)].reset_index(drop=True), theirs,
                                  check_exact=True)
    fed = Federation.assemble(cfg, tiny_mnist, torch.device("cpu"))
    planned = [len(fed.plan_round(r, round_generator(cfg.seed, r, fed.device)).users) for r in range(1, cfg.rounds + 1)]
    sent = [sum(d.message_type == TRAIN and d.group == str(r) for d in grid.traffic) for r in range(1, cfg.rounds + 1)]
    assert sent == planned and 0 in planned and max(planned) > 0, "rounds with and without clients"


# ---------------------------------------------------------------- the notebook's four runs


def test_baseline_experiments_build_the_four_runs():
    scale = Scale(rounds=4, local_epochs=1, num_users=20, frac=0.5)
    data = DataSpec("MNIST", "/nowhere", train=100, test=50)
    runs = baseline_experiments(data, scale, "a1-e9", seeds=(0, 1))
    assert len(runs) == 8 and [r.cfg.seed for r in runs] == [0] * 4 + [1] * 4
    first = runs[:4]
    assert [r.name for r in first] == ["HeteroFL a1-e9", "FedAvg a, only clients that hold it",
                                       "FedAvg e, every client", "FedAvg a, every client (upper reference)"]
    modes = [(r.cfg.model_mode, r.cfg.participants) for r in first]
    assert modes == [((("a", 1), ("e", 9)), "all"), ((("a", 1), ("e", 9)), "widest"), ((("e", 1),), "all"),
                     ((("a", 1),), "all")]
    assert [r.labels["method"] for r in first] == ["HeteroFL", "FedAvg", "FedAvg", "FedAvg"]
    assert [r.labels["width"] for r in first] == ["a-e", "a", "e", "a"]
    assert [r.labels["reachable"] for r in first] == [True, True, True, False]
    assert all(r.labels["trains"] for r in first)
    budget = {(r.cfg.rounds, r.cfg.local_epochs, r.cfg.num_users, r.cfg.frac, r.cfg.data_split, r.cfg.lr) for r in runs}
    assert budget == {(4, 1, 20, 0.5, "iid", 0.01)}, "the same users, data and budget"
    assert len({r.key for r in runs}) == 8, "every run has its own folder"
    dynamic = baseline_experiments(data, scale, "b-d", model_split="dynamic")
    assert [r.cfg.model_split for r in dynamic] == ["dynamic", "dynamic", "fix", "fix"]
    assert [r.name for r in dynamic][1:] == ["FedAvg b, only clients that hold it", "FedAvg d, every client",
                                             "FedAvg b, every client (upper reference)"]
    with pytest.raises(ValueError, match="single level a1"):
        baseline_experiments(data, scale, "a1")
