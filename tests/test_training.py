"""Local training: the one local step equals torch.optim.SGD after nn.utils.clip_grad_norm_ (the
authors' optimiser), for every option; sBN ghost batches need no patched forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from heterofl_core.config import parse_control
from heterofl_core.losses import cross_entropy, label_mask
from heterofl_core.models.layers import StaticBatchNorm2d
from heterofl_core.training import clip_grad_norms_, train_client
from reference import TINY, builder
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

OPTIONS = [dict(momentum=0.9, weight_decay=5e-4, clip_norm=1.0), dict(momentum=0.0, weight_decay=0.0, clip_norm=1e9),
           dict(momentum=0.9, weight_decay=0.0, clip_norm=0.05), dict(momentum=0.0, weight_decay=1e-2, clip_norm=0.5)]


def reference_training(model: nn.Module, batches, mask, cfg, lr: float) -> None:
    """The authors' loop: a fresh torch.optim.SGD, backward, clip_grad_norm_, step."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for x, y in batches:
        loss = cross_entropy(model(x), y, mask, cfg.mask_fill)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        optimizer.step()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("family", ["conv", "transformer"])
def test_train_client_equals_torch_optim_sgd_after_clipping(family, options):
    cfg = parse_control("1_100_0.1_iid_fix_a1-e1_bn_1_1", "MNIST", lr=0.2, local_epochs=1, **options)
    torch.manual_seed(0)
    model = builder(family, **{**TINY[family], **({"dropout": 0.0} if family == "transformer" else {})})(0.5)
    if family == "transformer":  # no dropout: both loops must see the same forward passes
        vocab = model.vocab_size
        batches = [(torch.randint(0, vocab, (2, 6)),) * 2 for _ in range(3)]
        mask = label_mask(torch.arange(vocab // 2), vocab)
    else:
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(4, 1, 28, 28, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(3)]
        mask = label_mask(torch.tensor([1, 3, 4, 7]), 10)
    expected = copy.deepcopy(model)
    reference_training(expected, batches, mask, cfg, cfg.lr)
    stats = train_client(model, lambda: iter(batches), mask, cfg, cfg.lr)
    assert stats.count == sum(y.numel() for _, y in batches)
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_clip_per_client_clips_each_client_by_its_own_norm():
    torch.manual_seed(0)
    grads = [torch.randn(3, 4, 5), torch.randn(3, 7)]
    grads[0][1] *= 100  # client 1 is far above the limit, the others below
    expected = []
    for k in range(3):
        mine = [g[k].clone() for g in grads]
        nn.utils.clip_grad_norm_([nn.Parameter(torch.zeros_like(g)) for g in mine], 10.0)  # norms only
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in mine]))
        expected.append([g * min(1.0, 10.0 / (norm.item() + 1e-6)) for g in mine])
    clip_grad_norms_(grads, 10.0, per_client=True)
    for k in range(3):
        for got, want in zip((g[k] for g in grads), expected[k]):
            torch.testing.assert_close(got, want)
    assert torch.linalg.vector_norm(torch.cat([g[1].flatten() for g in grads])) == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize("native_out", [True, False], ids=["aten-out-kernel", "public-fallback"])
def test_ghost_batches_of_a_static_batchnorm_equal_the_batches_one_by_one(native_out):
    """StaticBatchNorm2d's ghost-batch forward, through the private out= kernel and through the
    public F.batch_norm: outputs and statistics of feeding the batches one by one."""
    torch.manual_seed(0)
    ghost, plain = StaticBatchNorm2d(3).double(), StaticBatchNorm2d(3).double()
    ghost.native_out = native_out
    x = torch.randn(23, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ghost.ghost_batch = 5
    with torch.no_grad():  # as in the sBN pass
        out = ghost(x)
        expected = torch.cat([plain(part) for part in x.split(5)])
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last), "keeps the channels-last layout"
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[key], value, msg=key)
    assert int(ghost.num_batches_tracked) == 5
    assert "forward" not in vars(ghost)
    assert StaticBatchNorm2d.native_out, "this torch has the out= kernel the fast path uses"
