"""The import contract in pyproject.toml ([tool.importlinter]): layers from the kernels up to the command line,
no import of the benchmark suite from the library, no import cycles inside a package; checked with import-linter.

The package is checked as it is installed: `kernels/` becomes `fusedconv.kernels` (setuptools package-dir), which
a checkout's folder layout does not show, so the test copies the sources into that layout first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYPROJECT = os.path.join(REPO, "pyproject.toml")
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def stage_installed_layout(dest: str) -> None:
    """fusedconv/, kernels/ as fusedconv/kernels/, and bench/ under `dest`, the way the wheel (plus a checkout's
    bench/) puts them on sys.path."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(REPO, "fusedconv"), os.path.join(dest, "fusedconv"), ignore=ignore)
    shutil.copytree(os.path.join(REPO, "kernels"), os.path.join(dest, "fusedconv", "kernels"), ignore=ignore)
    shutil.copytree(os.path.join(REPO, "bench"), os.path.join(dest, "bench"), ignore=ignore)


def lint(root: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=root)  # before the editable install's finder, so the staged copy is checked
    return subprocess.run([sys.executable, "-c", LINT, PYPROJECT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def test_import_contract_holds(tmp_path):
    stage_installed_layout(str(tmp_path))
    proc = lint(str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout, proc.stdout


def test_staged_copy_is_what_grimp_reads(tmp_path):
    """The check must read the kernels as part of the package, or it could not see an op importing them."""
    stage_installed_layout(str(tmp_path))
    code = ("import sys, grimp; g = grimp.build_graph('fusedconv'); "
            "print(sorted(g.find_modules_directly_imported_by('fusedconv.activations')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fusedconv.kernels.reference" in proc.stdout, proc.stdout


if __name__ == "__main__":  # `python tests/test_architecture.py`: the full import-linter report, by hand
    import tempfile

    with tempfile.TemporaryDirectory() as staged:
        stage_installed_layout(staged)
        result = lint(staged)
        print(result.stdout + result.stderr)
        sys.exit(result.returncode)
