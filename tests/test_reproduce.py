"""The CI check of the notebooks: every notebook runs end to end through papermill with the smoke
profile injected, and the figures with their records appear.

Also: the committed notebooks are clean (no outputs, one `parameters` cell, asserts at the end), only the
profile and the paths are injected (each notebook reads its scale from heterofl_core.profiles, which refuses
unknown settings), the paper profile is the paper's settings, a re-run reads finished runs back, and a
failing notebook is reported with its cell and error.
"""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path

import nbformat
import papermill
import pytest

from heterofl_core import profiles
from heterofl_core import reproduce as rp
from heterofl_core.cli import main
from heterofl_core.config import parse_control
from heterofl_core.data import repo_root, resolve_data_root
from heterofl_core.experiments import Scale, text_corpus

DATA = resolve_data_root()
NOTEBOOK_DIR = repo_root() / "notebooks"
needs_data = pytest.mark.skipif(not (DATA / "MNIST").is_dir() or not (DATA / "SOTU").is_dir(),
                                reason=f"no offline data at {DATA}: set HETEROFL_DATA or put ../shared/data beside "
                                       f"the checkout")
TABLES = ("sizes_MNIST", "sizes_CIFAR10", "sizes_WikiText2", "ablation", "cifar10_table")


def parameter_names(notebook: str) -> set[str]:
    """The parameters as papermill reads them from the `parameters` cell (every line must parse)."""
    path = NOTEBOOK_DIR / f"{notebook}.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}
    inferred = set(papermill.inspect_notebook(str(path)))
    assert inferred == assigned, f"papermill cannot parse {sorted(assigned - inferred)} in {notebook}"
    return inferred


# ----------------------------------------------------------------------------- cheap checks

@pytest.mark.parametrize("notebook", rp.NOTEBOOKS)
def test_committed_notebook_is_clean(notebook: str) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / f"{notebook}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "committed without outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    assert "assert" in code[-1].source, "ends with asserts on what it showed"
    assert nb.metadata["kernelspec"]["name"] == rp.KERNEL


@pytest.mark.parametrize("notebook", rp.NOTEBOOKS)
def test_every_notebook_can_install_the_project_it_needs(notebook: str) -> None:
    """The cell after the parameters installs the project where it is missing, from the release of this version
    unless $HETEROFL_SOURCE says otherwise, then fetches the notebook's data (README, "Hosted notebooks")."""
    from heterofl_core import __version__

    cells = nbformat.read(NOTEBOOK_DIR / f"{notebook}.ipynb", as_version=4).cells
    position = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    setup = next(c for c in cells[position + 1:] if c.cell_type == "code").source
    assert 'importlib.util.find_spec("heterofl_core") is None' in setup
    assert f'os.environ.get("HETEROFL_SOURCE", "heterofl[notebooks]=={__version__}")' in setup, "pinned to this version"
    assert re.search(r"ensure_data\(\[[^\]]*\], data_root\)", setup), "then the data it reads"
    assert setup.index("find_spec") < setup.index("from heterofl_core"), "nothing of the project before it is there"


@pytest.mark.parametrize("profile", sorted(rp.PROFILES))
def test_only_the_profile_and_the_paths_are_injected(profile: str) -> None:
    for notebook in rp.NOTEBOOKS:
        injected = rp.notebook_parameters(profile, notebook, data_root=Path("d"), out_dir=Path("o"),
                                          figures_dir=Path("f"))
        assert injected == {"profile": profile, "data_root": "d", "out_dir": "o", "figures_dir": "f",
                            "interactive": False}, "the scale comes from the profile table, not from injection"
        missing = set(injected) - parameter_names(notebook)
        assert not missing, f"{profile} injects {sorted(missing)} that {notebook} does not declare"
        assert profiles.settings(profile, notebook).profile == profile, f"{notebook} has settings at {profile}"
    with pytest.raises(ValueError, match="unknown notebook"):
        rp.notebook_parameters(profile, "03_mnist_cnn", data_root=Path("d"), out_dir=Path("o"), figures_dir=Path("f"))


def test_settings_take_overrides_and_refuse_unknown_names() -> None:
    assert profiles.settings("workshop", "06_mnist_cnn", rounds=3).scale.rounds == 3
    assert profiles.settings("workshop", "09_ablations", seed=1).seed == 1
    with pytest.raises(ValueError, match="no setting 'round'"):
        profiles.settings("workshop", "06_mnist_cnn", round=3)
    with pytest.raises(ValueError, match="unknown profile"):
        profiles.settings("huge", "06_mnist_cnn")
    with pytest.raises(ValueError, match="unknown notebook"):
        profiles.settings("smoke", "06_ablations")
    with pytest.raises(ValueError, match="unknown scale settings"):
        Scale.from_params(rounds=1, points=[5])


