"""The notebooks' experiments: the run cache as a learner meets it when a notebook runs again."""

from __future__ import annotations

from pathlib import Path

from heterofl_core import experiments as ex
from fakes import mnist_data_root  # noqa: F401  (fixture)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)


def test_a_run_read_back_shows_its_curves_to_the_live_view(mnist_data_root: Path, tmp_path: Path) -> None:
    """A notebook's second Run All reads its runs back: the live view gets the finished run's last round (it
    stayed at "waiting for the first round" before), and exactly once."""
    scale = ex.Scale(rounds=2, local_epochs=1, num_users=4, frac=0.5, sbn_samples=40)
    experiment = ex.Experiment("e1", scale.config("MNIST", scale.control("e1")),
                               ex.DataSpec("MNIST", str(mnist_data_root), 80, 20))
    seen: list[tuple[int, int]] = []
    watch = lambda round_, frame: seen.append((round_, int(frame["round"].max())))  # noqa: E731
    trained, cached = ex.run_cached(experiment, tmp_path, device="cpu", on_round=watch)
    assert not cached and seen == [(1, 1), (2, 2)], "training: every round"
    seen.clear()
    again, cached = ex.run_cached(experiment, tmp_path, device="cpu", on_round=watch)
    assert cached and seen == [(2, 2)], "read back: the last round, once"
    tested = lambda frame: frame[frame["split"] == "test"]["value"].round(4).tolist()  # noqa: E731
    assert tested(again) == tested(trained), "the same metrics, read back"
