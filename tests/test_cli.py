"""The ``heterofl`` command line, in-process (``cli.main``) plus one check of the installed entry points.

Bad input must end with exit code 2 and a message that names the problem, never a traceback.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heterofl_core import federated
from heterofl_core.cli import EXIT_BAD_INPUT, main
from heterofl_core.config import parse_control
from fakes import write_tiny_mnist
from reference import one_cpu_thread  # noqa: F401  (autouse fixture: one intra-op thread)

CONTROL = "1_10_0.5_iid_fix_d1-e1_bn_1_1"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Caches and the default data root go to tmp; the working directory too (default run folders)."""
    monkeypatch.setenv("HETEROFL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HETEROFL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A missing MNIST must not be fetched from the internet during the tests."""
    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: network disabled in the tests")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", no_network)


@pytest.fixture(autouse=True)
def heap_opt_ins(monkeypatch) -> list[str]:
    """The program's opt-in to glibc heap reuse, recorded instead of done (it would last for this test process)."""
    calls: list[str] = []
    monkeypatch.setattr("heterofl_core.machine.reuse_host_memory", lambda: calls.append("reuse"))
    return calls


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    root = tmp_path / "data"
    write_tiny_mnist(root, n_train=100, n_test=30)
    return root


def run_args(root: Path, out: Path, *extra: str, control: str = CONTROL) -> list[str]:
    return ["run", "--data", "MNIST", "--control", control, "--rounds", "2", "--local-epochs", "1",
            "--data-root", str(root), "--out", str(out), "--device", "cpu", *extra]


