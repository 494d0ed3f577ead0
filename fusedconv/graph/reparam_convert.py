"""convert() over re-parameterized blocks: fuse the merged conv's chain inside each of their specializations.

A re-parameterized block is guarded already (`reparam_scope.py`): its own forward can no longer run (its branches
are gone), so the data-flow pass, which traces a block's forward, leaves it alone. Here each of its
specializations is traced instead (with the block's guarded forward dispatching straight to that
specialization), then rewritten by the same `ScopeRewrite` as any other block. Each new specialization keeps
the guard of the one it came from, and the new table keeps the old one as its base: a call the new guards
reject runs the base's specialization over role children (`roles.py`: the FusedConv2d bound back to the merged
conv it replaced), or raises as the base would. Children of these blocks were converted by the data-flow pass.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

from fusedconv.graph.legality import module_use_counts
from fusedconv.graph.reparam_graph import KIND
from fusedconv.graph.scope_rewrite import ScopeRewrite
from fusedconv.graph.specialize import _GUARDS, GuardTable, guard_table
from fusedconv.graph.tracing import trace_scope
from fusedconv.report import ConversionReport


class _OneEntry:
    """Stands in for a block's GuardTable while one specialization is traced: dispatches to it unguarded."""

    def __init__(self, fn):
        self.fn = fn

    def dispatch(self, block, *args):
        return self.fn(block, *args)


@contextlib.contextmanager
def _dispatching_to(module: nn.Module, table: GuardTable, k: int):
    module.__dict__[_GUARDS] = _OneEntry(table.entries[k].fn)
    try:
        yield
    finally:
        module.__dict__[_GUARDS] = table


def fuse_reparameterized(model: nn.Module, report: ConversionReport) -> None:
    """Fuse the chains inside every re-parameterized (not yet converted) block of `model`, in place."""
    uses = module_use_counts(model)
    for scope, module in list(model.named_modules()):
        table = guard_table(module)
        if table is None or table.kind != KIND:
            continue
        traced = []
        for k, entry in enumerate(table.entries):
            with _dispatching_to(module, table, k):
                try:
                    traced.append((entry.pattern, trace_scope(module, entry.pattern.concrete_args(table.params)
                                                              or None)))
                except Exception:  # noqa: BLE001 - this pattern keeps the base's specialization (fallback)
                    continue
        if not traced:
            continue
        _, guards = ScopeRewrite(module, scope, table.params, traced, uses, report, base=table).run()
        if guards is not None:
            report.add_guards(scope, table.original.__name__, guards)
