"""Evaluation, sBN statistics, the learning-rate schedule and local training, each against a plain reference.

The references are deliberately slow and literal: a loop over users with
``masked_fill`` + ``F.cross_entropy``, ``torch.logsumexp`` over masked logits,
per-batch BN statistics averaged by hand, ``MultiStepLR`` itself, and SGD with
momentum, weight decay and clipping written out step by step.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heterofl_core import training
from heterofl_core.config import ExperimentConfig, parse_control
from heterofl_core.data import TextData
from heterofl_core.evaluation import global_chance, image_metrics, local_chance, masked_log_partition, perplexity_summary, text_window_metrics
from heterofl_core.families import model_builder
from heterofl_core.splits import split_clients
from heterofl_core.training import sbn_statistics, scheduled_lr, train_client
from heterofl_core.workloads import TextWorkload
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

FILL_VALUES = {"zero": 0.0, "-inf": float("-inf")}


# ---------------------------------------------------------------- image metrics


def reference_image_metrics(logits, target, user_index, user_masks, fill):
    """Per user: its test samples, its masked logits, argmax and summed CE; then sample-weighted means."""
    loss_sum, correct, count = 0.0, 0, 0
    for index, mask in zip(user_index, user_masks):
        masked = logits[index].masked_fill(~mask, FILL_VALUES[fill])
        loss_sum += F.cross_entropy(masked, target[index], reduction="sum").item()
        correct += (masked.argmax(1) == target[index]).sum().item()
        count += len(index)
    return {
        "global_loss": F.cross_entropy(logits, target).item(),
        "global_accuracy": 100.0 * (logits.argmax(1) == target).float().mean().item(),
        "local_loss": loss_sum / count,
        "local_accuracy": 100.0 * correct / count,
    }


@pytest.mark.parametrize("fill", ["zero", "-inf"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_a_loop_over_users(fill, seed):
    g = torch.Generator().manual_seed(seed)
    n, classes, users = 60, 10, 5
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 3
    target = torch.randint(classes, (n,), generator=g)
    sizes = [20, 3, 12, 7, 18]  # unequal: the Local mean must weight users by their sample counts
    order = torch.randperm(n, generator=g)
    user_index = list(order.split(sizes))
    user_masks = torch.rand(users, classes, generator=g) < 0.4
    for u, index in enumerate(user_index):  # every user holds its test labels (else -inf gives inf loss) ...
        user_masks[u, target[index]] = True
    user_masks[1] = True  # ... and one user holds every class
    got = image_metrics(logits, target, user_index, user_masks, fill)
    expected = reference_image_metrics(logits, target, user_index, user_masks, fill)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-6), key  # accuracies are float32 means
    # the mask matters: with fill zero, hiding classes changes the Local numbers here
    assert got["local_loss"] != pytest.approx(got["global_loss"], rel=1e-6)


def test_global_chance_is_always_guessing_the_most_frequent_class():
    assert global_chance(torch.tensor([3, 3, 1, 0])) == pytest.approx(50.0)
    assert global_chance(torch.arange(10).repeat(7)) == pytest.approx(10.0)


def test_local_chance_is_uniform_guessing_among_each_users_classes():
    masks = torch.zeros(3, 10, dtype=torch.bool)
    masks[0, [1, 2]] = masks[1, [3, 4]] = True
    masks[2] = True  # an iid user holds every class
    assert local_chance(masks[:2], [30, 70]) == pytest.approx(50.0), "two classes per user: 50 %"
    assert local_chance(masks, [50, 50, 100]) == pytest.approx((50 / 2 + 50 / 2 + 100 / 10) / 200 * 100)
    assert local_chance(masks[2:], [7]) == pytest.approx(10.0)


def test_image_metrics_fill_zero_can_still_pick_an_absent_class():
    """With fill 0 (the authors' choice) an absent class has logit 0, which beats negative held logits."""
    logits = torch.tensor([[-2.0, -3.0, 5.0]])
    target = torch.tensor([0])
    mask = torch.tensor([[True, True, False]])
    zero = image_metrics(logits, target, [torch.tensor([0])], mask, "zero")
    minus_inf = image_metrics(logits, target, [torch.tensor([0])], mask, "-inf")
    assert zero["local_accuracy"] == 0.0 and minus_inf["local_accuracy"] == 100.0
    assert zero["local_loss"] == pytest.approx(torch.logsumexp(torch.tensor([-2.0, -3.0, 0.0]), 0).item() + 2.0)
    assert minus_inf["local_loss"] == pytest.approx(torch.logsumexp(torch.tensor([-2.0, -3.0]), 0).item() + 2.0)


# ---------------------------------------------------------------- text: masked log-partition and window losses


def brute_log_partition(logits, masks, fill):
    """(U, P): torch.logsumexp of each user's masked logits."""
    return torch.stack([torch.logsumexp(logits.masked_fill(~mask, FILL_VALUES[fill]), dim=1) for mask in masks])


def random_masks(users: int, vocab: int, g: torch.Generator) -> torch.Tensor:
    masks = torch.rand(users, vocab, generator=g) < 0.5
    masks[0] = True  # holds every token
    masks[1] = False
    masks[1, 3] = True  # holds a single token
    masks[:, 0] = True  # every user holds token 0 (the -inf fill needs one held token per row)
    return masks


@pytest.mark.parametrize("fill", ["zero", "-inf"])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_masked_log_partition_matches_logsumexp(fill, scale):
    g = torch.Generator().manual_seed(int(scale))
    positions, vocab, users = 40, 17, 6
    logits = torch.randn(positions, vocab, generator=g) * scale
    logits[::3, 5] = 80.0  # large logits, held by some users and not by others
    logits[1::4, 0] = -80.0
    logits[2] = 80.0  # a whole row of large logits
    masks = random_masks(users, vocab, g)
    got = masked_log_partition(logits, masks, fill)
    assert got.shape == (users, positions) and torch.isfinite(got).all()
    torch.testing.assert_close(got, brute_log_partition(logits, masks, fill), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fill", ["zero", "-inf"])
def test_masked_log_partition_is_stable_far_from_the_row_max(fill):
    logits = torch.zeros(2, 6)
    logits[0, 5] = 120.0  # the row max lies in a class the user does not hold
    logits[1] = -200.0  # every logit very negative
    masks = torch.tensor([[True, True, True, False, False, False]])
    got = masked_log_partition(logits, masks, fill)
    expected = brute_log_partition(logits, masks, fill)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def brute_window_metrics(logits, target, masks, fill):
    flat, labels = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    global_loss = F.cross_entropy(flat, labels)
    local = torch.stack([F.cross_entropy(flat.masked_fill(~mask, FILL_VALUES[fill]), labels) for mask in masks])
    return global_loss, local


@pytest.mark.parametrize("fill", ["zero", "-inf"])
def test_text_window_metrics_match_masked_cross_entropy(fill):
    g = torch.Generator().manual_seed(3)
    rows, seq, vocab, users = 3, 5, 13, 5
    logits = torch.randn(rows, seq, vocab, generator=g) * 4
    logits[0, :, 7] = 80.0  # large logits
    target = torch.randint(vocab, (rows, seq), generator=g)
    masks = random_masks(users, vocab, g)
    if fill == "-inf":  # a user that lacks a target token has an infinite loss; keep the comparison finite
        masks[:, target.flatten()] = True
    else:  # with fill zero, targets outside a user's mask are scored against logit 0
        masks[2, target[1, 2]] = False
    global_loss, local_loss = text_window_metrics(logits, target, masks, fill)
    expected_global, expected_local = brute_window_metrics(logits, target, masks, fill)
    assert local_loss.shape == (users,)
    torch.testing.assert_close(global_loss, expected_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(local_loss, expected_local, rtol=1e-5, atol=1e-4)


def test_text_window_metrics_absent_target_with_minus_inf_fill_is_infinite():
    logits = torch.zeros(1, 2, 4)
    target = torch.tensor([[0, 3]])
    masks = torch.tensor([[True, True, True, True], [True, True, False, False]])
    _, local = text_window_metrics(logits, target, masks, "-inf")
    assert torch.isfinite(local[0]) and local[1] == float("inf")


def test_perplexity_summary_is_mean_of_exp_of_window_losses():
    g = torch.Generator().manual_seed(0)
    global_losses = [torch.rand((), generator=g) * 3 for _ in range(7)]
    local_losses = [torch.rand(4, generator=g) * 3 for _ in range(7)]
    got = perplexity_summary(global_losses, local_losses)
    gl = [x.item() for x in global_losses]
    ll = [x.item() for row in local_losses for x in row]
    exp = torch.tensor(gl).exp().tolist(), torch.tensor(ll).exp().tolist()
    assert got["global_loss"] == pytest.approx(sum(gl) / len(gl), rel=1e-6)
    assert got["local_loss"] == pytest.approx(sum(ll) / len(ll), rel=1e-6)
    assert got["global_perplexity"] == pytest.approx(sum(exp[0]) / len(exp[0]), rel=1e-6)
    assert got["local_perplexity"] == pytest.approx(sum(exp[1]) / len(exp[1]), rel=1e-6)
    # the authors' perplexity is a mean of exp, not exp of the mean loss
    assert got["global_perplexity"] > torch.tensor(gl).mean().exp().item()


# ---------------------------------------------------------------- text workload evaluation (batched windows)


def tiny_text_data(vocab: int = 20, n_train: int = 400, n_test: int = 157) -> TextData:
    g = torch.Generator().manual_seed(0)
    train = torch.cat([torch.arange(vocab), torch.randint(vocab, (n_train - vocab,), generator=g)])
    test = torch.randint(vocab, (n_test,), generator=g)
    return TextData("toy", "memory", [f"w{i}" for i in range(vocab)], train, test[:50], test)


@pytest.mark.parametrize("eval_batch_size", [1, 10 * 8 * 2, 10_000])
def test_text_evaluate_matches_a_loop_over_windows(eval_batch_size):
    """No token masking (rate 0) and eval mode: Global/Local perplexity from one window at a time."""
    data = tiny_text_data()
    cfg = parse_control("1_4_1_iid_fix_a1_bn_1_1", "SOTU", bptt=8, embedding_size=16, hidden_size=32,
                        num_layers=1, token_mask_rate=0.0, batch_size_test=10)
    split = split_clients(data, "iid", cfg.num_users, cfg.seed)
    workload = TextWorkload(data, split, cfg, eval_batch_size)
    torch.manual_seed(0)
    model = model_builder(cfg, data.vocab_size)(1.0).eval()
    got = workload.evaluate(model, torch.Generator().manual_seed(0))

    rows = data.test[: len(data.test) // 10 * 10].view(10, -1)  # (10, 15): windows of 8 and a last one of 7
    global_losses, local_losses = [], []
    with torch.no_grad():
        for window in rows.split(cfg.bptt, dim=1):
            logits = model(window)
            g, l = brute_window_metrics(logits, window, workload.user_masks, cfg.mask_fill)
            global_losses.append(g)
            local_losses.append(l)
    assert len(global_losses) == 2 and rows.shape[1] == 15
    g, l = torch.stack(global_losses), torch.stack(local_losses)
    assert got["global_loss"] == pytest.approx(g.mean().item(), rel=1e-5)
    assert got["global_perplexity"] == pytest.approx(g.exp().mean().item(), rel=1e-5)
    assert got["local_loss"] == pytest.approx(l.mean().item(), rel=1e-5)
    assert got["local_perplexity"] == pytest.approx(l.exp().mean().item(), rel=1e-5)


# ---------------------------------------------------------------- sBN statistics


class TinyBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn1 = nn.BatchNorm2d(3, momentum=None, track_running_stats=True)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, momentum=None, track_running_stats=True)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))).mean((2, 3))


