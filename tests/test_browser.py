"""The widgets in a real JupyterLab, driven in headless Chromium, as a user meets them.

CI runs the notebooks with papermill (``interactive=False``): no frontend, no widget comms. This test
starts JupyterLab from this environment (default settings: comms over kernel subshells on) on
127.0.0.1 in a temporary folder, opens copies of the notebooks in Debian's Chromium through
Playwright, runs them with JupyterLab's "Run All Cells", then changes the controls and checks after
each change that the figure was redrawn, shows the new choice and is not blank (a race once left a
transparent image). Screenshots go to the test's tmp_path, and to ``$HETEROFL_BROWSER_SHOTS`` when
set (e.g. ``reproduction/browser``).

Needs the ``playwright`` package (in the ``dev`` extra) and a Chromium (``apt-get install chromium``;
``$HETEROFL_CHROMIUM`` names another binary). Without them it skips, except under CI (``$CI`` set),
where it fails: CI installs both.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
START_TIMEOUT = 90  # seconds for JupyterLab to answer
RUN_TIMEOUT = 240  # seconds for a notebook's Run All
REDRAW_TIMEOUT = 90  # seconds for one redraw after a change
SETTLE = 1.5  # seconds a redrawn figure must stay unchanged before it is judged


def _missing(reason: str) -> None:
    """Skip on a developer's machine; fail under CI, which installs everything this test needs."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must install it: see .ci/run)")
    pytest.skip(reason)


def _chromium() -> str:
    """The Chromium to drive (checked before anything starts), with Playwright and JupyterLab importable."""
    for module, where in (("playwright", "pip install -e '.[dev]'"), ("jupyterlab", "pip install -e '.[notebooks]'"),
                          ("psutil", "pip install -e '.[dev]'")):
        try:
            __import__(module)
        except ImportError:
            _missing(f"the {module} package is missing: {where}")
    explicit = os.environ.get("HETEROFL_CHROMIUM")
    if explicit:
        return explicit
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    _missing("no Chromium on PATH: `apt-get install chromium` (Debian) or set $HETEROFL_CHROMIUM")
    raise AssertionError  # unreachable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _end(pids: list[int], group: int | None = None, grace: float = 10.0) -> None:
    """SIGTERM a process group and each listed process, SIGKILL whatever is left after ``grace`` seconds."""
    import psutil

    if group is not None:
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    if group is not None:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- JupyterLab and Chromium

class Lab:
    """A running JupyterLab: its address, token, served folder, log, and the kernels seen (ended at teardown)."""

    def __init__(self, url: str, token: str, root: Path, log: Path) -> None:
        self.url, self.token, self.root, self.log = url, token, root, log
        self.kernels: set[int] = set()

    def tree(self, notebook: str) -> str:
        """The notebook alone in a fresh workspace (JupyterLab would otherwise reopen the previous tabs)."""
        workspace = Path(notebook).stem.replace("_", "-")
        return f"{self.url}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={self.token}"

    def api(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            body = answer.read()
        return json.loads(body) if body else None

    def shut_down(self, notebook: str) -> None:
        """End the notebook's kernel (JupyterLab keeps it when the page closes)."""
        for session in self.api("sessions"):
            if session.get("path") == notebook:
                self.api(f"sessions/{session['id']}", method="DELETE")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab of this environment on 127.0.0.1, serving a temporary folder (the committed notebooks are
    copied there, never opened in place), with fresh settings, so its defaults apply. Ended with its kernels."""
    _chromium()  # skip (or, under CI, fail) before starting anything
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    root.mkdir()
    env = dict(os.environ)
    for key, name in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                      ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                      ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")):
        (base / name).mkdir()
        env[key] = str(base / name)
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend, as a user gets it
    env.pop("JUPYTER_PATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    port, token = _free_port(), secrets.token_hex(16)
    log = base / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               # a bounded lifetime even if this process dies before its teardown
               "--ServerApp.shutdown_no_activity_timeout=600", "--MappingKernelManager.cull_idle_timeout=600",
               "--MappingKernelManager.cull_interval=60", "--MappingKernelManager.cull_connected=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    with log.open("w") as sink:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, log)
    # a SIGTERM (a CI timeout, `timeout`) unwinds the test, so that this teardown still ends what it started
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{lab.log_tail()}")
            try:
                with urllib.request.urlopen(f"{lab.url}/api/status?token={token}", timeout=2) as answer:
                    json.load(answer)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT} s:\n{lab.log_tail()}")
                time.sleep(0.3)
        yield lab
    finally:
        # kernels run in sessions of their own (jupyter_client starts them so): end them by PID too
        _end([server.pid, *sorted(lab.kernels | set(_descendants(server.pid)))], group=server.pid)
        server.wait(timeout=10)
        signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module")
def browser(lab: Lab) -> Iterator[Any]:
    """Headless Chromium (the system's) driven by Playwright; ended, with anything it started, at the end."""
    executable = _chromium()
    import psutil
    from playwright.sync_api import sync_playwright

    me = psutil.Process()
    before = {child.pid for child in me.children()}
    playwright = sync_playwright().start()
    # Playwright's driver, a child of this process, starts Chromium: end both by PID should stop() leave any
    drivers = {child.pid for child in me.children()} - before
    started: set[int] = set(drivers)
    try:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True, timeout=60_000,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage",
                  "--disable-breakpad", "--disable-crash-reporter"])
        for pid in drivers:
            started.update(_descendants(pid))
        yield chromium
        chromium.close()
    finally:
        for pid in drivers:
            started.update(_descendants(pid))
        try:
            playwright.stop()
        finally:
            _end(sorted(started))


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


