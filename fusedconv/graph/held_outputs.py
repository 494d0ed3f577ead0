"""Whether a flat graph may return a tensor its model holds, or a view of one: a forward that returns `self.anchors`,
`self.pos_embed.expand(...)` or a buffer passed through `nn.Identity` hands the caller a way to edit the model
without reaching into it, so such a model is never armed (graph/reach.py).

A node "may hold" when it reads a tensor of the model (get_attr) or when any of its inputs may hold and the node
is not known to return a new tensor: a fused or BN-folded layer, torch.nn's computing layers (conv, linear, norm,
pooling, upsampling, activations not in place), arithmetic and the out-of-place torch functions and tensor methods
listed below. Everything else (views, reshapes, `.to()` / `.contiguous()` which may return their input, in-place
ops, getitem, unknown functions) passes "may hold" on. Erring towards "may hold" only leaves a model unarmed.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fusedconv.bn_folded_layers import BN_FOLDED_LAYERS
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.modules import FusedConv2d

_FRESH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.matmul, operator.neg,
    operator.pow, operator.mod,
    torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.cat, torch.stack, torch.sigmoid, torch.tanh,
    torch.relu, torch.exp, torch.sqrt, torch.mean, torch.sum, torch.softmax, torch.clamp, torch.bmm, torch.addmm,
    torch.conv2d, torch.conv1d, torch.conv3d, torch.batch_norm, torch.layer_norm, torch.group_norm,
    torch.adaptive_avg_pool1d, torch.avg_pool1d, torch.max_pool2d, torch.max_pool1d,
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.linear, F.batch_norm, F.layer_norm, F.group_norm,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool1d,
    F.interpolate, F.pad, F.softmax, F.log_softmax, F.gelu, F.silu, F.sigmoid, F.tanh, F.normalize,
    F.pixel_shuffle, F.pixel_unshuffle,
})
# Activations that take `inplace=`: fresh unless called with inplace=True.
_INPLACE_FLAG_FUNCTIONS = frozenset({F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.mish, F.elu,
                                     F.leaky_relu, F.hardtanh, F.selu, F.celu})
_FRESH_METHODS = frozenset({
    "add", "sub", "mul", "div", "matmul", "neg", "pow", "sigmoid", "tanh", "relu", "exp", "sqrt", "mean", "sum",
    "softmax", "clamp", "clone", "abs", "square", "amax", "amin", "bmm", "log", "rsqrt", "__add__", "__mul__",
    "__sub__", "__truediv__", "__radd__", "__rmul__",
})
_FRESH_LAYERS = (
    FusedConv2d, FusedAffineLayer, *BN_FOLDED_LAYERS, nn.modules.conv._ConvNd, nn.Linear,
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Upsample, nn.Sigmoid, nn.Tanh, nn.GELU, nn.Softmax,
)
_INPLACE_FLAG_LAYERS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU, nn.LeakyReLU,
                        nn.Hardtanh)


def _fresh(node: fx.Node, root: nn.Module) -> bool:
    """Whether `node` returns a new tensor whatever its inputs (module doc)."""
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        if isinstance(m, _FRESH_LAYERS):
            return True
        return isinstance(m, _INPLACE_FLAG_LAYERS) and not getattr(m, "inplace", False)
    if node.op == "call_function":
        if node.target in _FRESH_FUNCTIONS:
            return True
        return node.target in _INPLACE_FLAG_FUNCTIONS and not node.kwargs.get("inplace", False) and not (
            len(node.args) > 1 and node.args[-1] is True)
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def returns_held(graph: fx.Graph, root: nn.Module) -> bool:
    """Whether an output of `graph` (traced from `root`, its tensors still get_attr nodes) may be a tensor `root`
    holds or a view of one (module doc)."""
    held: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            held.add(node)
        elif node.op == "output":
            found: list[bool] = []
            fx.node.map_arg(node.args, lambda a: found.append(a in held))
            return any(found)
        elif node.op != "placeholder" and not _fresh(node, root):
            found = []
            fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a in held))
            if any(found):
                held.add(node)
    return True
