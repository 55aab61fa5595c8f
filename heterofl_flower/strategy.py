"""The server side of HeteroFL as a Flower strategy (``flwr.serverapp.strategy.Strategy``).

It holds the experiment (:class:`~heterofl_core.federated.Federation`) and does each step
of a round with the library's code, so a round through Flower is the in-process round:

- :meth:`configure_train`: the round's plan from the run's seed (``Federation.plan_round``
  with the round's generator, not Flower's unseeded sampling); the sub-model of each rate
  (``Slicer.split``), packed once per rate; one message per client the plan trains (under
  ``participants=widest`` the others sit out and get none), to the node hosting that user.
- :meth:`aggregate_train`: the library's count rule (``aggregation.aggregate``) over the
  clients that replied, in the plan's order; a client that did not reply simply does not
  count (the rule's untouched entries keep their value).
- :meth:`evaluate`: Global and Local metrics on the server's test set, after the sBN
  statistics: a pass over the training set (``sbn_source=server``) or the nodes' own
  passes, asked for with ``query.sbn`` and added in user order (``sbn_source=clients``).

Usable with Flower's own loop (``strategy.start(grid, arrays, rounds,
evaluate_fn=strategy.evaluate_fn(grid))``) or with the library's run folder loop
(heterofl_flower.server_app).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from heterofl_core.aggregation import aggregate
from heterofl_core.federated import Federation, PhaseTimer, RoundPlan, add_states, round_generator
from heterofl_core.slicing import State
from heterofl_core.training import TrainStats, load_sbn_sums

from .messages import PARTITION, SBN, TRAIN, DataChoice, from_record, instruction, to_record

log = logging.getLogger(__name__)


class HeteroFLStrategy(Strategy):
    """HeteroFL's server: seeded sampling, one sub-model per rate, the count rule, sBN and evaluation."""

    def __init__(self, federation: Federation, data: DataChoice = DataChoice(), timeout: float | None = None) -> None:
        if federation.cfg.extraction != "static":
            raise ValueError(f"extraction={federation.cfg.extraction!r} does not run on Flower yet (one sub-model per "
                             f"rate is sent); use extraction=static, or heterofl run")
        self.federation = federation
        self.data = data  # the nodes' data (a root for nodes whose node-config names none, the subset)
        self.timeout = timeout  # seconds to wait for replies (None: until all arrive)
        self.nodes: dict[int, int] = {}  # partition -> node id
        self.plan: RoundPlan | None = None
        self.generator: torch.Generator | None = None  # the round's: sampling, then sBN and evaluation
        self.state: State = {}
        self.record: ArrayRecord | None = None  # the record self.state was read from or packed into
        self.bytes_sent: dict[float, int] = {}  # per rate: one sub-model's bytes this round

    # -- training ---------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One ``train`` message per client the round's seeded plan samples."""
        federation = self.federation
        self._hold(arrays)
        if not self.nodes:
            self.nodes = partitions(grid, self.timeout)
        self.generator = round_generator(federation.cfg.seed, server_round, federation.device)
        self.plan = federation.plan_round(server_round, self.generator)
        records = {rate: to_record(federation.slicer.split(self.state, rate)) for rate in dict.fromkeys(self.plan.rates)}
        self.bytes_sent = {rate: record.count_bytes() for rate, record in records.items()}
        messages = []
        for user, rate in zip(self.plan.users, self.plan.rates):
            fields = instruction(federation.cfg, self.data, user=user, rate=rate, round=server_round)
            content = RecordDict({"arrays": records[rate], "config": fields})
            messages.append(Message(content, dst_node_id=self.node_of(user), message_type=TRAIN,
                                    group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """The count rule over the clients that replied, in the plan's order."""
        assert self.plan is not None and self.plan.round == server_round, "configure_train first"
        federation, plan = self.federation, self.plan
        by_user: dict[int, Message] = {}
        for message in replies:
            if message.has_error():
                log.warning("round %d: a node failed: %s", server_round, message.error.reason)
            else:
                by_user[int(message.content["metrics"]["user"])] = message
        kept = [i for i, user in enumerate(plan.users) if user in by_user]
        states = [from_record(by_user[plan.users[i]].content["arrays"], federation.device) for i in kept]
        self.state = aggregate(federation.slicer, self.state, states, [plan.rates[i] for i in kept],
                               [federation.labels[plan.users[i]] for i in kept])
        self.record = to_record(self.state)
        stats = self._train_stats([by_user[plan.users[i]] for i in kept], [plan.rates[i] for i in kept])
        metrics = MetricRecord({**stats.metrics(), "lr": plan.lr, "clients_trained": len(kept),
                                "train_replies": len(kept)})
        return self.record, metrics

    def _train_stats(self, replies: list[Message], rates: list[float]) -> TrainStats:
        """The clients' sums, added as the in-process loop adds them: by width, then in plan order."""
        widths: dict[float, list[Message]] = defaultdict(list)
        for message, rate in zip(replies, rates):
            widths[rate].append(message)
        stats = TrainStats.zero(self.federation.device)
        for members in widths.values():
            for message in members:
                sums = message.content["metrics"]
                stats = stats.add(TrainStats(torch.tensor(sums["loss_sum"], dtype=torch.float32),
                                             torch.tensor(sums["correct"], dtype=torch.float32), int(sums["count"])))
        return stats

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, server_round: int, arrays: ArrayRecord, grid: Grid,
                 timer: PhaseTimer | None = None) -> MetricRecord:
        """Global and Local metrics of the global model after its sBN statistics (phases timed by ``timer``)."""
        federation = self.federation
        timer = timer or PhaseTimer(federation.device)
        self._hold(arrays)
        generator = self.generator if self.plan is not None and self.plan.round == server_round else \
            round_generator(federation.cfg.seed, server_round, federation.device)
        with timer.phase("sbn" if federation.uses_sbn else "eval"):
            if federation.uses_sbn and federation.cfg.sbn_source == "clients":
                model = federation.evaluation_copy(self.state)
                load_sbn_sums(model, add_states(self.clients_sbn_sums(server_round, grid)))
            else:
                model = federation.evaluation_model(self.state, generator, server_round)
        with timer.phase("eval"):
            return MetricRecord(federation.workload.evaluate(model, generator))

    def evaluate_fn(self, grid: Grid) -> Callable[[int, ArrayRecord], MetricRecord]:
        """:meth:`evaluate` as the ``evaluate_fn`` of Flower's ``Strategy.start``."""
        return lambda server_round, arrays: self.evaluate(server_round, arrays, grid)

    def clients_sbn_sums(self, server_round: int, grid: Grid) -> list[State]:
        """Every user's sBN sums from the nodes that host them, in user order."""
        federation = self.federation
        fields = instruction(federation.cfg, self.data, round=server_round)
        messages = [Message(RecordDict({"arrays": self.record, "config": fields}), dst_node_id=node, message_type=SBN,
                            group_id=str(server_round)) for node in self.nodes.values()]
        by_user: dict[int, State] = {}
        for message in grid.send_and_receive(messages, timeout=self.timeout):
            if message.has_error():
                log.warning("round %d: a node's sBN pass failed: %s", server_round, message.error.reason)
                continue
            for name, sums in message.content.array_records.items():
                by_user[int(name.removeprefix("user-"))] = from_record(sums, federation.device)
        if not by_user:
            raise RuntimeError(f"round {server_round}: no node returned sBN statistics")
        return [by_user[user] for user in sorted(by_user)]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """None: the paper evaluates on the server (:meth:`evaluate`)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        cfg = self.federation.cfg
        log.info("HeteroFL: %s %s, %d users, %d per round, sBN from the %s", cfg.dataset, cfg.control,
                 len(self.federation.fixed_levels), cfg.active_users, cfg.sbn_source)

    # -- nodes ------------------------------------------------------------------------------

    def node_of(self, user: int) -> int:
        """The node hosting ``user``: partition ``user mod P``."""
        return self.nodes[user % len(self.nodes)]

    def _hold(self, arrays: ArrayRecord) -> None:
        """Make ``self.state`` the global model in ``arrays`` (unpacked only when it is not ours)."""
        if arrays is not self.record:
            self.state = from_record(arrays, self.federation.device)
            self.record = arrays


def partitions(grid: Grid, timeout: float | None) -> dict[int, int]:
    """Ask every connected node which partition it holds: ``{partition: node id}``, checked complete."""
    messages = [Message(RecordDict({}), dst_node_id=node, message_type=PARTITION) for node in grid.get_node_ids()]
    found: dict[int, int] = {}
    totals = set()
    for message in grid.send_and_receive(messages, timeout=timeout):
        if message.has_error():
            raise RuntimeError(f"node {message.metadata.src_node_id} could not say its partition: "
                               f"{message.error.reason}")
        fields = message.content["partition"]
        part, total = int(fields["partition-id"]), int(fields["num-partitions"])
        if part in found:
            raise RuntimeError(f"two nodes hold partition {part}; give each node its own partition-id")
        found[part], totals = message.metadata.src_node_id, totals | {total}
    if not found or len(totals) != 1 or set(found) != set(range(max(totals))):
        raise RuntimeError(f"the nodes hold partitions {sorted(found)} of {sorted(totals)}; every partition "
                           f"0..N-1 of one N must be held by one node")
    return found
