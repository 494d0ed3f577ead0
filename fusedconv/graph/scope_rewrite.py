"""Rewriting one module scope under guards: trace each call pattern, fuse, specialize, keep an exact fallback.

For a block's forward, `patterns.call_patterns` lists the call patterns worth tracing (each parameter that
defaults to None both given and left out; plain defaults fixed). The first pattern that traces decides the
chains and builds their FusedConv2d modules (`ScopePass.plan`); every other pattern is kept as a
specialization only when its graph has exactly the same chains, so all specializations share those modules.

Then the block is changed once:
  * swap: every chain is module calls: the conv child becomes the FusedConv2d, BN / activation children
    nn.Identity, and the block's own forward runs unchanged — the specializations are that forward itself;
  * graph: each pattern's graph is rewritten to call the FusedConv2d (with the residual and activation in its
    epilogue); the specializations are those graphs' code.
A swap is left unguarded when the forward is proven independent of every assumption (only required
parameters, no type test on them, no attribute read besides the children it calls). Otherwise the block
becomes guarded (`specialize.install`): calls no guard accepts run the block's own forward over role
children (`roles.py`), which is the original function.
"""

from __future__ import annotations

import inspect
import re

import torch.fx as fx
import torch.nn as nn

from fusedconv.graph import private_residual
from fusedconv.graph.chains import Absorb, Chain, _node_name, _short
from fusedconv.graph.folded_sources import folded_source_terms
from fusedconv.graph.inlined_containers import called_module_terms, sequential_terms
from fusedconv.graph.patterns import MODULE_INTERNALS, CallPattern, Param, build_guard, merge_patterns
from fusedconv.graph.roles import AffineRole, BNRole, ConvRole
from fusedconv.graph.scope_pass import ScopePass
from fusedconv.graph.specialize import GuardTable, Specialization, install
from fusedconv.graph.tracing import ScopeTrace
from fusedconv.report import ConversionReport


def _signature(chains: list[Chain], absorbs: list[Absorb]) -> tuple:
    """What a graph's fusion plan is, comparable across the call patterns of one block."""
    return (tuple(sorted((str(ch.conv.target), ch.detail(), tuple(_node_name(n) for n in ch.nodes))
                         for ch in chains)),
            tuple(sorted((str(a.seq.target), a.detail(), tuple(_node_name(n) for n in a.nodes)) for a in absorbs)))


def _normalized(src: str, graph: fx.Graph) -> str:
    """The generated body with placeholders renamed by position (fx names them after the parameters, with a
    suffix when a pattern fixed them), so two patterns that run the same code compare equal."""
    body = src.split("):\n", 1)[-1]  # the signature differs in annotations only
    for i, n in enumerate(n for n in graph.nodes if n.op == "placeholder"):
        body = re.sub(rf"\b{re.escape(n.name)}\b", f"__param{i}", body)
    return body


