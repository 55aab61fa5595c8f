"""The federated round loop end to end on tiny data in the real file formats: run folders,
determinism, resume, refusals, the level assignment, text, eval_every and centralised runs."""

from __future__ import annotations

import ctypes
import json
import math
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from heterofl_core import federated, server
from heterofl_core.cohort import CohortRule
from heterofl_core.config import LEVEL_RATES, ExperimentConfig, assign_fixed_levels, parse_control
from heterofl_core.datasets import load_dataset
from heterofl_core.families import model_builder
from heterofl_core.federated import Federation, round_generator, run_experiment
from heterofl_core.runs import BEST_LABEL, METRIC_COLUMNS, RunError, read_metrics
from fakes import write_tiny_corpus, write_tiny_mnist
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

CONTROL = "1_10_0.5_iid_fix_d1-e1_bn_1_1"  # 5 of 10 users per round; global model at rate 0.125 (small and fast)
TEXT_OPTIONS = dict(embedding_size=16, hidden_size=32, num_layers=1, bptt=8)
IMAGE_METRICS = {"global_loss", "global_accuracy", "local_loss", "local_accuracy"}
TRAIN_METRICS = {"train_loss", "train_accuracy", "lr"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data root with a tiny MNIST (200 train / 50 test) and a tiny text corpus in SOTU's place."""
    root = tmp_path_factory.mktemp("data")
    write_tiny_mnist(root, n_train=200, n_test=50)
    write_tiny_corpus(root, "SOTU")
    return root


@pytest.fixture(scope="module")
def mnist(data_root):
    return load_dataset("MNIST", data_root, download=False)


def config(control: str = CONTROL, dataset: str = "MNIST", **overrides) -> ExperimentConfig:
    options = dict(rounds=4, local_epochs=1)
    if dataset != "MNIST":
        options.update(TEXT_OPTIONS)
    return parse_control(control, dataset, **{**options, **overrides})


def results(frame: pd.DataFrame) -> pd.DataFrame:
    """Everything that must be reproducible: no timing rows, no elapsed time."""
    kept = frame[frame["split"] != "time"].drop(columns="elapsed_s")
    return kept.sort_values(["round", "metric"]).reset_index(drop=True)


def assert_same_results(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(results(a), results(b), check_exact=True)


# ---------------------------------------------------------------- the run folder and the frame


def test_run_writes_folder_and_returns_tidy_metrics(tmp_path, data_root):
    cfg = config(rounds=3)
    out = tmp_path / "run"
    frame = run_experiment(cfg, data_root=data_root, out_dir=out, device="cpu", quiet=True)

    assert list(frame.columns) == list(METRIC_COLUMNS) == ["round", "split", "metric", "value", "elapsed_s"]
    assert sorted(frame["round"].unique()) == [1, 2, 3]
    for round_, rows in frame.groupby("round"):
        assert rows["metric"].is_unique, f"one row per metric in round {round_}"
        assert IMAGE_METRICS | TRAIN_METRICS <= set(rows["metric"]) and "round_s" in set(rows["metric"])
        assert rows["elapsed_s"].nunique() == 1
    split_of = dict(zip(frame["metric"], frame["split"]))
    assert all(split_of[m] == "test" for m in IMAGE_METRICS) and all(split_of[m] == "train" for m in TRAIN_METRICS)
    assert all(split_of[m] == "time" for m in split_of if m.endswith("_s"))
    assert frame["elapsed_s"].is_monotonic_increasing and frame["value"].map(math.isfinite).all()
    accuracy = frame[frame["metric"] == "global_accuracy"]["value"]
    assert accuracy.between(0, 100).all()
    assert (frame[frame["metric"] == "lr"]["value"] == cfg.lr).all()

    record = json.loads((out / "run.json").read_text())
    assert ExperimentConfig.from_dict(record["config"]) == cfg
    assert record["config"]["control"] == CONTROL
    assert record["data"] == {"name": "MNIST", "source": "MNIST (IDX files) at <data root>/MNIST"}
    assert isinstance(record["code_version"], str) and record["code_version"]
    assert record["device"] == "cpu"

    pd.testing.assert_frame_equal(read_metrics(out), frame, check_exact=True)  # metrics.csv holds the same numbers

    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ExperimentConfig.from_dict(checkpoint["config"]) == cfg and checkpoint["run"]["round"] == 3
    global_model = model_builder(cfg, 10)(cfg.global_rate)
    assert checkpoint["state"].keys() == global_model.state_dict().keys()

    best = torch.load(out / "best.pt", weights_only=False)
    assert best["label"] == BEST_LABEL and "best on the test set" in best["label"]
    values = accuracy.tolist()
    best_round = 1 + values.index(max(values))  # the first round reaching the best test accuracy
    assert best["run"]["round"] == best_round == checkpoint["run"]["best_round"]
    assert best["run"]["best_value"] == pytest.approx(max(values))


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_same_numbers_other_seed_other_numbers(mnist):
    cfg = config(rounds=2)
    first = run_experiment(cfg, data=mnist, device="cpu", quiet=True)
    again = run_experiment(cfg, data=mnist, device="cpu", quiet=True)
    other = run_experiment(cfg.replace(seed=1), data=mnist, device="cpu", quiet=True)
    assert_same_results(first, again)
    a, b = results(first), results(other)
    assert (a[["round", "metric"]].values == b[["round", "metric"]].values).all()
    assert (a["value"] != b["value"]).sum() > len(a) // 2


@pytest.fixture(scope="module")
def uninterrupted(mnist) -> pd.DataFrame:
    return run_experiment(config(rounds=4), data=mnist, device="cpu", quiet=True)


def test_resume_with_more_rounds_equals_an_uninterrupted_run(tmp_path, mnist, uninterrupted):
    out = tmp_path / "run"
    short = run_experiment(config(rounds=2), data=mnist, out_dir=out, device="cpu", quiet=True)
    assert sorted(short["round"].unique()) == [1, 2]
    torch.manual_seed(1234)  # a resumed run starts in a new process, with another global RNG state
    resumed = run_experiment(config(rounds=4), data=mnist, out_dir=out, device="cpu", quiet=True, resume=True)
    assert_same_results(resumed, uninterrupted)
    assert_same_results(read_metrics(out), uninterrupted)
    pd.testing.assert_frame_equal(resumed[resumed["round"] <= 2], short, check_exact=True)  # history kept as it was


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, mnist, uninterrupted):
    out = tmp_path / "run"
    seen = []

    def interrupt_after_round_2(round_: int, frame: pd.DataFrame) -> None:
        seen.append((round_, frame["round"].max()))
        if round_ == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(config(rounds=4), data=mnist, out_dir=out, device="cpu", quiet=True,
                       on_round=interrupt_after_round_2)
    assert seen == [(1, 1), (2, 2)]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["run"]["round"] == 2
    resumed = run_experiment(config(rounds=4), data=mnist, out_dir=out, device="cpu", quiet=True, resume=True,
                             on_round=lambda r, f: seen.append((r, f["round"].max())))
    assert seen[2:] == [(3, 3), (4, 4)]
    assert_same_results(resumed, uninterrupted)


def test_resuming_a_finished_run_does_nothing(tmp_path, mnist):
    out = tmp_path / "run"
    done = run_experiment(config(rounds=2), data=mnist, out_dir=out, device="cpu", quiet=True)
    checkpoint, best = (out / "checkpoint.pt").read_bytes(), (out / "best.pt").read_bytes()
    calls = []
    again = run_experiment(config(rounds=2), data=mnist, out_dir=out, device="cpu", quiet=True, resume=True,
                           on_round=lambda r, f: calls.append(r))
    assert calls == []
    pd.testing.assert_frame_equal(again, done, check_exact=True)  # timing rows included: nothing ran
    assert (out / "checkpoint.pt").read_bytes() == checkpoint and (out / "best.pt").read_bytes() == best


def test_text_resume_equals_an_uninterrupted_run(tmp_path, data_root):
    """Text rounds draw dropout and token masks too; a resumed run must draw the same ones."""
    cfg = config("1_4_0.5_iid_fix_a1-c1_bn_1_1", "SOTU", rounds=3)
    whole = run_experiment(cfg, data_root=data_root, device="cpu", quiet=True)
    out = tmp_path / "run"
    run_experiment(cfg.replace(rounds=1), data_root=data_root, out_dir=out, device="cpu", quiet=True)
    torch.manual_seed(1234)  # a resumed run starts in a new process, with another global RNG state
    resumed = run_experiment(cfg, data_root=data_root, out_dir=out, device="cpu", quiet=True, resume=True)
    assert_same_results(resumed, whole)


# ---------------------------------------------------------------- refusals


def test_existing_run_folder_without_resume_is_refused(tmp_path, mnist):
    out = tmp_path / "run"
    run_experiment(config(rounds=1), data=mnist, out_dir=out, device="cpu", quiet=True)
    before = (out / "run.json").read_bytes(), (out / "checkpoint.pt").read_bytes()
    with pytest.raises(RunError, match="--resume"):
        run_experiment(config(rounds=1), data=mnist, out_dir=out, device="cpu", quiet=True)
    assert ((out / "run.json").read_bytes(), (out / "checkpoint.pt").read_bytes()) == before


@pytest.mark.parametrize("change", [dict(lr=0.05), dict(seed=3), dict(model_mode=(("d", 1), ("e", 3)))])
def test_resume_with_another_config_is_refused_naming_the_field(tmp_path, mnist, change):
    out = tmp_path / "run"
    run_experiment(config(rounds=1), data=mnist, out_dir=out, device="cpu", quiet=True)
    before = (out / "checkpoint.pt").read_bytes()
    (field,) = change
    with pytest.raises(RunError, match=f"another config.*{field}"):
        run_experiment(config(rounds=2, **change), data=mnist, out_dir=out, device="cpu", quiet=True, resume=True)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, mnist):
    frame = run_experiment(config(rounds=1), data=mnist, out_dir=tmp_path / "new", device="cpu", quiet=True,
                           resume=True)
    assert frame["round"].tolist()[0] == 1 and (tmp_path / "new" / "checkpoint.pt").is_file()