def _keep(shots: Path, name: str) -> None:
    """Copy a screenshot to $HETEROFL_BROWSER_SHOTS (relative paths: to the checkout) when set."""
    wanted = os.environ.get("HETEROFL_BROWSER_SHOTS")
    if wanted:
        target = Path(wanted) if Path(wanted).is_absolute() else ROOT / wanted
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shots / name, target / name)


KERNEL_IDLE = """() => [...document.querySelectorAll('.jp-StatusBar-Widget span, .jp-StatusBar-Widget div')]
    .map(e => e.children.length ? '' : e.textContent.trim())
    .some(text => / \\| Idle$/.test(text) && !/^No Kernel/.test(text))"""


def _open(browser: Any, lab: Lab, notebook: str) -> Any:
    """A page with ``notebook`` open and its kernel started and idle; kernel PIDs are remembered for the teardown."""
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(lab.tree(notebook))
    page.locator(".jp-Notebook").first.wait_for()
    # the status bar says "<kernel> | Idle" once the kernel is up ("No Kernel | ..." before)
    page.wait_for_function(KERNEL_IDLE, timeout=START_TIMEOUT * 1000)
    _remember_kernels(lab)
    news = page.get_by_role("button", name="No", exact=True)  # JupyterLab asks about its news once
    if news.count():
        news.first.click()
    return page


def _remember_kernels(lab: Lab) -> None:
    import psutil

    ids = {kernel["id"] for kernel in lab.api("kernels")}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ipykernel" in cmdline and any(kernel_id in cmdline for kernel_id in ids):
            lab.kernels.add(proc.info["pid"])


PROMPTS = """() => [...document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim())"""


