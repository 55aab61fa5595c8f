"""The federated round loop, written once for every dataset family (spec sections 2, 4, 5, 7).

One round: sample ceil(frac * users) active users; give each its level (fixed, or
drawn afresh under ``dynamic``); split the global model to each client's width;
train locally; aggregate by the per-entry count rule; recompute sBN statistics
on a fresh full-width copy; evaluate Global and Local metrics.

Every round draws its randomness from generators seeded by (seed, round), so a
resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .aggregation import aggregate
from .cohort import grouped_model, train_cohort, use_cohort
from .config import LEVEL_RATES, ExperimentConfig, assign_fixed_levels, draw_dynamic_levels
from .data import ImageData, TextData, load_dataset
from .models import model_builder
from .runs import RunError, RunFolder, RunState, metrics_frame
from .slicing import Slicer, State
from .splits import ClientSplit, split_clients
from .training import Batch, TrainStats, fast_layout, reuse_host_memory, sbn_statistics, scheduled_lr, train_client
from .workloads import Workload, make_workload

RoundCallback = Callable[[int, pd.DataFrame], None]


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
    activations stay in cache and in the heap (training.reuse_host_memory); on a GPU,
    chunks that fill it. sBN still averages over batches of ``batch_size_train`` inside
    each chunk (training.sbn_statistics), as the authors' loader gives them."""
    return 1000 if device.type == "cuda" else 100


def round_generator(seed: int, round_: int, device: torch.device) -> torch.Generator:
    """The generator for one round's sampling, shuffling, augmentation and token masks."""
    torch.manual_seed(seed * 1_000_003 + round_)  # dropout and other global-RNG draws
    return torch.Generator(device).manual_seed(seed * 1_000_003 + round_)


def centralised_split(data: ImageData | TextData) -> ClientSplit:
    """fed=0: a single client that holds all the data."""
    if isinstance(data, TextData):
        raise ValueError("centralised training (fed=0) is only implemented for image data")
    everything = torch.arange(data.num_classes)
    return ClientSplit(train=[torch.arange(len(data.train_y))], test=[torch.arange(len(data.test_y))], labels=[everything])


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
    cohorts: bool  # the family has a cohort form (cohort.grouped_model): same-width clients may train together

    @classmethod
    def assemble(cls, cfg: ExperimentConfig, data: ImageData | TextData, device: torch.device,
                 eval_batch_size: int = 1000) -> Federation:
        reuse_host_memory()
        if (cfg.model == "transformer") != isinstance(data, TextData):
            kind = "a text corpus" if isinstance(data, TextData) else "image data"
            raise ValueError(f"model {cfg.model!r} does not fit {data.name} ({kind}): use transformer for text, "
                             f"conv or resnet18 for images")
        data = data.to(device)
        if cfg.federated:
            split = split_clients(data, cfg.data_split, cfg.num_users, cfg.seed)
        else:
            split = centralised_split(data)
        split = ClientSplit(train=[i.to(device) for i in split.train], test=[i.to(device) for i in split.test],
                            labels=[l.to(device) for l in split.labels])
        workload = make_workload(data, split, cfg, eval_batch_size)
        channels = data.train_x.shape[1] if isinstance(data, ImageData) else None
        build = model_builder(cfg, workload.num_classes, in_channels=channels)
        users = cfg.num_users if cfg.federated else 1
        levels = assign_fixed_levels(cfg.model_mode, users) if cfg.federated else [cfg.model_mode[0][0]]
        with torch.device("meta"):  # free, and draws no random numbers
            cohorts = grouped_model(build(cfg.global_rate)) is not None
        return cls(cfg, workload, Slicer(build, cfg.global_rate), build,
                   model_builder(cfg, workload.num_classes, track_running_stats=True, in_channels=channels),
                   split.labels, levels, device, cohorts)

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The global model's initial parameters, from the config's seed."""
        torch.manual_seed(self.cfg.seed)
        return {k: v.to(self.device) for k, v in self.build(self.cfg.global_rate).state_dict().items()}

    def run_round(self, state: dict[str, torch.Tensor], round_: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One federated round; returns the new global state and the round's metrics and phase times."""
        cfg, generator = self.cfg, round_generator(self.cfg.seed, round_, self.device)
        times: dict[str, float] = {}
        clock = _Clock(self.device)
        lr = scheduled_lr(cfg, round_)
        users_total = len(self.fixed_levels)
        active = min(cfg.active_users, users_total)
        users = torch.randperm(users_total, generator=generator, device=self.device)[:active].tolist()
        levels = (draw_dynamic_levels(cfg.model_mode, users_total, generator) if cfg.model_split == "dynamic"
                  else self.fixed_levels)
        rates = [LEVEL_RATES[levels[u]] for u in users]

        client_states, stats = self.train_clients(state, users, rates, generator, lr, clock, times)
        state = aggregate(self.slicer, state, client_states, rates, [self.labels[u] for u in users])
        times["aggregate_s"] = clock.lap()
        metrics = {}
        if round_ % cfg.eval_every == 0 or round_ == cfg.rounds:
            evaluated = self.evaluation_model(state, generator)
            times["sbn_s"] = clock.lap()
            metrics = self.workload.evaluate(evaluated, generator)
            times["eval_s"] = clock.lap()
        metrics.update(train_loss=(stats.loss_sum / max(stats.count, 1)).item(),
                       train_accuracy=(stats.correct / max(stats.count, 1) * 100).item(), lr=lr)
        times["other_s"] = clock.lap()
        times["round_s"] = clock.total()
        return state, {**metrics, **times}

    def train_clients(self, state: State, users: list[int], rates: list[float], generator: torch.Generator, lr: float,
                      clock: _Clock, times: dict[str, float]) -> tuple[list[State], TrainStats]:
        """Local training of the active clients; their trained states in user order.

        Clients of a width that :func:`cohort.use_cohort` picks train together as one
        batched computation, the others one by one. Every client's batches are drawn
        from the generator in user order either way.
        """
        cfg = self.cfg
        together = {rate for rate, n in Counter(rates).items() if self.cohorts and use_cohort(self.device, rate, n)}
        models: dict[float, nn.Module] = {}  # built in user order, as the global generator (dropout) expects
        subs: dict[float, State] = {}  # the sub-model of each width (the same for all its clients)
        cohorts: dict[float, list[tuple[int, list[Batch], torch.Tensor | None]]] = defaultdict(list)
        states: list[State] = [{} for _ in users]
        stats = TrainStats.zero(self.device)
        times["split_s"] = times["local_training_s"] = 0.0
        for i, (user, rate) in enumerate(zip(users, rates)):
            if rate not in subs:
                subs[rate] = self.slicer.split(state, rate)
                times["split_s"] += clock.lap()
                models[rate] = fast_layout(self.build(rate).to(self.device))
            batches, mask = self.workload.client_batches(user, generator), self.workload_mask(user)
            if rate in together:
                cohorts[rate].append((i, [batch for _ in range(cfg.local_epochs) for batch in batches()], mask))
            else:
                models[rate].load_state_dict(subs[rate])
                stats = stats.add(train_client(models[rate], batches, mask, cfg, lr))
                states[i] = {k: v.detach().clone(memory_format=torch.contiguous_format)
                             for k, v in models[rate].state_dict().items()}
            times["local_training_s"] += clock.lap()
        for rate, members in cohorts.items():
            trained, cohort_stats = train_cohort(grouped_model(models[rate]), subs[rate],
                                                 [batches for _, batches, _ in members],
                                                 [mask for _, _, mask in members], cfg, lr)
            for (i, _, _), client_state in zip(members, trained):
                states[i] = client_state
            stats = stats.add(cohort_stats)
            times["local_training_s"] += clock.lap()
        return states, stats

    def workload_mask(self, user: int) -> torch.Tensor | None:
        """The user's label mask for the masked loss, or None when masking is off."""
        return self.workload.user_masks[user] if self.cfg.mask else None

    def evaluation_model(self, state: dict[str, torch.Tensor], generator: torch.Generator) -> nn.Module:
        """A fresh full-width copy; with sBN, its running statistics over the training set."""
        model = fast_layout(self.build_eval(self.cfg.global_rate).to(self.device), training=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
                                      for k in missing), (missing, unexpected)
        if self.cfg.norm == "bn" and self.cfg.model != "transformer":
            sbn_statistics(model, self.workload.stats_inputs(generator), self.cfg.sbn_batch)
        return model.eval()