# ---------------------------------------------------------------- who trains at which rate


def record_assignments(monkeypatch, cfg: ExperimentConfig, data, rounds: int) -> list[list[tuple[int, float]]]:
    """Run rounds through a Federation and record, per round, (user, rate) of every client trained:
    the users whose batches were drawn, and the rates aggregation received in the plan's order."""
    fed = Federation.assemble(cfg, data, torch.device("cpu"))
    trained, plans, per_round = [], [], []
    client_batches, plan_round = fed.workload.client_batches, fed.plan_round

    def recording_batches(user, generator):
        trained.append(user)
        return client_batches(user, generator)

    def recording_plan(round_, generator, available=None):
        plans.append(plan_round(round_, generator, available))
        return plans[-1]

    def recording_aggregate(slicer, state, client_states, rates, labels):
        plan = plans[-1]
        assert sorted(trained[-len(rates):]) == sorted(plan.users), "the planned users trained"
        assert list(rates) == plan.rates
        per_round.append(list(zip(plan.users, rates)))
        return aggregate(slicer, state, client_states, rates, labels)

    aggregate = server.aggregate
    monkeypatch.setattr(fed.workload, "client_batches", recording_batches)
    monkeypatch.setattr(fed, "plan_round", recording_plan)
    monkeypatch.setattr(server, "aggregate", recording_aggregate)
    state = fed.initial_state()
    for round_ in range(1, rounds + 1):
        state, _ = fed.run_round(state, round_)
    assert len(trained) == sum(len(r) for r in per_round)
    return per_round


