"""Re-parameterizing one block under guards: each call pattern traced and merged, the block kept itself.

The same mechanism as convert's rewrites (`scope_rewrite.py`): every call pattern of the block's forward
(`patterns.call_patterns`: parameters that default to None both given and left out) is traced
(`tracing.trace_scope` with `ReparamTracer`, recording the attributes read on the block and on each submodule
the trace went through), its sums are merged (`reparam_graph.ScopePass`), and the block becomes a guarded
instance of its own class (`specialize.install`) whose specializations are the merged graphs. Merges that are
the same in several patterns share one conv (`reparam_conv`, `reparam_conv_1`, ...). What no specialization
references any more (the branches, their learned scalars) is taken off the block, so its state_dict holds
the merged conv instead of the branches; stateless children (activation, identity, drop-path) stay.

What happens when a guard fails (a call pattern no trace covered, `self.use_identity` flipped, a merged
branch set back, a child replaced) was a design choice between (a) keeping the original branches hidden on the
block (unregistered, moved by `.to()`, carried by deepcopy / pickle) so the block's own forward can run, and
(b) raising a clear error. This module does (b), `specialize.GuardMiss` naming the block, the assumption that
broke and the patterns it was merged for, because:
  * the branches are the training-time weights: after `load_state_dict` into the merged model (the usual
    deployment step: keys are `reparam_conv.*`) hidden branches would be stale, and a fallback over them would
    be silently wrong, which is worse than an error;
  * a deployment model carrying a second, unmerged copy of every block's weights defeats re-parameterization;
  * re-parameterization is a one-way transform in every published implementation (timm, MobileOne, DBB
    delete their branches): nothing can call the training-time forward of a merged block.
What can be known at rewrite time is covered instead of raising: every call pattern the signature allows is
traced while the branches still exist, so calling the same block two ways (an optional argument given or
left out) runs a merged graph for each.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
import torch.nn as nn

from fusedconv.graph.inlined_containers import called_module_terms
from fusedconv.graph.patterns import (
    CallPattern, Param, UnsupportedSignature, attribute_terms, build_guard, call_patterns, forward_params,
    merge_patterns,
)
from fusedconv.graph.reparam_graph import KIND, MERGED_NAME, ScopePass
from fusedconv.graph.reparam_leaves import ReparamTracer
from fusedconv.graph.specialize import GuardTable, Specialization, install
from fusedconv.graph.tracing import ScopeTrace, trace_scope
from fusedconv.report import ConversionReport


def trace_patterns(module: nn.Module) -> tuple[list[Param], list[tuple[CallPattern, ScopeTrace]]]:
    """(parameters, [(pattern, trace)]) for every call pattern of `module` that traces; raises the first
    tracing error when none does, UnsupportedSignature for *args / **kwargs forwards."""
    params = forward_params(module)
    traced, first_error = [], None
    for pattern in call_patterns(params):
        try:
            traced.append((pattern, trace_scope(module, pattern.concrete_args(params) or None, ReparamTracer())))
        except Exception as e:  # noqa: BLE001 - any failure means fx cannot see this call pattern
            first_error = first_error or e
    if not traced:
        raise first_error
    return params, traced


def _targets(graph: fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}


def _same_conv(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    geometry = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    return all(getattr(a, k) == getattr(b, k) for k in geometry) and torch.equal(a.weight, b.weight) and \
        (a.bias is None) == (b.bias is None) and (a.bias is None or torch.equal(a.bias, b.bias))


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _prune(module: nn.Module, prefix: str, keep: set[str], removed: set[str]) -> None:
    """Take off `module` every parameter, buffer and stateful submodule whose path no kept graph references."""
    def used(path: str) -> bool:
        return path in keep or any(k.startswith(path + ".") for k in keep)

    for slot in ("_parameters", "_buffers"):
        for name in list(module.__dict__[slot]):
            if not used(prefix + name):
                del module.__dict__[slot][name]
                removed.add(prefix + name)
    for name, child in list(module._modules.items()):
        path = prefix + name
        if child is None or path in keep:
            continue
        if used(path):
            _prune(child, path + ".", keep, removed)
        elif _has_state(child):
            del module._modules[name]
            removed.add(path)


def _module_expr(path: str) -> str:
    """Source text, in a guard, for the submodule at dotted `path` of the block (`m` is its _modules)."""
    first, *rest = path.split(".")
    return f"m[{first!r}]" + "".join(f"._modules[{p!r}]" for p in rest)


def _normalized(graph: fx.Graph) -> str:
    """The generated body with placeholders renamed by position, so two patterns running the same code match."""
    body = graph.python_code(root_module="self").src.split("):\n", 1)[-1]
    for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        body = re.sub(rf"\b{re.escape(n.name)}\b", f"__param{i}", body)
    return body


class ReparamRewrite:
    """Merges the sums of one block over all its call patterns; `run()` returns guard descriptions or None."""

    def __init__(self, module: nn.Module, scope: str, report: ConversionReport):
        self.module, self.scope, self.report = module, scope, report

    def run(self, params: list[Param], traced: list[tuple[CallPattern, ScopeTrace]]) -> list[str] | None:
        module = self.module
        # A name the merged conv may take: not one of the block's attributes, except a plain None placeholder
        # (timm's `self.reparam_conv = None`, which the block's own forward then finds set).
        taken = {k for k, v in module.__dict__.items() if v is not None} | set(module._modules) | \
            set(module._parameters) | set(module._buffers)
        passes = []
        for pattern, trace in traced:
            rows = ConversionReport()
            sp = ScopePass(module, self.scope, rows, trace.graph)
            sp.taken = taken
            # (the pass rewrites the trace's graph: the children it called before, to tell the calls it drops)
            sp.called_before = {str(n.target) for n in trace.graph.nodes if n.op == "call_module"}
            sp.run()
            passes.append((pattern, trace, sp, rows))
        if not any(sp.merged for _, _, sp, _ in passes):
            self.report.extend(passes[0][3])  # (what could not be merged, and why)
            return None
        # What the first pattern did, and what the first pattern that merged did where that is another one.
        first_rows = [passes[0][3]] + ([] if passes[0][2].merged else
                                       [next(rows for _, _, sp, rows in passes if sp.merged)])
        passes = [(pattern, trace, sp) for pattern, trace, sp, _ in passes]
        keep = set().union(*(_targets(sp.graph) for _, _, sp in passes))
        live = self._live_sources(passes, keep)
        if live:
            # Its merged copy would be a snapshot of weights the block still uses live: an in-place edit (a
            # fine-tuning step, load_state_dict) would reach one of the two and not the other.
            self.report.add(self.scope, tuple(f"{self.scope}.{p}" if self.scope else p for p in live), KIND,
                            "skipped", f"{live[0]} is merged into a conv but also called outside the merged sum "
                            "(by this or another call pattern): not merged, so edits to its weights reach every use")
            return None
        for rows in first_rows:
            self.report.extend(rows)
        if isinstance(module, fx.GraphModule):
            # Its forward is its graph: straight-line code, the same for every call; rewritten in place.
            return self._rewrite_graph_module(passes[0][2])
        merged = self._share_convs(passes, taken)
        keep = set().union(*(_targets(sp.graph) for _, _, sp in passes))  # (the merged convs as renamed)
        for name, conv in merged.items():
            module.__dict__.pop(name, None)  # the None placeholder, if any
            module._modules[name] = conv
        removed: set[str] = set()
        _prune(module, "", keep, removed)
        table = self._table(params, passes, removed, tuple(merged))
        install(module, table)
        for _, _, sp in passes[1:]:
            if not sp.merged:
                self.report.notes.append(f"reparam: {self.scope or '<root>'}: one call pattern has no mergeable "
                                         "sum; its branches are kept for it")
        return table.describe()

    def _live_sources(self, passes, keep: set[str]) -> list[str]:
        """The stateful modules merged into a conv that a kept graph still calls or reads (a module called twice,
        once in a merged sum and once outside it; a pattern that merged nothing keeping the branches)."""
        prefix = f"{self.scope}." if self.scope else ""
        live = []
        for _, _, sp in passes:
            for name in sp.added:
                for qual in sp.sources[name]:
                    path = qual[len(prefix):] if qual.startswith(prefix) else qual
                    used = any(t == path or t.startswith(path + ".") or path.startswith(t + ".") for t in keep)
                    if used and path not in live and _has_state(self.module.get_submodule(path)):
                        live.append(path)
        return live

    def _rewrite_graph_module(self, sp: ScopePass) -> None:
        module = self.module
        for name in sp.added:
            module.add_submodule(name, sp.gm.get_submodule(name))
        module.graph = sp.graph
        module.recompile()
        module.delete_all_unused_submodules()
        return None

    def _share_convs(self, passes, taken: set) -> dict[str, nn.Conv2d]:
        """One block-level name per distinct merged conv; each pattern's graph is renamed to call it."""
        merged: dict[str, nn.Conv2d] = {}
        origin: dict[str, tuple] = {}
        for _, _, sp in passes:
            rename = {}
            for name in sp.added:
                conv = sp.gm.get_submodule(name)
                # The same merge: the same branch modules, giving the same conv (from another pattern only).
                same = next((n for n, c in merged.items() if origin[n] == sp.sources[name] and
                             n not in rename.values() and _same_conv(c, conv)), None)
                if same is None:
                    same, i = MERGED_NAME, 0
                    while same in merged or same in taken:
                        i += 1
                        same = f"{MERGED_NAME}_{i}"
                    merged[same] = conv
                    origin[same] = sp.sources[name]
                rename[name] = same
            for node in sp.graph.nodes:  # all at once: a new name may be another conv's old one
                if node.op == "call_module" and node.target in rename:
                    node.target = rename[node.target]
        return merged

    def _table(self, params: list[Param], passes, removed: set[str], merged: tuple) -> GuardTable:
        module = self.module
        local = {p.name: f"a{i}" for i, p in enumerate(params)}
        expect: list = []
        items = []
        dropped = {}  # graph -> the children whose calls the pass dropped (nn.Identity next to a merged conv)
        for pattern, trace, sp in passes:
            key = (_normalized(sp.graph), tuple(sorted((k, tuple(sorted(set(v))))
                                                      for k, v in trace.nested_reads.items())))
            items.append((pattern, trace, key, sp.graph))
            dropped[id(sp.graph)] = sp.called_before - _targets(sp.graph)
        entries = []
        top_removed = frozenset(r for r in removed if "." not in r)
        for pattern, trace, _, graph in merge_patterns(items):
            g = build_guard(module, params, pattern, trace, local, expect, top_removed)
            # Submodules the trace went through: their reads decided the inlined code (shallowest first, so
            # the identity of each parent is checked before its dict is read).
            for path in sorted(trace.nested_reads, key=lambda p: p.count(".")):
                if any(path == r or path.startswith(r + ".") for r in removed):
                    continue
                try:
                    sub = module.get_submodule(path)
                except AttributeError:
                    continue
                reads = list(trace.nested_reads[path]) + [n for n, c in sub._modules.items() if c is not None]
                inner = frozenset(r[len(path) + 1:] for r in removed if r.startswith(path + ".")
                                  and "." not in r[len(path) + 1:])
                expr = _module_expr(path)
                attribute_terms(g, sub, reads, f"{expr}.__dict__", f"{expr}._modules", f"self.{path}", expect,
                                inner)
            # A child still in the block whose call the merged graph dropped: a hook or an instance forward on it,
            # added after reparameterize, must not be skipped (the call then raises GuardMiss: merged branches).
            for path in sorted(dropped[id(graph)]):
                if not any(path == r or path.startswith(r + ".") for r in removed):
                    called_module_terms(g, module, path, expect)
            code = graph.python_code(root_module="self")
            entries.append(Specialization(g.expression(), g.described, code.src, code.globals,
                                          list(zip(g.terms, g.labels)), pattern))
        return GuardTable(type(module), params, entries, expect, [], kind=KIND, scope=self.scope, merged=merged)


def reparameterize_scope(module: nn.Module, scope: str, report: ConversionReport) -> nn.Module:
    """Merge the sums of `module`'s own forward; the block stays the same object (guarded when anything
    merged, with `report.guards` saying what for). A forward that cannot be traced is noted and left alone."""
    try:
        params, traced = trace_patterns(module)
    except UnsupportedSignature as e:
        report.notes.append(f"reparam: {scope or '<root>'}: {e}: its call pattern cannot be guarded; sums in its "
                            "own forward were not merged")
        return module
    except Exception as e:  # noqa: BLE001 - any tracing failure means "graph not visible"
        msg = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__
        report.notes.append(f"reparam: could not trace {scope or '<root>'} ({why}); sums in its own forward were "
                            "not examined")
        return module
    guards = ReparamRewrite(module, scope, report).run(params, traced)
    if guards is not None:
        report.add_guards(scope, type(module).__fusedconv_original__.__name__, guards)
    return module
