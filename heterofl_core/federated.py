"""The federated round loop, written once for every dataset family (spec sections 2, 4, 5, 7).

One round: sample ceil(frac * users) active users; give each its level (fixed, or
drawn afresh under ``dynamic``); split the global model to each client's width;
train locally; aggregate by the per-entry count rule; recompute sBN statistics
on a fresh full-width copy; evaluate Global and Local metrics. Under
``participants=widest`` only the sampled clients at the global model's level train
(FedAvg on the clients that can hold it: a baseline); a round may then have none.

Beside sBN, the alternative a reader tries first: clients keep running BatchNorm
statistics while they train and the server averages them
(:meth:`Federation.local_update_tracking`, :meth:`Federation.averaged_statistics_model`).

The server's steps of a round are written once (server.py) and shared with Flower's
strategy; :meth:`Federation.run_round` drives them in this process, training the clients
here (:meth:`Federation.train`). Randomness comes from seeded generators (seeds.py), so a
client's result does not depend on which other clients train, in which order or in which
process (:meth:`Federation.local_update`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterator

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import extraction
from .aggregation import aggregate_holdings
from .cohort import CohortRule, grouped_model, train_cohort
from .config import LEVEL_RATES, ExperimentConfig, assign_fixed_levels, draw_dynamic_levels
from .data import ImageData, TextData
from .datasets import load_dataset
from .families import FAMILIES, get_family, model_builder
from .machine import fast_layout
from .models.layers import CLIENT_BN_MOMENTUM, track_running_statistics
from .runs import RunError, RunFolder, RunState, metrics_frame
from .seeds import client_generator, client_sbn_generator, global_rng, round_generator, seed_for
from .server import RoundSetup, RoundSteps, is_reply_count
from .slicing import Holding, Slicer, State
from .splits import ClientSplit, split_clients
from .training import TrainStats, load_sbn_sums, sbn_statistics, sbn_sums, scheduled_lr, train_client
from .workloads import Workload, make_workload

RoundCallback = Callable[[int, pd.DataFrame], None]
RoundFunction = Callable[[State, int], tuple[State, dict[str, float]]]  # (global state, round) -> (new state, metrics)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but no CUDA device is available; use --device cpu or auto")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"bad device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return chosen


def default_eval_batch_size(device: torch.device) -> int:
    """Images per forward pass of the sBN pass and evaluation: on a CPU, chunks whose
    activations stay in cache; on a GPU, chunks that fill it. sBN still averages over
    batches of ``batch_size_train`` inside each chunk (training.sbn_statistics), as the
    authors' loader gives them."""
    return 1000 if device.type == "cuda" else 100


@dataclass(frozen=True)
class RoundPlan:
    """Who trains in a round and at which width: the server's draws for the round."""

    round: int
    users: list[int]
    rates: list[float]
    lr: float
    sat_out: list[int] = field(default_factory=list)  # sampled, but not training (``participants=widest``)
    skipped: list[int] = field(default_factory=list)  # sampled, but not available (their node is not connected)


