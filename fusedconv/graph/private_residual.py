"""Residuals no one else can read: when a rewritten block may let its residual conv write into the residual.

Inductor writes every residual conv's output in place into the residual (`mkldnn::_convolution_pointwise_
.binary`), which saves a fresh output buffer per residual block on CPU. fusedconv allows the same only where it
can prove that no one else reads that tensor afterwards. The proof has two halves:

- in the block's graph (`mark`, at rewrite time): the residual is the output of a child module call of the same
  scope (not a block input, which belongs to the caller) whose only user is the fused call;
- on every call (`residual_private`, evaluated by the rewritten code just before the fused call): that child is a
  plain nn.Sequential of FusedConv2d / nn.Identity modules with at least one FusedConv2d (or a FusedConv2d
  itself), so its output is a tensor the last FusedConv2d has just allocated and no module code kept, and no
  forward hook (on those modules or global) could have kept it either. Hooks or children added after convert are seen here, at the call.

Anything else — a Unet encoder's stage outputs kept for the decoder, a residual that is also returned, a
downsample with a hook that stores features — takes the ordinary out-of-place call.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
from torch.nn.modules import module as _module_globals

from fusedconv.graph.legality import has_hooks
from fusedconv.modules import FusedConv2d


def _global_hooks() -> bool:
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks
                or getattr(_module_globals, "_global_forward_hooks_always_called", None))


def residual_private(producer) -> bool:
    """True when what `producer(...)` just returned can be held by no one but the caller (see the module doc)."""
    if _global_hooks():
        return False
    if type(producer) is FusedConv2d:
        return not has_hooks(producer)
    if type(producer) is not nn.Sequential or has_hooks(producer):
        return False
    children = list(producer._modules.values())
    return (any(type(c) is FusedConv2d for c in children)
            and all(type(c) in (FusedConv2d, nn.Identity) and not has_hooks(c) for c in children))


def mark(graph: fx.Graph, residual, fused_module, at: fx.Node) -> tuple[dict, fx.Node | None]:
    """Keyword arguments for the fused call (`{"residual_private": node}` where the graph half of the proof holds,
    else {}) and the get_attr node that reads the producer (to keep), inserted before `at`."""
    if (type(fused_module) is not FusedConv2d or not isinstance(residual, fx.Node)
            or residual.op != "call_module" or len(residual.users) != 1):
        return {}, None
    with graph.inserting_before(at):
        producer = graph.get_attr(str(residual.target))
        flag = graph.call_function(residual_private, (producer,))
    return {"residual_private": flag}, producer
