"""The workshop kit: the instructor's plan, the pictures to project, the room's pooled results, ready results."""

from __future__ import annotations

import json
import re
import statistics
import tarfile
from pathlib import Path

import pytest

from heterofl_core import experiments as ex, packs, pictures, pool
from heterofl_core.cli import main
from heterofl_core.data import repo_root
from heterofl_core.profiles import NOTEBOOKS
from heterofl_core.runs import results_version
from fakes import mnist_data_root  # noqa: F401  (fixture)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

GUIDE = repo_root() / "notebooks" / "INSTRUCTOR_GUIDE.md"


# ----------------------------------------------------------------------------- the instructor's guide

def plan_rows() -> list[dict[str, str]]:
    """The rows of the guide's plan table (the one whose header starts with `| start | minutes |`)."""
    lines = GUIDE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| start | minutes |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


def test_the_plan_fits_three_hours_and_names_real_notebooks() -> None:
    rows = plan_rows()
    minutes = [int(row["minutes"]) for row in rows]
    assert sum(minutes) <= 180, f"{sum(minutes)} minutes"
    scheduled = [row["notebook"] for row in rows if re.fullmatch(r"\d\d_\w+", row["notebook"])]
    assert scheduled and set(scheduled) <= set(NOTEBOOKS), "every notebook it schedules exists"
    for row in rows:
        if row["notebook"] in NOTEBOOKS:
            assert re.fullmatch(r"\d+ s", row["run (measured)"]), f"{row['notebook']}: its measured run time"
    clock = 0
    for row, length in zip(rows, minutes):  # the start column is the running sum
        assert row["start"] == f"{clock // 60}:{clock % 60:02d}", row
        clock += length


def test_the_guide_has_goals_questions_mistakes_and_cuts() -> None:
    text = GUIDE.read_text()
    for heading in ("## Learning goals", "## The plan", "## At each stop", "## Mistakes", "## What to cut"):
        assert heading in text, heading
    goals = text[text.index("## Learning goals"):text.index("## The plan")]
    assert all(f"| {name[:2]} " in goals for name in NOTEBOOKS), "a goal for every notebook"


# ----------------------------------------------------------------------------- pictures to project

def test_the_pictures_are_drawn_from_the_library(tmp_path: Path) -> None:
    saved = pictures.draw_all(tmp_path)
    for name in pictures.PICTURES:
        for suffix in (".png", ".pdf"):
            assert (tmp_path / f"{name}{suffix}").stat().st_size > 10_000, f"{name}{suffix}"
        assert json.loads((tmp_path / f"{name}.json").read_text())["figure"] == name
    numbers = json.loads((tmp_path / "round_diagram.json").read_text())["numbers"]
    assert numbers["clients_per_level"] == {"a": 5.0, "e": 5.0}, "10 clients a round, half at each level"
    assert abs(numbers["mb_per_client"]["a"] - 5.94) < 0.01 and numbers["fedavg_mb_each_way"] > numbers["mb_each_way"]
    assert len(saved) == 9


# ----------------------------------------------------------------------------- the room's results

@pytest.fixture(scope="module")
def three_seeds(mnist_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ex.Experiment]]:
    """Three small real runs (smoke scale, seeds 0, 1, 2) of one config, trained once for the module."""
    runs = tmp_path_factory.mktemp("runs")
    scale = ex.Scale(rounds=1, local_epochs=1, num_users=4, frac=0.5, sbn_samples=40)
    data = ex.DataSpec("MNIST", str(mnist_data_root), 80, 20)
    experiments = [ex.Experiment("a1-e1", scale.config("MNIST", scale.control("a1-e1"), seed=seed), data)
                   for seed in range(3)]
    ex.run_all(experiments, runs, device="cpu", log=False)
    return runs, experiments


def test_three_tables_pool_into_one_row_with_spreads(three_seeds, tmp_path: Path) -> None:
    runs, experiments = three_seeds
    for table, experiment in enumerate(experiments):
        cost = pool.client_flops(experiment.cfg, experiment.data.load())
        pool.write_result(experiment.folder(runs), tmp_path, table=str(table), name=experiment.name,
                          profile="smoke", cost=cost)
    table = pool.pool([tmp_path], results=results_version())
    accuracies = [json.loads(p.read_text())["metrics"]["global_accuracy"] for p in sorted(tmp_path.glob("*.json"))]
    row = table.loc["a1-e1"]
    assert row["runs"] == 3 and row["tables"] == "0, 1, 2"
    assert row["global_accuracy (mean)"] == pytest.approx(sum(accuracies) / 3)
    assert row["low"] == min(accuracies) and row["high"] == max(accuracies)
    assert row["std"] == pytest.approx(statistics.stdev(accuracies))
    assert main(["pool", str(tmp_path)]) == 0


