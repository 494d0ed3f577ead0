"""Residuals a FusedConv3d call of the flat forward may write into (graph/flat.py): video ResNets' residual blocks.

Inside a call the layout boundary switched to channels_last_3d, a FusedConv3d with a residual runs one oneDNN conv
with the add as a post-op (fusedconv/cpu_conv3d.py); Inductor writes such a conv's output into the residual itself
(`mkldnn::_convolution_pointwise_.binary`), which saves a fresh output buffer per block. The flat forward lets a
FusedConv3d call do the same where it can prove that no one else reads the residual afterwards:

- in the graph (`mark`, when the flat forward is built): the residual is the output of another FusedConv3d call,
  read only by FusedConv3d calls, the last of them this one, not as their residual, and not returned — a
  torchvision r3d_18 block's input (the previous block's output, read by its conv1) or its downsample's output;
- on every call (`flat_private_3d`, evaluated just before the call): no global hooks or torch function / dispatch
  modes, and each of those modules is still exactly a FusedConv3d running FusedConv3d's own forward (no forward
  of its instance, not compiled in place, the class-level methods not patched) without hooks: none of them can have
  kept the tensor, and the producer's output is a tensor it has just allocated.

The call gets `residual_private=flag`; FusedConv3d writes in place only on its channels_last_3d route, into a
residual that is dense in that layout and not a view (cpu_conv3d._writable); anything else is the ordinary call.
"""

from __future__ import annotations

import torch.fx as fx

from fusedconv.fused_layers import FusedConv3d
from fusedconv.graph.private_residual import global_observers, hooked

# FusedConv3d's methods a module call runs: patched (instrumentation, a test), the call runs other code.
_FORWARD, _CALL, _CALL_IMPL = FusedConv3d.forward, FusedConv3d.__call__, FusedConv3d._call_impl


def _plain_conv3d(module) -> bool:
    """A FusedConv3d whose call runs FusedConv3d's own code and no hook: it keeps neither input nor output."""
    if type(module) is not FusedConv3d or hooked(module):
        return False
    d = module.__dict__
    return "forward" not in d and d.get("_compiled_call_impl") is None


def flat_private_3d(leaves: tuple, producer: int, fused: int, *readers: int) -> bool:
    """The per-call half (module doc): `leaves[producer]` made the residual, `leaves[fused]` takes it, `readers`
    read it before."""
    if global_observers() or FusedConv3d.forward is not _FORWARD or FusedConv3d.__call__ is not _CALL \
            or FusedConv3d._call_impl is not _CALL_IMPL:
        return False
    return all(_plain_conv3d(leaves[i]) for i in (producer, fused, *readers))


def mark(graph: fx.Graph, leaves: fx.Node, calls: dict) -> None:
    """The graph half (module doc). `calls`: FusedConv3d call nodes of the flat graph (`call_leaf(leaves, i, x[,
    residual])`) -> leaf index; each call whose residual qualifies gets `residual_private=flat_private_3d(...)`."""
    order = {n: k for k, n in enumerate(graph.nodes)}

    def call_args(node):  # (x, residual) of a call_leaf node
        args = node.args[2:]
        return (args[0] if args else None), (args[1] if len(args) > 1 else node.kwargs.get("residual"))

    for call, c in calls.items():
        x, residual = call_args(call)
        if not isinstance(residual, fx.Node) or residual is x or residual not in calls:
            continue
        readers = [u for u in residual.users if u is not call]
        if any(u not in calls or order[u] > order[call] or call_args(u)[1] is residual for u in readers):
            continue  # read by something else, after this call, or as another call's residual
        with graph.inserting_before(call):
            flag = graph.call_function(flat_private_3d, (leaves, calls[residual], c, *(calls[u] for u in readers)))
        call.kwargs = {**call.kwargs, "residual_private": flag}