def _called_modules(graph: fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_module"}


def _tail_path(ch: Chain) -> str:
    """Dotted path from the scope to the conv that ends the Sequential `ch.conv` calls."""
    _, name, containers = ch.tail
    names = [str(ch.conv.target)]
    for c in containers:
        names.append(list(c._modules)[-1])
    return ".".join(names)


def _proven_independent(module: nn.Module, params: list[Param], traces: list[ScopeTrace], graph: fx.Graph) -> bool:
    """The forward depends on nothing but its tensor inputs and the children it calls."""
    if len(traces) != 1 or traces[0].type_checked or any(p.default is not inspect.Parameter.empty for p in params):
        return False
    called = {str(n.target).split(".")[0] for n in graph.nodes if n.op in ("call_module", "get_attr")}
    d = module.__dict__
    for attr in set(traces[0].reads):
        if attr.startswith("__") or attr in MODULE_INTERNALS:
            continue
        if attr in d.get("_modules", {}):
            if attr not in called:
                return False
        elif attr in d or not hasattr(type(module), attr):  # a plain attribute, parameter, buffer, or absent
            return False
    return True


def _conv_role(ch: Chain):
    """The fallback's stand-in for the chain's conv. With a BN after it, the conv alone (its bias as convert found
    it; the BN's role reads the live scale and shift). Without one (a lone conv, a conv + activation), nothing else
    applies the fused module's scale and shift, which then stand for the conv's own bias: the role is the fused
    affine with their live values (an edit of them, or a state_dict loaded after convert, reaches the fallback as
    it reaches the fused call)."""
    if ch.bn is None:
        return AffineRole(ch.fused)
    if ch.bn_sources is None:
        return ConvRole(ch.fused, ch.conv_bias)
    sources = ", ".join(t for t in ch.bn_sources if t is not None)
    message = (f"{ch.conv.target}: its scale / shift were edited after convert, but they are the fold of the "
               f"F.batch_norm of {sources}, which the block's own forward reads (this call takes it): edit those "
               f"instead, or convert the model again")
    return ConvRole(ch.fused, ch.conv_bias, pinned=[(ch.fused, message)])


def _bn_role(ch: Chain, chains: list[Chain] = ()) -> BNRole:
    """The fallback's stand-in for the chain's BatchNorm module: its affine, and the activation of a norm-act BN
    (the chain's activation when no activation call of its own follows: `ChainMatcher.match` takes a norm-act's
    activation from the BN and stops there). A BN module that `chains` fold into several convs pins their copies
    (roles._Role: the block's forward calls the one BN, which cannot apply copies edited apart)."""
    sharing = [c for c in chains if c.bn is not None and c.bn.op == "call_module" and c.bn.target == ch.bn.target]
    pinned = ()
    if len(sharing) > 1:
        names = ", ".join(str(c.conv.target) for c in sharing)
        message = (f"the BatchNorm {ch.bn.target} is folded into each of {names}: their scale / shift were "
                   f"edited after convert, and the block's own forward (this call takes it) calls the one BN, "
                   f"which cannot compute what they do now; convert the model again")
        pinned = [(c.fused, message) for c in sharing]
    return BNRole(ch.fused, ch.conv_bias, ch.act_spec if ch.act is None else None, pinned)


class ScopeRewrite:
    """Fuses one traced scope over all its call patterns; `run()` returns the module (the same object)."""

    def __init__(self, module: nn.Module, scope: str, params: list[Param],
                 traced: list[tuple[CallPattern, ScopeTrace]], uses, report: ConversionReport,
                 base: GuardTable | None = None):
        self.module, self.scope, self.params, self.traced = module, scope, params, traced
        self.uses, self.report = uses, report
        # A block guarded before (re-parameterized): `traced` are its specializations' graphs, in the order of
        # base.entries; each new specialization keeps its base entry's guard, and the fallback is the base's.
        self.base = base

    def run(self) -> tuple[nn.Module, list[str] | None]:
        """(module, guard descriptions or None when unguarded / unchanged)."""
        module = self.module
        # Children (dotted paths) the original graph called and no rewritten graph calls any more.
        self.removed_calls: set[str] = set()
        self.before = dict(module._modules)
        primary = ScopePass(module, self.traced[0][1].graph, self.scope, self.uses, self.report)
        good, absorbs = primary.plan()
        if not good and not absorbs:
            return module, None
        swap = primary.swappable(good, absorbs) and self.base is None  # the base's code is not the forward
        plans = [(self.traced[0][0], self.traced[0][1], primary, good, absorbs)]
        want = _signature(good, absorbs)
        for pattern, trace in self.traced[1:]:
            sp = ScopePass(module, trace.graph, self.scope, self.uses, ConversionReport())
            try:
                g2, a2 = sp.plan()
            except Exception:  # noqa: BLE001 - this pattern then takes the fallback
                continue
            if _signature(g2, a2) == want and (not swap or sp.swappable(g2, a2)):
                plans.append((pattern, trace, sp, g2, a2))
        if isinstance(module, fx.GraphModule):
            # Its forward is its graph: straight-line code over its inputs, so the rewritten graph computes
            # the same function for every call; it replaces the graph in place, unguarded.
            plans = plans[:1]
            if swap:
                self._swap(good, absorbs)
                return module, None
        elif swap and self.base is None and _proven_independent(module, self.params, [t for _, t in self.traced], primary.graph):
            self._swap(good, absorbs)
            return module, None
        sources = []
        if not swap:
            try:
                sources = self._rewrite_graphs(plans, good)
            except Exception as e:  # noqa: BLE001 - an unforeseen graph: leave the scope exactly as it was
                for ch in good:
                    self.report.add(self.scope, [_node_name(n) for n in ch.nodes], ch.kind, "skipped",
                                    f"could not rewrite the scope's graph ({_short(e)})")
                self.report.notes.append(f"{self.scope or '<root>'}: could not rewrite the graph ({_short(e)})")
                return module, None
            if not sources:
                return module, None
            roles = self._install_graph(good, absorbs, sources[0][3])
            if isinstance(module, fx.GraphModule):
                module.graph = sources[0][4]
                module.recompile()
                return module, None
        else:
            roles = self._swap(good, absorbs)
        if swap:
            items = [(pattern, trace, "swap", None) for pattern, trace, _, _, _ in plans]
        else:
            items = [(pattern, trace, (_normalized(src, graph), self._base_index(pattern)), (src, glb))
                     for pattern, src, glb, _, graph in sources
                     for pat, trace, _, _, _ in plans if pat is pattern]
        expect: list = [] if self.base is None else list(self.base.expect)
        entries = []
        for pattern, trace, key, payload in merge_patterns(items):
            local = {p.name: f"a{i}" for i, p in enumerate(self.params)}
            guard = build_guard(module, self.params, pattern, trace, local, expect)
            self._sequential_terms(guard, good, absorbs, inlined=not swap, expect=expect)
            terms, described = guard.expression(), guard.described
            checks = list(zip(guard.terms, guard.labels))
            if self.base is not None:  # the base entry's assumptions first; what it checks already is not repeated
                b = self.base.entries[key[1]]
                known = {label for _, label in b.checks}
                checks = b.checks + [(t, label) for t, label in checks if label not in known]
                terms = " and ".join(t for t, _ in checks) or "True"
                described = b.described + [x for x in described if x not in b.described
                                           and not x.startswith("submodules ")]
            entries.append(Specialization(terms, described, *(payload or (None, None)), checks, pattern))
        if not swap:  # what owned_input.OwnedInputSequential needs to know of each graph
            facts = {src: (private_residual.takes_owned(graph), private_residual.fresh_output(graph))
                     for _, src, _, _, graph in sources}
            for entry in entries:
                entry.owned_input, entry.fresh_output = facts.get(entry.src, (False, None))
        if self.base is None:
            table = GuardTable(type(module), self.params, entries, expect, roles)
        else:
            self._rebind_base(expect)
            table = GuardTable(self.base.original, self.params, entries, expect, roles, scope=self.scope,
                               base=self.base)
        install(module, table)
        return module, table.describe()

    def _sequential_terms(self, guard, chains: list[Chain], absorbs: list[Absorb], inlined: bool,
                          expect: list) -> None:
        """The guard terms for the Sequentials the rewrite reached into (graph/inlined_containers.py): an absorbed
        one the graph inlines (it took an add), or one whose last layer now computes more (a tail chain, an
        absorbed activation); and for each child whose calls the rewritten graph dropped (a BN's stand-in, an
        activation or a DropPath the fused layer took over, a conv left where it was); and for the tensors a
        fold read that stay in the block (graph/folded_sources.py): a functional F.batch_norm's, the bias of a conv
        kept beside its fused module."""
        for ch in chains:
            if ch.bn_sources is not None:
                folded_source_terms(guard, self.module, ch.bn_sources, expect)
            if ch.tail is None and ch.conv_module.__dict__["_parameters"].get("bias") is not None and \
                    self.module.get_submodule(str(ch.conv.target)) is ch.conv_module:
                # The conv stays beside its fused module (the forward reads its tensors): its bias, folded into the
                # shift, is read live by the fallback and must be as convert folded it for the fused call.
                folded_source_terms(guard, self.module, (f"{ch.conv.target}.bias",), expect)
            if ch.tail is not None:
                along = [list(c._modules)[-1] for c in ch.tail[2][:-1]]
                sequential_terms(guard, self.module, str(ch.conv.target), expect, inlined=False, along=along)
        covered = set()
        for a in absorbs:
            seq = str(a.seq.target)
            if inlined and a.add is not None:
                sequential_terms(guard, self.module, seq, expect, inlined=True)
                covered.add(seq)
            else:
                along = a.leaves[-1][len(seq) + 1:].split(".")[:-1]
                sequential_terms(guard, self.module, seq, expect, inlined=False, along=along)
        for path in sorted(self.removed_calls - covered):
            called_module_terms(guard, self.module, path, expect)

    def _base_index(self, pattern: CallPattern) -> int | None:
        return None if self.base is None else next(k for k, s in enumerate(self.base.entries) if s.pattern == pattern)

    def _rebind_base(self, expect: list) -> None:
        """The base guards pinned the children this rewrite replaced (the merged conv): they now pin the
        replacements, so the base still accepts the block as converted (its fallback binds the roles)."""
        for name, old in self.before.items():
            new = self.module._modules.get(name)
            if new is not old:
                for objects in (expect, self.base.expect):
                    for i, v in enumerate(objects):
                        if v is old:
                            objects[i] = new
        self.base._compile()

    # ------------------------------------------------------------------ changing the block
    def _swap(self, good: list[Chain], absorbs: list[Absorb]) -> list:
        sp = ScopePass(self.module, self.traced[0][1].graph, self.scope, self.uses, ConversionReport())
        roles = []
        for ch in good:
            roles.append(self._place(ch, sp))
            for n in ch.nodes[1:]:
                old = sp._mod(n)
                stand_in = nn.Identity().train(old.training)
                sp._set(self.module, n.target, stand_in)
                role = _bn_role(ch) if n is ch.bn else old
                roles.append((str(n.target), stand_in, role))
            self.report.add(self.scope, [_node_name(n) for n in ch.nodes], ch.kind, "fused", ch.detail())
        for a in absorbs:
            old = sp._mod(a.act)
            a.fused.act = a.act_spec
            stand_in = nn.Identity().train(old.training)
            sp._set(self.module, a.act.target, stand_in)
            roles += [(str(a.act.target), stand_in, old), (a.leaves[-1], a.fused, AffineRole(a.fused))]
            self.report.add(self.scope, [_node_name(n) for n in a.nodes], a.kind, "fused", a.detail())
        return roles

    def _place(self, ch: Chain, sp: ScopePass) -> tuple:
        """Put the fused module where the conv was (inside its Sequential when the conv ends one)."""
        if ch.tail is not None:
            owner, name, _ = ch.tail
            owner._modules[name] = ch.fused
            return _tail_path(ch), ch.fused, _conv_role(ch)
        sp._set(self.module, ch.conv.target, ch.fused)
        return str(ch.conv.target), ch.fused, _conv_role(ch)

    def _rewrite_graphs(self, plans, good: list[Chain]) -> list:
        """(pattern, source, globals, names, graph) per pattern whose rewritten graph calls no changed child
        otherwise than through its chains; the primary's failure raises."""
        taken: set = set()
        names: dict[str, str] = {}
        primary_sp = plans[0][2]
        for ch in good:
            name = primary_sp.fused_name(ch, taken)
            if name is not None:
                names[str(ch.conv.target)] = name
        by_conv = {str(ch.conv.target): ch.fused for ch in good}
        changed = self._changed_paths(good, plans[0][4], names)
        out = []
        for k, (pattern, trace, sp, chains, absorbs) in enumerate(plans):
            for ch in chains:
                ch.fused = by_conv[str(ch.conv.target)]
            try:
                before = _called_modules(sp.graph)
                kept = sp.rewrite_graph(chains, absorbs, names)
                self.removed_calls.update(before - _called_modules(sp.graph))
                bad = [n for n in sp.graph.nodes if n.op in ("call_module", "get_attr") and n not in kept
                       and any(str(n.target) == p or str(n.target).startswith(p + ".") or p.startswith(f"{n.target}.")
                               for p in changed)]
                if bad:
                    raise RuntimeError(f"the graph still calls {bad[0].target}, which the rewrite changes")
                code = sp.graph.python_code(root_module="self")
            except Exception:
                if k == 0:
                    raise
                continue
            out.append((pattern, code.src, code.globals, names, sp.graph))
        return out

    def _changed_paths(self, good: list[Chain], absorbs: list[Absorb], names: dict) -> set:
        paths = set()
        for ch in good:
            if ch.tail is not None:
                paths.add(_tail_path(ch))
            elif names[str(ch.conv.target)] == str(ch.conv.target):
                paths.add(str(ch.conv.target))
            if self._bn_replaceable(ch):
                paths.add(str(ch.bn.target))
        for a in absorbs:
            paths.add(a.leaves[-1])
        return paths

    def _bn_replaceable(self, ch: Chain) -> bool:
        """The BN child may become an nn.Identity: no call of it left in the primary pattern's graph once its chains
        are rewritten (each call folded into its conv; a BN folded into two convs is shared by their copies,
        `_bn_role`), held nowhere else, a direct child."""
        if ch.bn is None or ch.bn.op != "call_module" or "." in str(ch.bn.target):
            return False
        bn = self.module._modules.get(str(ch.bn.target))
        count = sum(1 for n in self.traced[0][1].graph.nodes if n.op == "call_module" and n.target == ch.bn.target)
        return bn is not None and self.uses[id(bn)] == 1 and count <= 1

    def _install_graph(self, good: list[Chain], absorbs: list[Absorb], names: dict) -> list:
        roles = []
        mods = self.module._modules
        for ch in good:
            ch.fused.residual_required = ch.add is not None
            role_conv = _conv_role(ch)
            if ch.tail is not None:
                owner, name, _ = ch.tail
                owner._modules[name] = ch.fused
                roles.append((_tail_path(ch), ch.fused, role_conv))
            else:
                name = names[str(ch.conv.target)]
                mods[name] = ch.fused
                if name == str(ch.conv.target):
                    roles.append((name, ch.fused, role_conv))
            if self._bn_replaceable(ch):
                old = mods[str(ch.bn.target)]
                stand_in = nn.Identity().train(old.training)
                mods[str(ch.bn.target)] = stand_in
                roles.append((str(ch.bn.target), stand_in, _bn_role(ch, good)))
            self.report.add(self.scope, [_node_name(n) for n in ch.nodes], ch.kind, "fused", ch.detail())
        for a in absorbs:
            a.fused.act = a.act_spec
            a.fused.residual_required = a.add is not None
            roles.append((a.leaves[-1], a.fused, AffineRole(a.fused)))
            self.report.add(self.scope, [_node_name(n) for n in a.nodes], a.kind, "fused", a.detail())
        return roles
