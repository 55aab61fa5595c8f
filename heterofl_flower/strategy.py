"""The server side of HeteroFL as a Flower strategy (``flwr.serverapp.strategy.Strategy``).

A thin driver of the library's server steps (heterofl_core.server.RoundSteps), the very
steps the in-process loop calls, with Flower's messages in between:

- :meth:`configure_train`: the nodes connected now (the map of partitions is refreshed every
  round, so a restarted node gets work again), the round's plan among the users they host
  (``RoundSteps.configure``: the seeded plan; with every node connected, the in-process one)
  and one ``train`` message per client, to the node hosting that user. A static width's
  clients share one packed sub-model; under rolling and random extraction each message
  carries the client's own sub-model and index sets.
- :meth:`aggregate_train`: the count rule over the clients that replied (``RoundSteps.aggregate``;
  a missing reply is a client fewer), the training metrics, and who was asked and who
  replied per level, with ``short_round`` when the replies fall below the threshold.
- :meth:`evaluate`: Global and Local metrics on the server's test set, after the sBN
  statistics: a pass over the training set (``sbn_source=server``) or the nodes' own
  passes, asked for with ``query.sbn`` and added in user order (``sbn_source=clients``).

Usable with Flower's own loop (``strategy.start(grid, arrays, rounds,
evaluate_fn=strategy.evaluate_fn(grid))``) or with the library's run folder loop
(heterofl_flower.server_app).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from heterofl_core.federated import Federation, PhaseTimer
from heterofl_core.seeds import round_generator
from heterofl_core.server import RoundSetup, RoundSteps, check_required, reply_counts
from heterofl_core.slicing import State
from heterofl_core.training import TrainStats

from .messages import PARTITION, SBN, TRAIN, DataChoice, from_record, held_record, instruction, to_record

log = logging.getLogger(__name__)


class HeteroFLStrategy(Strategy):
    """HeteroFL's server: seeded sampling among connected nodes, the round's sub-models, the count rule,
    sBN and evaluation."""

    def __init__(self, federation: Federation, data: DataChoice = DataChoice(), timeout: float | None = None,
                 required: str = "widest") -> None:
        self.federation = federation
        self.steps = RoundSteps(federation)
        self.data = data  # the nodes' data (a root for nodes whose node-config names none, the subset)
        self.timeout = timeout  # seconds to wait for replies (None: until all arrive)
        self.required = check_required(required)  # replies below this make a short round (server.reply_counts)
        self.nodes: dict[int, int] = {}  # partition -> node id, of the nodes connected
        self.parts: int | None = None  # how many partitions the users are spread over
        self.setup: RoundSetup | None = None
        self.state: State = {}
        self.record: ArrayRecord | None = None  # the record self.state was read from or packed into

    # -- training ---------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One ``train`` message per client of the round's seeded plan among the connected nodes' users."""
        federation = self.federation
        self._hold(arrays)
        self.refresh_nodes(grid)
        users = range(len(federation.fixed_levels))
        self.setup = setup = self.steps.configure(self.state, server_round,
                                                  available={u for u in users if self.hosted(u)})
        if setup.skipped:
            log.warning("round %d: users %s were sampled but their nodes are not connected; sampled users %s instead",
                        server_round, setup.skipped, setup.plan.users)
        records: dict[int, ArrayRecord] = {}  # task position -> its sub-model's record, packed once per group
        for group in setup.groups:
            records.update(dict.fromkeys(group, to_record(setup.tasks[group[0]].sub_state)))
        messages = []
        for i, task in enumerate(setup.tasks):
            fields = instruction(federation.cfg, self.data, user=task.user, rate=task.rate, round=server_round)
            content = RecordDict({"arrays": records[i], "config": fields})
            if task.holding is not None:
                content["held"] = held_record(task.holding)
            messages.append(Message(content, dst_node_id=self.node_of(task.user), message_type=TRAIN,
                                    group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """The count rule over the clients that replied, the training metrics, and who replied per level."""
        setup = self.setup
        assert setup is not None and setup.round == server_round, "configure_train first"
        device = self.federation.device
        trained: dict[int, State] = {}
        stats: dict[int, TrainStats] = {}
        for message in replies:
            if message.has_error():
                log.warning("round %d: a node failed: %s", server_round, message.error.reason)
                continue
            sums = message.content["metrics"]
            user = int(sums["user"])
            trained[user] = from_record(message.content["arrays"], device)
            stats[user] = TrainStats(torch.tensor(sums["loss_sum"], dtype=torch.float32),
                                     torch.tensor(sums["correct"], dtype=torch.float32), int(sums["count"]))
        self.state = self.steps.aggregate(self.state, setup, trained)
        self.record = to_record(self.state)
        counts = reply_counts(setup, trained, self.required)
        missing = [task.user for task in setup.tasks if task.user not in trained]
        if missing:
            log.warning("round %d: no reply from users %s%s", server_round, missing,
                        " (a short round: below the threshold %r)" % self.required if counts["short_round"] else "")
        total = self.steps.add_stats(setup, stats, device)
        return self.record, MetricRecord({**self.steps.training_metrics(setup, total, len(trained)), **counts})

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self, server_round: int, arrays: ArrayRecord, grid: Grid,
                 timer: PhaseTimer | None = None) -> MetricRecord:
        """Global and Local metrics of the global model after its sBN statistics (phases timed by ``timer``)."""
        federation = self.federation
        timer = timer or PhaseTimer(federation.device)
        self._hold(arrays)
        setup = self.setup
        generator = setup.generator if setup is not None and setup.round == server_round else \
            round_generator(federation.cfg.seed, server_round, federation.device)
        with timer.phase("sbn" if federation.uses_sbn else "eval"):
            sums = self.clients_sbn_sums(server_round, grid) if federation.uses_sbn and \
                federation.cfg.sbn_source == "clients" else None
            model = self.steps.statistics_model(self.state, server_round, generator, sums)
        with timer.phase("eval"):
            return MetricRecord(self.steps.evaluate(model, generator))

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

    def refresh_nodes(self, grid: Grid) -> None:
        """The map of partitions to the nodes connected now. The first time, every partition must be
        held (:func:`partitions`); later, nodes that left are dropped and nodes that joined are asked
        their partition: a restarted node (a new node id) takes its partition over and gets work again."""
        if self.parts is None:
            self.nodes = self.nodes or partitions(grid, self.timeout)
            self.parts = len(self.nodes)
            return
        connected = set(grid.get_node_ids())
        if gone := {part: node for part, node in self.nodes.items() if node not in connected}:
            log.warning("nodes %s (partitions %s) are no longer connected", sorted(gone.values()), sorted(gone))
        self.nodes = {part: node for part, node in self.nodes.items() if node in connected}
        for node, answer in ask_partitions(grid, connected - set(self.nodes.values()), self.timeout):
            if isinstance(answer, str):
                log.warning("node %d joined but could not say its partition: %s", node, answer)
            elif answer[1] != self.parts:
                log.warning("node %d joined with %d partitions, not this run's %d: it gets no work", node, answer[1],
                            self.parts)
            else:
                if answer[0] in self.nodes:
                    log.warning("node %d takes partition %d over from node %d", node, answer[0], self.nodes[answer[0]])
                self.nodes[answer[0]] = node

    def partition_of(self, user: int) -> int:
        """The partition hosting ``user``: ``user mod P``."""
        return user % (self.parts or len(self.nodes))

    def hosted(self, user: int) -> bool:
        """Whether the node hosting ``user`` is connected."""
        return self.partition_of(user) in self.nodes

    def node_of(self, user: int) -> int:
        """The node hosting ``user``."""
        return self.nodes[self.partition_of(user)]

    def _hold(self, arrays: ArrayRecord) -> None:
        """Make ``self.state`` the global model in ``arrays`` (unpacked only when it is not ours)."""
        if arrays is not self.record:
            self.state = from_record(arrays, self.federation.device)
            self.record = arrays


def ask_partitions(grid: Grid, nodes: Iterable[int], timeout: float | None) -> list[tuple[int, tuple[int, int] | str]]:
    """Ask ``nodes`` which partition each holds: ``(node id, (partition-id, num-partitions))``, or
    ``(node id, the error's reason)`` for a node that failed to say."""
    messages = [Message(RecordDict({}), dst_node_id=node, message_type=PARTITION) for node in nodes]
    answers: list[tuple[int, tuple[int, int] | str]] = []
    for message in grid.send_and_receive(messages, timeout=timeout) if messages else []:
        node = message.metadata.src_node_id
        if message.has_error():
            answers.append((node, message.error.reason))
        else:
            fields = message.content["partition"]
            answers.append((node, (int(fields["partition-id"]), int(fields["num-partitions"]))))
    return answers


def partitions(grid: Grid, timeout: float | None) -> dict[int, int]:
    """Ask every connected node which partition it holds: ``{partition: node id}``, checked complete."""
    found: dict[int, int] = {}
    totals = set()
    for node, answer in ask_partitions(grid, grid.get_node_ids(), timeout):
        if isinstance(answer, str):
            raise RuntimeError(f"node {node} could not say its partition: {answer}")
        part, total = answer
        if part in found:
            raise RuntimeError(f"two nodes hold partition {part}; give each node its own partition-id")
        found[part], totals = node, totals | {total}
    if not found or len(totals) != 1 or set(found) != set(range(max(totals))):
        raise RuntimeError(f"the nodes hold partitions {sorted(found)} of {sorted(totals)}; every partition "
                           f"0..N-1 of one N must be held by one node")
    return found