def test_fixed_levels_are_respected(monkeypatch, mnist):
    cfg = config("1_10_0.5_iid_fix_d1-e4_bn_1_1", eval_every=100)  # users 0-1 at d, 2-9 at e
    levels = assign_fixed_levels(cfg.model_mode, cfg.num_users)
    assert levels == ["d"] * 2 + ["e"] * 8
    per_round = record_assignments(monkeypatch, cfg, mnist, rounds=4)
    for assignment in per_round:
        users = [u for u, _ in assignment]
        assert len(users) == len(set(users)) == cfg.active_users == 5
        assert all(rate == LEVEL_RATES[levels[u]] for u, rate in assignment)
    assert len({u for r in per_round for u, _ in r}) > 5, "different users are drawn in different rounds"


def test_dynamic_levels_are_drawn_every_round(monkeypatch, mnist):
    cfg = config("1_10_0.5_iid_dynamic_d1-e1_bn_1_1", eval_every=100)
    per_round = record_assignments(monkeypatch, cfg, mnist, rounds=4)
    rates_of = defaultdict(set)
    for assignment in per_round:
        assert len({u for u, _ in assignment}) == 5
        for user, rate in assignment:
            rates_of[user].add(rate)
    assert {r for rates in rates_of.values() for r in rates} == {0.125, 0.0625}
    assert any(len(rates) == 2 for rates in rates_of.values()), "some user trained at both levels"