def test_paper_profile_is_the_papers_settings() -> None:
    for notebook, dataset in (("06_mnist_cnn", "MNIST"), ("07_cifar10_resnet18", "CIFAR10"),
                              ("08_wikitext2_transformer", "WikiText2")):
        settings = profiles.settings("paper", notebook)
        control = settings.scale.control("a1-e1")
        assert settings.scale.config(dataset, control) == parse_control(control, dataset)
        assert settings.scale.reductions(dataset) == [], f"{dataset}: paper profile reduces nothing"
        assert settings.points == list(range(1, 10)) and settings.global_levels == list("abcd")
    ablation = profiles.settings("paper", "09_ablations")
    assert ablation.mode == "a1-e1", "the paper ablates a-e"
    for values, dataset in ((ablation.mnist, "MNIST"), (ablation.cifar10, "CIFAR10")):
        scale = Scale.from_params(**values)
        control = scale.control("a1-e1", split="non-iid-2", model_split="dynamic")
        assert scale.config(dataset, control) == parse_control(control, dataset)
        assert scale.reductions(dataset, "non-iid-2") == [], f"{dataset} ablation: paper profile reduces nothing"
    table = profiles.settings("paper", "10_paper_figures")
    assert Scale.from_params(**table.cifar10).reductions("CIFAR10") == [] and table.table_models == [
        "a", "a-e", "a-b-c-d-e", "b", "c", "d", "e"], "the paper's CIFAR10 table, its rows"


