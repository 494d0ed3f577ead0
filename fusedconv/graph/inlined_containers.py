"""Guard terms for what a rewritten block's graph no longer runs as written: the plain Sequentials it reaches into
and the children whose calls it dropped.

A rewritten block's graph reaches into some of its Sequential children rather than calling them as they were:
  * an absorbed Sequential (scope_pass.match_absorb: it ends in a fused layer that takes the add / activation
    after it) is inlined: the graph calls its leaves one by one, through its nested plain Sequentials, and drops
    the calls of its nn.Identity stand-ins;
  * a Sequential ending in the conv that took the BN / activation after it (a tail chain) is still called, but
    now returns what the block's next layers used to compute.
The block's own forward (its exact fallback, graph/roles.py) would run those Sequentials as they are now, so the
graph is right only while they are as convert left them. Per such Sequential the block's guard checks on every
call (the path to it from the block by identity first, so that each expression is safe to evaluate):
  * its children, and those of each plain Sequential in it on the way to the fused layer, are the same objects in
    the same order (`same_children`: nothing appended, removed, replaced or moved);
  * nothing runs around their forwards: no hooks, no instance-level forward, not compiled in place, the class and
    its forward unchanged — for an inlined Sequential also for every plain Sequential nested in it and for its
    nn.Identity stand-ins, whose calls the graph dropped.
Likewise for each child whose call the rewritten graph dropped (a BN's nn.Identity stand-in, an activation or a
DropPath the fused layer took over, a conv left where it was under a fused twin): the path to it by identity, and
nothing running around its forward (`called_module_terms`).
A hook or module added there after convert then sends the call to the fallback instead of being skipped (whose
stand-in for a hooked nn.Identity carries its hooks, graph/roles.py: the hook sees what the BN computed).
"""
from __future__ import annotations

import torch.nn as nn

from fusedconv.graph.legality import is_plain_sequential
from fusedconv.graph.patterns import Guard
from fusedconv.graph.private_residual import hooked_source


def sequential_terms(g: Guard, block: nn.Module, path: str, expect: list, inlined: bool,
                     along: list[str] | None = None) -> None:
    """Add to `g` the terms for the plain Sequential at dotted `path` under `block` (module doc). `inlined`: the
    graph calls its leaves (every nested plain Sequential and nn.Identity stand-in is checked); otherwise only the
    containers on the way to its last child are (`along`: the names of those steps below `path`, a tail chain's)."""
    module_expr, where = _path_terms(g, block, path, expect)
    seq = block.get_submodule(path)
    if inlined:
        _inlined(g, seq, module_expr, where, expect)
        return
    for step in [None, *(along or [])]:
        if step is not None:
            seq = seq._modules[step]
            module_expr, where = f"{module_expr}._modules[{step!r}]", f"{where}.{step}"
        _children(g, seq, module_expr, where, expect)
        _runs_as_written(g, seq, module_expr, where, expect)


def called_module_terms(g: Guard, block: nn.Module, path: str, expect: list) -> None:
    """Add to `g` the terms for a child at dotted `path` whose calls the rewritten graph dropped (a BN's nn.Identity
    stand-in, an activation module the fused layer took over): while it is there and nothing runs around its
    forward, dropping the call changes nothing the block's own forward would compute. A path no longer in the
    block has nothing to check."""
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return
    expr, where = _path_terms(g, block, path, expect)
    _runs_as_written(g, module, expr, where, expect)


def _path_terms(g: Guard, block: nn.Module, path: str, expect: list) -> tuple[str, str]:
    """Terms checking each step of the path to the submodule at `path` by identity; (its expression, its name)."""
    parts = path.split(".")
    expr = "m"  # the expression of the current module's _modules (the block's own: `m`)
    where = "self"
    for i, name in enumerate(parts):
        expect.append(block.get_submodule(".".join(parts[:i + 1])))
        where = f"{where}.{name}"
        g.check(f"{expr}.get({name!r}, MISSING) is e[{len(expect) - 1}]", f"{where} unchanged", describe=False)
        module_expr = f"{expr}[{name!r}]"
        expr = f"{module_expr}._modules"
    return module_expr, where


def _inlined(g: Guard, seq: nn.Module, x: str, where: str, expect: list) -> None:
    _children(g, seq, x, where, expect)
    _runs_as_written(g, seq, x, where, expect)
    for name, child in seq._modules.items():
        cx, cw = f"{x}._modules[{name!r}]", f"{where}.{name}"
        if is_plain_sequential(child):
            _inlined(g, child, cx, cw, expect)
        elif type(child) is nn.Identity:
            _runs_as_written(g, child, cx, cw, expect)


def _children(g: Guard, seq: nn.Module, x: str, where: str, expect: list) -> None:
    expect.append(tuple(seq._modules.values()))
    g.check(f"same_children({x}._modules, e[{len(expect) - 1}])", f"{where}'s submodules unchanged", describe=False)


def _runs_as_written(g: Guard, module: nn.Module, x: str, where: str, expect: list) -> None:
    # Its class's forward by identity rather than the class itself: the flat forward's trace (graph/flat.py) asks
    # the block's guard which specialization to inline while the modules it goes through wear a read-recording
    # subclass (tracing._recording_reads), which keeps the forward.
    expect.append(type(module).forward)
    c = len(expect) - 1
    g.check(f"type({x}).forward is e[{c}] and 'forward' not in {x}.__dict__ "
            f"and {x}.__dict__.get('_compiled_call_impl') is None and not {hooked_source(f'{x}.__dict__')}",
            f"{where} has no hooks and runs its own forward", describe=False)