def test_round_generator_seeds_by_seed_and_round():
    a = torch.rand(3, generator=round_generator(0, 5, torch.device("cpu")))
    assert torch.equal(a, torch.rand(3, generator=round_generator(0, 5, torch.device("cpu"))))
    assert not torch.equal(a, torch.rand(3, generator=round_generator(0, 6, torch.device("cpu"))))
    assert not torch.equal(a, torch.rand(3, generator=round_generator(1, 5, torch.device("cpu"))))


# ---------------------------------------------------------------- other splits, text, evaluation cadence, centralised


@pytest.mark.parametrize("control", ["1_10_0.5_non-iid-2_dynamic_d1-e1_bn_1_1", "1_10_0.5_iid_fix_b1-e1_gn_1_0",
                                     "1_10_0.3_non-iid-2_fix_d1-e1_none_0_1"])
def test_other_splits_modes_and_norms_run(mnist, control):
    frame = run_experiment(config(control, rounds=2), data=mnist, device="cpu", quiet=True)
    last = frame[frame["round"] == 2].set_index("metric")["value"]
    assert IMAGE_METRICS | TRAIN_METRICS <= set(last.index)
    assert all(math.isfinite(last[m]) for m in IMAGE_METRICS)


def test_non_iid_local_accuracy_uses_each_users_labels(mnist):
    """non-iid-2: each user holds 2 labels, so the masked Local task is much easier than the Global one."""
    cfg = config("1_10_0.5_non-iid-2_fix_d1_bn_1_1", rounds=2, local_epochs=2)
    last = run_experiment(cfg, data=mnist, device="cpu", quiet=True).query("round == 2").set_index("metric")["value"]
    assert last["local_accuracy"] > last["global_accuracy"]


def test_text_run_end_to_end(tmp_path, data_root):
    cfg = config("1_4_0.5_iid_fix_a1-c1_bn_1_1", "SOTU", rounds=2)
    frame = run_experiment(cfg, data_root=data_root, out_dir=tmp_path / "run", device="cpu", quiet=True)
    last = frame[frame["round"] == 2].set_index("metric")["value"]
    for name in ("global_perplexity", "local_perplexity", "global_loss", "local_loss", "train_loss"):
        assert math.isfinite(last[name]), name
    assert last["global_perplexity"] > 1 and last["local_perplexity"] > 1
    # a mean of exp(loss) over windows is at least exp of the mean loss (Jensen)
    assert last["global_perplexity"] >= math.exp(last["global_loss"]) * (1 - 1e-6)
    assert last["global_perplexity"] < 31 * 2, "a model after two rounds is not much worse than uniform over 31 words"
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    ppl = frame[frame["metric"] == "global_perplexity"]["value"].tolist()
    assert best["run"]["round"] == 1 + ppl.index(min(ppl)), "lower perplexity is better"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["name"] == "SOTU"