def _run_all(page: Any, shots: Path) -> None:
    """JupyterLab's Run > Run All Cells; waits until every code cell has run (its prompt has a number)."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    error = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                         has_text=re.compile(r"Traceback|\w+Error\b"))
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        prompts = page.evaluate(PROMPTS)
        if prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
            break
        if error.count():
            pytest.fail(f"the notebook raised:\n{error.first.inner_text()[-3000:]}")
        if time.monotonic() > deadline:
            page.screenshot(path=str(shots / "run-all-timeout.png"))
            pytest.fail(f"Run All did not finish within {RUN_TIMEOUT} s; prompts {prompts}; "
                        f"screenshot {shots / 'run-all-timeout.png'}")
        page.wait_for_timeout(300)
    page.wait_for_function(KERNEL_IDLE, timeout=RUN_TIMEOUT * 1000)


# ----------------------------------------------------------------------------- looking at a figure

FIGURE_STATE = """box => {
    const images = box.querySelectorAll('img');
    const img = images[images.length - 1];
    // what the widget says, without its controls (a dropdown's text lists every option)
    const text = [...box.querySelectorAll('.widget-html, .widget-output')].map(e => e.innerText).join('\\n');
    return {src: img ? img.src : null, ready: !!img && img.complete && img.naturalWidth > 0,
            width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0, text: text};
}"""


def _state(box: Any) -> dict[str, Any]:
    return box.evaluate(FIGURE_STATE)


def _wait_redrawn(page: Any, box: Any, before: dict[str, Any], expect: list[str], what: str,
                  absent: list[str] = ()) -> dict[str, Any]:
    """Wait until the box's figure is a new image, its text shows ``expect`` (and none of ``absent``), and
    both stay unchanged for SETTLE seconds; returns that state."""
    deadline = time.monotonic() + REDRAW_TIMEOUT
    stable_since, last = None, None
    while time.monotonic() < deadline:
        state = _state(box)
        good = (state["ready"] and state["src"] != before["src"] and all(t in state["text"] for t in expect)
                and not any(t in state["text"] for t in absent))
        if good and last is not None and (state["src"], state["text"]) == (last["src"], last["text"]):
            if time.monotonic() - stable_since >= SETTLE:
                return state
        else:
            stable_since = time.monotonic()
        last = state if good else None
        page.wait_for_timeout(150)
    state = _state(box)
    problems = []
    if not state["ready"]:
        problems.append("no figure shown")
    elif state["src"] == before["src"]:
        problems.append("the figure was not redrawn (same image as before)")
    problems += [f"missing text {t!r}" for t in expect if t not in state["text"]]
    problems += [f"stale text {t!r}" for t in absent if t in state["text"]]
    pytest.fail(f"after {what}: {'; '.join(problems) or 'never settled'}\nshown text:\n{state['text'][-2000:]}")


def _colours(png: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        colours = image.convert("RGBA").getcolors(maxcolors=1 << 16)
    return len(colours) if colours is not None else 1 << 16


def _check_figure(page: Any, box: Any, shots: Path, name: str, what: str, previous: bytes | None = None) -> bytes:
    """Screenshot the figure alone (the pixel checks) and the whole widget (for people); fail on a blank figure
    or on the same pixels as ``previous``. Returns the figure's screenshot."""
    box.scroll_into_view_if_needed()
    figure = box.locator("img").last
    png = figure.screenshot(path=str(shots / f"{name}-figure.png"), animations="disabled")
    box.screenshot(path=str(shots / f"{name}.png"), animations="disabled")
    _keep(shots, f"{name}.png")
    _keep(shots, f"{name}-figure.png")
    colours = _colours(png)
    assert colours > 1, (f"after {what}: the figure is blank (one colour over its "
                         f"{figure.bounding_box()} box); screenshot {shots / (name + '.png')}")
    assert png != previous, f"after {what}: the figure shows the same pixels as before the change"
    return png


# ----------------------------------------------------------------------------- the mixture explorer

def _labelled(box: Any, kind: str, label: str) -> Any:
    """The ipywidgets control of ``kind`` whose description starts with ``label``."""
    page = getattr(box, "page", box)
    return box.locator(kind).filter(has=page.locator("label.widget-label", has_text=re.compile("^" + re.escape(label))))


def _dropdown(box: Any, label: str) -> Any:
    return _labelled(box, ".widget-dropdown", label).locator("select")


def _slider(box: Any, label: str) -> Any:
    return _labelled(box, ".widget-slider", label)


