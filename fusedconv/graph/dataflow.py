"""The data-flow pass: find Conv2d -> BN (-> act) (-> + residual -> act) chains in what each module computes,
and the same chains over Conv1d / Conv3d / ConvTranspose1d-3d / Linear (which need a BN; Linear takes no add).

Every module scope is traced on its own with torch.fx, all of its submodules kept as leaves, so a chain is
always found at the smallest scope that holds it. Scopes fx cannot trace (data-dependent control flow, list
inputs, ...) are not a dead end: their children are visited and tried in turn, and plain nn.Sequential chains
are fused without tracing (`sequential.py`).

A chain is fused only when the graph proves it is exactly equivalent:
  * the conv's output feeds the BN and nothing else, and the BN's output feeds only the activation / add
    (through calls that are the identity in eval mode: nn.Identity, dropout, drop-path);
  * the add's other operand is a computed tensor that does not depend on the chain and is not one that
    usually broadcasts (a parameter, a constant, a reduction / reshape / indexing result), and an in-place add
    updates the chain's value, not the other operand;
  * the BN's forward is understood (`legality.batchnorm_verdict`), with eval-mode running statistics;
  * the conv is exactly nn.Conv2d or a recognised padding conv (`same_padding.conv_pre_pad`: timm's Conv2dSame,
    efficientnet's Conv2dStatic/DynamicSamePadding), called at one call site (other subclasses may compute
    differently: reported), or
    a layer `legality.chain_base` accepts, followed by a BatchNorm of its rank (`legality.BATCHNORMS_AFTER`).
"Conv" may also be a plain nn.Sequential that ends in a conv (a BN after it folds into that last conv), and a
plain nn.Sequential ending in an already fused FusedConv2d passes a following add / activation into that
module's epilogue (the Sequential call is then inlined into its children's calls: `Absorb`).

How a scope is rewritten (`scope_rewrite.py`): each call pattern of its forward is traced (`patterns.py`),
the chains found here become FusedConv2d modules, and the block stays the same object:
  * if every chain is made of module calls (conv, BN, activation module) each called once and held in one
    place only, the conv child becomes the FusedConv2d and the others nn.Identity;
  * otherwise (a residual add joins the epilogue, a functional activation or F.batch_norm, an activation
    module used at two call sites as in torchvision's BasicBlock) each pattern's graph is rewritten to call
    the FusedConv2d, registered under the conv's attribute name, and runs as that pattern's specialization.
Unless the forward is proven to depend on nothing but its tensor inputs, the block dispatches through guards
(`specialize.py`) with its own forward over role children (`roles.py`) as the exact fallback.

Files: `chains.py` (the chain records and the fx calls they are made of), `chain_match.py` (one chain from a
conv call), `scope_pass.py` (one scope: plan its chains, rewrite its graph), this module (the walk over scopes).
"""

from __future__ import annotations

import torch.nn as nn

from fusedconv import fold
from fusedconv.graph.chains import _short
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.fused_mixed import is_mixed_conv2d
from fusedconv.graph.legality import chain_base, is_leaf_type, module_use_counts
from fusedconv.graph.patterns import UnsupportedSignature, call_patterns, forward_params, list_patterns
from fusedconv.graph.scope_rewrite import ScopeRewrite
from fusedconv.graph.sequential import KIND, fuse_sequential, is_plain_sequential
from fusedconv.graph.specialize import guard_table
from fusedconv.graph.tracing import ScopeTracer, trace_scope, visit_children
from fusedconv.modules import FusedConv2d
from fusedconv.report import ConversionReport


def _traceable_candidates(module: nn.Module) -> bool:
    """Worth tracing: a conv (any kind, or an already fused module) among its children, or inside containers
    (Sequential, ModuleList, ModuleDict) among its children; a Linear counts only beside a BatchNorm (so
    attention / MLP blocks without one are not traced for nothing)."""
    seen = _candidate_children(module)
    return seen["conv"] or (seen["linear"] and seen["bn"])


def _candidate_children(module: nn.Module, seen: dict | None = None) -> dict:
    seen = {"conv": False, "linear": False, "bn": False} if seen is None else seen
    for child in module.children():
        if isinstance(child, (nn.modules.conv._ConvNd, FusedConv2d, FusedAffineLayer)) or is_mixed_conv2d(child):
            seen["conv"] = True  # (timm's MixedConv2d: a BN after it folds into its groups, fused_mixed.py)
        elif isinstance(child, nn.Linear):
            seen["linear"] = True
        elif fold.is_batchnorm(child):
            seen["bn"] = True
        # (plain nn.Module: the containers fx's GraphModule creates for nested call targets)
        elif type(child) in (nn.ModuleList, nn.ModuleDict, nn.Module) or is_plain_sequential(child):
            _candidate_children(child, seen)
    return seen


