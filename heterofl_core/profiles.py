"""Profiles: the scale every notebook runs at, from one table.

A notebook's ``profile`` parameter alone selects its scale, whether it is set by
hand in JupyterLab or injected by ``heterofl reproduce``: the notebook asks
:func:`settings` for everything that depends on it. ``overrides`` change single
settings; a name the notebook does not have is refused.

- ``smoke``: every notebook end to end in minutes (CI); the numbers mean nothing.
- ``workshop``: every notebook in at most 4 minutes on a 2-core laptop CPU, still
  showing the effect it teaches (its closing asserts check that effect).
- ``quick``: the figures on a laptop CPU, reduced as each figure says.
- ``paper``: the paper's settings (spec section 7); a GPU, hours to days.

Training notebooks share the names of :class:`~heterofl_core.experiments.Scale`
(rounds, local_epochs, num_users, frac, eval_every, sbn_samples, train_samples,
test_samples); ``None`` keeps the paper's value. The interpolation notebooks (06-08)
add the grid: ``global_levels`` (panels), ``other_levels`` (the lines' small levels;
None: every smaller one), ``points`` (i of x{i}-y{10-i}), optionally ``panel_points``
(a panel's own i, e.g. ``{"a": [1, 3, 5, 7, 9]}``) and ``seeds`` (each point is the mean
and range over them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator

NOTEBOOKS = (
    "00_setup_and_data",
    "01_width_slicing",
    "02_aggregation",
    "03_one_round_by_hand",
    "04_scaler_sbn_masking",
    "05_fedavg_baselines",
    "06_mnist_cnn",
    "07_cifar10_resnet18",
    "08_wikitext2_transformer",
    "09_ablations",
    "10_paper_figures",
    "11_flower",
    "12_beyond_static_slicing",
    "13_group_work",
    "14_your_data",
)
ALL_LEVELS = ["a", "b", "c", "d"]  # the interpolation figure's four panels: global model a, b, c, d
ALL_POINTS = list(range(1, 10))  # x{i}-y{10-i}, i = 1..9
TABLE_MODELS = ["a", "a-e", "a-b-c-d-e", "b", "c", "d", "e"]
QUICK_TABLE_MODELS = ["c", "c-e", "c-d-e", "d", "d-e", "e"]  # rows of the paper's CIFAR10 table a CPU can train
SEEDS = [0, 1, 2]  # every point of an interpolation figure: mean and range over these

_PAPER = dict(rounds=None, local_epochs=None, num_users=100, frac=0.1, eval_every=1, sbn_samples=0,
              train_samples=None, test_samples=None)  # None: the paper's value for the dataset
_SMOKE_MNIST = dict(rounds=1, local_epochs=1, num_users=10, frac=0.2, eval_every=1, sbn_samples=200,
                    train_samples=500, test_samples=200)
_SMOKE_CIFAR10 = dict(rounds=1, local_epochs=1, num_users=10, frac=0.2, eval_every=1, sbn_samples=100,
                      train_samples=200, test_samples=100)
_SMOKE_TEXT = dict(rounds=1, local_epochs=1, num_users=10, frac=0.2, eval_every=1, sbn_samples=0,
                   train_samples=1280, test_samples=1280)
_WORKSHOP_MNIST = dict(rounds=4, local_epochs=1, num_users=10, frac=0.5, eval_every=4, sbn_samples=2000,
                       train_samples=6000, test_samples=2000)
_WORKSHOP_CIFAR10 = dict(rounds=3, local_epochs=1, num_users=10, frac=0.5, eval_every=3, sbn_samples=500,
                         train_samples=2000, test_samples=1000)
_WORKSHOP_TEXT = dict(rounds=2, local_epochs=1, num_users=10, frac=0.5, eval_every=2, sbn_samples=0,
                      train_samples=16000, test_samples=2560)  # text steps cost the same at every width
# The ablation at workshop scale: MNIST only (8 runs of mixture c-e); enough for sBN's effect (notebook 09).
_WORKSHOP_ABLATION_MNIST = dict(rounds=4, local_epochs=1, num_users=10, frac=0.5, eval_every=4, sbn_samples=2000,
                                train_samples=4000, test_samples=2000)
# quick, small: 3,000 images for six rounds; the one-round notebook (03) and the MNIST ablation (09).
_QUICK_SMALL_MNIST = dict(rounds=6, local_epochs=1, num_users=10, frac=0.5, eval_every=6, sbn_samples=1000,
                          train_samples=3000, test_samples=1000)
# quick, interpolation (06): the paper's 100 users, 10 per round, on the whole training and test sets; 8 of 200
# rounds and 1 of 5 local epochs (the CPU budget). Enough for the levels to order the accuracy beyond the spread
# of 3 seeds (measured: see README).
_QUICK_MNIST = dict(rounds=8, local_epochs=1, num_users=100, frac=0.1, eval_every=8, sbn_samples=6000,
                    train_samples=None, test_samples=None)
_QUICK_CIFAR10 = dict(rounds=6, local_epochs=1, num_users=10, frac=0.5, eval_every=6, sbn_samples=1000,
                      train_samples=5000, test_samples=2000)
# 05: HeteroFL a1-e9 against FedAvg on the same users and rounds (the paper's 100 users, 10 a round: one in ten
# can hold the full model, so FedAvg at full width trains about one client a round).
_WORKSHOP_BASELINE_MNIST = dict(rounds=8, local_epochs=1, num_users=100, frac=0.1, eval_every=8, sbn_samples=2000,
                                train_samples=12000, test_samples=2000)
_QUICK_BASELINE_MNIST = dict(rounds=10, local_epochs=1, num_users=100, frac=0.1, eval_every=10, sbn_samples=3000,
                             train_samples=20000, test_samples=5000)
# 13: notebook 05's paired comparison, one seed per table (table k: seed k), then the challenge: the best
# Global accuracy of the a1-e9 clients within a budget of client-FLOPs (pool.client_flops). The budget is
# about 1.6 times the cost of the default entry under seed 0 (workshop 6.2e10, quick 1.2e11, paper 5.0e13).
_ONE_ROUND = dict(rounds=1, eval_every=1, split="non-iid-2")  # 03: one round, two classes per user (masking at work)
_QUICK_TEXT = dict(rounds=4, local_epochs=1, num_users=10, frac=0.5, eval_every=4, sbn_samples=0,
                   train_samples=16000, test_samples=5120)

# 11: one round through a grid in this process, then a short simulation on Ray (its start costs ~40 s on 2 cores).
_FLOWER_SMOKE = dict(rounds=1, local_epochs=1, num_users=10, frac=0.5, eval_every=1, sbn_samples=0,
                     train_samples=500, test_samples=200, supernodes=3, mode="a1-e1")
_FLOWER_WORKSHOP = dict(rounds=2, local_epochs=1, num_users=10, frac=0.5, eval_every=1, sbn_samples=0,
                        train_samples=3000, test_samples=1000, supernodes=3, mode="a1-e1")
_FLOWER_PAPER = dict(_PAPER, rounds=2, supernodes=10, mode="a1-e1")  # the paper's round; 2 rounds show the path

# 12: static, rolling and random extraction under a1-e9 (one user in ten at full width), fix and dynamic levels.
# Rolling's window moves one channel a round, so it departs from static only over many rounds (the CNN's
# layers are 64 to 512 channels wide): quick runs 12 rounds of the small MNIST scale (6 for notebooks 03 and 09).
_EXTRACTION = dict(mode="a1-e9", model_splits=["fix", "dynamic"], show_rounds=4, cifar10=None, cifar10_seeds=[0])
_EXTRACTION_QUICK_MNIST = dict(_QUICK_SMALL_MNIST, rounds=12, eval_every=12)
# workshop: six runs (3 strategies x fix, dynamic) on half of the workshop MNIST subset, so the notebook fits its
# 4 minutes on 2 cores (the full-width client's local training is most of the cost); 4 rounds, as the others.
_EXTRACTION_WORKSHOP_MNIST = dict(_WORKSHOP_MNIST, train_samples=3000, test_samples=1000, sbn_samples=1000)
# 14: one run of Fashion-MNIST (else MNIST) at a1-e1; Dirichlet splits of its training labels over split_users
# users, one per alpha (no training); a folder of own_images[0] training and own_images[1] test images per class.
_YOUR_DATA = dict(mode="a1-e1", alphas=[0.1, 1.0, 100.0], split_users=20, own_images=[30, 10])

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "00_setup_and_data": dict(show_samples=8),
        "01_width_slicing": dict(explore_model="conv"),
        "02_aggregation": dict(toy_width=8),
        "03_one_round_by_hand": {**_SMOKE_MNIST, **_ONE_ROUND, "mode": "c1-e1"},
        "04_scaler_sbn_masking": {**_SMOKE_MNIST, **_ONE_ROUND, "mode": "a1-e1"},
        "05_fedavg_baselines": dict(**_SMOKE_MNIST, mode="a1-e9", seeds=[0]),
        "06_mnist_cnn": dict(**_SMOKE_MNIST, global_levels=["c", "d"], other_levels=["e"], seeds=[0], points=[5], curve_eval_every=1,
                             featured_mode="c5-e5"),
        "07_cifar10_resnet18": dict(**_SMOKE_CIFAR10, global_levels=["d"], other_levels=["e"], seeds=[0], points=[5], curve_eval_every=1,
                                    featured_mode="d5-e5"),
        "08_wikitext2_transformer": dict(**_SMOKE_TEXT, global_levels=["d"], other_levels=["e"], seeds=[0], points=[5], curve_eval_every=1,
                                         featured_mode="d5-e5"),
        "09_ablations": dict(mnist=_SMOKE_MNIST, cifar10=_SMOKE_CIFAR10, mode="d1-e1", seed=0),
        "10_paper_figures": dict(cifar10=_SMOKE_CIFAR10, table_models=["a", "a-e", "e"], seed=0),
        "11_flower": _FLOWER_SMOKE,
        "12_beyond_static_slicing": dict(_EXTRACTION, mnist=_SMOKE_MNIST, seeds=[0], show_rounds=3),
        "13_group_work": dict(**_SMOKE_MNIST, mode="a1-e9", table=0, room=None, budget=1e8),
        "14_your_data": {**_SMOKE_MNIST, **_YOUR_DATA, "own_images": [5, 2]},
    },
    # A room of laptops: each notebook at most 4 minutes on 2 cores. MNIST on a tenth of its training set
    # for a few rounds is enough to see the widths order the accuracy; CIFAR10 and text show the recipe runs.
    "workshop": {
        "00_setup_and_data": dict(show_samples=16),
        "01_width_slicing": dict(explore_model="conv"),
        "02_aggregation": dict(toy_width=8),
        "03_one_round_by_hand": {**_WORKSHOP_MNIST, **_ONE_ROUND, "sbn_samples": 1000, "test_samples": 1000,
                                 "mode": "a1-e1"},  # the round runs twice (by hand, then run_experiment)
        "04_scaler_sbn_masking": {**_WORKSHOP_MNIST, **_ONE_ROUND, "sbn_samples": 1000, "test_samples": 1000,
                                  "mode": "a1-e1"},
        "05_fedavg_baselines": dict(**_WORKSHOP_BASELINE_MNIST, mode="a1-e9", seeds=[0, 1]),
        "06_mnist_cnn": dict(**_WORKSHOP_MNIST, global_levels=["c"], other_levels=["e"], seeds=[0], points=[1, 5], curve_eval_every=1,
                             featured_mode="c5-e5"),  # c alone beats c1-e9, in about a minute of training
        "07_cifar10_resnet18": dict(**_WORKSHOP_CIFAR10, global_levels=["c"], other_levels=["e"], seeds=[0], points=[5], curve_eval_every=1,
                                    featured_mode="c5-e5"),
        "08_wikitext2_transformer": dict(**_WORKSHOP_TEXT, global_levels=["c"], other_levels=["e"], seeds=[0], points=[5], curve_eval_every=1,
                                         featured_mode="c5-e5"),
        "09_ablations": dict(mnist=_WORKSHOP_ABLATION_MNIST, cifar10=None, mode="c1-e1", seed=0),  # CIFAR10: too slow
        "10_paper_figures": dict(cifar10=_WORKSHOP_CIFAR10, table_models=["c", "d", "e"], seed=0),  # a: too slow
        "11_flower": _FLOWER_WORKSHOP,
        "12_beyond_static_slicing": dict(_EXTRACTION, mnist=_EXTRACTION_WORKSHOP_MNIST, seeds=[0]),
        "13_group_work": dict(**_WORKSHOP_BASELINE_MNIST, mode="a1-e9", table=0, room=None, budget=1e11),
        "14_your_data": {**_WORKSHOP_MNIST, **_YOUR_DATA},
    },
    # The figures on a 2-core CPU, the whole suite in under 90 minutes (measured: see README). MNIST shows the
    # paper's result (06: the paper's users, whole data, 8 rounds, 3 seeds, every panel, lines to e only, i = 5,
    # and i = 1, 3, 5, 7, 9 on panel a's line);
    # CIFAR10 and text get what the budget allows (narrow panels c and d), and their figures say when no trend shows.
    "quick": {
        "00_setup_and_data": dict(show_samples=16),
        "01_width_slicing": dict(explore_model="resnet18"),
        "02_aggregation": dict(toy_width=8),
        "03_one_round_by_hand": {**_QUICK_SMALL_MNIST, **_ONE_ROUND, "mode": "a1-e1"},
        "04_scaler_sbn_masking": {**_QUICK_SMALL_MNIST, **_ONE_ROUND, "mode": "a1-e1"},
        "05_fedavg_baselines": dict(**_QUICK_BASELINE_MNIST, mode="a1-e9", seeds=SEEDS),
        "06_mnist_cnn": dict(**_QUICK_MNIST, global_levels=ALL_LEVELS, other_levels=["e"], points=[5],
                             panel_points={"a": [1, 3, 5, 7, 9]},  # a-e: 5 of the paper's 9 (+4 modes, ~11 min)
                             seeds=SEEDS, curve_eval_every=2, featured_mode="a5-e5"),
        "07_cifar10_resnet18": dict(**_QUICK_CIFAR10, global_levels=["c", "d"], other_levels=["e"], points=[5],
                                    seeds=SEEDS, curve_eval_every=2, featured_mode="c5-e5"),
        "08_wikitext2_transformer": dict(**_QUICK_TEXT, global_levels=["c", "d"], other_levels=["e"], points=[5],
                                         seeds=SEEDS, curve_eval_every=2, featured_mode="c5-e5"),
        "09_ablations": dict(mnist=_QUICK_SMALL_MNIST, cifar10=None, mode="a1-e1", seed=0),  # CIFAR10: ~25 min
        "10_paper_figures": dict(cifar10=_QUICK_CIFAR10, table_models=QUICK_TABLE_MODELS, seed=0),
        "11_flower": _FLOWER_WORKSHOP,
        "12_beyond_static_slicing": dict(_EXTRACTION, mnist=_EXTRACTION_QUICK_MNIST, seeds=SEEDS),
        "13_group_work": dict(**_QUICK_BASELINE_MNIST, mode="a1-e9", table=0, room=None, budget=2e11),
        "14_your_data": {**_QUICK_SMALL_MNIST, **_YOUR_DATA},
    },
    # The paper's settings (spec section 7): 100 users, 10 active, the paper's rounds, local epochs and
    # lr milestones, whole datasets, sBN over the whole training set, evaluation every round, i = 1..9.
    "paper": {
        "00_setup_and_data": dict(show_samples=16),
        "01_width_slicing": dict(explore_model="resnet18"),
        "02_aggregation": dict(toy_width=8),
        "03_one_round_by_hand": {**_PAPER, **_ONE_ROUND, "mode": "a1-e1"},
        "04_scaler_sbn_masking": {**_PAPER, **_ONE_ROUND, "mode": "a1-e1"},
        "05_fedavg_baselines": dict(**_PAPER, mode="a1-e9", seeds=SEEDS),
        "06_mnist_cnn": dict(**_PAPER, global_levels=ALL_LEVELS, other_levels=None, points=ALL_POINTS, seeds=SEEDS,
                             panel_points={}, curve_eval_every=1, featured_mode="a5-e5"),  # every panel: i = 1..9
        "07_cifar10_resnet18": dict(**_PAPER, global_levels=ALL_LEVELS, other_levels=None, points=ALL_POINTS,
                                    seeds=SEEDS, curve_eval_every=1, featured_mode="a5-e5"),
        "08_wikitext2_transformer": dict(**_PAPER, global_levels=ALL_LEVELS, other_levels=None, points=ALL_POINTS,
                                         seeds=SEEDS, curve_eval_every=1, featured_mode="a5-e5"),
        "09_ablations": dict(mnist=_PAPER, cifar10=_PAPER, mode="a1-e1", seed=0),
        "10_paper_figures": dict(cifar10=_PAPER, table_models=TABLE_MODELS, seed=0),
        "11_flower": _FLOWER_PAPER,
        "12_beyond_static_slicing": dict(_EXTRACTION, mnist=_PAPER, seeds=SEEDS, cifar10=_PAPER),  # CIFAR10: 1 seed
        "13_group_work": dict(**_PAPER, mode="a1-e9", table=0, room=None, budget=7e13),
        "14_your_data": {**_PAPER, **_YOUR_DATA},
    },
}


class Settings(Mapping[str, Any]):
    """One notebook's settings at one profile: ``settings.rounds``, ``settings["rounds"]``,
    and ``settings.scale`` for a training notebook."""

    def __init__(self, profile: str, notebook: str, values: dict[str, Any]) -> None:
        self.profile, self.notebook, self._values = profile, notebook, dict(values)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self.notebook} has no setting {name!r}; it has: {', '.join(self._values)}") from None

    @property
    def scale(self) -> Any:
        """The training scale (experiments.Scale) of a training notebook."""
        from .experiments import Scale
        return Scale.from_params(**{k: v for k, v in self._values.items() if k in Scale.__dataclass_fields__})

    def __repr__(self) -> str:
        return f"Settings({self.profile!r}, {self.notebook!r}, {self._values!r})"


def settings(profile: str, notebook: str, **overrides: Any) -> Settings:
    """The settings of ``notebook`` at ``profile``, with ``overrides`` on top (names it has only)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    if notebook not in PROFILES[profile]:
        raise ValueError(f"unknown notebook {notebook!r}; valid: {', '.join(NOTEBOOKS)}")
    values = PROFILES[profile][notebook]
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"{notebook} has no setting {', '.join(map(repr, unknown))}; it has: {', '.join(values)}")
    return Settings(profile, notebook, {**values, **overrides})
