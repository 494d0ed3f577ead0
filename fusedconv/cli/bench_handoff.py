"""`fusedconv bench`: hands the remaining arguments to the benchmark suite, which lives in a source checkout's
`bench/` package and is not part of the installed library.

The suite is looked up at run time (importlib), never imported by the library's modules, so the package does
not depend on a checkout; from an installed package without one, the command says so in one line.
"""

from __future__ import annotations

import importlib
import os
import sys

from fusedconv.cli.status import CLIError

# The folder that holds the `fusedconv` package: a source checkout's root when installed editable.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _import_bench():
    """The benchmark suite lives in the source checkout's bench/ package, not in the installed wheel."""
    try:
        bench_run = importlib.import_module("bench.run")
        if hasattr(bench_run, "main"):
            return bench_run
    except ImportError:
        pass
    for root in (os.getcwd(), PACKAGE_PARENT):
        if os.path.isfile(os.path.join(root, "bench", "run.py")) and os.path.isfile(
                os.path.join(root, "bench", "metrics.py")):
            sys.path.insert(0, root)
            sys.modules.pop("bench", None)
            return importlib.import_module("bench.run")
    raise CLIError("bench: the benchmark suite needs a source checkout (its bench/ folder is not part of the "
                   "installed package); run `fusedconv bench` from a fusedconv checkout or `python -m bench` there")


def cmd_bench(args) -> int:
    bench_run = _import_bench()
    return bench_run.main(list(args.bench_args), prog="fusedconv bench")
