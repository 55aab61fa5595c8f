"""HeteroFL on Flower (heterofl_flower), in one process through a stand-in grid: what each node
receives per rate, aggregation equal to the library's, partial replies, sBN from the clients'
sums, run configs; a short simulation on Ray (slow). The deployment on 127.0.0.1 is in
test_flower_deployment.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'heterofl[flower]'")

from flwr.app import ConfigRecord  # noqa: E402

from heterofl_core.aggregation import aggregate  # noqa: E402
from heterofl_core.cohort import CohortRule  # noqa: E402
from heterofl_core.config import LEVEL_RATES, parse_control  # noqa: E402
from heterofl_core.datasets import load_dataset  # noqa: E402
from heterofl_core.federated import Federation, add_states, run_experiment  # noqa: E402
from heterofl_core.runs import read_metrics  # noqa: E402
from heterofl_core.server import is_reply_count  # noqa: E402
from heterofl_core.training import load_sbn_sums, sbn_statistics  # noqa: E402
from heterofl_flower.client_app import app as client_app  # noqa: E402
from heterofl_flower.local_grid import LocalGrid  # noqa: E402
from heterofl_flower.messages import TRAIN, from_record  # noqa: E402
from heterofl_flower.cli import APP_DIR  # noqa: E402
from heterofl_flower.server_app import RUN_CONFIG_KEYS, FlowerRun, serve  # noqa: E402
from heterofl_flower.strategy import HeteroFLStrategy, partitions  # noqa: E402
from fakes import write_tiny_mnist  # noqa: E402
from reference import one_cpu_thread  # noqa: E402,F401  (autouse fixture: one intra-op thread)

CONTROL = "1_10_0.5_iid_fix_a1-e1_bn_1_1"  # the issue's: 5 of 10 users a round, levels a and e


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_tiny_mnist(root, n_train=200, n_test=50)
    return root


@pytest.fixture(scope="module")
def mnist(data_root):
    return load_dataset("MNIST", data_root, download=False)


def config(control: str = CONTROL, **overrides):
    return parse_control(control, "MNIST", **{"rounds": 2, "local_epochs": 1, **overrides})


def test_core_library_never_imports_flower():
    code = ("import sys, pkgutil, importlib, heterofl_core\n"
            "for m in pkgutil.walk_packages(heterofl_core.__path__, 'heterofl_core.'):\n    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "from heterofl_core.cli import build_parser; build_parser()\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')], 'flower imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_node_gets_the_sub_model_of_its_rate_one_record_per_rate(mnist, data_root):
    cfg = config()
    federation = Federation.assemble(cfg, mnist, torch.device("cpu"))
    with LocalGrid(client_app, 3, {"data-root": str(data_root)}) as grid:
        strategy = HeteroFLStrategy(federation)
        strategy.nodes = partitions(grid, None)
        messages = list(strategy.configure_train(1, _record(federation.initial_state()), ConfigRecord(), grid))
    plan = strategy.setup.plan
    assert [int(m.content["config"]["user"]) for m in messages] == plan.users
    assert len(set(plan.rates)) == 2, "the seed gives this round both levels"
    records = {}
    for message, user, rate in zip(messages, plan.users, plan.rates):
        assert message.metadata.message_type == TRAIN
        assert message.metadata.dst_node_id == strategy.nodes[user % 3]
        state = from_record(message.content["arrays"])
        expected = federation.slicer.split(federation.initial_state(), rate)
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
        assert all(torch.equal(state[k], expected[k]) for k in expected)
        records.setdefault(rate, message.content["arrays"])
        assert message.content["arrays"] is records[rate], "one ArrayRecord per rate, shared"


@pytest.mark.parametrize("sbn_source", ["server", "clients"])
def test_rounds_through_flower_equal_the_in_process_rounds_bit_for_bit(tmp_path, data_root, sbn_source):
    """One by one in both (the in-process loop's cohort training equals it up to float rounding)."""
    cfg = config(sbn_source=sbn_source)
    run_experiment(cfg, data_root=data_root, out_dir=tmp_path / "in-process", quiet=True, cohort_rule=CohortRule(0.0))
    with LocalGrid(client_app, 3, {"data-root": str(data_root)}) as grid:
        serve(grid, FlowerRun(cfg, str(tmp_path / "flower"), 3, data_root=str(data_root), quiet=True))
    ours, theirs = (_results(read_metrics(tmp_path / name)) for name in ("flower", "in-process"))
    pd.testing.assert_frame_equal(_without_reply_counts(ours), theirs, check_exact=True)
    assert (ours[ours.metric == "users_replied"].value == cfg.active_users).all()
    assert (ours[ours.metric == "short_round"].value == 0).all()
    assert {d.message_type for d in grid.traffic} == {"query.partition", TRAIN} | (
        {"query.sbn"} if sbn_source == "clients" else set())


def test_a_round_with_lost_replies_aggregates_the_clients_that_replied(mnist, data_root):
    cfg = config()
    federation = Federation.assemble(cfg, mnist, torch.device("cpu"))
    state = federation.initial_state()
    lost_user = None

    def lost(message):
        return message.metadata.message_type == TRAIN and int(message.content["config"]["user"]) == lost_user

    with LocalGrid(client_app, 3, {"data-root": str(data_root)}, lost=lost) as grid:
        strategy = HeteroFLStrategy(federation)
        strategy.nodes = partitions(grid, None)
        messages = list(strategy.configure_train(1, _record(state), ConfigRecord(), grid))
        lost_user = strategy.setup.plan.users[1]
        replies = list(grid.send_and_receive(messages))
        arrays, metrics = strategy.aggregate_train(1, replies)
    plan = strategy.setup.plan
    kept = [i for i, user in enumerate(plan.users) if user != lost_user]
    trained = [federation.local_update(federation.slicer.split(state, plan.rates[i]), plan.users[i], plan.rates[i], 1)[0]
               for i in kept]
    expected = aggregate(federation.slicer, state, trained, [plan.rates[i] for i in kept],
                         [federation.labels[plan.users[i]] for i in kept])
    assert metrics["users_replied"] == len(kept) == cfg.active_users - 1
    assert metrics["users_asked"] == cfg.active_users
    level = "a" if plan.rates[1] == 1.0 else "e"
    assert metrics[f"replied_{level}"] == metrics[f"asked_{level}"] - 1
    got = from_record(arrays)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_sbn_from_the_clients_sums_equals_one_pass_over_their_batches(mnist):
    """Each user's pass over its own data, added, equals one sBN pass over all those batches."""
    cfg = config(sbn_source="clients", control="1_10_0.5_non-iid-2_fix_a1-e1_bn_1_1", sbn_batch_size=7)
    federation = Federation.assemble(cfg, mnist, torch.device("cpu"))
    state = federation.initial_state()
    combined = federation.evaluation_model(state, torch.Generator(), round_=3)

    from heterofl_core.seeds import client_sbn_generator
    batches = []
    for user in range(cfg.num_users):
        for chunk in federation.workload.user_stats_inputs(user, client_sbn_generator(cfg.seed, 3, user, federation.device)):
            batches.extend(chunk.split(7))  # the user's own batches: its last may be smaller
    one_pass = sbn_statistics(federation.evaluation_copy(state), batches)
    stats = {k: v for k, v in combined.state_dict().items() if "running" in k or "num_batches" in k}
    assert stats and all(torch.allclose(v, one_pass.state_dict()[k], rtol=1e-5, atol=1e-6) for k, v in stats.items())
    assert all(torch.equal(combined.state_dict()[k], one_pass.state_dict()[k]) for k in stats if "num_batches" in k)


def test_sbn_sums_of_disjoint_passes_add():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), torch.nn.BatchNorm2d(3, momentum=None))
    generator = torch.Generator().manual_seed(0)
    parts = [[torch.randn(4, 1, 2, 2, generator=generator) for _ in range(n)] for n in (2, 3)]
    from heterofl_core.training import sbn_sums
    sums = [sbn_sums(sbn_statistics(model, part)) for part in parts]
    load_sbn_sums(model, add_states(sums))
    reference = sbn_statistics(torch.nn.Sequential(model[0], torch.nn.BatchNorm2d(3, momentum=None)),
                               parts[0] + parts[1])
    assert torch.allclose(model[1].running_mean, reference[1].running_mean, atol=1e-6)
    assert torch.allclose(model[1].running_var, reference[1].running_var, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 5


def test_nodes_with_missing_or_repeated_partitions_are_refused(data_root):
    with LocalGrid(client_app, 2, {"data-root": str(data_root)}) as grid:
        grid.contexts[2].node_config["partition-id"] = 0
        with pytest.raises(RuntimeError, match="two nodes hold partition 0"):
            partitions(grid, None)
    with LocalGrid(client_app, 2) as grid:
        del grid.contexts[1].node_config["partition-id"]
        with pytest.raises(RuntimeError, match="lacks partition-id and num-partitions"):
            partitions(grid, None)


def test_run_config_of_a_deployment():
    run = FlowerRun.from_run_config({"data": "MNIST", "control": CONTROL, "supernodes": 3, "out": "runs/x",
                                     "rounds": 2, "set": "sbn_source=clients lr=0.05", "timeout": 0})
    assert (run.cfg.rounds, run.cfg.sbn_source, run.cfg.lr, run.supernodes, run.timeout) == (2, "clients", 0.05, 3, None)
    assert run.cfg.model_mode == (("a", 1), ("e", 1)) and LEVEL_RATES["e"] == 0.0625
    with pytest.raises(ValueError, match="lacks supernodes, out"):
        FlowerRun.from_run_config({"data": "MNIST", "control": CONTROL})
    with pytest.raises(ValueError, match="unknown run-config keys \\['epochs'\\]; valid: data, control"):
        FlowerRun.from_run_config({"data": "MNIST", "control": CONTROL, "supernodes": 3, "out": "x", "epochs": 1})


def test_every_run_config_key_is_declared_by_the_app_and_read():
    """Flower refuses a --run-config key the app does not declare ("Invalid run configuration"): the
    app's pyproject.toml declares exactly the keys FlowerRun reads, and each one takes effect."""
    import tomllib
    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(RUN_CONFIG_KEYS)
    defaults = FlowerRun.from_run_config(declared)
    assert (defaults.timeout, defaults.train_samples, defaults.test_samples, defaults.required) == (None, None, None,
                                                                                                   "widest")
    run = FlowerRun.from_run_config({**declared, "local-epochs": 2, "rounds": 3, "seed": 4, "train-samples": 100,
                                     "test-samples": 50, "short-round": "all", "device": "cpu", "resume": True,
                                     "data-root": "/data", "timeout": 9})
    assert (run.cfg.local_epochs, run.cfg.rounds, run.cfg.seed, run.train_samples, run.test_samples, run.required,
            run.device, run.resume, run.data_root, run.timeout) == (2, 3, 4, 100, 50, "all", "cpu", True, "/data", 9.0)
    with pytest.raises(ValueError, match="bad reply threshold 'most'"):
        FlowerRun.from_run_config({**declared, "short-round": "most"})


def test_a_node_that_leaves_is_skipped_and_a_restarted_node_gets_work_again(data_root, mnist):
    """Node 2 (partition 1) leaves after round 1: round 2 samples only partition 0's users and says
    which it skipped; a node restarted on partition 1 (a new id) takes it over and gets work in round 3."""
    cfg = config(rounds=3)
    federation = Federation.assemble(cfg, mnist, torch.device("cpu"))
    with LocalGrid(client_app, 2, {"data-root": str(data_root)}) as grid:
        strategy = HeteroFLStrategy(federation)
        arrays, metrics = _record(federation.initial_state()), {}
        for round_ in (1, 2, 3):
            if round_ == 2:
                grid.disconnect(2)
            if round_ == 3:
                restarted = grid.connect(1)
            messages = list(strategy.configure_train(round_, arrays, ConfigRecord(), grid))
            arrays, metrics[round_] = strategy.aggregate_train(round_, grid.send_and_receive(messages))
            users = strategy.setup.plan.users
            if round_ == 2:
                assert all(user % 2 == 0 for user in users) and strategy.setup.skipped
                assert all(user % 2 == 1 for user in strategy.setup.skipped)
                assert metrics[2]["users_skipped"] == len(strategy.setup.skipped)
            if round_ == 3:
                assert strategy.nodes == {0: 1, 1: restarted}
                assert {m.metadata.dst_node_id for m in messages} == {1, restarted}, "the restarted node gets work"
            assert metrics[round_]["users_replied"] == metrics[round_]["users_asked"] == cfg.active_users


def test_a_node_that_dies_mid_round_is_a_client_fewer_and_the_round_says_so(data_root, mnist):
    cfg = config()
    federation = Federation.assemble(cfg, mnist, torch.device("cpu"))
    with LocalGrid(client_app, 2, {"data-root": str(data_root)}) as grid:
        strategy = HeteroFLStrategy(federation)
        messages = list(strategy.configure_train(1, _record(federation.initial_state()), ConfigRecord(), grid))
        grid.disconnect(2)  # after the round's messages went out
        _, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    hosted_by_2 = [task for task in strategy.setup.tasks if task.user % 2 == 1]
    assert hosted_by_2 and metrics["users_replied"] == cfg.active_users - len(hosted_by_2)
    widest_lost = all(task.user % 2 == 1 for task in strategy.setup.tasks if task.rate == 1.0)
    assert metrics["short_round"] == float(widest_lost)


def test_rolling_messages_carry_each_clients_index_sets_and_the_node_checks_them(data_root, mnist):
    cfg = config(extraction="rolling")
    federation = Federation.assemble(cfg, mnist, torch.device("cpu"))
    with LocalGrid(client_app, 3, {"data-root": str(data_root)}) as grid:
        strategy = HeteroFLStrategy(federation)
        messages = list(strategy.configure_train(2, _record(federation.initial_state()), ConfigRecord(), grid))
        for message, task in zip(messages, strategy.setup.tasks):
            held = message.content["held"].to_torch_state_dict()
            assert all(torch.equal(held[f"{key}|{axis}"], index) for key, holding in task.holding.items()
                       for axis, index in enumerate(holding.index))
        from heterofl_flower.messages import check_held
        state = from_record(messages[0].content["arrays"])
        check_held(state, messages[0].content["held"])
        key = next(iter(state))
        with pytest.raises(ValueError, match=f"the sub-model's {key} has shape"):
            check_held({**state, key: state[key][:1]}, messages[0].content["held"])


def test_a_node_with_no_data_refuses_to_start(tmp_path, capsys):
    from heterofl_core.cli import main
    empty = tmp_path / "empty"
    empty.mkdir()
    node = ["flower", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "0", "--partitions", "2",
            "--data-root", str(empty)]
    assert main(node) == 2
    assert f"this node's data root {empty} holds no dataset" in capsys.readouterr().err
    assert main([*node, "--data", "CIFAR10"]) == 2
    assert "CIFAR10 not found under this node's data root" in capsys.readouterr().err
    started = subprocess.run([sys.executable, "-m", "heterofl_core", *node], capture_output=True, text=True)
    assert started.returncode == 2 and "holds no dataset" in started.stderr and "Traceback" not in started.stderr


def test_cli_says_what_to_do_without_flower_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    from heterofl_core.cli import main
    assert main(["flower", "simulate", "--data", "MNIST", "--control", CONTROL, "--supernodes", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--supernodes must be at least 1" in capsys.readouterr().err
    assert main(["flower", "supernode", "--superlink", "127.0.0.1:9092", "--partition", "3", "--partitions", "3",
                 "--print"]) == 2
    assert "--partition must be in 0..2" in capsys.readouterr().err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    assert main(["flower", "simulate", "--data", "MNIST", "--control", CONTROL, "--out", str(tmp_path / "y")]) == 2
    assert "pip install 'heterofl[flower]'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("extraction", ["rolling", "random"])
def test_simulation_on_ray_writes_the_run_folder_of_heterofl_run(tmp_path, data_root, extraction):
    """2 rounds, 3 virtual SuperNodes on Ray; metrics equal the in-process run's (one by one: bit for bit),
    under the extractions whose clients each get their own sub-model (static: the LocalGrid and deployment tests)."""
    from heterofl_core.cli import main
    common = ["--data", "MNIST", "--control", CONTROL, "--rounds", "2", "--local-epochs", "1",
              "--data-root", str(data_root), "--quiet", "--set", f"extraction={extraction}"]
    assert main(["flower", "simulate", *common, "--supernodes", "3", "--out", str(tmp_path / "flower")]) == 0
    assert main(["run", *common, "--one-by-one", "--out", str(tmp_path / "in-process")]) == 0
    ours, theirs = (_results(read_metrics(tmp_path / name)) for name in ("flower", "in-process"))
    pd.testing.assert_frame_equal(_without_reply_counts(ours), theirs, check_exact=True)
    assert {p.name for p in (tmp_path / "flower").iterdir()} >= {"run.json", "metrics.csv", "checkpoint.pt", "best.pt"}
    assert main(["flower", "simulate", *common[:5], "3", *common[6:], "--supernodes", "3", "--resume",
                 "--out", str(tmp_path / "flower")]) == 0, "resumes to round 3"
    assert read_metrics(tmp_path / "flower")["round"].max() == 3


def _record(state):
    from heterofl_flower.messages import to_record
    return to_record(state)


def _without_reply_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """The metrics both engines record (the in-process loop, where every client replies, records no reply counts)."""
    return frame[~frame.metric.map(is_reply_count)].reset_index(drop=True)


def _results(frame: pd.DataFrame) -> pd.DataFrame:
    kept = frame[frame["split"] != "time"].drop(columns="elapsed_s")
    return kept.sort_values(["round", "metric"]).reset_index(drop=True)