def _drag_to_min(page: Any, slider: Any) -> None:
    """Drag a slider's handle with the mouse past the left end of its track, as a user does."""
    handle = slider.locator(".noUi-handle").first
    track = slider.locator(".noUi-base").first
    handle.scroll_into_view_if_needed()
    h, t = handle.bounding_box(), track.bounding_box()
    x, y = h["x"] + h["width"] / 2, h["y"] + h["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 9):
        page.mouse.move(x - step * (x - t["x"] + 30) / 8, y)
        page.wait_for_timeout(30)
    page.mouse.up()


def _table_texts(model: str, shares: dict[str, int]) -> list[str]:
    """What the explorer's table must show for a selection: each level's and the mixture's parameter count, and
    the mixture (computed here by the library, independently of the kernel)."""
    from heterofl_core.sizes import human, mixture_sizes

    rows = mixture_sizes(model, "-".join(f"{level}{share}" for level, share in shares.items() if share > 0))
    return [human(r.params) for r in rows] + [rows[-1].model_mode]


def _explorer_notebook() -> Path:
    """The teaching notebook with the mixture explorer (found by content: notebooks get renumbered)."""
    found = [p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if "plots.mixture_explorer(" in p.read_text()]
    assert found, f"no notebook in {NOTEBOOKS} calls plots.mixture_explorer"
    return found[0]


def test_mixture_explorer_redraws_every_change_in_jupyterlab(lab: Lab, browser: Any, shots: Path) -> None:
    """Run the slicing notebook, then: slider a dragged to 0, the model switched to the Transformer, another
    layer, slider b dragged to 0. After each: a new figure, not blank, and the table and caption of the choice."""
    from playwright.sync_api import expect

    from heterofl_core.families import get_family

    notebook = _explorer_notebook()
    shutil.copy(notebook, lab.root / notebook.name)  # JupyterLab autosaves: never the committed file
    page = _open(browser, lab, notebook.name)
    mismatches: list[str] = []
    try:
        _run_all(page, shots)
        model = _dropdown(page, "model").first
        box = page.locator(".widget-vbox", has=model).last
        box.scroll_into_view_if_needed()
        shares = {level: 1 for level in "abcde"}
        state = _wait_redrawn(page, box, {"src": None}, _table_texts(model.input_value(), shares), "Run All")
        pixels = _check_figure(page, box, shots, "explorer-0-initial", "Run All")

        changes = ["slider a to 0", "model transformer", "another layer", "slider b to 0"]
        for step, what in enumerate(changes, 1):
            layer_before = _dropdown(box, "layer").input_value()
            if what.startswith("slider"):
                level = what.split()[1]
                slider = _slider(box, f"{level} (r=")
                _drag_to_min(page, slider)
                assert slider.locator(".widget-readout").inner_text().strip() == "0", f"{what}: not at 0"
                shares[level] = 0
            elif what.startswith("model"):
                _dropdown(box, "model").select_option(what.split()[1])
                # the kernel answers with the new family's layers
                expect(_dropdown(box, "layer")).to_have_value(get_family(what.split()[1]).shown_parameters[0],
                                                              timeout=REDRAW_TIMEOUT * 1000)
            else:
                options = _dropdown(box, "layer").locator("option").all_inner_texts()
                _dropdown(box, "layer").select_option(next(o for o in options if o != layer_before))
            model_name, layer = _dropdown(box, "model").input_value(), _dropdown(box, "layer").input_value()
            if what == "another layer":
                assert layer != layer_before
            state = _wait_redrawn(page, box, state, _table_texts(model_name, shares), what)
            pixels = _check_figure(page, box, shots, f"explorer-{step}-{what.replace(' ', '-')}", what, pixels)
            # the figure is of the choice: the caption names model, layer and mixture (checked after the
            # pixels, so that a blank figure is what fails first)
            mode = "-".join(f"{level}{share}" for level, share in shares.items() if share > 0)
            missing = [t for t in (f"({model_name})", layer, mode) if t not in state["text"]]
            if missing:
                mismatches.append(f"after {what}: the explorer does not name {missing}")
        assert not mismatches, "\n".join(mismatches)
        assert not page.errors, f"JavaScript errors in the page: {page.errors}"  # type: ignore[attr-defined]
    finally:
        page.close()
        lab.shut_down(notebook.name)


# ----------------------------------------------------------------------------- live training curves

LIVE_NOTEBOOK = {
    "setup": """\
import sys, threading, time
import ipywidgets, matplotlib, pandas as pd
from heterofl_core import plots

plots.use_style()
print("environment", sys.prefix, "ipywidgets", ipywidgets.__version__)
live = plots.LiveCurves("global_accuracy", "browser check", interactive=True)
rows = []

def one_round():
    \"\"\"What a training run reports after each round (train loss, then test accuracy), fed to the curves.\"\"\"
    round_ = len(rows) // 2 + 1
    rows.append({"round": round_, "split": "train", "metric": "train_loss", "value": 2.3 / round_})
    rows.append({"round": round_, "split": "test", "metric": "global_accuracy", "value": 100 - 60 / round_})
    live(round_, pd.DataFrame(rows))
""",
    "train": """\
for _ in range(3):  # a training loop: rounds drawn from the cell's own thread
    time.sleep(0.3)
    one_round()
print("trained", len(rows) // 2, "rounds")
""",
    "button": """\
more = ipywidgets.Button(description="one more round")  # rounds drawn from a widget callback (a subshell)
more.on_click(lambda _: one_round())
more
""",
}


def _live_notebook(folder: Path) -> str:
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in LIVE_NOTEBOOK.values()]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    name = "live_curves_check.ipynb"
    nbformat.write(notebook, folder / name)
    return name


