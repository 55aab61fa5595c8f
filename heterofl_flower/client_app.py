"""The node side: Flower's ``ClientApp`` whose handlers are the library's client steps.

A node (a SuperNode: one device, or one virtual node of a simulation) holds partition
``p`` of ``P`` (its ``node-config``: ``partition-id``, ``num-partitions``) and hosts the
users ``u`` with ``u mod P == p``. Its data come from its own data root (``node-config``
``data-root``; else the server's hint; else the library's rule) and the library's
seeded client split, so every node agrees with the server on who holds what. A node
downloads nothing unless its node-config says ``download=true``.

- ``train``: :meth:`Federation.local_update`: the same pure function of (sub-model, user,
  rate, round, seed) that the in-process loop runs, so its result is the same bit for bit.
- ``query.sbn``: :meth:`Federation.user_sbn_sums` for each user the node hosts.
"""

from __future__ import annotations

import json
from functools import lru_cache

from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from heterofl_core.config import ExperimentConfig
from heterofl_core.data import ImageData, TextData
from heterofl_core.datasets import load_dataset
from heterofl_core.run_cache import subset
from heterofl_core.federated import Federation, default_eval_batch_size, resolve_device

from .messages import check_held, experiment_of, from_record, reply, to_record

app = ClientApp()


@app.query("partition")
def partition(message: Message, context: Context) -> Message:
    """Which partition this node holds."""
    part, parts = node_partition(context)
    return reply(message, partition=ConfigRecord({"partition-id": part, "num-partitions": parts}))


@app.train()
def train(message: Message, context: Context) -> Message:
    """One client's local training on this node's data: the library's ``local_update``."""
    fields = message.content["config"]
    user, rate, round_ = int(fields["user"]), float(fields["rate"]), int(fields["round"])
    check_hosts(context, user)
    federation = node_federation(message, context)
    sub_state = from_record(message.content["arrays"], federation.device)
    if "held" in message.content.array_records:  # rolling, random: this client's own index sets
        check_held(sub_state, message.content["held"])
    state, stats = federation.local_update(sub_state, user, rate, round_)
    metrics = MetricRecord({"user": user, "loss_sum": stats.loss_sum.item(), "correct": stats.correct.item(),
                            "count": stats.count})
    return reply(message, arrays=to_record(state), metrics=metrics)


@app.query("sbn")
def sbn(message: Message, context: Context) -> Message:
    """Each hosted user's sBN pass over its own data, as sums (``sbn_source=clients``)."""
    federation = node_federation(message, context)
    round_ = int(message.content["config"]["round"])
    model = federation.evaluation_copy(from_record(message.content["arrays"], federation.device))
    part, parts = node_partition(context)
    users = range(part, len(federation.fixed_levels), parts)
    return reply(message, **{f"user-{user}": to_record(federation.user_sbn_sums(model, user, round_)) for user in users})


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node's config."""
    config = context.node_config
    if "partition-id" not in config or "num-partitions" not in config:
        raise ValueError(f"this node's node-config {dict(config)} lacks partition-id and num-partitions; start it "
                         f"with --node-config \"partition-id=K num-partitions=N\"")
    return int(config["partition-id"]), int(config["num-partitions"])


def check_hosts(context: Context, user: int) -> None:
    part, parts = node_partition(context)
    if user % parts != part:
        raise ValueError(f"user {user} is hosted by partition {user % parts}, not by this node ({part} of {parts})")


def node_federation(message: Message, context: Context) -> Federation:
    """The experiment's pieces on this node (built once per experiment, data and device)."""
    cfg, fields, config = experiment_of(message), message.content["config"], context.node_config
    data_root = str(config.get("data-root", "") or fields["data-root"]) or None
    return _federation(json.dumps(cfg.to_dict()), data_root, int(fields["train-samples"]), int(fields["test-samples"]),
                       str(config.get("device", "cpu")), bool(config.get("download", False)))


@lru_cache(maxsize=2)
def _federation(experiment: str, data_root: str | None, train_samples: int, test_samples: int,
                device: str, download: bool) -> Federation:
    cfg = ExperimentConfig.from_dict(json.loads(experiment))
    torch_device = resolve_device(device)
    data = experiment_data(cfg.dataset, data_root, train_samples or None, test_samples or None, download)
    return Federation.assemble(cfg, data, torch_device, default_eval_batch_size(torch_device))


def experiment_data(name: str, data_root: str | None, train_samples: int | None,
                    test_samples: int | None, download: bool = True) -> ImageData | TextData:
    """The dataset, or the seeded subset the notebooks' profiles use (the same on every node and the server)."""
    return subset(load_dataset(name, data_root, download=download), train_samples, test_samples)
