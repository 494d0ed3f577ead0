"""Makes `fusedconv.kernels` importable from a source checkout that was not installed for this interpreter.

Installed, setuptools maps the top-level `kernels/` folder to `fusedconv.kernels` (pyproject.toml
`package-dir`; an editable install does the same with a meta-path finder). Run from the repository root with
the package installed for another Python, or not at all (`python -m bench` on a machine whose `pip` is not
this `python`'s), `fusedconv` is found on the current directory and nothing maps its kernels: every import
then failed with "No module named 'fusedconv.kernels'". Here, only when nothing else provides the
subpackage, the checkout's own `kernels/` beside the package is loaded under that name.
"""

from __future__ import annotations

import importlib.util
import os
import sys

NAME = "fusedconv.kernels"


def map_checkout_kernels() -> bool:
    """Load the checkout's `kernels/` as `fusedconv.kernels` when no installed mapping provides it; True when
    it did. Called by `fusedconv/__init__.py` before anything imports the kernels."""
    if NAME in sys.modules or importlib.util.find_spec(NAME) is not None:
        return False
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return False  # not a checkout either: the import that follows reports the missing subpackage
    spec = importlib.util.spec_from_file_location(NAME, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    return True