def reference_sbn(model: TinyBNNet, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per batch: batch mean and unbiased variance at each BN's input; running stats = their plain average."""
    stats = {name: ([], []) for name in ("bn1", "bn2")}
    with torch.no_grad():
        for x in batches:
            h = model.conv1(x)
            stats["bn1"][0].append(h.mean((0, 2, 3)))
            stats["bn1"][1].append(h.var((0, 2, 3), unbiased=True))
            h = F.batch_norm(h, None, None, model.bn1.weight, model.bn1.bias, training=True)
            h = model.conv2(torch.relu(h))
            stats["bn2"][0].append(h.mean((0, 2, 3)))
            stats["bn2"][1].append(h.var((0, 2, 3), unbiased=True))
    return {f"{name}.running_{kind}": torch.stack(values).mean(0)
            for name, (means, variances) in stats.items() for kind, values in (("mean", means), ("var", variances))}


def make_batches(seed: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=g) * (1 + seed) + seed for n in sizes]


def test_sbn_statistics_are_the_cumulative_average_of_batch_statistics():
    torch.manual_seed(0)
    model = TinyBNNet().double()
    with torch.no_grad():  # affine parameters away from 1/0 so bn1's output depends on them
        model.bn1.weight.uniform_(0.5, 2.0)
        model.bn1.bias.uniform_(-1.0, 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [x.double() for x in make_batches(1, (5, 3, 8, 2))]  # unequal batch sizes
    out = sbn_statistics(model, iter(batches))
    assert out is model or isinstance(out, TinyBNNet)
    assert not out.training and not any(m.training for m in out.modules()), "returned in eval mode"
    state = out.state_dict()
    for key, expected in reference_sbn(model, batches).items():
        torch.testing.assert_close(state[key], expected, rtol=1e-10, atol=1e-12, msg=key)
    assert state["bn1.num_batches_tracked"].item() == len(batches)
    for key, value in before.items():  # the pass changes no parameter
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("chunks, batch", [((25, 13), 5), ((12,), 5), ((4,), 5)])
def test_sbn_statistics_of_ghost_batches_equal_feeding_the_batches_one_by_one(chunks, batch):
    """Large chunks of whole batches (and a chunk's smaller last batch) give the statistics of the
    authors' loop over batches of ``batch``."""
    torch.manual_seed(0)
    model = TinyBNNet().double()
    with torch.no_grad():
        model.bn1.weight.uniform_(0.5, 2.0)
        model.bn1.bias.uniform_(-1.0, 1.0)
    inputs = [x.double() for x in make_batches(3, chunks)]
    batches = [b for x in inputs for b in x.split(batch)]
    state = sbn_statistics(model, iter(inputs), batch).state_dict()
    for key, expected in reference_sbn(model, batches).items():
        torch.testing.assert_close(state[key], expected, rtol=1e-10, atol=1e-12, msg=key)
    assert state["bn2.num_batches_tracked"].item() == len(batches)
    assert "forward" not in vars(model.bn1), "the ghost-batch forward is removed afterwards"


def test_sbn_statistics_do_not_leak_from_an_earlier_pass():
    torch.manual_seed(0)
    model = TinyBNNet()
    first, second = make_batches(1, (6, 6)), make_batches(2, (4, 7, 3))
    sbn_statistics(model, first)
    again = sbn_statistics(model, second)
    fresh = sbn_statistics(copy.deepcopy(model), second)
    for key, value in fresh.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    expected = reference_sbn(model, second)
    torch.testing.assert_close(again.state_dict()["bn2.running_var"], expected["bn2.running_var"])


# ---------------------------------------------------------------- learning-rate schedule


@pytest.mark.parametrize("lr, milestones", [(0.01, (100,)), (0.1, (150, 250)), (0.1, (50, 100)), (0.5, ())])
def test_scheduled_lr_matches_multisteplr_stepped_once_per_round(lr, milestones):
    cfg = ExperimentConfig(lr=lr, milestones=milestones, gamma=0.1)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
    for round_ in range(1, 401):  # round r trains at the lr after r - 1 scheduler steps
        assert scheduled_lr(cfg, round_) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), round_
        optimizer.step()
        scheduler.step()
    if milestones:
        assert scheduled_lr(cfg, milestones[0]) == lr and scheduled_lr(cfg, milestones[0] + 1) == pytest.approx(lr * 0.1)