def test_eval_every_tests_only_on_schedule_and_at_the_last_round(mnist):
    frame = run_experiment(config(rounds=3, eval_every=2), data=mnist, device="cpu", quiet=True)
    tested = sorted(frame[frame["metric"] == "global_accuracy"]["round"])
    assert tested == [2, 3]
    assert sorted(frame[frame["metric"] == "train_loss"]["round"]) == [1, 2, 3]
    assert "sbn_s" not in set(frame[frame["round"] == 1]["metric"])


def test_sbn_samples_uses_a_random_subset_of_the_training_set(mnist):
    def sizes(cfg: ExperimentConfig) -> list[int]:
        fed = Federation.assemble(cfg, mnist, torch.device("cpu"), eval_batch_size=64)
        return [len(x) for x in fed.workload.stats_inputs(torch.Generator().manual_seed(0))]

    assert sum(sizes(config(sbn_samples=30))) == 30 and sum(sizes(config())) == 200
    assert sum(sizes(config(sbn_samples=1000))) == 200  # more than there are: all of them
    full = run_experiment(config(rounds=1), data=mnist, device="cpu", quiet=True)
    subset = run_experiment(config(rounds=1, sbn_samples=30), data=mnist, device="cpu", quiet=True)
    train = lambda f: f[f["split"] == "train"]["value"].tolist()  # noqa: E731
    assert train(full) == train(subset), "sBN statistics do not change training"
    assert full.query("metric == 'global_loss'")["value"].item() != subset.query("metric == 'global_loss'")["value"].item()


@pytest.mark.parametrize("overrides, batches", [({}, 20), ({"sbn_batch_size": 64}, 4), ({"batch_size_train": 25}, 8)])
def test_sbn_statistics_average_over_batches_of_the_training_batch_size(mnist, overrides, batches):
    """As the authors' loader gives them: 200 training images in batches of 10 are 20 batches
    (in chunks of 60: 60, 60, 60, 20); sbn_batch_size overrides; a smaller last batch counts once."""
    fed = Federation.assemble(config(**overrides), mnist, torch.device("cpu"), eval_batch_size=64)
    model = fed.evaluation_model(fed.initial_state(), torch.Generator().manual_seed(0))
    counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert counts == {batches}


def test_evaluation_model_is_fresh_every_time(mnist):
    """sBN statistics come from a fresh copy: evaluating state B after state A equals evaluating B alone."""
    cfg = config()
    fed = Federation.assemble(cfg, mnist, torch.device("cpu"))
    a = fed.initial_state()
    b, _ = fed.run_round(a, 1)
    after_a = (fed.evaluation_model(a, torch.Generator().manual_seed(0)), fed.evaluation_model(b, torch.Generator()))
    alone = fed.evaluation_model(b, torch.Generator())
    for key, value in alone.state_dict().items():
        assert torch.equal(after_a[1].state_dict()[key], value), key
    assert not any(m.training for m in alone.modules())
    running = [k for k in alone.state_dict() if k.endswith("running_mean")]
    assert running and not torch.equal(after_a[0].state_dict()[running[0]], alone.state_dict()[running[0]])


def test_centralised_run(mnist):
    cfg = config("0_1_1_none_fix_d1_bn_1_1", rounds=2)
    frame = run_experiment(cfg, data=mnist, device="cpu", quiet=True)
    last = frame[frame["round"] == 2].set_index("metric")["value"]
    # one client holding every class and the whole test set: Local is Global
    assert last["local_accuracy"] == last["global_accuracy"]
    assert last["local_loss"] == pytest.approx(last["global_loss"], rel=1e-5)
    assert last["train_loss"] < math.log(10) * 1.5


# ---------------------------------------------------------------- a client's round is a pure function


