"""pytest setup: runs `interpret` tests under TRITON_INTERPRET=1 in a child pytest, everything else in-process.

Why: Triton reads TRITON_INTERPRET when a kernel is *decorated* (`@triton.jit` returns an interpreter function
instead of a JITFunction), i.e. when `fusedconv` is imported. The ahead-of-time compile tests need real
JITFunctions and the interpreter tests need interpreted ones, so one process cannot hold both.

How (one `python -m pytest -q` from the repo root runs both, every test counted as passed / failed / skipped):
  * Mark a test `@pytest.mark.interpret` (a module can set `pytestmark = pytest.mark.interpret`). Any test
    file may do so — e.g. tests/test_fuzz.py for hypothesis fuzzing of the kernel under the interpreter.
  * In the normal (parent) run, the first time an `interpret` test is due, this conftest starts ONE child
    `python -m pytest` with TRITON_INTERPRET=1 on the node ids of all selected `interpret` tests, and waits
    for it. The child records every test's outcome (and failure text) in a JSON file; each `interpret` test
    in the parent then passes, fails (with the child's report) or skips (with the child's reason) accordingly.
    `-k`, `-m`, `-x` and node ids select the child's tests as usual, since the child gets the final selection.
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


# ------------------------------------------------------------------------------------------------ parent side
class _InterpretChild:
    """Runs the session's `interpret` tests once in a TRITON_INTERPRET=1 child and holds their outcomes."""

    def __init__(self, config):
        self.config = config
        self.results: dict[str, dict] | None = None
        self.failure: str | None = None

    def run(self, session) -> None:
        nodeids = [it.nodeid for it in session.items if "interpret" in it.keywords]
        fd, report_path = tempfile.mkstemp(prefix="fusedconv-interpret-", suffix=".json")
        os.close(fd)
        env = dict(os.environ, TRITON_INTERPRET="1", **{_REPORT_ENV: report_path})
        rootdir = str(self.config.rootpath)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", rootdir,
               *_durations_args(self.config), *nodeids]
        try:
            proc = subprocess.run(cmd, cwd=rootdir, env=env, capture_output=True, text=True,
                                  timeout=INTERPRET_CHILD_TIMEOUT_S)
            output = proc.stdout + proc.stderr
            with open(report_path) as f:
                text = f.read()
            self.results = json.loads(text) if text.strip() else {}
            if not self.results:
                self.failure = f"the TRITON_INTERPRET=1 child pytest reported no results (exit {proc.returncode}):\n" \
                               + output[-6000:]
            self.output_tail = output[-6000:]
            self.durations_report = _durations_section(output)
        except subprocess.TimeoutExpired:
            self.failure = f"the TRITON_INTERPRET=1 child pytest ran over {INTERPRET_CHILD_TIMEOUT_S} s"
            self.results = {}
        finally:
            try:
                os.unlink(report_path)
            except OSError:
                pass

    durations_report = ""

    def outcome(self, item, session) -> None:
        """Pass, fail or skip `item` as the child did."""
        if self.results is None:
            self.run(session)
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
    private-residual and owned-input tests)."""
    from fusedconv import cpu

    calls = []
    real = cpu._pointwise_binary_inplace

    def counting(residual, *args):
        calls.append(residual.data_ptr())
        return real(residual, *args)

    monkeypatch.setattr(cpu, "_pointwise_binary_inplace", counting)
    return calls