def test_only_selects_notebooks_and_refuses_unknown_names() -> None:
    assert rp.select(["06,mnist", "10"]) == ["06_mnist_cnn", "10_paper_figures"]
    assert rp.select(None) == list(rp.NOTEBOOKS)
    with pytest.raises(ValueError, match="unknown notebook"):
        rp.select(["nope"])
    assert main(["reproduce", "--profile", "smoke", "--only", "nope"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--profile", "huge"])
    assert exit_.value.code == 2


def test_the_committed_figures_come_from_the_course_as_it_is() -> None:
    """What figures/ must show (a quick run of the final code writes it): the paper's mixtures i = 1, 3, 5, 7, 9 on
    one line, the baselines beside HeteroFL, and the ablation's no-norm Scaler pair."""
    figures = repo_root() / "figures"
    points = json.loads((figures / "interpolation_MNIST.json").read_text())["points"]
    inner = {}
    for point in points:
        if 0 < point["share_big"] < 1:
            inner.setdefault(point["panel"], set()).add(point["share_big"])
    assert max(len(shares) for shares in inner.values()) >= 5, inner
    baseline = json.loads((figures / "baseline_MNIST.json").read_text())
    assert baseline["profile"] == "quick" and sum(r["name"].startswith("FedAvg") for r in baseline["rows"]) == 3
    ablation = json.loads((figures / "ablation.json").read_text())
    assert {"no norm + masked CE", "no norm + Scaler + masked CE"} <= {c["name"] for c in ablation["configs"]}
    summary = json.loads((figures / "reproduction.json").read_text())
    assert summary["profile"] == "quick" and set(summary["notebooks"]) == set(rp.NOTEBOOKS), "one run of every notebook"
    assert all(run["status"] == "ok" for run in summary["notebooks"].values())


# ----------------------------------------------------------------------------- the smoke reproduction

@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reproduce")
    started = time.perf_counter()
    summary = rp.reproduce("smoke", out=out, data_root=DATA)
    summary["test_seconds"] = time.perf_counter() - started
    return out, summary


@pytest.mark.slow
@needs_data
def test_smoke_executes_every_notebook_with_injected_parameters(smoke: tuple[Path, dict]) -> None:
    out, summary = smoke
    assert [name for name, run in summary["notebooks"].items() if run["status"] == "ok"] == list(rp.NOTEBOOKS)
    for notebook in rp.NOTEBOOKS:
        nb = nbformat.read(out / "notebooks" / f"{notebook}.ipynb", as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and 'profile = "smoke"' in injected[0].source and "interactive = False" in injected[0].source
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{notebook}: {errors[:1]}"
        assert "all checks passed" in "".join(o.get("text", "") for o in nb.cells[-1].outputs), notebook


@pytest.mark.slow
@needs_data
def test_smoke_writes_every_figure_with_its_record(smoke: tuple[Path, dict]) -> None:
    out, _ = smoke
    figures = out / "figures"
    corpus, _ = text_corpus(DATA)
    for dataset in ("MNIST", "CIFAR10", corpus):
        for kind in ("interpolation", "curves"):
            stem = figures / f"{kind}_{dataset}"
            assert stem.with_suffix(".png").stat().st_size > 10_000 and stem.with_suffix(".pdf").exists()
            record = json.loads(stem.with_suffix(".json").read_text())
            assert record["profile"] == "smoke" and record["configs"] and record["code_version"] and record["date"]
            assert dataset in " ".join(record["data_source"]).replace("CIFAR-10", "CIFAR10")
            assert any("1 round" in r for r in record["reductions"]), "the record says what was cut"
    for table in TABLES:
        for suffix in (".png", ".pdf", ".csv", ".md", ".json"):
            assert (figures / f"{table}{suffix}").exists(), f"{table}{suffix}"
    assert "JPEG" in " ".join(json.loads((figures / "cifar10_table.json").read_text())["data_source"])
    ablation = json.loads((figures / "ablation.json").read_text())
    assert {"no norm + masked CE", "no norm + Scaler + masked CE"} <= {c["name"] for c in ablation["configs"]}, \
        "the Scaler's no-norm pair"
    baseline = json.loads((figures / "baseline_MNIST.json").read_text())
    assert sum(row["name"].startswith("FedAvg") for row in baseline["rows"]) == 3 and baseline["configs"]
    assert (figures / "README.md").read_text().count("![") >= 11


@pytest.mark.slow
@needs_data
def test_smoke_records_hold_their_points_their_training_code_and_no_machine_path(smoke: tuple[Path, dict]) -> None:
    out, summary = smoke
    figures = out / "figures"
    texts = {p.name: p.read_text() for p in figures.iterdir() if p.suffix in (".json", ".md")}
    assert "reproduction.json" in texts, "the run's per-notebook seconds are written beside the figures"
    absolute = re.compile(r"""(^|[\s(\[='"`:])/[\w.-]+/""")  # a path from the root, not ../shared/data
    for name, text in texts.items():
        assert not absolute.search(text), f"{name} holds an absolute path: {absolute.search(text)}"
    seconds = json.loads(texts["reproduction.json"])["notebooks"]
    assert set(seconds) == set(rp.NOTEBOOKS) and all(run["seconds"] > 0 for run in seconds.values())
    for record in (json.loads(texts[n]) for n in texts if n.startswith("interpolation_")):
        assert record["trained_with"] and all(v["results_version"] for v in record["trained_with"])
        assert record["points"] and set(record["points"][0]) >= {"panel", "mix", "share_big", "mean_size", "mean",
                                                                  "low", "high", "seeds"}
        assert {p["share_big"] for p in record["points"]} >= {0.0, 1.0}, "each line runs from y alone to x alone"


@pytest.mark.slow
@needs_data
def test_rerun_reads_finished_runs_back(smoke: tuple[Path, dict]) -> None:
    out, _ = smoke
    metrics = sorted((out / "runs" / "MNIST").glob("*/metrics.csv"))
    assert metrics
    before = {p: p.stat().st_mtime_ns for p in metrics}
    summary = rp.reproduce("smoke", only=["06"], out=out, data_root=DATA)
    assert summary["notebooks"]["06_mnist_cnn"]["status"] == "ok"
    assert {p: p.stat().st_mtime_ns for p in metrics} == before, "finished runs are not trained again"
    executed = nbformat.read(out / "notebooks" / "06_mnist_cnn.ipynb", as_version=4)
    assert "(cached)" in "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)


def test_smoke_never_writes_into_the_committed_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert rp.figures_folder("quick") == rp.figures_folder("paper") == tmp_path / "figures"
    assert rp.figures_folder("smoke") == tmp_path / "reproduction" / "figures"
    assert rp.figures_folder("quick", out="o") == rp.figures_folder("smoke", out="o") == tmp_path / "o" / "figures"
    assert rp.figures_folder("smoke", out="o", figures="f") == tmp_path / "f"


@pytest.mark.slow
@needs_data
def test_a_failing_notebook_names_the_cell_and_the_error(tmp_path: Path) -> None:
    params = rp.notebook_parameters("smoke", "06_mnist_cnn", data_root=DATA, out_dir=tmp_path,
                                    figures_dir=tmp_path / "figures")
    params["overrides"] = {"global_levels": ["z"]}  # not a level: the grid cell raises
    with pytest.raises(rp.NotebookFailed) as failure:
        rp.execute("06_mnist_cnn", params, tmp_path)
    message = str(failure.value)
    assert "06_mnist_cnn.ipynb failed in cell" in message and "ValueError" in message and "'z'" in message
    assert (tmp_path / "notebooks" / "06_mnist_cnn.ipynb").exists(), "the executed copy is kept"


@pytest.mark.slow
@needs_data
def test_fresh_retrains_every_run(smoke: tuple[Path, dict]) -> None:
    out, _ = smoke
    before = {p: p.stat().st_mtime_ns for p in (out / "runs" / "MNIST").glob("*/metrics.csv")}
    rp.reproduce("smoke", only=["06"], out=out, data_root=DATA, fresh=True)  # last: it replaces the runs
    after = {p: p.stat().st_mtime_ns for p in (out / "runs" / "MNIST").glob("*/metrics.csv")}
    assert after and not set(after) - set(before), "the same run folders come back"
    assert all(after[p] != before[p] for p in after), "every run trained again"