def _inlined_children(module: nn.Module) -> set[str]:
    """Names of the children whose own submodules a guarded block's code calls directly.

    The re-parameterization trace goes through user modules (`reparam_leaves.py`), so a merged block's code
    calls e.g. `self.se.fc1` and its guards pin those grandchildren by identity; rewriting inside such a child
    on its own would make every call of the block miss its guards (GuardMiss). Those children are left to the
    block's own rewrite (`reparam_convert.py`), which sees their modules in the merged code.
    """
    pinned: set[int] = set()
    table = guard_table(module)
    while table is not None:
        pinned.update(id(o) for o in table.expect if isinstance(o, nn.Module))
        table = table.base
    if not pinned:
        return set()
    return {name for name, child in module.named_children()
            if child is not None and any(id(m) in pinned for m in list(child.modules())[1:])}


class DataflowWalk:
    """Visits every module scope, children first; returns each scope's replacement (often itself)."""

    def __init__(self, model: nn.Module, report: ConversionReport):
        self.report = report
        self.uses = module_use_counts(model)
        self.done: dict[int, nn.Module] = {}

    def visit(self, module: nn.Module, scope: str = "") -> nn.Module:
        key = id(module)
        if key not in self.done:  # a shared module is rewritten once and stays shared
            self.done[key] = self._visit(module, scope)
        return self.done[key]

    def _visit(self, module: nn.Module, scope: str) -> nn.Module:
        if is_leaf_type(module):
            return module
        inlined = _inlined_children(module)
        for name in inlined:
            self.report.notes.append(f"{scope + '.' if scope else ''}{name}: not converted on its own: the "
                                     f"re-parameterized block {scope or '<root>'!r} runs its modules from its merged "
                                     "code (its chains are fused there where provable)")
        visit_children(module, scope, lambda child, path: child if path.rsplit(".", 1)[-1] in inlined
                       else self.visit(child, path))
        if is_plain_sequential(module):
            fuse_sequential(module, scope, self.uses, self.report)
            return module
        if type(module).forward is nn.Module.forward or not _traceable_candidates(module):  # no forward of its own
            return module
        if guard_table(module) is not None:  # converted before: its chains are fused already
            return module
        try:
            params = forward_params(module)
        except UnsupportedSignature as e:
            self._unguardable(module, scope, str(e))
            return module
        traced, first_error = [], None
        for pattern in call_patterns(params):
            try:
                traced.append((pattern, trace_scope(module, pattern.concrete_args(params) or None)))
            except Exception as e:  # noqa: BLE001 - any failure means fx cannot see this call pattern
                first_error = first_error or e
        if not traced:
            self._untraceable(module, scope, first_error)
            return module
        for pattern in list_patterns(params, traced):
            try:
                traced.append((pattern, trace_scope(module, pattern.concrete_args(params) or None,
                                                    ScopeTracer(pattern.list_params(params)))))
            except Exception:  # noqa: BLE001 - lists then take the block's other specializations or its fallback
                pass
        result, guards = ScopeRewrite(module, scope, params, traced, self.uses, self.report).run()
        if guards is not None:
            self.report.add_guards(scope, type(module).__name__, guards)
        return result

    def _unguardable(self, module: nn.Module, scope: str, why: str) -> None:
        """A forward whose call pattern cannot be guarded: its own chains stay as they are."""
        convs = [n for n, c in module.named_children() if chain_base(c) is not None]
        has_bn = any(fold.is_batchnorm(c) for c in module.children())
        if convs and has_bn:
            self.report.add(scope, convs, KIND, "skipped", f"{why}: its call pattern cannot be guarded; only its "
                                                         "children were converted")

    def _untraceable(self, module: nn.Module, scope: str, err: BaseException) -> None:
        convs = [n for n, c in module.named_children() if chain_base(c) is not None]
        has_bn = any(fold.is_batchnorm(c) for c in module.children())
        if convs and has_bn:
            self.report.add(scope, convs, KIND, "skipped",
                            f"forward not traceable by torch.fx ({_short(err)}); only its children were converted")
        else:
            self.report.notes.append(f"{scope or '<root>'}: forward not traceable by torch.fx ({_short(err)}); "
                                     "its children were converted separately")


def fuse_dataflow(model: nn.Module, report: ConversionReport) -> nn.Module:
    """Fuse every provable chain of `model` in place; returns the model (always the same object)."""
    return DataflowWalk(model, report).visit(model, "")
