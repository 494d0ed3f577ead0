"""pytest setup: runs `interpret` tests under TRITON_INTERPRET=1 in a child pytest, everything else in-process.

Why: Triton reads TRITON_INTERPRET when a kernel is *decorated* (`@triton.jit` returns an interpreter function
instead of a JITFunction), i.e. when `fusedconv` is imported. The ahead-of-time compile tests need real
JITFunctions and the interpreter tests need interpreted ones, so one process cannot hold both.

How (one `python -m pytest -q` from the repo root runs both, every test counted as passed / failed / skipped):
  * Mark a test `@pytest.mark.interpret` (a module can set `pytestmark = pytest.mark.interpret`). Any test
    file may do so — e.g. tests/test_fuzz.py for hypothesis fuzzing of the kernel under the interpreter.
  * In the normal (parent) run, this conftest starts ONE child `python -m pytest` with TRITON_INTERPRET=1 on
    the node ids of all selected `interpret` tests when the test loop starts; it runs beside the in-process
    tests (the interpreter is the slowest part of the suite and CI has 2 cores), and the `interpret` tests are
    moved to the end of the run, so the parent waits for the child only when nothing else is left. The child
    records every test's outcome (and failure text) in a JSON file; each `interpret` test in the parent then
    passes, fails (with the child's report) or skips (with the child's reason) accordingly. A parent-side test
    that reads a file the child writes requests the `interpret_child_finished` fixture (it runs after them).
    `-k`, `-m`, `-x` and node ids select the child's tests as usual, since the child gets the final selection.
  * `--durations=N` (pyproject's addopts sets it) is passed to the child, and the child's slowest tests are
    printed after the parent's: the parent's time for an `interpret` test is only its wait for the child.
  * When TRITON_INTERPRET=1 is already set (e.g. `TRITON_INTERPRET=1 python -m pytest -m interpret`), the
    `interpret` tests run in-process and tests NOT marked `interpret` are skipped (they need real kernels).
  * `gpu` tests are skipped when there is no CUDA device (and under the interpreter).

Interpreter tests must keep shapes tiny (the interpreter runs every program instance in Python).
The child is given `INTERPRET_CHILD_TIMEOUT_S` seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # `from util import ...` in test files, whatever the import mode
    sys.path.insert(0, str(_TESTS_DIR))

INTERPRET_CHILD_TIMEOUT_S = 1200
_REPORT_ENV = "FUSEDCONV_INTERPRET_REPORT"  # set in the child: where to write per-test outcomes


def interpreter_active() -> bool:
    """True when this process runs Triton kernels in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    interp = interpreter_active()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device" if not interp else "gpu tests do not run under "
                                "TRITON_INTERPRET=1")
    skip_real = pytest.mark.skip(reason="needs real Triton kernels; TRITON_INTERPRET=1 is set in this process")
    gpu_ok = None
    for item in items:
        if interp and "interpret" not in item.keywords:
            item.add_marker(skip_real)
        elif "gpu" in item.keywords:
            if gpu_ok is None:
                gpu_ok = _cuda_available() and not interp
            if not gpu_ok:
                item.add_marker(skip_gpu)
    if not interp:
        _move_interpret_tests_last(items)


