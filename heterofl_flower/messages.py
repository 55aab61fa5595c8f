"""What travels between the server and the nodes, and how it is packed (Flower's records).

Message types (Flower routes ``<category>.<action>`` to the client app's handler):

- ``query.partition``: which partition a node holds (its ``node-config``), sent once.
- ``train``: one client's round: its sub-model (under static extraction one ``ArrayRecord``
  per rate, shared by every message of that rate), the client's user, rate and round, and,
  where sub-models are not shared by rate (rolling, random), ``held``: the client's own index
  sets, which global channels each axis of each tensor holds (the node checks its sub-model
  against them). The reply holds the trained sub-model and the client's training sums.
- ``query.sbn``: the global model; the reply holds, per user the node hosts, the sums of
  its sBN pass over its own data (``sbn_source=clients``).

Every instruction carries the experiment's config as JSON, so a node needs nothing but
its data to take part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from heterofl_core.config import ExperimentConfig
from heterofl_core.slicing import Holding, State


@dataclass(frozen=True)
class DataChoice:
    """Which data an experiment uses: a data-root hint for nodes whose node-config names none, and
    the seeded subset (``run_cache.subset``; None: all of it)."""

    root: str | None = None
    train_samples: int | None = None
    test_samples: int | None = None


TRAIN = "train"
PARTITION = "query.partition"
SBN = "query.sbn"


def to_record(state: State) -> ArrayRecord:
    """A state dict as an ``ArrayRecord`` (copied to host memory)."""
    return ArrayRecord({key: value.detach().cpu() for key, value in state.items()})


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> State:
    """An ``ArrayRecord`` back as a state dict on ``device`` (writable tensors, exactly the values sent)."""
    return {key: value.clone().to(device) for key, value in record.to_torch_state_dict().items()}


def held_record(holding: dict[str, Holding]) -> ArrayRecord:
    """A client's index sets as a record: ``"<tensor>|<axis>"`` -> the global indices that axis holds."""
    return ArrayRecord({f"{key}|{axis}": index.cpu() for key, held in holding.items()
                        for axis, index in enumerate(held.index)})


def check_held(sub_state: State, held: ArrayRecord) -> None:
    """Raise ValueError unless every tensor of ``sub_state`` has the shape its index sets in ``held`` give."""
    lengths: dict[str, dict[int, int]] = {}
    for name, index in held.to_torch_state_dict().items():
        key, axis = name.rsplit("|", 1)
        lengths.setdefault(key, {})[int(axis)] = len(index)
    for key, value in sub_state.items():
        shape = [length for _, length in sorted(lengths.get(key, {}).items())]
        if list(value.shape) != shape:
            raise ValueError(f"the sub-model's {key} has shape {list(value.shape)}, but its index sets give {shape}")


def instruction(cfg: ExperimentConfig, data: DataChoice, **fields: int | float | str) -> ConfigRecord:
    """The config part of an instruction: the experiment, its data and the message's own fields."""
    return ConfigRecord({"experiment": json.dumps(cfg.to_dict()), "data-root": data.root or "",
                         "train-samples": data.train_samples or 0, "test-samples": data.test_samples or 0, **fields})


def experiment_of(message: Message) -> ExperimentConfig:
    """The experiment an instruction belongs to."""
    return ExperimentConfig.from_dict(json.loads(str(message.content["config"]["experiment"])))


def reply(message: Message, **records: object) -> Message:
    """A reply to ``message`` holding ``records`` (ArrayRecord, MetricRecord or ConfigRecord by name)."""
    return Message(RecordDict(records), reply_to=message)


def array_bytes(message: Message) -> int:
    """Bytes of the model tensors a message carries (its ArrayRecords; config and metrics are a few bytes more)."""
    return sum(record.count_bytes() for record in message.content.array_records.values()) if message.has_content() else 0