@dataclass
class Federation:
    """The pieces of one experiment, assembled from its config and data."""

    cfg: ExperimentConfig
    workload: Workload
    slicer: Slicer
    build: Callable[[float], nn.Module]
    build_eval: Callable[[float], nn.Module]
    labels: list[torch.Tensor]
    fixed_levels: list[str]
    device: torch.device
    cohort_rule: CohortRule  # which same-width clients train together (speed only)
    has_cohort_form: bool  # the family has a cohort form (cohort.grouped_model)
    uses_sbn: bool  # the evaluation copy has BatchNorms whose statistics the server recomputes
    models: dict[float, nn.Module] = field(default_factory=dict)  # one training model per width, reused
    tracking_models: dict[float, nn.Module] = field(default_factory=dict)  # the same, tracking BN statistics

    @classmethod
    def assemble(cls, cfg: ExperimentConfig, data: ImageData | TextData, device: torch.device,
                 eval_batch_size: int = 1000, cohort_rule: CohortRule | None = None) -> Federation:
        kind = "text" if isinstance(data, TextData) else "image"
        family = get_family(cfg.model)
        if family.data_kind != kind:
            raise ValueError(f"model {cfg.model!r} does not fit {data.name} ({kind} data); it takes {family.data_kind} "
                             f"data; models for {kind} data: "
                             f"{', '.join(f.name for f in FAMILIES.values() if f.data_kind == kind)}")
        data = data.to(device)
        split = split_clients(data, cfg.data_split, cfg.num_users, cfg.seed)
        split = ClientSplit(train=[i.to(device) for i in split.train], test=[i.to(device) for i in split.test],
                            labels=[l.to(device) for l in split.labels])
        workload = make_workload(data, split, cfg, eval_batch_size)
        channels = data.train_x.shape[1] if isinstance(data, ImageData) else None
        build = model_builder(cfg, workload.num_classes, in_channels=channels)
        build_eval = model_builder(cfg, workload.num_classes, track_running_stats=True, in_channels=channels)
        users = cfg.num_users if cfg.federated else 1
        levels = assign_fixed_levels(cfg.model_mode, users) if cfg.federated else [cfg.model_mode[0][0]]
        with torch.device("meta"):  # free, and draws no random numbers
            has_cohort_form = grouped_model(build(cfg.global_rate)) is not None
            uses_sbn = any(isinstance(m, nn.BatchNorm2d) for m in build_eval(cfg.global_rate).modules())
        return cls(cfg, workload, Slicer(build, cfg.global_rate), build, build_eval, split.labels, levels, device,
                   cohort_rule or CohortRule.measured(device), has_cohort_form, uses_sbn)

    def initial_state(self) -> State:
        """The global model's initial parameters, from the config's seed."""
        return {k: v.to(self.device) for k, v in self.seeded_build(self.build, self.cfg.global_rate).state_dict().items()}

    def seeded_build(self, build: Callable[[float], nn.Module], rate: float) -> nn.Module:
        """``build(rate)`` initialised from the config's seed; torch's global generator is left as it was."""
        with global_rng(self.cfg.seed, torch.device("cpu")):
            return build(rate)

    def plan_round(self, round_: int, generator: torch.Generator, available: Collection[int] | None = None) -> RoundPlan:
        """The round's active users (uniform, without replacement) and their widths; under
        ``participants=widest`` only those at the global model's width train, the others sit out
        (the same draws either way).

        With ``available`` (the users whose node is connected), the users are the first
        available ones of the same seeded order; the unavailable ones met before them are
        ``skipped``. With every user available, the plan is the one without ``available``.
        """
        cfg = self.cfg
        users_total = len(self.fixed_levels)
        active = min(cfg.active_users, users_total)
        order = torch.randperm(users_total, generator=generator, device=self.device).tolist()
        users, skipped = order[:active], []
        if available is not None:
            users = []
            for user in order:
                if len(users) == active:
                    break
                (users if user in available else skipped).append(user)
        levels = (draw_dynamic_levels(cfg.model_mode, users_total, generator) if cfg.model_split == "dynamic"
                  else self.fixed_levels)
        rates = [LEVEL_RATES[levels[u]] for u in users]
        if cfg.participants == "all":
            return RoundPlan(round_, users, rates, scheduled_lr(cfg, round_), skipped=skipped)
        assert cfg.participants == "widest", cfg.participants
        trains = [rate == cfg.global_rate for rate in rates]
        return RoundPlan(round_, [u for u, t in zip(users, trains) if t], [r for r, t in zip(rates, trains) if t],
                         scheduled_lr(cfg, round_), sat_out=[u for u, t in zip(users, trains) if not t],
                         skipped=skipped)

    def run_round(self, state: State, round_: int) -> tuple[State, dict[str, float]]:
        """One federated round in this process: the server's steps (server.py) around local training
        here; returns the new global state and the round's metrics and phase times."""
        steps = RoundSteps(self)
        timer = PhaseTimer(self.device)
        with timer.phase("round"):
            with timer.phase("split"):
                setup = steps.configure(state, round_)
            with timer.phase("local_training"):
                trained, stats = self.train(setup)
            with timer.phase("aggregate"):
                state = steps.aggregate(state, setup, trained)
            metrics: dict[str, float] = {}
            if steps.evaluates(round_):
                with timer.phase("sbn" if self.uses_sbn else "eval"):
                    evaluated = steps.statistics_model(state, round_, setup.generator)
                with timer.phase("eval"):
                    metrics = steps.evaluate(evaluated, setup.generator)
            metrics.update(steps.training_metrics(setup, stats, len(trained)))
        return state, {**metrics, **timer.report()}

    def round_holdings(self, plan: RoundPlan, generator: torch.Generator) -> list[dict[str, Holding]]:
        """Each client's channels this round under ``cfg.extraction`` (extraction.py); random draws
        come from the round's generator, client after client in the plan's order."""
        return [extraction.holdings(self.slicer, rate, self.cfg.extraction, plan.round, generator)
                for rate in plan.rates]

    def channels_held(self, round_: int, key: str, axis: int = 0) -> tuple[RoundPlan, torch.Tensor]:
        """Round ``round_``'s plan and which channels of tensor ``key``'s ``axis`` each of its
        clients holds (bool, clients x channels): the draws :meth:`run_round` makes, nothing trained."""
        generator = round_generator(self.cfg.seed, round_, self.device)
        plan = self.plan_round(round_, generator)
        width = self.slicer.global_shapes[key][axis]
        held = torch.zeros(len(plan.users), width, dtype=torch.bool)
        for row, holding in zip(held, self.round_holdings(plan, generator)):
            row[holding[key].index[axis].cpu()] = True
        return plan, held

    def train(self, setup: RoundSetup) -> tuple[dict[int, State], TrainStats]:
        """Local training of the round's clients here: ``{user: trained state}`` and their summed sums.

        Each client's result is :meth:`local_update`'s. The clients of a group (one sub-model: a
        static width) that the cohort rule picks train together as one batched computation
        (cohort.py), which gives the same states up to float rounding; the others one by one.
        """
        trained: dict[int, State] = {}
        stats = TrainStats.zero(self.device)
        for group in setup.groups:
            tasks = [setup.tasks[i] for i in group]
            rate, sub_state, users = tasks[0].rate, tasks[0].sub_state, [task.user for task in tasks]
            if self.has_cohort_form and self.cohort_rule.together(rate, len(tasks)):
                states, cohort_stats = self.cohort_update(sub_state, users, rate, setup.round)
                trained.update(zip(users, states))
                stats = stats.add(cohort_stats)
                continue
            for task in tasks:
                trained[task.user], client_stats = self.local_update(task.sub_state, task.user, task.rate, setup.round)
                stats = stats.add(client_stats)
        return trained, stats

    def local_update(self, sub_state: State, user: int, rate: float, round_: int) -> tuple[State, TrainStats]:
        """One client's round: its rate-``rate`` sub-model trained on its own data.

        A pure function of (the sub-model, the rate, the user's data, the round's settings,
        the client's generator seeded by (seed, round, user)): it does not depend on which
        other clients train, in which order, or in which process.
        """
        return self.train_locally(self.training_model(rate), sub_state, user, round_)

    def local_update_tracking(self, sub_state: State, user: int, rate: float,
                              round_: int) -> tuple[State, TrainStats]:
        """:meth:`local_update` on a model whose BatchNorms also track running statistics, as
        PyTorch's default ``nn.BatchNorm2d`` does (momentum 0.1): what a reader would try before sBN.

        The same generator, batches and steps; a train-mode forward ignores running statistics,
        so the trained weights are :meth:`local_update`'s, bit for bit. The returned state adds each
        BatchNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked``; they start from
        ``sub_state``'s when it holds them, else from the initial 0 / 1 / 0 (the global state
        carries none: sBN's server keeps no statistics).
        """
        self._need_batch_norm("local_update_tracking")
        model = self.tracking_model(rate)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
        return self.train_locally(model, sub_state, user, round_)

    def train_locally(self, model: nn.Module, sub_state: State, user: int, round_: int) -> tuple[State, TrainStats]:
        """Load ``sub_state`` into ``model`` and train it as ``user`` in round ``round_``; its trained state."""
        load_weights(model, sub_state)
        generator = client_generator(self.cfg.seed, round_, user, self.device)
        with global_rng(seed_for(self.cfg.seed, round_, 2, user), self.device):  # dropout
            stats = train_client(model, self.workload.client_batches(user, generator), self.user_mask(user),
                                 self.cfg, scheduled_lr(self.cfg, round_))
        return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}, stats

    def cohort_update(self, sub_state: State, users: list[int], rate: float,
                      round_: int) -> tuple[list[State], TrainStats]:
        """:meth:`local_update` for several clients of one width at once (cohort.train_cohort):
        each client's batches come from its own generator, so each gets its own step."""
        batches = []
        for user in users:
            epoch = self.workload.client_batches(user, client_generator(self.cfg.seed, round_, user, self.device))
            batches.append([batch for _ in range(self.cfg.local_epochs) for batch in epoch()])
        grouped = grouped_model(self.training_model(rate))
        return train_cohort(grouped, sub_state, batches, [self.user_mask(user) for user in users], self.cfg,
                            scheduled_lr(self.cfg, round_))

    def training_model(self, rate: float) -> nn.Module:
        """The rate-``rate`` model that local training loads each client's state into."""
        if rate not in self.models:
            self.models[rate] = fast_layout(self.seeded_build(self.build, rate).to(self.device))
        return self.models[rate]

    def tracking_model(self, rate: float) -> nn.Module:
        """:meth:`training_model` with BatchNorms that track running statistics (momentum 0.1), same layout."""
        if rate not in self.tracking_models:
            model = track_running_statistics(self.seeded_build(self.build, rate), CLIENT_BN_MOMENTUM)
            self.tracking_models[rate] = fast_layout(model.to(self.device))
        return self.tracking_models[rate]

    def user_mask(self, user: int) -> torch.Tensor | None:
        """The user's label mask for the masked loss, or None when masking is off."""
        return self.workload.user_masks[user] if self.cfg.mask else None

    def evaluation_model(self, state: State, generator: torch.Generator, round_: int = 0,
                         user_sums: list[State] | None = None) -> nn.Module:
        """A fresh full-width copy; with sBN, its running statistics over the training set
        (``round_`` seeds the clients' passes).

        ``sbn_source=server`` (the paper): one pass over the whole training set, which the server
        holds. ``clients``: every user's own pass over its own data (:meth:`user_sbn_sums`; or
        ``user_sums``, the users' sums as their nodes sent them), combined by adding them: what a
        deployment whose server holds no data can do.
        """
        model = self.evaluation_copy(state)
        if self.uses_sbn and self.cfg.sbn_source == "server":
            sbn_statistics(model, self.workload.stats_inputs(generator), self.cfg.sbn_batch)
        elif self.uses_sbn:
            if user_sums is None:
                user_sums = [self.user_sbn_sums(model, user, round_) for user in range(len(self.fixed_levels))]
            load_sbn_sums(model, add_states(user_sums))
        return model.eval()

    def evaluation_copy(self, state: State) -> nn.Module:
        """A fresh full-width evaluation model holding ``state`` (statistics not yet computed)."""
        model = fast_layout(self.seeded_build(self.build_eval, self.cfg.global_rate).to(self.device), training=False)
        return load_weights(model, state)

    def user_sbn_sums(self, model: nn.Module, user: int, round_: int) -> State:
        """One user's sBN pass over its own training data (training.sbn_sums): its share of the
        statistics under ``sbn_source=clients``. Overwrites ``model``'s statistics."""
        generator = client_sbn_generator(self.cfg.seed, round_, user, self.device)
        sbn_statistics(model, self.workload.user_stats_inputs(user, generator), self.cfg.sbn_batch)
        return sbn_sums(model)

    # -- the alternative to sBN: the clients' running statistics, averaged ----------------------

    def averaged_statistics_model(self, state: State, client_states: list[State], rates: list[float]) -> nn.Module:
        """A fresh full-width evaluation copy holding ``state``'s weights whose BatchNorm statistics are
        the clients' running statistics (:meth:`local_update_tracking`) averaged by the count rule: per
        channel, the mean over the clients whose rate-``rates[m]`` sub-model holds it (static extraction);
        a channel no client held keeps the initial mean 0 / variance 1. In eval mode, ready for
        ``workload.evaluate``: the obvious alternative to sBN (:meth:`evaluation_model`)."""
        self._need_batch_norm("averaged_statistics_model")
        self._need_static("averaged_statistics_model")
        model = self.evaluation_copy(state)
        initial = {key: value for key, value in model.state_dict().items() if is_statistic(key)}
        for m, client in enumerate(client_states):
            if missing := sorted(set(initial) - set(client)):
                raise ValueError(f"client state {m} holds no running statistics ({missing[0]}, ...): train it with "
                                 f"Federation.local_update_tracking")
        owner = {key: f"{key.rsplit('.', 1)[0]}.weight" for key in initial}  # a statistic's channels are its BN's
        holdings = [{key: self.slicer.holdings(rate)[owner[key]] for key in initial} for rate in rates]
        averaged = aggregate_holdings(initial, [{key: client[key] for key in initial} for client in client_states],
                                      holdings, [torch.empty(0, dtype=torch.long)] * len(rates))
        return load_weights(model, {**state, **averaged}).eval()

    def _need_batch_norm(self, what: str) -> None:
        if not self.uses_sbn:
            raise ValueError(f"{what} needs BatchNorm layers: model {self.cfg.model!r} with norm {self.cfg.norm!r} "
                             f"has none (use norm=bn with an image model)")

    def _need_static(self, what: str) -> None:
        if self.cfg.extraction != "static":
            raise ValueError(f"{what} takes the clients of static extraction (each rate's nested prefixes), "
                             f"not extraction={self.cfg.extraction!r}")


STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # a BatchNorm's buffers: not trained


def is_statistic(key: str) -> bool:
    """Whether state key ``key`` is a BatchNorm's running statistic (not a trained tensor)."""
    return key.rsplit(".", 1)[-1] in STATISTICS


def load_weights(model: nn.Module, state: State) -> nn.Module:
    """``model.load_state_dict(state)`` where ``state`` may lack running statistics (those keep ``model``'s)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(is_statistic(key) for key in missing), (missing, unexpected)
    return model


def add_states(states: list[State]) -> State:
    """Entry-wise sum of states with the same keys, added in list order."""
    total = {key: value.clone() for key, value in states[0].items()}
    for state in states[1:]:
        for key, value in state.items():
            total[key] += value
    return total


class PhaseTimer:
    """Wall-clock seconds per named phase of a round, waiting for the GPU at every boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def report(self) -> dict[str, float]:
        """``{phase}_s`` for every phase, and ``other_s``: the round's time outside them."""
        phases = {f"{name}_s": value for name, value in self.seconds.items() if name != "round"}
        return {**phases, "other_s": self.seconds["round"] - sum(phases.values()), "round_s": self.seconds["round"]}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run_experiment(cfg: ExperimentConfig, *, data: ImageData | TextData | None = None, data_root: str | Path | None = None,
                   out_dir: str | Path | None = None, device: str = "auto", resume: bool = False, quiet: bool = False,
                   on_round: RoundCallback | None = None, eval_batch_size: int | None = None,
                   cohort_rule: CohortRule | None = None,
                   rounds_by: Callable[[Federation], RoundFunction] | None = None,
                   runtime: dict[str, object] | None = None, round_lines: bool = True) -> pd.DataFrame:
    """Run (or resume) one experiment; return its tidy per-round metrics.

    With ``out_dir`` the run is a folder (runs.py) and can be resumed; ``on_round``
    is called after every round with the metrics so far (live plots in notebooks).
    Unless ``quiet`` a progress bar counts the rounds, and ``round_lines`` prints one line per round.
    ``rounds_by(federation)`` gives the function that runs one round (default:
    :meth:`Federation.run_round`, in this process; heterofl_flower's runs it through
    Flower); ``runtime`` describes where rounds run, for run.json.
    """
    if resume and out_dir is None:
        raise ValueError("resume needs the run folder to continue: pass out_dir (--out)")
    torch_device = resolve_device(device)
    if eval_batch_size is None:
        eval_batch_size = default_eval_batch_size(torch_device)
    if data is None:
        data = load_dataset(cfg.dataset, data_root)
    federation = Federation.assemble(cfg, data, torch_device, eval_batch_size, cohort_rule)
    folder = RunFolder(out_dir) if out_dir is not None else None
    run, state = RunState(), None
    if folder is not None:
        folder.start(cfg, data.name, data.source, str(torch_device), resume, runtime)
        if resume and folder.checkpoint.exists():
            saved = folder.load()
            run = RunState(**saved["run"])
            if run.round > cfg.rounds:
                raise RunError(f"{folder.checkpoint} is at round {run.round}, past the {cfg.rounds} rounds asked for; "
                               f"ask for at least {run.round} rounds")
            state = {k: v.to(torch_device) for k, v in saved["state"].items()}
    if state is None:
        state = federation.initial_state()

    bar = tqdm(range(run.round + 1, cfg.rounds + 1), initial=run.round, total=cfg.rounds, disable=quiet,
               desc=f"{cfg.dataset} {cfg.control}", unit="round", dynamic_ncols=True, leave=round_lines)
    run_round = rounds_by(federation) if rounds_by is not None else federation.run_round
    for round_ in bar:
        state, metrics = run_round(state, round_)
        run.round, run.elapsed_s = round_, run.elapsed_s + metrics["round_s"]
        run.rows.extend({"round": round_, "split": _split_of(name), "metric": name, "value": value,
                         "elapsed_s": round(run.elapsed_s, 3)} for name, value in metrics.items())
        headline = metrics.get(federation.workload.headline)
        better = headline is not None and (run.best_value is None or (
            headline > run.best_value if federation.workload.higher_is_better else headline < run.best_value))
        if better:
            run.best_round, run.best_value = round_, headline
        if folder is not None:
            folder.save(cfg, state, run, best=better)
        if headline is not None:
            bar.set_postfix_str(f"{federation.workload.headline} {headline:.4g}, round {metrics['round_s']:.1f}s")
        if not quiet and round_lines:
            bar.write(_round_line(round_, cfg.rounds, metrics, federation.workload.headline))
        if on_round is not None:
            on_round(round_, metrics_frame(run.rows))
    return metrics_frame(run.rows)


def _split_of(metric: str) -> str:
    if metric.endswith("_s"):
        return "time"
    if metric.startswith("train_") or metric in ("lr", "clients_trained") or is_reply_count(metric):
        return "train"
    return "test"


def _round_line(round_: int, rounds: int, metrics: dict[str, float], headline: str) -> str:
    local = headline.replace("global", "local")
    tested = f"{headline} {metrics[headline]:.4g}, {local} {metrics[local]:.4g}, " if headline in metrics else ""
    phases = ", ".join(f"{name[:-2].replace('_', ' ')} {metrics[name]:.2f}"
                       for name in ("local_training_s", "split_s", "aggregate_s", "sbn_s", "eval_s") if name in metrics)
    return (f"round {round_}/{rounds}: {tested}train loss {metrics['train_loss']:.4f} | "
            f"{metrics['round_s']:.2f} s ({phases})")