# ------------------------------------------------------------------------------------------------ parent side
class _InterpretChild:
    """Runs the session's `interpret` tests once in a TRITON_INTERPRET=1 child and holds their outcomes.

    The child starts when the test loop starts and runs beside the in-process tests (CI has 2 cores; the
    parent is one process, the interpreter another), and the `interpret` tests are put last, so the parent
    waits for the child only once it has nothing else to run."""

    def __init__(self, config):
        self.config = config
        self.results: dict[str, dict] | None = None
        self.failure: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, session) -> None:
        nodeids = [it.nodeid for it in session.items if "interpret" in it.keywords]
        fd, self.report_path = tempfile.mkstemp(prefix="fusedconv-interpret-", suffix=".json")
        os.close(fd)
        env = dict(os.environ, TRITON_INTERPRET="1", **{_REPORT_ENV: self.report_path})
        # One torch thread: the child shares the CPUs with the parent (the interpreter itself is single-threaded).
        env.setdefault("OMP_NUM_THREADS", "1")
        rootdir = str(self.config.rootpath)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", rootdir,
               *_durations_args(self.config), *nodeids]
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: nobody reads it while it runs
        self.deadline = time.monotonic() + INTERPRET_CHILD_TIMEOUT_S
        self.proc = subprocess.Popen(cmd, cwd=rootdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True)

    def wait(self, session) -> None:
        """Wait for the child (starting it first if it was not started) and read its outcomes."""
        if self.results is not None:
            return
        if self.proc is None:
            self.start(session)
        try:
            self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            self.failure = f"the TRITON_INTERPRET=1 child pytest ran over {INTERPRET_CHILD_TIMEOUT_S} s"
            self.results = {}
            return
        self.log.seek(0)
        output = self.log.read()
        self.log.close()
        with open(self.report_path) as f:
            text = f.read()
        os.unlink(self.report_path)
        self.results = json.loads(text) if text.strip() else {}
        if not self.results:
            self.failure = f"the TRITON_INTERPRET=1 child pytest reported no results (exit {self.proc.returncode}):" \
                           "\n" + output[-6000:]
        self.output_tail = output[-6000:]
        self.durations_report = _durations_section(output)

    def stop(self) -> None:
        """Kill a child still running (the session ended early, e.g. -x or Ctrl-C) and remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for close in (lambda: self.log.close(), lambda: os.unlink(self.report_path)):
            try:
                close()
            except (OSError, AttributeError):
                pass

    durations_report = ""

    def outcome(self, item, session) -> None:
        """Pass, fail or skip `item` as the child did."""
        self.wait(session)
        result = self.results.get(item.nodeid)
        if result is None:
            pytest.fail(self.failure or f"no result from the TRITON_INTERPRET=1 child for {item.nodeid}:\n"
                        + getattr(self, "output_tail", ""), pytrace=False)
        if result["outcome"] == "skipped":
            pytest.skip(result.get("reason", "skipped in the interpreter child"))
        if result["outcome"] == "failed":
            pytest.fail(f"[TRITON_INTERPRET=1 child]\n{result.get('longrepr', '')}", pytrace=False)


def _durations_args(config) -> list[str]:
    """The parent's `--durations` / `--durations-min` for the child: the interpreter tests are the slowest of the
    suite, and the parent only times how long each one took to *report* the child's outcome."""
    durations = config.getoption("durations", None)
    if durations is None:
        return []
    args = [f"--durations={durations}"]
    durations_min = config.getoption("durations_min", None)
    if durations_min is not None:
        args.append(f"--durations-min={durations_min}")
    return args


def _durations_section(output: str) -> str:
    """The child's "slowest durations" section (from its header line to the blank line or summary after it)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if "slowest" in line and "durations" in line), None)
    if start is None:
        return ""
    end = start + 1
    while end < len(lines) and lines[end].strip() and not lines[end].startswith("="):
        end += 1
    return "\n".join(lines[start:end])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the interpreter child's slowest tests after the parent's own (its timings are the real ones)."""
    child = getattr(config, "_fusedconv_interpret_child", None)
    if child is not None and child.durations_report:
        terminalreporter.write_sep("=", "TRITON_INTERPRET=1 child: " + child.durations_report.splitlines()[0]
                                   .strip(" ="))
        terminalreporter.write_line("\n".join(child.durations_report.splitlines()[1:]))


def _move_interpret_tests_last(items) -> None:
    """Stable: the in-process tests first, then the `interpret` tests (which only report the child's outcomes),
    then the parent-side tests that read what the child wrote (fixture `interpret_child_finished`)."""
    def group(item):
        if "interpret" in item.keywords:
            return 1
        return 2 if "interpret_child_finished" in getattr(item, "fixturenames", ()) else 0

    items.sort(key=group)  # sort is stable: each group keeps its collection order


