"""The server's steps of a round, written once for every engine (spec sections 2, 4, 5).

Shaped like a Flower strategy: :meth:`RoundSteps.configure` (the round's plan and what each
client receives), :meth:`RoundSteps.aggregate` (the count rule over whichever replies came
back) and the evaluation (:meth:`RoundSteps.statistics_model`, then :meth:`RoundSteps.evaluate`).
The engines are thin drivers: the in-process loop (``Federation.run_round``) calls
configure -> train -> aggregate -> evaluate; the Flower strategy (heterofl_flower.strategy)
calls the same steps with messages in between. Timing wraps the calls from outside.

A baseline is a configuration of these steps, not another loop: FedAvg on the clients that
can hold the full model is ``participants=widest``; FedAvg at one width is a control string
whose clients all have that level.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Mapping

import torch
from torch import nn

from . import extraction
from .aggregation import aggregate, aggregate_holdings
from .config import level_of
from .seeds import round_generator
from .slicing import Holding, State
from .training import TrainStats

if TYPE_CHECKING:
    from .federated import Federation, RoundPlan


@dataclass(frozen=True)
class ClientTask:
    """What one client of a round receives: its user and width, its sub-model, and which
    entries of the global model it holds (``None``: static slicing's nested prefixes of ``rate``)."""

    user: int
    rate: float
    sub_state: State  # one object for every client of a group: the same sub-model
    holding: dict[str, Holding] | None = None


@dataclass
class RoundSetup:
    """A configured round: the plan, the round's generator (it goes on into the evaluation),
    each client's task in the plan's order, and the groups of clients that receive one sub-model."""

    plan: RoundPlan
    generator: torch.Generator
    tasks: list[ClientTask]
    groups: list[list[int]]  # positions in ``tasks``: static, one group per width; else one client each

    @property
    def round(self) -> int:
        return self.plan.round

    @property
    def skipped(self) -> list[int]:
        """Users the seeded order reached but whose node was not connected (``RoundPlan.skipped``)."""
        return self.plan.skipped


class RoundSteps:
    """The server's steps of one experiment (:class:`~heterofl_core.federated.Federation`)."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation

    def configure(self, state: State, round_: int, available: Collection[int] | None = None) -> RoundSetup:
        """The round's plan (``Federation.plan_round`` with the round's generator, sampling among
        ``available`` users when given) and each client's sub-model under ``cfg.extraction``: static
        splits once per width (nested prefixes, shared by a width's clients); rolling and random
        give each client its own index sets, drawn client after client in the plan's order."""
        fed = self.federation
        generator = round_generator(fed.cfg.seed, round_, fed.device)
        plan = fed.plan_round(round_, generator, available)
        if fed.cfg.extraction == "static":
            subs = {rate: fed.slicer.split(state, rate) for rate in dict.fromkeys(plan.rates)}
            tasks = [ClientTask(user, rate, subs[rate]) for user, rate in zip(plan.users, plan.rates)]
            widths: dict[float, list[int]] = defaultdict(list)
            for i, rate in enumerate(plan.rates):
                widths[rate].append(i)
            groups = list(widths.values())
        else:
            held = fed.round_holdings(plan, generator)
            tasks = [ClientTask(user, rate, extraction.split(state, holding), holding)
                     for user, rate, holding in zip(plan.users, plan.rates, held)]
            groups = [[i] for i in range(len(tasks))]
        return RoundSetup(plan, generator, tasks, groups)

    def aggregate(self, state: State, setup: RoundSetup, replies: Mapping[int, State]) -> State:
        """The count rule over the clients that replied (``{user: trained state}``), in the plan's
        order: a client that did not reply is a client fewer, and an entry no reply holds keeps its value."""
        fed = self.federation
        kept = [task for task in setup.tasks if task.user in replies]
        states = [replies[task.user] for task in kept]
        labels = [fed.labels[task.user] for task in kept]
        if fed.cfg.extraction == "static":
            return aggregate(fed.slicer, state, states, [task.rate for task in kept], labels)
        return aggregate_holdings(state, states, [task.holding for task in kept], labels)

    def training_metrics(self, setup: RoundSetup, stats: TrainStats, replied: int) -> dict[str, float]:
        """The round's training metrics: the replies' loss and accuracy, the learning rate and how many trained."""
        return {**stats.metrics(), "lr": setup.plan.lr, "clients_trained": replied}

    @staticmethod
    def add_stats(setup: RoundSetup, stats: Mapping[int, TrainStats], device: torch.device) -> TrainStats:
        """The clients' training sums (``{user: sums}``), added as the in-process loop adds them:
        group after group, each in the plan's order."""
        total = TrainStats.zero(device)
        for group in setup.groups:
            for i in group:
                if setup.tasks[i].user in stats:
                    total = total.add(stats[setup.tasks[i].user])
        return total

    def evaluates(self, round_: int) -> bool:
        """Whether round ``round_`` is evaluated (every ``eval_every`` rounds, and the last)."""
        cfg = self.federation.cfg
        return round_ % cfg.eval_every == 0 or round_ == cfg.rounds

    def statistics_model(self, state: State, round_: int, generator: torch.Generator,
                         user_sums: list[State] | None = None) -> nn.Module:
        """The model to evaluate: a fresh full-width copy with its sBN statistics, from the server's
        data (drawing from the round's ``generator``) or (``sbn_source=clients``) from the users'
        sums, computed here unless given (``Federation.evaluation_model``)."""
        return self.federation.evaluation_model(state, generator, round_, user_sums)

    def evaluate(self, model: nn.Module, generator: torch.Generator) -> dict[str, float]:
        """Global and Local metrics on the server's test set (token masks from the round's ``generator``)."""
        return self.federation.workload.evaluate(model, generator)


REPLY_COUNTS = ("users_", "asked_", "replied_", "short_round")  # the names :func:`reply_counts` gives begin so


def is_reply_count(metric: str) -> bool:
    """Whether ``metric`` is one of :func:`reply_counts`' (an engine whose replies can go missing records them)."""
    return metric.startswith(REPLY_COUNTS)


def reply_counts(setup: RoundSetup, replied: Collection[int], required: str = "widest") -> dict[str, float]:
    """Who was asked and who replied, in all and per level (``asked_a``, ``replied_a``, ...), the
    sampled users skipped because their node was not connected, and ``short_round``: 1 when the
    replies fall below ``required`` (``widest``: no client of the widest level asked replied;
    ``all``: any reply missing; a number in (0, 1]: the share of replies), else 0."""
    asked = setup.tasks
    back = [task for task in asked if task.user in replied]
    counts: dict[str, float] = {"users_asked": len(asked), "users_replied": len(back),
                                "users_skipped": len(setup.skipped)}
    for level in sorted({level_of(task.rate) for task in asked}):
        counts[f"asked_{level}"] = sum(level_of(task.rate) == level for task in asked)
        counts[f"replied_{level}"] = sum(level_of(task.rate) == level for task in back)
    counts["short_round"] = float(is_short(asked, back, required))
    return counts


def is_short(asked: list[ClientTask], back: list[ClientTask], required: str) -> bool:
    """Whether the replies ``back`` of the clients ``asked`` fall below ``required`` (see :func:`reply_counts`)."""
    if not asked:
        return False
    if required == "widest":
        widest = max(task.rate for task in asked)
        return not any(task.rate == widest for task in back)
    if required == "all":
        return len(back) < len(asked)
    return len(back) < math.ceil(float(required) * len(asked))


def check_required(required: str) -> str:
    """``required`` if it is a valid reply threshold (see :func:`reply_counts`), else a ValueError naming the valid ones."""
    if required in ("widest", "all"):
        return required
    try:
        share = float(required)
    except ValueError:
        share = math.nan
    if not 0 < share <= 1:
        raise ValueError(f"bad reply threshold {required!r}; valid: widest (a client of the widest level asked must "
                         f"reply), all, or a share of the replies in (0, 1], e.g. 0.5")
    return required