def test_live_curves_redraw_every_round_in_jupyterlab(lab: Lab, browser: Any, shots: Path) -> None:
    """LiveCurves in a scratch notebook (the widget of notebook 06's "watch one run", without the training):
    three rounds from a cell, then two from a button's callback; after each, the figure of that round."""
    notebook = _live_notebook(lab.root)
    page = _open(browser, lab, notebook)
    try:
        _run_all(page, shots)
        printed = page.locator(".jp-OutputArea-output", has_text="environment").first.inner_text()
        assert f"environment {sys.prefix} " in printed, f"the kernel is not this environment's: {printed}"
        import ipywidgets
        assert f"ipywidgets {ipywidgets.__version__}" in printed, printed
        box = page.locator(".jp-CodeCell").first.locator(".jp-OutputArea").first  # where `live` shows itself
        steps = [(3, "three rounds from a cell")] + [(r, f"round {r} from the button") for r in (4, 5)]
        state: dict[str, Any] = {"src": None}
        pixels = None
        for step, (round_, what) in enumerate(steps):
            if round_ > 3:
                page.get_by_role("button", name="one more round").click()
            state = _wait_redrawn(page, box, state, [], what)
            pixels = _check_figure(page, box, shots, f"live-{step}-round-{round_}", what, pixels)
            # the figure is of that round: its caption says so (checked after the pixels)
            assert f"round {round_}" in state["text"] and f"round {round_ - 1}" not in state["text"], (
                f"after {what}: the live curves do not say 'round {round_}': {state['text']!r}")
        assert not page.errors, f"JavaScript errors in the page: {page.errors}"  # type: ignore[attr-defined]
    finally:
        page.close()
        lab.shut_down(notebook)


# ----------------------------------------------------------------------------- the exercises, as a learner meets them

FIRST_LINE_EDIT = "untouched = 3  # a wrong answer"


def test_exercises_hide_their_solutions_and_answer_a_wrong_answer_in_one_line(lab: Lab, browser: Any,
                                                                              shots: Path) -> None:
    """Notebook 02 after Run All: every solution is a closed <details> (its code hidden until the learner opens
    it), every exercise waits for an answer; a wrong answer typed into Exercise 3 gets one line, no traceback,
    and not the value; opening a solution shows its code."""
    notebook = NOTEBOOKS / "02_aggregation.ipynb"
    shutil.copy(notebook, lab.root / notebook.name)
    page = _open(browser, lab, notebook.name)
    try:
        _run_all(page, shots)
        solutions = page.locator(".jp-MarkdownCell details")
        assert solutions.count() == 3, f"{solutions.count()} solution blocks rendered"
        for k in range(solutions.count()):
            block = solutions.nth(k)
            assert block.get_attribute("open") is None, "a solution starts closed"
            assert block.locator("summary").inner_text().startswith(f"Solution to Exercise {k + 1}")
            assert not block.locator("pre").is_visible(), "its code is hidden until opened"
        waiting = page.locator(".jp-OutputArea-output", has_text=re.compile("not attempted yet|no guess yet"))
        assert waiting.count() == 3, "each exercise waits for the learner's answer"

        cells = page.locator(".jp-CodeCell")
        cell = cells.nth(next(k for k in range(cells.count()) if "untouched = None" in cells.nth(k).inner_text()))
        cell.scroll_into_view_if_needed()
        editor = cell.locator(".cm-content").first
        editor.click()
        page.keyboard.press("Control+Home")
        page.keyboard.press("Shift+End")
        page.keyboard.type(FIRST_LINE_EDIT)
        page.keyboard.press("Shift+Enter")
        answer = cell.locator(".jp-OutputArea-output").first
        answer.wait_for()
        page.wait_for_function(KERNEL_IDLE, timeout=RUN_TIMEOUT * 1000)
        text = answer.inner_text().strip()
        cell.screenshot(path=str(shots / "exercise-wrong-answer.png"))
        _keep(shots, "exercise-wrong-answer.png")
        assert text.startswith("Exercise 3: not yet.") and "\n" not in text, f"one line: {text!r}"
        assert cell.locator("[data-mime-type='application/vnd.jupyter.stderr']").count() == 0, "no traceback"
        assert "24" not in text, f"the answer (24 entries) is not given away: {text!r}"

        first = solutions.first
        first.locator("summary").click()
        assert first.get_attribute("open") is not None and first.locator("pre").is_visible()
        assert "def count_rule" in first.locator("pre").inner_text()
        first.screenshot(path=str(shots / "solution-opened.png"))
        _keep(shots, "solution-opened.png")
        assert not page.errors, f"JavaScript errors in the page: {page.errors}"  # type: ignore[attr-defined]
    finally:
        page.close()
        lab.shut_down(notebook.name)