def _background_modules(session) -> list:
    """The selected test modules that start a long child run early (`start_in_background(session)`, and
    `stop_background()` for the end of the session), e.g. test_kernel_compile.py's triton-3.6 run."""
    modules = []
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_in_background") and module not in modules:
            modules.append(module)
    return modules


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """Start the interpreter child and the modules' background runs before the first test, so they run beside
    the in-process tests."""
    if session.config.option.collectonly:
        return
    child = getattr(session.config, "_fusedconv_interpret_child", None)
    if child is not None and any("interpret" in it.keywords for it in session.items):
        child.start(session)
    for module in _background_modules(session):
        module.start_in_background(session)


def pytest_sessionfinish(session):
    child = getattr(session.config, "_fusedconv_interpret_child", None)
    if child is not None and child.results is None:
        child.stop()
    for module in _background_modules(session):
        module.stop_background()


@pytest.fixture
def interpret_child_finished(request):
    """For a parent-side test that reads what the interpreter child wrote: waits until the child has ended."""
    child = getattr(request.config, "_fusedconv_interpret_child", None)
    if child is not None and (child.proc is not None or child.results is not None):
        child.wait(request.session)


def pytest_configure(config):
    if not interpreter_active():
        config._fusedconv_interpret_child = _InterpretChild(config)
    elif os.environ.get(_REPORT_ENV):
        config.pluginmanager.register(_ChildRecorder(os.environ[_REPORT_ENV]), "fusedconv-interpret-recorder")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    child = getattr(item.config, "_fusedconv_interpret_child", None)
    if child is not None and "interpret" in item.keywords:
        # The test body runs in the child; here it only reports the child's outcome.
        item.runtest = lambda: child.outcome(item, item.session)


# ------------------------------------------------------------------------------------------------ child side
class _ChildRecorder:
    """Child-process plugin: collects each test's outcome and writes them as JSON at the end of the session."""

    def __init__(self, path: str):
        self.path = path
        self.results: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        entry = self.results.setdefault(report.nodeid, {"outcome": "passed"})
        if report.failed:
            entry["outcome"] = "failed"
            entry["longrepr"] = entry.get("longrepr", "") + f"[{report.when}] " + str(report.longreprtext)[-8000:]
        elif report.skipped and entry["outcome"] != "failed":
            entry["outcome"] = "skipped"
            longrepr = report.longrepr
            entry["reason"] = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)

    def pytest_sessionfinish(self, session):
        with open(self.path, "w") as f:
            json.dump(self.results, f)


@pytest.fixture
def inplace_calls(monkeypatch):
    """The residual data pointers of every in-place oneDNN residual conv the CPU path runs (shared by the
    private-residual and owned-input tests); small convs take the oneDNN route too (`onednn_small_convs`)."""
    from fusedconv import cpu

    monkeypatch.setattr(cpu, "small_conv_macs", 0)

    calls = []
    real = cpu._pointwise_binary_inplace

    def counting(residual, *args):
        calls.append(residual.data_ptr())
        return real(residual, *args)

    monkeypatch.setattr(cpu, "_pointwise_binary_inplace", counting)
    return calls


@pytest.fixture
def onednn_small_convs(monkeypatch):
    """Small convs on the oneDNN route too (cpu.small_conv_macs = 0): for tests of that route's mechanics (direct
    calls, in-place residuals, edits seen) on shapes small enough to run fast, which by default stay on F.conv2d."""
    from fusedconv import cpu

    monkeypatch.setattr(cpu, "small_conv_macs", 0)


@pytest.fixture
def module_calls(monkeypatch):
    """Counts FusedConv2d calls that went through the module (FusedConv2d.forward → cpu.eager_forward): the flat
    forward's direct calls (graph/flat_fused.py) do not."""
    from fusedconv import cpu

    count = [0]
    real = cpu.eager_forward

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu, "eager_forward", counting)
    return count
