"""``heterofl bench``: where a federated round's time goes on this machine, against baselines.

Measured in one run, on one device:

1. Server work per family, 10 clients of mixture a1-e1 and of a-b-c-d-e: the
   library's split and aggregate (its fast path) against
   (i) a plain baseline: for split, the loop kept here, per tensor and per client
       a gather through an index grid (``t[meshgrid(...)]``, as the authors' code
       does); for aggregation, the library's plain count rule
       (:func:`~heterofl_core.aggregation.aggregate_plain`, the definition: per tensor
       and per client, add into a sum and a count tensor through an index grid); and
   (ii) the memory floor: one plain copy of the same bytes (split: the clients'
       sub-models; aggregate: the clients' trained states).
2. Per extraction strategy (static, rolling, random; extraction.py), split and aggregate
   of 10 clients of every level against the same copy floor, and which aggregation path
   each takes (random's sets do not nest: the plain rule).
3. Cohort training against one-by-one training, per level of the MNIST CNN
   (5 clients, as in the paper's a1-e1 round), and which way the fixed rule picks.
4. One full MNIST round with the paper's settings (``1_100_0.1_iid_fix_a1-e1_bn_1_1``,
   batch 10, 5 local epochs, sBN over all 60,000 training images), by phase; the
   ratio of the whole round to its local training; the round's peak memory; and the
   FLOPs of each phase, which bound that ratio from below.

``--quick`` shrinks every part (narrow models, 2 steps, 1 local epoch, sBN over 2,000
images) to check the machinery and the JSON schema in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import aggregation, extraction
from .aggregation import aggregate, aggregate_holdings, aggregate_plain
from .cohort import CohortRule, grouped_model, train_cohort
from .config import EXTRACTIONS, LEVEL_RATES, assign_fixed_levels, parse_control, parse_model_mode
from .data import DATA_ROOT_RULE, ImageData
from .datasets import get_dataset, load_dataset
from .families import build_model
from .federated import Federation, default_eval_batch_size, resolve_device
from .losses import label_mask
from .machine import fast_layout, reuse_host_memory, set_cpu_threads
from .seeds import global_rng
from .sizes import level_size
from .slicing import PREFIX, Heads, Rule, Slicer, State
from .training import train_client

PAPER_CONTROL = "1_100_0.1_iid_fix_a1-e1_bn_1_1"
MIXTURES = ("a1-e1", "a1-b1-c1-d1-e1")
CLIENTS = 10
COHORT_CLIENTS = 5
WIKITEXT2_TOKENS_PER_USER = 20_886  # 2,088,628 training tokens over 100 users
TARGETS = {"aggregate_vs_memcpy_max": 3.0, "aggregate_speedup_vs_plain_min": 30.0, "round_over_training_max": 1.25}
TARGET_FAMILIES = ("resnet18", "transformer")
BASELINES = {"split": "loop", "aggregate": "plain"}  # each phase's plain baseline: the loop here, the library's rule


# ----------------------------------------------------------------------------- the split baseline

def _axis_index(rule: Rule, size: int, local: int, device: torch.device) -> torch.Tensor:
    """Global indices a client holds along one axis, in its order (LABELS: all rows)."""
    if rule == PREFIX:
        return torch.arange(local, device=device)
    if isinstance(rule, Heads):
        per_head = size // rule.count
        return (torch.arange(rule.count, device=device)[:, None] * per_head
                + torch.arange(local // rule.count, device=device)).flatten()
    return torch.arange(size, device=device)


def _grid(index: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.meshgrid(*index, indexing="ij"))


def loop_split(slicer: Slicer, state: State, rate: float) -> State:
    """Baseline split: gather each sub-tensor through an index grid."""
    out = {}
    for key, piece in slicer.slices(rate).items():
        tensor = state[key]
        index = [_axis_index(rule, size, n, tensor.device)
                 for rule, size, n in zip(piece.rules, tensor.shape, piece.local_shape)]
        out[key] = tensor[_grid(index)]
    return out


# ----------------------------------------------------------------------------- timing and memory

def _seconds(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` rounds that call them in turn, after one
    warm-up call each. Taking turns puts the same disturbances (other processes, memory
    bandwidth taken by neighbours) on every function, so their ratios hold; the best time
    is the least disturbed one."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _copy_floor(tensors: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One plain copy of the bytes of ``tensors`` into a buffer already in memory."""
    source = torch.cat([t.reshape(-1) for t in tensors])
    target = source.clone()
    return lambda: target.copy_(source)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak resident memory since the last reset (VmHWM; else the process's lifetime peak), and the GPU's."""
    out: dict[str, Any] = {}
    try:
        status = Path("/proc/self/status").read_text()
        line = next(l for l in status.splitlines() if l.startswith("VmHWM:"))
        out["host_peak_mb"], out["host_method"] = int(line.split()[1]) / 1024, "VmHWM since reset"
    except (OSError, StopIteration):
        out["host_peak_mb"], out["host_method"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"
    if device.type == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
    }
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average_1min_before"] = round(os.getloadavg()[0], 2)
    return info


# ----------------------------------------------------------------------------- 1. split and aggregate

def _family_options(family: str, quick: bool) -> dict[str, Any]:
    if family == "transformer":
        quick_options = dict(vocab_size=500, embed=64, hidden=64, layers=1)
        return quick_options if quick else dict(vocab_size=get_dataset("WikiText2").classes)  # the authors' vocabulary
    return dict(hidden=(8, 16, 32, 64)) if quick else {}


def _label_sets(family: str, vocab: int, clients: int, generator: torch.Generator, quick: bool) -> list[torch.Tensor]:
    """Images: every class (iid). Text: the distinct tokens of a user's row, drawn from a Zipf law
    over the vocabulary (WikiText2: about 20,900 training tokens per user)."""
    if family != "transformer":
        return [torch.arange(10) for _ in range(clients)]
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    draws = 500 if quick else WIKITEXT2_TOKENS_PER_USER
    return [torch.unique(torch.multinomial(weights, draws, replacement=True, generator=generator))
            for _ in range(clients)]


def _server_inputs(family: str, mixture: str, device: torch.device,
                   quick: bool) -> tuple[Slicer, State, list[float], list[torch.Tensor]]:
    """The slicer, a global state (seed 0), the 10 clients' rates under ``mixture`` and their label sets."""
    options = _family_options(family, quick)
    slicer = Slicer(partial(build_model, family, **options))
    with global_rng(0, torch.device("cpu")):  # the model's initial draws; torch's generator is left as it was
        global_state = {k: v.to(device) for k, v in build_model(family, 1.0, **options).state_dict().items()}
    rates = [LEVEL_RATES[level] for level in assign_fixed_levels(parse_model_mode(mixture), CLIENTS)]
    vocab = options.get("vocab_size", 10)
    labels = [l.to(device) for l in _label_sets(family, vocab, CLIENTS, torch.Generator().manual_seed(0), quick)]
    return slicer, global_state, rates, labels


def bench_server(family: str, mixture: str, device: torch.device, quick: bool, repeats: int) -> dict[str, Any]:
    """Split and aggregate of 10 clients of ``mixture`` against the plain baselines and the copy floor."""
    slicer, global_state, rates, labels = _server_inputs(family, mixture, device, quick)
    clients = [slicer.split(global_state, rate) for rate in rates]
    client_tensors = [t for state in clients for t in state.values()]
    loop_repeats = 1 if family == "transformer" and not quick else repeats  # seconds per call

    out: dict[str, Any] = {"rates": rates, "client_mb": sum(t.numel() * t.element_size() for t in client_tensors) / 2**20}
    out.update(_seconds({"split_s": lambda: [slicer.split(global_state, r) for r in rates],
                         "aggregate_s": lambda: aggregate(slicer, global_state, clients, rates, labels),
                         "memcpy_s": _copy_floor(client_tensors)}, device, repeats))  # the same bytes either way
    holdings = [slicer.holdings(rate) for rate in rates]
    out.update(_seconds({"split_loop_s": lambda: [loop_split(slicer, global_state, r) for r in rates],
                         "aggregate_plain_s": lambda: aggregate_plain(global_state, clients, holdings, labels)},
                        device, loop_repeats))
    for phase, baseline in BASELINES.items():
        out[f"{phase}_speedup_vs_{baseline}"] = out[f"{phase}_{baseline}_s"] / out[f"{phase}_s"]
        out[f"{phase}_vs_memcpy"] = out[f"{phase}_s"] / out["memcpy_s"]
    return out


def bench_family(family: str, device: torch.device, quick: bool, repeats: int) -> dict[str, Any]:
    """Both mixtures; the family's headline numbers are the worse of the two."""
    mixtures = {m: bench_server(family, m, device, quick, repeats) for m in MIXTURES}
    summary: dict[str, Any] = {"mixtures": mixtures}
    for phase, baseline in BASELINES.items():
        summary[f"{phase}_speedup_vs_{baseline}"] = min(m[f"{phase}_speedup_vs_{baseline}"] for m in mixtures.values())
        summary[f"{phase}_vs_memcpy"] = max(m[f"{phase}_vs_memcpy"] for m in mixtures.values())
    return summary


# ----------------------------------------------------------------------------- 2. extraction strategies

EXTRACTION_MIXTURE = "a1-b1-c1-d1-e1"
EXTRACTION_ROUND = 2  # rolling's window in round 2 is shifted by one channel: a real roll


def bench_extraction(family: str, device: torch.device, quick: bool, repeats: int) -> dict[str, Any]:
    """Per extraction strategy, split and aggregate (:func:`~heterofl_core.extraction.split`,
    :func:`~heterofl_core.aggregation.aggregate_holdings`) of 10 clients of every level, against the
    copy floor. Static and rolling take the fast path; random, whose sets do not nest, the plain rule."""
    slicer, global_state, rates, labels = _server_inputs(family, EXTRACTION_MIXTURE, device, quick)
    out: dict[str, Any] = {"mixture": EXTRACTION_MIXTURE, "round": EXTRACTION_ROUND, "strategies": {}}
    for strategy in EXTRACTIONS:
        generator = torch.Generator().manual_seed(0)
        holdings = [extraction.holdings(slicer, rate, strategy, EXTRACTION_ROUND, generator) for rate in rates]
        clients = [extraction.split(global_state, held) for held in holdings]
        client_tensors = [t for state in clients for t in state.values()]
        row = {"client_mb": sum(t.numel() * t.element_size() for t in client_tensors) / 2**20,
               "aggregate_path": "fast" if aggregation.fast_path_applies(global_state, holdings) else "plain"}
        row.update(_seconds({"split_s": lambda: [extraction.split(global_state, held) for held in holdings],
                             "aggregate_s": lambda: aggregate_holdings(global_state, clients, holdings, labels),
                             "memcpy_s": _copy_floor(client_tensors)}, device, repeats))
        for phase in ("split", "aggregate"):
            row[f"{phase}_vs_memcpy"] = row[f"{phase}_s"] / row["memcpy_s"]
        out["strategies"][strategy] = row
    return out


# ----------------------------------------------------------------------------- 3. cohort training

def bench_cohort(data: ImageData, device: torch.device, quick: bool, repeats: int) -> dict[str, Any]:
    """Per level of the MNIST CNN: 5 clients' steps one by one and as a cohort, from one sub-model."""
    cfg = parse_control(PAPER_CONTROL, "MNIST", local_epochs=1)
    steps = 2 if quick else 30
    generator = torch.Generator().manual_seed(0)
    pick = torch.randint(len(data.train_y), (COHORT_CLIENTS, steps, cfg.batch_size_train), generator=generator)
    batches = [[(data.train_x[i].to(device), data.train_y[i].to(device)) for i in client] for client in pick]
    masks = [label_mask(torch.arange(10, device=device), 10) for _ in range(COHORT_CLIENTS)]
    rule = CohortRule.measured(device)
    levels: dict[str, Any] = {}
    for level, rate in LEVEL_RATES.items():
        options = dict(hidden=(8, 16, 32, 64)) if quick else {}
        model = fast_layout(build_model("conv", rate, **options).to(device))
        grouped = grouped_model(model)
        start = {k: v.clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}

        def one_by_one() -> list[State]:
            trained = []
            for client, mask in zip(batches, masks):
                model.load_state_dict(start)
                train_client(model, lambda client=client: iter(client), mask, cfg, cfg.lr)
                trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return trained

        def together() -> list[State]:
            return train_cohort(grouped, start, batches, masks, cfg, cfg.lr)[0]

        plain, fast = one_by_one(), together()
        per_step = COHORT_CLIENTS * steps
        seconds = _seconds({"one_by_one": one_by_one, "cohort": together}, device, repeats)
        row = {"one_by_one_ms": seconds["one_by_one"] / per_step * 1e3, "cohort_ms": seconds["cohort"] / per_step * 1e3,
               "rule_picks_cohort": rule.together(rate, COHORT_CLIENTS),
               "max_abs_diff": max((p[k] - f[k]).abs().max().item() for p, f in zip(plain, fast) for k in p)}
        row["speedup"] = row["one_by_one_ms"] / row["cohort_ms"]
        row["rule_agrees"] = row["rule_picks_cohort"] == (row["speedup"] > 1)
        levels[level] = row
    measured = CohortRule.from_speedups({LEVEL_RATES[level]: row["speedup"] for level, row in levels.items()},
                                        f"heterofl bench on {device.type}")
    return {"family": "conv", "clients": COHORT_CLIENTS, "steps": steps, "batch": cfg.batch_size_train,
            "max_cohort_rate": rule.max_rate, "measured_max_cohort_rate": measured.max_rate, "levels": levels}


# ----------------------------------------------------------------------------- 4. one MNIST round

def bench_round(data: ImageData, device: torch.device, quick: bool) -> dict[str, Any]:
    """One round with the paper's settings, by phase, with its peak memory and FLOPs per phase."""
    cfg = parse_control(PAPER_CONTROL, "MNIST", **({"local_epochs": 1, "sbn_samples": 2000} if quick else {}))
    batch = default_eval_batch_size(device)
    federation = Federation.assemble(cfg, data, device, batch)
    state = federation.initial_state()
    _reset_peak_memory(device)
    before = _peak_memory(device)["host_peak_mb"]  # the data, the library and the global state
    _, metrics = federation.run_round(state, 1)
    memory = {**_peak_memory(device), "host_before_round_mb": before}
    phases = {name: metrics.get(f"{name}_s", 0.0) for name in
              ("local_training", "split", "aggregate", "sbn", "eval", "other")}
    # FLOPs (multiply-add = 2) per phase; training ~ 3 forwards per sample (forward, input and
    # weight gradients), for the expected mix of levels among the active users.
    forward = {level: level_size("conv", level).flops_standard for level in cfg.levels}
    shares = sum(share for _, share in cfg.model_mode)
    samples = cfg.active_users * (len(data.train_y) // cfg.num_users) * cfg.local_epochs
    flops = {"local_training": sum(3 * forward[level] * samples * share / shares for level, share in cfg.model_mode),
             "sbn": forward[cfg.levels[0]] * len(data.train_y), "eval": forward[cfg.levels[0]] * len(data.test_y)}
    return {
        "control": cfg.control, "dataset": data.name, "clients": cfg.active_users, "local_epochs": cfg.local_epochs,
        "batch_size_train": cfg.batch_size_train, "sbn_eval_batch_size": batch,
        "cohort_levels": [level for level, _ in cfg.model_mode if federation.cohort_rule.together(LEVEL_RATES[level], 2)],
        "phases_s": phases, "round_s": metrics["round_s"], "local_training_s": phases["local_training"],
        "round_over_training": metrics["round_s"] / phases["local_training"],
        "global_accuracy": metrics.get("global_accuracy"), "peak_memory": memory,
        "flops": flops, "round_over_training_at_equal_flop_rate": sum(flops.values()) / flops["local_training"],
        "note": "training FLOPs: the expected mix of levels (a1-e1: 5 a, 5 e clients)",
    }


# ----------------------------------------------------------------------------- the whole benchmark

def run_benchmark(device: str = "auto", *, quick: bool = False, data: ImageData | None = None,
                  data_root: str | Path | None = None, repeats: int | None = None,
                  families: Sequence[str] = ("conv", "resnet18", "transformer")) -> dict[str, Any]:
    """Every measurement of ``heterofl bench``, as a JSON-ready dict."""
    torch_device = resolve_device(device)
    repeats = repeats or (1 if quick else 5)
    if data is None:
        data = load_dataset("MNIST", data_root)
    report: dict[str, Any] = {"machine": machine_info(torch_device),
                              "settings": {"quick": quick, "repeats": repeats, "device": str(torch_device)}}
    report["round"] = bench_round(data, torch_device, quick)  # first: freed memory stays in the process
    report["cohort"] = bench_cohort(data, torch_device, quick, repeats)
    report["families"] = {family: bench_family(family, torch_device, quick, repeats) for family in families}
    report["extraction"] = {family: bench_extraction(family, torch_device, quick, repeats) for family in families}
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    report["targets"] = check_targets(report)
    return report


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: aggregation within 3x of the copy floor and 30x faster than the plain
    rule (ResNet18 and the transformer); a round within 1.25x of its local training."""
    out: dict[str, Any] = {}
    for family in TARGET_FAMILIES:
        if family in report["families"]:
            result = report["families"][family]
            out[f"{family}_aggregate_vs_memcpy"] = result["aggregate_vs_memcpy"] <= TARGETS["aggregate_vs_memcpy_max"]
            out[f"{family}_aggregate_speedup_vs_plain"] = (result["aggregate_speedup_vs_plain"]
                                                           >= TARGETS["aggregate_speedup_vs_plain_min"])
    out["round_over_training"] = report["round"]["round_over_training"] <= TARGETS["round_over_training_max"]
    return out


def format_report(report: dict[str, Any]) -> str:
    """The tables ``heterofl bench`` prints."""
    machine = report["machine"]
    lines = [f"machine: {machine['cpu']}, {machine['logical_cores']} logical cores, {machine.get('memory_gb', '?')} GB, "
             f"torch {machine['torch']} ({machine['cpu_capability']}, {machine['torch_threads']} threads), "
             f"device {machine['device']}" + (f" ({machine['gpu']})" if "gpu" in machine else ""),
             f"load average (1 min) before/after: {machine.get('load_average_1min_before', '?')}/"
             f"{machine.get('load_average_1min_after', '?')}"
             + ("   [--quick: numbers are not meaningful]" if report["settings"]["quick"] else ""), ""]
    lines += ["split and aggregate, 10 clients (ms; x copy = time / one plain copy of the clients' bytes;",
              "x loop = speedup over the index-grid loop; x plain = speedup over the plain count rule)"]
    header = f"{'family':<12}{'mixture':<16}{'MB':>7}{'copy':>8}{'split':>8}{'loop':>9}{'x loop':>8}{'x copy':>8}" \
             f"{'aggr':>8}{'plain':>9}{'x plain':>8}{'x copy':>8}"
    lines += [header, "-" * len(header)]
    for family, result in report["families"].items():
        for mixture, m in result["mixtures"].items():
            lines.append(f"{family:<12}{mixture:<16}{m['client_mb']:>7.0f}{m['memcpy_s'] * 1e3:>8.1f}"
                         f"{m['split_s'] * 1e3:>8.1f}{m['split_loop_s'] * 1e3:>9.0f}{m['split_speedup_vs_loop']:>8.0f}"
                         f"{m['split_vs_memcpy']:>8.2f}{m['aggregate_s'] * 1e3:>8.1f}{m['aggregate_plain_s'] * 1e3:>9.0f}"
                         f"{m['aggregate_speedup_vs_plain']:>8.0f}{m['aggregate_vs_memcpy']:>8.2f}")
    lines += ["", "extraction strategies: split and aggregate, 10 clients of mixture "
                  f"{EXTRACTION_MIXTURE}, round {EXTRACTION_ROUND} (ms; x copy = time / one plain copy of the clients' bytes)"]
    header = f"{'family':<12}{'strategy':<10}{'MB':>7}{'copy':>8}{'split':>8}{'x copy':>8}{'aggr':>8}{'x copy':>8}{'path':>7}"
    lines += [header, "-" * len(header)]
    for family, result in report["extraction"].items():
        for strategy, m in result["strategies"].items():
            lines.append(f"{family:<12}{strategy:<10}{m['client_mb']:>7.0f}{m['memcpy_s'] * 1e3:>8.1f}"
                         f"{m['split_s'] * 1e3:>8.1f}{m['split_vs_memcpy']:>8.2f}{m['aggregate_s'] * 1e3:>8.1f}"
                         f"{m['aggregate_vs_memcpy']:>8.2f}{m['aggregate_path']:>7}")
    cohort = report["cohort"]
    lines += ["", f"cohort training, MNIST CNN, {cohort['clients']} clients x {cohort['steps']} steps of batch "
                  f"{cohort['batch']} (ms per client-step; rule: cohorts up to rate {cohort['max_cohort_rate']:g})"]
    header = f"{'level':<7}{'one by one':>11}{'cohort':>9}{'speedup':>9}{'rule':>9}{'agrees':>8}{'max |diff|':>12}"
    lines += [header, "-" * len(header)]
    for level, row in cohort["levels"].items():
        lines.append(f"{level:<7}{row['one_by_one_ms']:>11.2f}{row['cohort_ms']:>9.2f}{row['speedup']:>9.2f}"
                     f"{'cohort' if row['rule_picks_cohort'] else 'single':>9}{'yes' if row['rule_agrees'] else 'NO':>8}"
                     f"{row['max_abs_diff']:>12.1e}")
    round_ = report["round"]
    memory = round_["peak_memory"]
    lines += ["", f"one round, {round_['dataset']} {round_['control']}: {round_['clients']} clients, batch "
                  f"{round_['batch_size_train']}, {round_['local_epochs']} local epochs, sBN/eval batch "
                  f"{round_['sbn_eval_batch_size']}, cohorts: {'-'.join(round_['cohort_levels']) or 'none'}"]
    header = f"{'phase':<16}{'seconds':>9}{'share':>8}{'GFLOP':>9}"
    lines += [header, "-" * len(header)]
    for phase, seconds in round_["phases_s"].items():
        gflop = round_["flops"].get(phase)
        lines.append(f"{phase:<16}{seconds:>9.2f}{seconds / round_['round_s']:>8.1%}"
                     f"{'' if gflop is None else f'{gflop / 1e9:.0f}':>9}")
    lines.append(f"{'round':<16}{round_['round_s']:>9.2f}")
    lines += [f"round / local training: {round_['round_over_training']:.2f} "
              f"(at equal FLOP rate in every phase: {round_['round_over_training_at_equal_flop_rate']:.2f})",
              f"peak memory: host {memory['host_peak_mb']:.0f} MB ({memory['host_method']}; "
              f"{memory['host_before_round_mb']:.0f} MB before the round)"
              + (f", GPU {memory['device_peak_mb']:.0f} MB" if "device_peak_mb" in memory else "")]
    lines += ["", "targets: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in report["targets"].items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``heterofl bench``."""
    bench = commands.add_parser("bench", help="measure split, aggregation, cohort training and one MNIST round",
                                description="Times, in one run on one device: split and aggregation of 10 "
                                            "clients per model family against plain baselines (an index-grid "
                                            "loop; the plain count rule) and a plain copy; cohort against one-by-one training per level; one MNIST round "
                                            f"with the paper's settings ({PAPER_CONTROL}) by phase, with its peak "
                                            "memory. Prints tables; --json keeps every number.")
    bench.add_argument("--json", metavar="FILE", help="also write every measurement to FILE as JSON")
    bench.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    bench.add_argument("--data-root", metavar="DIR",
                       help=f"where MNIST lives ({DATA_ROOT_RULE})")
    bench.add_argument("--quick", action="store_true",
                       help="narrow models, 2 steps, 1 local epoch, sBN over 2,000 images: checks the "
                            "machinery in seconds, numbers are not meaningful")
    bench.add_argument("--repeats", type=int, help="timed repeats per measurement, best kept (default 5; quick 1)")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction, default=True,
                       help="keep freed host memory in the process, as `heterofl run` does (on by default for "
                            "this program; --no-reuse-host-memory measures without it)")
    bench.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    set_cpu_threads(args.threads)
    if args.reuse_host_memory:
        reuse_host_memory()
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be positive, got {args.repeats}")
    report = run_benchmark(args.device, quick=args.quick, data_root=args.data_root, repeats=args.repeats)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0
