"""A grid in one process: Flower's ``Grid`` interface over client apps called directly.

For tests, teaching and inspection, not speed: each message is handed to the ``ClientApp``
with its node's ``Context`` (``node-config``: ``partition-id``, ``num-partitions``), as a
SuperNode would, and the reply comes straight back. :attr:`LocalGrid.traffic` records
every message's type, destination and model bytes both ways; ``lost`` can drop chosen
replies (a node that never answers) to exercise rounds where only some nodes reply, and
:meth:`LocalGrid.disconnect` / :meth:`LocalGrid.connect` take a node away and bring one
back under a new id, as a SuperNode that dies and is restarted.

Use it as a context manager: inside, the process has the task identity a Flower runtime
gives its ServerApp (run id, node id), which building a ``Message`` needs; on exit the
previous identity is back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from .messages import array_bytes


@dataclass(frozen=True)
class Delivery:
    """One message and its reply, as the grid carried them."""

    message_type: str
    node: int
    partition: int
    group: str
    sent_bytes: int  # model bytes to the node
    received_bytes: int  # model bytes back (0 when the reply was lost)


class LocalGrid(Grid):
    """``nodes`` nodes (ids 1..N, partition i on node i + 1), each running ``client_app``."""

    def __init__(self, client_app: ClientApp, nodes: int, node_config: dict[str, object] | None = None,
                 lost: Callable[[Message], bool] | None = None) -> None:
        self.client_app, self.lost = client_app, lost
        self.nodes, self.node_config = nodes, node_config or {}
        self.contexts: dict[int, Context] = {}
        for part in range(nodes):
            self.connect(part)
        self.traffic: list[Delivery] = []
        self._run = None
        self._outer: tuple[object, object, object] | None = None

    def connect(self, partition: int) -> int:
        """A node holding ``partition`` joins under a new id (ids count up from 1); its id."""
        node = max(self.contexts, default=0) + 1
        self.contexts[node] = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                      node_config={"partition-id": partition, "num-partitions": self.nodes,
                                                   **self.node_config})
        return node

    def disconnect(self, node: int) -> None:
        """Node ``node`` leaves: it is no longer listed, and a message to it gets an error reply."""
        del self.contexts[node]

    def __enter__(self) -> LocalGrid:
        self._outer = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # the server's, as a runtime sets it
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._outer is not None
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = self._outer  # type: ignore[assignment]

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self._run = run

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers at once: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers at once: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Each message handed to its node's client app, in order; the replies that were not lost."""
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            context = self.contexts.get(node)
            if context is None:  # as the SuperLink answers for a node that went offline
                answer = Message(Error(ErrorCode.NODE_UNAVAILABLE, f"node {node} is offline"), reply_to=message)
            else:
                try:
                    answer = self.client_app(message, context)
                except Exception as error:  # as a SuperNode does: the server gets an error reply
                    reason = f"{type(error).__name__}: {error}"
                    answer = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
            lost = self.lost is not None and self.lost(message)
            partition = int(context.node_config.get("partition-id", -1)) if context is not None else -1
            self.traffic.append(Delivery(message.metadata.message_type, node, partition, message.metadata.group_id,
                                         array_bytes(message), 0 if lost or context is None else array_bytes(answer)))
            if not lost:
                replies.append(answer)
        return replies
