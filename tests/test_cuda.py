"""Split, aggregation and one local training step on the GPU give the CPU's results, and stay on the GPU."""

from __future__ import annotations

import pytest
import torch

from heterofl_core.aggregation import aggregate
from heterofl_core.config import parse_control
from heterofl_core.workloads import augment_batch
from heterofl_core.losses import cross_entropy, label_mask
from heterofl_core.training import train_client
from reference import (FAMILIES, RATES, TINY, builder, num_classes, random_labels, random_state_like, shapes_at,
                       slicer_for)
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CPU = torch.device("cpu")
TOL = dict(rtol=1e-3, atol=1e-4)


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 on the GPU while comparing with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def options(family: str) -> dict:
    return {"dropout": 0.0} if family == "transformer" else {}


def batch(family: str, labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch (on the CPU) whose targets are among the client's labels."""
    if family == "transformer":
        tokens = labels[torch.randint(0, len(labels), (2, 16), generator=gen)]
        return tokens, tokens
    x = torch.randn(4, 1, 28, 28, generator=gen) if family == "conv" else torch.randn(4, 3, 32, 32, generator=gen)
    return x, labels[torch.randint(0, len(labels), (4,), generator=gen)]


def one_round(family: str, device: torch.device, seed: int = 0):
    """Split to one client per level, one SGD step each with masked cross-entropy, aggregate."""
    build, slicer = builder(family, **options(family)), slicer_for(family, **options(family))
    torch.manual_seed(seed)
    global_state = {k: v.to(device) for k, v in build(1.0).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    splits, trained, label_sets = [], [], []
    for rate in RATES:
        labels = random_labels(num_classes(family), gen)
        labels = labels if len(labels) else torch.tensor([0])
        sub = slicer.split(global_state, rate)
        model = build(rate).to(device)
        model.load_state_dict(sub, strict=True)
        x, y = batch(family, labels, gen)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        loss = cross_entropy(model(x.to(device)), y.to(device), label_mask(labels.to(device), num_classes(family)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        splits.append(sub)
        trained.append({k: v.detach() for k, v in model.state_dict().items()})
        label_sets.append(labels.to(device))
    new_state = aggregate(slicer, global_state, trained, list(RATES), label_sets)
    return splits, trained, new_state


def assert_on(state: dict, device_type: str) -> None:
    assert all(v.device.type == device_type for v in state.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_split_on_gpu_equals_cpu(family):
    slicer = slicer_for(family)
    gen = torch.Generator().manual_seed(1)
    state = random_state_like(shapes_at(family, 1.0), gen)
    gpu_state = {k: v.cuda() for k, v in state.items()}
    for rate in RATES:
        on_gpu = slicer.split(gpu_state, rate)
        assert_on(on_gpu, "cuda")
        on_cpu = slicer.split(state, rate)
        assert all(torch.equal(on_gpu[k].cpu(), on_cpu[k]) for k in on_cpu)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aggregate_on_gpu_equals_cpu(family, dtype):
    gen = torch.Generator().manual_seed(2)
    rates = [1.0, 0.5, 0.25, 0.0625, 0.0625]
    old = random_state_like(shapes_at(family, 1.0), gen, dtype)
    clients = [random_state_like(shapes_at(family, r), gen, dtype) for r in rates]
    labels = [random_labels(num_classes(family), gen) for _ in rates]
    on_cpu = aggregate(slicer_for(family), old, clients, rates, labels)
    to_gpu = lambda s: {k: v.cuda() for k, v in s.items()}  # noqa: E731
    on_gpu = aggregate(slicer_for(family), to_gpu(old), [to_gpu(c) for c in clients], rates,
                       [l.cuda() for l in labels])
    assert_on(on_gpu, "cuda")
    for key in on_cpu:
        assert on_gpu[key].dtype == dtype
        torch.testing.assert_close(on_gpu[key].cpu(), on_cpu[key], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_round_on_gpu_equals_cpu(family):
    cpu_splits, cpu_trained, cpu_new = one_round(family, CPU)
    gpu_splits, gpu_trained, gpu_new = one_round(family, torch.device("cuda"))
    for cpu_state, gpu_state in zip(cpu_splits + cpu_trained + [cpu_new], gpu_splits + gpu_trained + [gpu_new]):
        assert_on(gpu_state, "cuda")
        assert set(cpu_state) == set(gpu_state)
        for key in cpu_state:
            torch.testing.assert_close(gpu_state[key].cpu(), cpu_state[key], **TOL)
    # the round did something: the trained states differ from their splits
    assert any(not torch.equal(cpu_trained[0][k], cpu_splits[0][k]) for k in cpu_trained[0])



def test_local_training_with_augmentation_never_waits_for_the_gpu():
    """Batches drawn and augmented on the GPU, masked loss, clipping, SGD: no step copies to the host."""
    device = torch.device("cuda")
    cfg = parse_control("1_100_0.1_iid_fix_a1-e1_bn_1_1", "CIFAR10", local_epochs=2)
    model = builder("resnet18", **TINY["resnet18"])(0.25).to(device)
    gen = torch.Generator(device).manual_seed(0)
    images, targets = torch.randn(30, 3, 32, 32, device=device), torch.randint(0, 10, (30,), device=device)

    def batches():
        order = torch.randperm(len(targets), generator=gen, device=device)
        return ((augment_batch(images[i], (0.0, 0.0, 0.0), gen), targets[i]) for i in order.split(10))

    mask = label_mask(torch.arange(5, device=device), 10)
    train_client(model, batches, mask, cfg, 0.1)  # warm-up: cuDNN plans, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = train_client(model, batches, mask, cfg, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.count == 60 and stats.loss_sum.device.type == "cuda"