def test_a_file_from_other_code_or_another_profile_is_refused(three_seeds, tmp_path: Path, capsys) -> None:
    runs, experiments = three_seeds
    paths = [pool.write_result(e.folder(runs), tmp_path, table=str(k), name=e.name, profile="smoke", cost=1.0)
             for k, e in enumerate(experiments)]
    odd = json.loads(paths[2].read_text())
    paths[2].write_text(json.dumps({**odd, "results_version": "0123456789ab"}))
    with pytest.raises(pool.PoolError, match=rf"different code that makes results.*{paths[2].name}"):
        pool.pool([tmp_path])
    assert main(["pool", str(tmp_path)]) == 2
    assert paths[2].name in capsys.readouterr().err
    paths[2].write_text(json.dumps({**odd, "profile": "workshop"}))
    with pytest.raises(pool.PoolError, match="different profile"):
        pool.pool([tmp_path])


def test_the_challenge_ranks_entries_within_the_budget(three_seeds, tmp_path: Path) -> None:
    runs, experiments = three_seeds
    costs = [1e9, 2e9, 3e9]
    for k, (experiment, cost) in enumerate(zip(experiments, costs)):
        pool.write_result(experiment.folder(runs), tmp_path, table=str(k), name=f"entry {k}", profile="smoke",
                          cost=cost)
    board = pool.challenge([tmp_path], budget=2.5e9)
    within = board[board["within budget"]]
    assert list(board["rank"]) == ["1", "2", "over budget"] and set(within["table"]) == {"0", "1"}
    assert within["global_accuracy"].is_monotonic_decreasing


def test_client_flops_charge_every_trained_sample_at_its_level(mnist_data_root: Path) -> None:
    from heterofl_core.sizes import level_size

    scale = ex.Scale(rounds=2, local_epochs=2, num_users=4, frac=0.5)
    data = ex.DataSpec("MNIST", str(mnist_data_root), 80, 20).load()
    widest = scale.config("MNIST", scale.control("a1"))
    # every round: 2 of 4 users (20 samples each), 2 local epochs, all at level a
    assert pool.client_flops(widest, data) == 2 * 2 * 20 * 2 * level_size("conv", "a").flops
    mixed = scale.config("MNIST", scale.control("a1-e1"))
    fewer = mixed.replace(participants="widest")
    assert pool.client_flops(fewer, data) < pool.client_flops(mixed, data) < pool.client_flops(widest, data)


# ----------------------------------------------------------------------------- ready results for slow laptops

def test_a_pack_of_runs_is_read_back_on_another_machine(three_seeds, tmp_path: Path) -> None:
    runs, experiments = three_seeds
    archive = tmp_path / "workshop-runs.tar.gz"
    manifest = packs.pack_runs(runs, archive, profile="smoke")
    assert len(manifest["runs"]) == 3 and manifest["results_version"] == results_version()
    with tarfile.open(archive) as opened:
        assert not any(name.endswith(".pt") for name in opened.getnames()), "no checkpoints unless asked"
    elsewhere = tmp_path / "laptop" / "runs"
    assert main(["runs", "unpack", str(archive), "--into", str(elsewhere)]) == 0
    for experiment in experiments:
        _, cached = ex.run_cached(experiment, elsewhere, device="cpu")
        assert cached, f"{experiment.name} seed {experiment.cfg.seed} is read back, not trained"


def test_a_pack_from_other_code_is_refused(three_seeds, tmp_path: Path, capsys) -> None:
    runs, _ = three_seeds
    archive = tmp_path / "old.tar.gz"
    manifest = packs.pack_runs(runs, archive)
    with tarfile.open(archive, "w:gz") as rewritten:  # the same runs, made by other code
        packs._add_bytes(rewritten, packs.MANIFEST, json.dumps({**manifest, "results_version": "0123456789ab"}).encode())
    with pytest.raises(packs.PackError, match="other code"):
        packs.unpack_runs(archive, tmp_path / "into")
    assert main(["runs", "unpack", str(archive), "--into", str(tmp_path / "into")]) == 2
    assert "0123456789ab" in capsys.readouterr().err
    assert not (tmp_path / "into").exists(), "nothing unpacked"
