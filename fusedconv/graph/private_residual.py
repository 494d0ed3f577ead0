"""Residuals no one else can read: when a rewritten block may let its residual conv write into the residual.

Inductor writes every residual conv's output in place into the residual (`mkldnn::_convolution_pointwise_
.binary`), which saves a fresh output buffer per residual block on CPU. fusedconv allows the same only where it
can prove that no one else reads that tensor afterwards. Two kinds of residual qualify.

A child's output (`mark`, e.g. a downsample branch). The proof has two halves:

- in the block's graph (at rewrite time): the residual is the output of a child module call of the same scope
  whose only user is the fused call;
- on every call (`residual_private`, evaluated by the rewritten code just before the fused call): that child is a
  plain nn.Sequential of FusedConv2d / nn.Identity modules with at least one FusedConv2d (or a FusedConv2d
  itself), so its output is a tensor the last FusedConv2d has just allocated and no module code kept, and no
  forward hook (on those modules, on the fused module, or global) or torch function / dispatch mode
  (fusedconv/modes.py) could have kept it either. Hooks, modes or children added after convert are seen here, at
  the call.

The block's own input (`mark_owned_input`, an identity residual `x + f(x)`). It belongs to the caller, so the
block alone can never prove it dead; the proof has three parts:

- in the block's graph (at rewrite time): the input is used only by module calls, and the fused call taking it
  as its residual is the last of them in the graph's order (not returned, not stored, nothing reads it after);
  the graph then gets one more parameter, `_fusedconv_input_owned` (default False), which only
  `owned_input.OwnedInputSequential` ever sets (see there for the call-site half: who may say the input is owned);
- on every call (`owned_residual`): the caller said owned, no global hooks or modes, the fused module and every other
  module reading the input are FusedConv2d / fused Sequentials (`_fused_chain`) without hooks.

Anything else — a Unet encoder's stage outputs kept for the decoder, a residual that is also returned, a
downsample with a hook that stores features, a block called directly by user code — takes the ordinary
out-of-place call.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.nn.modules import module as _module_globals

from fusedconv.modes import user_modes
from fusedconv.modules import FusedConv2d

# The extra parameter of a graph whose identity residual may be written in place (default False: not owned).
OWNED = "_fusedconv_input_owned"


def global_hooks() -> bool:
    """Whether any module hook is registered globally (forward, pre-forward or backward)."""
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks or getattr(g, "_global_forward_hooks_always_called", None))


def global_observers() -> bool:
    """Whether code outside the model sees every output of a forward: a module hook registered globally, or an
    active torch function or dispatch mode (`user_modes`). Such code can keep a tensor a residual write would
    overwrite, and can edit a module in the middle of a forward."""
    return global_hooks() or user_modes()


def hooked_source(d: str) -> str:
    """`hooked` as the source of an expression over a module's `__dict__` bound to the name `d`, for the checks
    fusedconv generates (graph/flat.py, graph/flat_fused.py): truthy when the module has hooks."""
    return (f"({d}.get('_forward_pre_hooks') or {d}.get('_forward_hooks') or {d}.get('_backward_pre_hooks') "
            f"or {d}.get('_backward_hooks'))")


def hooked(module) -> bool:
    """Whether user code registered forward / backward hooks or pre-hooks on `module` (legality.has_hooks,
    spelled out for the per-call checks: they run on every block call). None has none."""
    if module is None:
        return False
    d = module.__dict__
    return bool(d.get("_forward_pre_hooks") or d.get("_forward_hooks") or d.get("_backward_pre_hooks")
                or d.get("_backward_hooks"))


def _fused_chain(module) -> bool:
    """A FusedConv2d, or a plain nn.Sequential of FusedConv2d / nn.Identity with at least one FusedConv2d, none
    with hooks: it keeps neither its input nor its output, and its output is a tensor it has just allocated."""
    if type(module) is FusedConv2d:
        return not hooked(module)
    if type(module) is not nn.Sequential or hooked(module):
        return False
    children = list(module._modules.values())
    return (any(type(c) is FusedConv2d for c in children)
            and all(type(c) in (FusedConv2d, nn.Identity) and not hooked(c) for c in children))


def residual_private(producer, fused=None) -> bool:
    """True when what `producer(...)` just returned can be held by no one but the caller (see the module doc);
    `fused`, the module about to take it as its residual, must carry no hook either (a pre-hook could keep it)."""
    if global_observers() or hooked(fused):
        return False
    return _fused_chain(producer)


def owned_residual(owned, fused, *readers) -> bool:
    """The per-call half for an identity residual: the caller said the input is owned, and the fused module and
    every other module of the block that reads the input can keep no reference to it."""
    if owned is not True or global_observers() or type(fused) is not FusedConv2d or hooked(fused):
        return False
    return all(_fused_chain(m) for m in readers)


def mark(graph: fx.Graph, residual, fused_module, at: fx.Node, fused_name: str) -> tuple[dict, list[fx.Node]]:
    """Keyword arguments for the fused call (`{"residual_private": node}` where the graph half of the proof holds,
    else {}) and the get_attr nodes that read the producer and the fused module (`fused_name`; to keep),
    inserted before `at`."""
    if (type(fused_module) is not FusedConv2d or not isinstance(residual, fx.Node)
            or residual.op != "call_module" or len(residual.users) != 1):
        return {}, []
    with graph.inserting_before(at):
        producer = graph.get_attr(str(residual.target))
        fused = graph.get_attr(fused_name)
        flag = graph.call_function(residual_private, (producer, fused))
    return {"residual_private": flag}, [producer, fused]


def mark_owned_input(graph: fx.Graph, residual_calls: list[fx.Node]) -> list[fx.Node]:
    """Where a fused call (one of `residual_calls`, each `call_module(fused, (x, residual))`) takes a block input
    as its residual and is that input's last reader (the graph half, module doc), give the graph the OWNED
    parameter and the call `residual_private=owned_residual(...)`. Returns the get_attr nodes it added (to keep)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(str(n.target).startswith("*") for n in placeholders) or any(n.target == OWNED for n in placeholders):
        return []
    order = {n: i for i, n in enumerate(graph.nodes)}
    owned, added = None, []
    for call in residual_calls:
        if call.op != "call_module" or len(call.args) != 2 or call.kwargs:
            continue
        x, residual = call.args
        if residual not in placeholders or x is residual:
            continue
        readers = [u for u in residual.users if u is not call]
        if any(u.op != "call_module" or u.kwargs or residual not in u.args or order[u] > order[call]
               for u in readers):
            continue  # a non-module use (returned, a view, an op), or a reader after the fused call
        if owned is None:
            with graph.inserting_after(placeholders[-1]):
                owned = graph.placeholder(OWNED, default_value=False)
        with graph.inserting_before(call):
            mods = [graph.get_attr(str(n.target)) for n in [call, *readers]]
            flag = graph.call_function(owned_residual, (owned, *mods))
        added += mods
        call.kwargs = {"residual_private": flag}
    return added


def takes_owned(graph: fx.Graph) -> bool:
    """Whether `mark_owned_input` gave this graph its OWNED parameter."""
    return any(n.op == "placeholder" and n.target == OWNED for n in graph.nodes)


def fresh_output(graph: fx.Graph) -> tuple[str, ...] | None:
    """The path (names from the block down) of the module call whose result the graph returns and nothing else
    in it uses, or None: when that module is a `_fused_chain` at call time, the block's output is a tensor no
    one else holds (a fused call's fresh output, or a residual the block proved private and wrote in place)."""
    out = next((n for n in graph.nodes if n.op == "output"), None)
    if out is None or not isinstance(out.args[0], fx.Node):
        return None
    value = out.args[0]
    if value.op != "call_module" or len(value.users) != 1:
        return None
    return tuple(str(value.target).split("."))
