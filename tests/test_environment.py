"""The test environment is the one README's test command builds: every package of pyproject's `test` extra.

Several test files use `pytest.importorskip` for optional integrations (onnxruntime, timm, ...). Without this
check a missing package would turn those tests into quiet skips and the suite would still look green.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11 (tomllib)")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _extra(name: str) -> list[Requirement]:
    with open(PYPROJECT, "rb") as f:
        project = tomllib.load(f)["project"]
    return [Requirement(r) for r in project["optional-dependencies"][name]]


def test_test_extra_is_installed():
    missing, wrong = [], []
    for req in _extra("test"):
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req} (installed {version})")
    assert not missing and not wrong, (
        f"the test environment lacks packages of the [test] extra: missing {missing}, wrong version {wrong}; "
        "install it with README's test command: pip install -e \".[test]\"")


def test_test_extra_covers_plotting():
    # The benchmark's plots are a feature under test (tests/test_bench_math.py, tests/test_cli.py).
    assert "matplotlib" in {r.name for r in _extra("test")}
