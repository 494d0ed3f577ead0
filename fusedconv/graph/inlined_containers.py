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
  * nothing runs around their forwards: no hooks, no instance-level forward, not compiled in place, their class's
    forward unchanged — for an inlined Sequential also for every plain Sequential nested in it and for its
    nn.Identity stand-ins, whose calls the graph dropped.
It is one term per Sequential: the path by identity, then `unchanged_subtree` over a snapshot of the
modules that matter, top down (each a child of one checked before it, so the snapshot's objects are the tree's).
Spelled out as expressions walking the tree, the same checks tripled the whole-model flat check's cost on
mobilenet_v2 (its ten residual blocks; bench/cpu_gap.py, 0.040 -> 0.121 ms back to back).
Likewise for each child whose call the rewritten graph dropped (a BN's nn.Identity stand-in, an activation or a
DropPath the fused layer took over, a conv left where it was under a fused twin): the path to it by identity,
nothing running around its forward, and its settings as convert read them (`called_module_terms`: a shared
`nn.LeakyReLU` whose calls two fused convs took over keeps its module; its `negative_slope` edited after convert
must reach the block's fallback, as its forward would have read it).
A hook or module added there after convert then sends the call to the fallback instead of being skipped (whose
stand-in for a hooked nn.Identity carries its hooks, graph/roles.py: the hook sees what the BN computed).
"""
from __future__ import annotations

import copy

import torch.nn as nn

from fusedconv.graph.legality import is_plain_sequential
from fusedconv.graph.model_code import MISSING, plain_container, same_children, same_plain
from fusedconv.graph.patterns import Guard
from fusedconv.graph.private_residual import hooked


def runs_as_written(module: nn.Module, forward, settings: tuple = ()) -> bool:
    """A call of `module` runs `forward` (its class's, by identity) and nothing around it: no hooks, no
    instance-level forward, not compiled in place; and its `settings` (`module_settings`) are what they were."""
    d = module.__dict__
    return (type(module).forward is forward and "forward" not in d and d.get("_compiled_call_impl") is None
            and not hooked(module) and (not settings or _same_settings(d, settings)))


def module_settings(module: nn.Module) -> tuple:
    """What `module`'s forward may read of its own instance state besides its children and tensors: each public
    attribute of its `__dict__` but `training` (an activation's `negative_slope`, `min_val`, `approximate`,
    `inplace`), as (name, by value, value): plain values and containers by value (a copy), other objects by
    identity."""
    out = []
    for name, value in module.__dict__.items():
        if name.startswith("_") or name in ("training", "forward"):
            continue
        by_value = plain_container(value)
        out.append((name, by_value, copy.deepcopy(value) if by_value else value))
    return tuple(out)


def _same_settings(d: dict, settings: tuple) -> bool:
    for name, by_value, value in settings:
        now = d.get(name, MISSING)
        if not (same_plain(now, value) if by_value else now is value):
            return False
    return True


def unchanged_subtree(spec: tuple) -> bool:
    """Each (module, forward or None, children or None) of `spec`, top down: its children are still `children`
    (`same_children`) and a call of it still runs `forward` alone (`runs_as_written`). The caller checked the first
    module's identity; each later one is a child of one checked before it, so reading it from `spec` is reading it
    from the tree."""
    for module, forward, children in spec:
        if children is not None and not same_children(module.__dict__["_modules"], children):
            return False
        if forward is not None and not runs_as_written(module, forward):
            return False
    return True


def sequential_terms(g: Guard, block: nn.Module, path: str, expect: list, inlined: bool,
                     along: list[str] | None = None) -> None:
    """Add to `g` the term for the plain Sequential at dotted `path` under `block` (module doc). `inlined`: the
    graph calls its leaves (every nested plain Sequential and nn.Identity stand-in is checked); otherwise only the
    containers on the way to its last child are (`along`: the names of those steps below `path`, a tail chain's)."""
    seq = block.get_submodule(path)
    spec: list[tuple] = []
    if inlined:
        _inlined(seq, spec)
    else:
        module = seq
        for step in [None, *(along or [])]:
            if step is not None:
                module = module._modules[step]
            spec.append((module, type(module).forward, tuple(module._modules.values())))
    path_term = _path_term(block, path, expect)
    expect.append(tuple(spec))
    g.check(f"{path_term} and unchanged_subtree(e[{len(expect) - 1}])",
            f"self.{path} and what it holds as convert left them", describe=False)


def called_module_terms(g: Guard, block: nn.Module, path: str, expect: list) -> None:
    """Add to `g` the term for a child at dotted `path` whose calls the rewritten graph dropped (a BN's nn.Identity
    stand-in, an activation module the fused layer took over): while it is there and nothing runs around its
    forward, dropping the call changes nothing the block's own forward would compute. A path no longer in the
    block has nothing to check."""
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return
    path_term = _path_term(block, path, expect)
    settings = module_settings(module)
    expect += [type(module).forward, settings]
    args = f"e[{len(expect) - 3}], e[{len(expect) - 2}]" + (f", e[{len(expect) - 1}]" if settings else "")
    g.check(f"{path_term} and runs_as_written({args})",
            f"self.{path} has no hooks, runs its own forward and keeps its settings", describe=False)


def _path_term(block: nn.Module, path: str, expect: list) -> str:
    """A term checking each step of the path from the block to the submodule at `path` by identity (the submodule
    itself ends up last in `expect`)."""
    parts = path.split(".")
    terms = []
    expr = "m"  # the expression of the current module's _modules (the block's own: `m`)
    for i, name in enumerate(parts):
        expect.append(block.get_submodule(".".join(parts[:i + 1])))
        terms.append(f"{expr}.get({name!r}, MISSING) is e[{len(expect) - 1}]")
        expr = f"e[{len(expect) - 1}]._modules"
    return " and ".join(terms)


def _inlined(seq: nn.Module, spec: list) -> None:
    # Its forward's class by identity rather than the class itself: the flat forward's trace (graph/flat.py) asks
    # the block's guard which specialization to inline while the modules it goes through wear a read-recording
    # subclass (tracing._recording_reads), which keeps the forward.
    spec.append((seq, type(seq).forward, tuple(seq._modules.values())))
    for child in seq._modules.values():
        if is_plain_sequential(child):
            _inlined(child, spec)
        elif type(child) is nn.Identity:
            spec.append((child, type(child).forward, None))
