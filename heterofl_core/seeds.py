"""Where every random draw of a run comes from: generators seeded by (seed, round, ...), never
torch's global state.

The server's draws of a round (the active users, dynamic levels, random extraction, the sBN
order and augmentation, the evaluation's token masks) come from one generator seeded by
(seed, round); each client's from its own, seeded by (seed, round, user). So a resumed run
continues exactly as an uninterrupted one would, and a client's result does not depend on
which other clients train, in which order or in which process.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def seed_for(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence: well mixed, the same on every platform)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def round_generator(seed: int, round_: int, device: torch.device) -> torch.Generator:
    """The server's generator for one round: the active users, dynamic levels, the sBN
    order and augmentation, and the evaluation's token masks."""
    return torch.Generator(device).manual_seed(seed_for(seed, round_, 0))


def client_generator(seed: int, round_: int, user: int, device: torch.device) -> torch.Generator:
    """One client's own generator for one round: its shuffling, augmentation, token masks and dropout."""
    return torch.Generator(device).manual_seed(seed_for(seed, round_, 1, user))


def client_sbn_generator(seed: int, round_: int, user: int, device: torch.device) -> torch.Generator:
    """One client's generator for its sBN pass of a round (``sbn_source=clients``): its order and augmentation."""
    return torch.Generator(device).manual_seed(seed_for(seed, round_, 3, user))


@contextmanager
def global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Within the block torch's global generator on ``device`` (and the CPU) starts from
    ``seed``; after it, it is back as it was. For layers that draw from it (dropout)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