class _Clock:
    """Wall-clock laps that wait for the GPU to finish first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        lap, self.last = now - self.last, now
        return lap

    def total(self) -> float:
        return time.perf_counter() - self.start


def run_experiment(cfg: ExperimentConfig, *, data: ImageData | TextData | None = None, data_root: str | Path | None = None,
                   out_dir: str | Path | None = None, device: str = "auto", resume: bool = False, quiet: bool = False,
                   on_round: RoundCallback | None = None, eval_batch_size: int | None = None) -> pd.DataFrame:
    """Run (or resume) one experiment; return its tidy per-round metrics.

    With ``out_dir`` the run is a folder (runs.py) and can be resumed; ``on_round``
    is called after every round with the metrics so far (live plots in notebooks).
    """
    if resume and out_dir is None:
        raise ValueError("resume needs the run folder to continue: pass out_dir (--out)")
    torch_device = resolve_device(device)
    if eval_batch_size is None:
        eval_batch_size = default_eval_batch_size(torch_device)
    if data is None:
        data = load_dataset(cfg.dataset, data_root)
    federation = Federation.assemble(cfg, data, torch_device, eval_batch_size)
    folder = RunFolder(out_dir) if out_dir is not None else None
    run, state = RunState(), None
    if folder is not None:
        folder.start(cfg, data.name, data.source, str(torch_device), resume)
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
               desc=f"{cfg.dataset} {cfg.control}", unit="round", dynamic_ncols=True)
    for round_ in bar:
        state, metrics = federation.run_round(state, round_)
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
        if not quiet:
            bar.write(_round_line(round_, cfg.rounds, metrics, federation.workload.headline))
        if on_round is not None:
            on_round(round_, metrics_frame(run.rows))
    return metrics_frame(run.rows)


def _split_of(metric: str) -> str:
    if metric.endswith("_s"):
        return "time"
    if metric.startswith("train_") or metric == "lr":
        return "train"
    return "test"


def _round_line(round_: int, rounds: int, metrics: dict[str, float], headline: str) -> str:
    local = headline.replace("global", "local")
    tested = f"{headline} {metrics[headline]:.4g}, {local} {metrics[local]:.4g}, " if headline in metrics else ""
    phases = ", ".join(f"{name[:-2].replace('_', ' ')} {metrics[name]:.2f}"
                       for name in ("local_training_s", "split_s", "aggregate_s", "sbn_s", "eval_s") if name in metrics)
    return (f"round {round_}/{rounds}: {tested}train loss {metrics['train_loss']:.4f} | "
            f"{metrics['round_s']:.2f} s ({phases})")