def bad_input(capsys, argv: list[str]) -> str:
    """Run ``argv``; check exit code 2, nothing on stdout, no traceback; return the stderr message."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT, (code, captured.err)
    assert "Traceback" not in captured.err and captured.out == ""
    assert captured.err.startswith(f"heterofl {argv[0]}: error: "), captured.err
    return captured.err


# ---------------------------------------------------------------- sizes and control


def test_sizes_json_resnet18(capsys):
    assert main(["sizes", "--model", "resnet18", "--mode", "a-b-c-d-e", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["model_mode"] for row in rows] == ["a", "b", "c", "d", "e", "a-b-c-d-e"]
    for row in rows:
        assert {"model_mode", "params", "flops", "mb", "ratio"} <= row.keys()
        assert isinstance(row["params"], int) and isinstance(row["flops"], int)
        assert isinstance(row["mb"], float) and isinstance(row["ratio"], float)
        assert row["mb"] == pytest.approx(row["params"] * 4 / 2**20)
    a, mixture = rows[0], rows[-1]
    assert a["params"] == 9622090 and a["ratio"] == 1.0 and round(a["mb"], 2) == 36.71
    assert round(mixture["ratio"], 2) == 0.27
    assert mixture["params"] == pytest.approx(sum(r["params"] for r in rows[:5]) / 5, abs=1)
    assert [row["params"] for row in rows[:5]] == sorted((row["params"] for row in rows[:5]), reverse=True)


def test_sizes_transformer_counts_the_authors_wikitext2_vocabulary(capsys):
    """Their vocabulary ('<ukn>', '<eos>' and the training words) makes level a 73.49 MB, as the authors count it."""
    assert main(["sizes", "--model", "transformer", "--mode", "a-b-c-d-e"]) == 0
    level_a = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("a "))
    assert "73.49" in level_a.split(), level_a


def test_sizes_table(capsys):
    assert main(["sizes", "--model", "conv", "--mode", "a1-e1"]) == 0
    table = capsys.readouterr().out
    assert "a1-e1" in table or "a-e" in table


@pytest.mark.parametrize("mode, words", [("a-z", ["'z'", "valid levels"]), ("b-a", ["widest level first"])])
def test_sizes_bad_mode(capsys, mode, words):
    message = bad_input(capsys, ["sizes", "--model", "conv", "--mode", mode])
    assert message.count("\n") == 1 and all(word in message for word in words), message


def test_control_json_prints_the_parsed_config(capsys):
    assert main(["control", "1_100_0.1_non-iid-2_dynamic_a2-b8_bn_1_0", "--data", "CIFAR10", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(parse_control("1_100_0.1_non-iid-2_dynamic_a2-b8_bn_1_0", "CIFAR10").to_dict()))
    assert printed["model_mode"] == [["a", 2], ["b", 8]] and printed["mask"] is False
    assert printed["model"] == "resnet18" and printed["rounds"] == 800 and printed["milestones"] == [300, 500]


BAD_CONTROLS = [
    ("1_100_0.1_iid_fix_a2-z8_bn_1_1", ["'z'", "valid levels"]),  # unknown level letter
    ("1_100_0.1_iid_fix_a-b_bn_1_1", ["'a' has no proportion"]),  # missing proportions
    ("1_100_1.5_iid_fix_a1_bn_1_1", ["frac", "1.5"]),
    ("1_100_0.1_non-iid-0_fix_a1_bn_1_1", ["non-iid-0", "N >= 1"]),
    ("1_100_0.1_iid_fix_a1_batch_1_1", ["unknown norm 'batch'", "bn"]),
    ("1_100_0.1_iid_fix_a1_bn_1", ["8 parts", "expected 9"]),
    ("1_ten_0.1_iid_fix_a1_bn_1_1", ["num_users", "'ten'"]),
]


@pytest.mark.parametrize("control, words", BAD_CONTROLS)
def test_control_bad_string_is_one_line_on_stderr(capsys, control, words):
    message = bad_input(capsys, ["control", control])
    assert message.endswith("\n") and message.count("\n") == 1, f"one line: {message!r}"
    for word in words:
        assert word in message


# ---------------------------------------------------------------- run: bad input


@pytest.mark.parametrize("control, words", BAD_CONTROLS[:3])
def test_run_bad_control_string(capsys, tmp_path, control, words):
    message = bad_input(capsys, run_args(tmp_path / "data", tmp_path / "out", control=control))
    assert all(word in message for word in words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, near", [("NOPE", None), ("fashionmnist", "FashionMNIST"), ("MNST", "MNIST")])
def test_run_unknown_dataset_lists_the_datasets_and_the_nearest(capsys, tmp_path, name, near):
    (tmp_path / "empty").mkdir()
    argv = ["run", "--data", name, "--control", CONTROL, "--data-root", str(tmp_path / "empty"), "--device", "cpu"]
    message = bad_input(capsys, argv)
    assert f"unknown dataset {name!r}" in message
    assert "MNIST, FashionMNIST, KMNIST, EMNIST, CIFAR10, CIFAR100, SVHN, WikiText2" in message
    assert (f"did you mean {near}?" in message) if near else "did you mean" not in message
    assert str(tmp_path / "empty") in message, "it says where a folder of one's own would go"


def test_run_missing_mnist_says_where_it_looked_and_how_to_get_it(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    message = bad_input(capsys, run_args(tmp_path / "empty", tmp_path / "out"))
    assert "MNIST not found" in message
    assert str(tmp_path / "empty" / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "How to get it" in message and "--data-root" in message
    assert "network disabled" in message, "the failed download is reported"


def test_run_truncated_idx_file(capsys, tmp_path, mnist_root):
    path = mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    message = bad_input(capsys, run_args(mnist_root, tmp_path / "out"))
    assert "truncated" in message and str(path) in message


def test_run_resume_with_another_config_and_existing_folder(capsys, tmp_path, mnist_root):
    out = tmp_path / "out"
    assert main(run_args(mnist_root, out, "--quiet")) == 0
    capsys.readouterr()
    message = bad_input(capsys, run_args(mnist_root, out, "--quiet"))
    assert "--resume" in message and str(out) in message
    message = bad_input(capsys, run_args(mnist_root, out, "--quiet", "--resume", "--set", "lr=0.05"))
    assert "another config" in message and "lr" in message
    message = bad_input(capsys, run_args(mnist_root, out, "--quiet", "--resume", "--seed", "4"))
    assert "seed" in message


@pytest.mark.parametrize("setting, words", [
    ("bogus=1", ["'bogus=1'", "KEY=VALUE", "lr"]),
    ("lr", ["KEY=VALUE"]),
    ("lr=fast", ["lr", "'fast'", "float"]),
    ("scale=maybe", ["scale", "bool"]),
    ("milestones=10,x", ["milestones"]),
    ("lr=-1", ["lr must be positive"]),
    ("mask_fill=nan", ["mask fill", "-inf"]),
])
def test_run_bad_set(capsys, tmp_path, setting, words):
    message = bad_input(capsys, run_args(tmp_path / "data", tmp_path / "out", "--set", setting))
    assert all(word in message for word in words), message


@pytest.mark.parametrize("command", ["run", "bench"])
def test_zero_threads_are_refused(capsys, tmp_path, command):
    argv = run_args(tmp_path / "data", tmp_path / "out") if command == "run" else ["bench", "--quick"]
    message = bad_input(capsys, argv + ["--threads", "0"])
    assert "--threads must be positive, got 0" in message, message


@pytest.mark.parametrize("device, words", [("tpu", ["unknown device 'tpu'", "cpu"]), ("cuda:x", ["cuda"])])
def test_run_bad_device(capsys, tmp_path, mnist_root, device, words):
    argv = run_args(mnist_root, tmp_path / "out")
    argv[argv.index("--device") + 1] = device
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    message = bad_input(capsys, argv)
    assert all(word in message for word in words), message


def test_run_malformed_cuda_device_with_cuda_present(capsys, tmp_path, mnist_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = run_args(mnist_root, tmp_path / "out")
    argv[argv.index("--device") + 1] = "cuda:x"
    message = bad_input(capsys, argv)
    assert "cuda:x" in message


@pytest.mark.parametrize("model", ["transformer"])
def test_run_model_that_does_not_fit_the_data(capsys, tmp_path, mnist_root, model):
    message = bad_input(capsys, run_args(mnist_root, tmp_path / "out", "--set", f"model={model}"))
    assert "model" in message


def test_run_interrupted_says_how_to_continue(capsys, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(federated, "run_experiment", interrupted)
    assert main(run_args(tmp_path, tmp_path / "out")) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err


# ---------------------------------------------------------------- run: success


def test_run_quiet_writes_the_folder_and_a_summary(capsys, tmp_path, mnist_root):
    out = tmp_path / "out"
    assert main(run_args(mnist_root, out, "--quiet")) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finished 2 rounds -> {out}: ")
    assert re.search(r"global_accuracy \d", lines[0]) and "local_accuracy" in lines[0]
    assert "round 1/2" not in captured.out + captured.err and "%|" not in captured.err  # no per-round lines, no bar
    for name in ("run.json", "metrics.csv", "checkpoint.pt", "best.pt"):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["control"] == CONTROL and record["config"]["rounds"] == 2
    assert record["config"]["local_epochs"] == 1 and record["device"] == "cpu"

    # resuming the finished run does nothing and prints the same summary
    assert main(run_args(mnist_root, out, "--quiet", "--resume")) == 0
    assert capsys.readouterr().out.strip() == lines[0]


def test_run_default_out_folder(capsys, tmp_path, mnist_root):
    argv = ["run", "--data", "MNIST", "--control", CONTROL, "--rounds", "1", "--local-epochs", "1",
            "--data-root", str(mnist_root), "--device", "cpu", "--quiet", "--seed", "2"]  # no --out
    assert main(argv) == 0
    out = Path("runs") / f"MNIST_{CONTROL}_seed2_rounds-1_local_epochs-1"
    assert (tmp_path / out / "metrics.csv").is_file()
    assert str(out) in capsys.readouterr().out
    assert main(argv + ["--set", "participants=widest"]) == 0, "another config: another folder, not a refusal"
    assert (tmp_path / f"{out}_participants-widest" / "metrics.csv").is_file()


def test_run_with_progress_prints_round_lines_with_times(capsys, tmp_path, mnist_root):
    assert main(run_args(mnist_root, tmp_path / "out", "--set", "lr=0.05")) == 0
    captured = capsys.readouterr()
    for round_ in (1, 2):
        line = next(l for l in captured.out.splitlines() if l.startswith(f"round {round_}/2:"))
        assert re.search(r"global_accuracy [\d.]+, local_accuracy [\d.]+", line), line
        assert re.search(r"\| \d+\.\d\d s \(local training \d+\.\d\d", line), line
    assert "finished 2 rounds" in captured.out.strip().splitlines()[-1]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["lr"] == 0.05


def test_the_run_program_opts_its_own_process_into_heap_reuse_unless_told_not_to(tmp_path, mnist_root, heap_opt_ins,
                                                                                   capsys):
    assert main(run_args(mnist_root, tmp_path / "a", "--quiet")) == 0
    assert heap_opt_ins == ["reuse"]
    assert main(run_args(mnist_root, tmp_path / "b", "--quiet", "--no-reuse-host-memory")) == 0
    assert heap_opt_ins == ["reuse"]
    help_text = subprocess.run([sys.executable, "-m", "heterofl_core", "run", "--help"], capture_output=True, text=True,
                               timeout=120).stdout
    assert "this program opts in by default" in " ".join(help_text.split())


# ---------------------------------------------------------------- the installed entry points


def test_entry_points(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "heterofl_core", "--help"], capture_output=True, text=True,
                               timeout=120)
    assert help_text.returncode == 0, help_text.stderr
    assert all(command in help_text.stdout for command in ("sizes", "control", "run"))
    script = shutil.which("heterofl", path=str(Path(sys.executable).parent))
    assert script, "the heterofl console script is installed next to the interpreter"
    sizes = subprocess.run([script, "sizes", "--model", "conv", "--mode", "a-e", "--json"], capture_output=True,
                           text=True, timeout=120)
    assert sizes.returncode == 0, sizes.stderr
    rows = json.loads(sizes.stdout)
    assert [row["model_mode"] for row in rows] == ["a", "e", "a-e"] and rows[-1]["ratio"] < 1
