"""fusedconv/_checkout.py: a source checkout imports its kernels even where the package is not installed for
the running Python (a GPU machine whose `pip` belongs to another interpreter ran `python -m bench` and failed
with "No module named 'fusedconv.kernels'")."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bare_checkout(tmp_path):
    """The package and its kernels copied into a folder no installed mapping knows."""
    for name in ("fusedconv", "kernels"):
        shutil.copytree(os.path.join(REPO, name), tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def _run_without_site(cwd, code: str) -> subprocess.CompletedProcess:
    """`python -S`: no site module, so no .pth file (the editable install's finder) is read; torch and the
    other dependencies still come from the site-packages folders, put on PYTHONPATH behind the checkout."""
    paths = [str(cwd)] + [p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                      *site.getsitepackages()} if os.path.isdir(p)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_an_uninstalled_checkout_imports_its_own_kernels(tmp_path):
    root = _bare_checkout(tmp_path)
    out = _run_without_site(root, "import fusedconv, fusedconv.kernels as k, fusedconv.kernels.reference as r;"
                                  "print(k.__file__); print(r.__file__); print(fusedconv.FusedConv2d.__name__)")
    assert out.returncode == 0, out.stderr[-3000:]
    kernels_file, reference_file, cls = out.stdout.split()
    assert os.path.samefile(kernels_file, root / "kernels" / "__init__.py")
    assert os.path.samefile(reference_file, root / "kernels" / "reference.py")
    assert cls == "FusedConv2d"


def test_an_installed_mapping_wins_and_nothing_is_loaded_twice():
    import fusedconv
    import fusedconv.kernels
    from fusedconv._checkout import map_checkout_kernels

    assert map_checkout_kernels() is False  # already provided: left alone
    assert sys.modules["fusedconv.kernels"] is fusedconv.kernels


def test_without_a_kernels_folder_the_import_error_names_the_subpackage(tmp_path):
    root = _bare_checkout(tmp_path)
    shutil.rmtree(root / "kernels")
    out = _run_without_site(root, "import fusedconv")
    assert out.returncode != 0
    assert "No module named 'fusedconv.kernels'" in out.stderr


@pytest.mark.parametrize("broken", ["raise RuntimeError('kernels failed to import')\n"])
def test_a_failing_kernels_import_is_raised_and_not_left_half_loaded(tmp_path, broken):
    root = _bare_checkout(tmp_path)
    with open(root / "kernels" / "__init__.py", "a") as f:
        f.write(broken)
    code = ("import sys\ntry:\n    import fusedconv\nexcept RuntimeError as e:\n    print('raised', e)\n"
            "print('fusedconv.kernels' in sys.modules)")
    out = _run_without_site(root, code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["raised kernels failed to import", "False"]