# ---------------------------------------------------------------- local training


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()


def tiny_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sizes = (4, 4, 3)  # the last batch smaller, as DataLoader gives it
    return [(torch.randn(n, 6, generator=g, dtype=torch.float64) * 5, torch.randint(5, (n,), generator=g)) for n in sizes]


def reference_train(model: nn.Module, batches, mask, fill, cfg: ExperimentConfig, lr: float) -> list[float]:
    """SGD written out: masked CE, clip the total grad norm, add weight decay, momentum, step. Returns pre-clip norms."""
    params = list(model.parameters())
    buffers: list[torch.Tensor | None] = [None] * len(params)
    norms = []
    for _ in range(cfg.local_epochs):
        for x, y in batches:
            logits = model(x)
            if mask is not None:
                logits = logits.masked_fill(~mask, FILL_VALUES[fill])
            grads = torch.autograd.grad(F.cross_entropy(logits, y), params)
            norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
            norms.append(norm.item())
            coef = min(1.0, cfg.clip_norm / (norm.item() + 1e-6))
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads)):
                    d = g * coef + cfg.weight_decay * p
                    buffers[i] = d.clone() if buffers[i] is None else cfg.momentum * buffers[i] + d
                    p -= lr * buffers[i]
    return norms


@pytest.mark.parametrize("masked", [False, True])
def test_train_client_matches_plain_sgd_with_momentum_decay_and_clipping(monkeypatch, masked):
    cfg = ExperimentConfig(local_epochs=2, clip_norm=0.5, momentum=0.9, weight_decay=5e-4)
    mask = torch.tensor([True, False, True, True, False]) if masked else None
    batches = tiny_batches()
    model, reference = tiny_classifier(), tiny_classifier()
    norms = reference_train(reference, batches, mask, "zero", cfg, lr=0.3)

    seen = []  # grad norm of every step, as the SGD update sees it
    real_sgd = training.sgd

    def recording_sgd(params, grads, *args, **kwargs):
        seen.append(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
        return real_sgd(params, grads, *args, **kwargs)

    monkeypatch.setattr(training, "sgd", recording_sgd)
    stats = train_client(model, lambda: iter(batches), mask, cfg, lr=0.3)
    assert len(seen) == len(norms) == cfg.local_epochs * len(batches)
    assert max(norms) > cfg.clip_norm, "the test must exercise clipping"
    assert all(n <= cfg.clip_norm * (1 + 1e-6) for n in seen)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    assert stats.count == cfg.local_epochs * sum(len(y) for _, y in batches)


def test_train_client_with_lr_zero_leaves_the_state_unchanged():
    cfg = parse_control("1_10_0.5_iid_fix_a1_bn_1_1", "MNIST", local_epochs=2)
    torch.manual_seed(0)
    model = model_builder(cfg, 10)(0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(10, 1, 28, 28, generator=g), torch.randint(10, (10,), generator=g)) for _ in range(2)]
    stats = train_client(model, lambda: iter(batches), torch.ones(10, dtype=torch.bool), cfg, lr=0.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert stats.count == 40 and torch.isfinite(stats.loss_sum)


def test_train_client_stats_are_sums_over_steps():
    cfg = ExperimentConfig(local_epochs=1, clip_norm=1.0)
    batches = tiny_batches(1)
    model = tiny_classifier(1)
    probe = copy.deepcopy(model)
    stats = train_client(model, lambda: iter(batches), None, cfg, lr=0.0)  # lr 0: every step sees the same model
    with torch.no_grad():
        loss = sum(F.cross_entropy(probe(x), y, reduction="sum").item() for x, y in batches)
        correct = sum((probe(x).argmax(1) == y).sum().item() for x, y in batches)
    assert stats.loss_sum.item() == pytest.approx(loss, rel=1e-9)
    assert stats.correct.item() == correct and stats.count == sum(len(y) for _, y in batches)