def capture_round(monkeypatch, federation: Federation, state, round_: int) -> tuple[list[int], list[float], list[dict]]:
    """The users, rates and trained client states of one round, as aggregation receives them."""
    seen = {}
    real = server.aggregate

    def recording(slicer, global_state, client_states, rates, label_sets):
        seen.update(states=client_states, rates=list(rates))
        return real(slicer, global_state, client_states, rates, label_sets)

    monkeypatch.setattr(server, "aggregate", recording)
    plan = federation.plan_round(round_, federated.round_generator(federation.cfg.seed, round_, federation.device))
    federation.run_round(state, round_)
    monkeypatch.setattr(server, "aggregate", real)
    return plan.users, seen["rates"], seen["states"]


@pytest.mark.parametrize("dataset", ["MNIST", "SOTU"])
def test_a_client_trained_alone_equals_the_same_client_inside_a_full_round(monkeypatch, data_root, dataset):
    """Trained alone, in another Federation (another 'process'), in reverse order, after other work:
    the same tensors bit for bit, because a client draws only from its own generator."""
    cfg = config("1_10_0.5_iid_fix_d1-e1_bn_1_1", dataset, eval_every=100)
    data = load_dataset(dataset, data_root, download=False)
    inside = Federation.assemble(cfg, data, torch.device("cpu"), cohort_rule=CohortRule(0.0))
    state = inside.initial_state()
    users, rates, states = capture_round(monkeypatch, inside, state, round_=3)
    alone = Federation.assemble(cfg, data, torch.device("cpu"), cohort_rule=CohortRule(0.0))
    torch.rand(5)  # the global generator moves between rounds: it must not matter
    for user, rate, expected in reversed(list(zip(users, rates, states))):
        got, _ = alone.local_update(alone.slicer.split(state, rate), user, rate, 3)
        assert set(got) == set(expected)
        assert all(torch.equal(got[key], expected[key]) for key in expected), f"user {user}"


def test_a_client_in_a_cohort_equals_the_client_alone(monkeypatch, mnist):
    cfg = config("1_10_0.5_iid_fix_d1-e1_bn_1_1", eval_every=100)
    cohorts = Federation.assemble(cfg, mnist, torch.device("cpu"), cohort_rule=CohortRule(1.0))
    state = cohorts.initial_state()
    users, rates, states = capture_round(monkeypatch, cohorts, state, round_=2)
    assert len(set(rates)) < len(rates), "some width has several clients: a cohort trained"
    for user, rate, expected in zip(users, rates, states):
        got, _ = cohorts.local_update(cohorts.slicer.split(state, rate), user, rate, 2)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def module_forwards() -> dict[type, object]:
    """Every nn.Module subclass loaded in the process and its own ``forward``."""
    found, todo = {}, [nn.Module]
    while todo:
        cls = todo.pop()
        found[cls] = cls.__dict__.get("forward")
        todo.extend(sub for sub in cls.__subclasses__() if sub not in found)
    return found


@pytest.mark.parametrize("dataset", ["MNIST", "SOTU"])
def test_run_experiment_leaves_the_process_as_it_was(monkeypatch, data_root, dataset):
    """torch's global RNG (CPU), its thread count, every module class's forward, and the C
    allocator (no libc calls: ctypes.CDLL is made to fail) are as before the run."""
    def no_libc(*args, **kwargs):
        raise AssertionError("a library call tuned the C allocator")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    torch.manual_seed(1234)
    rng, threads, forwards = torch.get_rng_state(), torch.get_num_threads(), module_forwards()
    run_experiment(config("1_10_0.5_iid_fix_d1-e1_bn_1_1", dataset, rounds=1), data_root=data_root,
                   device="cpu", quiet=True)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG state changed"
    assert torch.get_num_threads() == threads
    after = module_forwards()
    assert all(after[cls] is forward for cls, forward in forwards.items()), "a module's forward was replaced"


def test_a_run_on_a_dirichlet_split(tmp_path, data_root):
    frame = run_experiment(config("1_10_0.5_dir0.3_fix_d1-e1_bn_1_1", rounds=1), data_root=data_root, quiet=True)
    tested = frame[frame.split == "test"].set_index("metric").value
    assert {"global_accuracy", "local_accuracy"} <= set(tested.index)
    assert 0 <= tested["local_accuracy"] <= 100
