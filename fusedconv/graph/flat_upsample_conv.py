"""A conv right after a nearest 2x upsampling, in the whole-model flat forward (flat.py): computed at the source
resolution, so the upsampled tensor is never built and the conv does fewer multiply-adds.

A U-Net decoder step is `conv3x3(cat([upsample2x(x), skip]))` (smp's Unet: conv, BN, ReLU), and its last step
`conv3x3(upsample2x(x))`. Nearest 2x upsampling repeats each source pixel over a 2x2 block, so the conv's output
pixel (2i + p, 2j + q) reads source rows i - 1 + p .. i + p and columns j - 1 + q .. j + q only: for each of the
four output phases (p, q) the 3x3 kernel collapses to a 2x2 one (taps that land on the same source pixel summed;
`phase_weight`). One 2x2 conv over the source (padding 1) with the four phase kernels stacked as output channels
computes all four, 16 multiply-adds per output pixel and input channel instead of 9 x 4 = 36 per source pixel, and
`out[:, :, 2i + p, 2j + q] = y[:, phase (p, q), i + p, j + q]` is one strided view of that output. A 1x1 conv commutes
with the upsampling outright: it runs on the source (4x fewer multiply-adds) and its output is upsampled.
With a concatenation the conv splits by input channels: conv(cat(up(x), skip)) = conv_x(up(x)) + conv_s(skip) (the
folded bias on the skip part), the upsampled part added through the strided view, the activation applied after.
On smp's Unet(resnet34) decoder steps at 224x224, converted with and without this path, batch 1, 2 threads
(`python -m bench.bench_upsample_conv`): 0.58-0.78x the time.

`fuse_upsample_conv(graph)` takes a FusedConv2d call (`flat_fused.fused_call`, no residual) whose input is an
`upsample_cat` (flat_concat.py) or a nearest `F.interpolate` used by that call alone, with nothing but reads
between the two (nothing runs that could write to the sources), and makes the pair one `upsample_conv` call. That
call computes at the source resolution only where the module's own call would run its oneDNN route (the per-forward
leaf check passed, oneDNN accepted the module, and the module routed the signature of the tensor the upsampling
would build to oneDNN: float32, channels_last, no gradient), for a 3x3 conv with padding 1 or a 1x1 conv without,
stride 1, no dilation, one group, and every upsampled part by exactly 2 in both directions. Anything else runs the
two calls the graph had. Same function, not the same rounding: the phase kernels are sums of the folded weight's
taps (computed in float64, rounded once), and the sums run in another order, as another conv algorithm's would.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fusedconv import cpu
from fusedconv.activations import apply_activation
from fusedconv.graph.flat_concat import _eager, _factors, _format, _nearest_args, nearest_blocks, upsample_cat
from fusedconv.graph.flat_fused import fused_call

_CL = torch.channels_last
_Tensor = torch.Tensor
# Source taps of each output phase of a nearest 2x upsampling followed by a 3x3 conv with padding 1: phase p reads
# source offsets (-1 + p, p); kernel tap 0 lands on the first of them, tap 2 on the second, tap 1 on the first for
# p = 1 and on the second for p = 0. _PHASES[p][k][t]: tap t of the 3x3 kernel lands on source offset k of phase p.
_PHASES = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))
_UNIT = ([1, 1], [1, 1], 1)  # stride, dilation, groups of the phase conv


def phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """The four 2x2 kernels of a 3x3 conv (padding 1) after a nearest 2x upsampling, as one (4 * C_out, C_in, 2, 2)
    weight: phase (p, q) at output channels (2p + q) * C_out .. (2p + q + 1) * C_out, computed in float64."""
    m = torch.tensor(_PHASES, dtype=torch.float64, device=weight.device)  # (phase, source offset, tap)
    k = torch.einsum("pky,qlx,oiyx->pqoikl", m, m, weight.to(torch.float64))
    return k.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


def phase_view(y: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (p, q, n, i, j, c) of a channels_last phase-conv output `y` (N, 4C, H + 1, W + 1) and of a
    channels_last `out` (N, C, 2H, 2W) with out's element (p, q, n, i, j, c) = out[n, c, 2i + p, 2j + q] and y's the
    value phase (p, q) gives it, y[n, (2p + q) * C + c, i + p, j + q]."""
    n, c4, h1, w1 = y.shape
    c, h, w = c4 // 4, h1 - 1, w1 - 1
    sy, so = y.stride(0), out.stride(0)
    y6 = y.as_strided((2, 2, n, h, w, c), (w1 * c4 + 2 * c, c4 + c, sy, w1 * c4, c4, 1), y.storage_offset())
    o6 = out.as_strided((2, 2, n, h, w, c), (2 * w * c, c, so, 4 * w * c, 2 * c, 1), out.storage_offset())
    return y6, o6


class _Plan:
    """What a module needs to run one concatenation layout at the source resolution: the upsampled and the plain
    input channels' weights packed for oneDNN (None when the layout has no plain part), the upsampled conv's bias
    and call tail (its activation fused when there is no plain part), and the plain conv's."""

    __slots__ = ("up", "up_bias", "up_tail", "plain", "plain_tail")


def _entry(state, layout: tuple, kernel: int, x_up: torch.Tensor, x_plain: torch.Tensor | None):
    """The module's _Plan for `layout` ((upsampled?, channels) per part), built on first use and kept on its
    eager state (dropped with every refold); None when oneDNN refuses it (remembered as False)."""
    plans = state.upsampled
    if plans is None:
        plans = state.upsampled = {}
    plan = plans.get(layout)
    if plan is not None:
        return plan or None
    weight, bias = state.weight, state.bias
    up_idx, plain_idx, start = [], [], 0
    for is_up, c in layout:
        (up_idx if is_up else plain_idx).extend(range(start, start + c))
        start += c
    # The phase conv (3x3) and the plain conv keep the module's padding: 1 for 3x3, 0 for 1x1.
    pad = [1, 1] if kernel == 3 else [0, 0]
    alone = not plain_idx  # no plain part: the bias and the activation go on the upsampled conv
    act = state.unary_tail[4:] if alone else cpu.unary_attr("identity", 0.0)
    w_up = weight[:, up_idx]
    plan = _Plan()
    try:
        plan.up = cpu.pack_weight(phase_weight(w_up) if kernel == 3 else w_up.contiguous(), pad, *_UNIT[:2], 1,
                                  x_up.shape)
        plan.up_bias = None if not alone else bias.repeat(4) if kernel == 3 else bias
        plan.up_tail = (pad, *_UNIT, *act)
        plan.plain = plan.plain_tail = None
        if not alone:
            plan.plain = cpu.pack_weight(weight[:, plain_idx].contiguous(), pad, *_UNIT[:2], 1, x_plain.shape)
            plan.plain_tail = (pad, *_UNIT, *act)
        # One trial call on the real inputs: oneDNN refuses some geometries only when run.
        cpu._pointwise(x_up, plan.up, plan.up_bias, *plan.up_tail)
    except RuntimeError:
        plans[layout] = False
        return None
    plans[layout] = plan
    return plan


def _sources(items: list):
    """(layout, upsampled sources, plain parts, output shape) when every part is a plain float32 CPU tensor, dense
    channels_last, each upsampled part by exactly 2 in both directions; None otherwise."""
    layout, ups, plains = [], [], []
    n = h = w = None
    for item in items:
        if type(item) is tuple:
            x, size, scale_factor = item
        else:
            x = item
        if (type(x) is not _Tensor or not x.is_cpu or x.dtype is not torch.float32 or x.dim() != 4
                or _format(x) is not _CL):
            return None
        if type(item) is tuple:
            if _factors(x, size, scale_factor) != (2, 2):
                return None
            shape = (x.shape[0], 2 * x.shape[2], 2 * x.shape[3])
            ups.append(x)
        else:
            shape = (x.shape[0], x.shape[2], x.shape[3])
            plains.append(x)
        if n is None:
            n, h, w = shape
        elif shape != (n, h, w):
            return None  # eager raises its own error
        layout.append((type(item) is tuple, x.shape[1]))
    if not ups:
        return None
    return tuple(layout), ups, plains, (n, sum(c for _, c in layout), h, w)


def _at_source_resolution(state, items: list):
    """The conv of the upsampled input computed at the source resolution (module doc), or None to run the graph's
    own calls."""
    padding, stride, dilation, groups = state.geometry
    kernel = state.weight.shape[2]
    if (not state.onednn_ok or groups != 1 or stride != [1, 1] or dilation != [1, 1]
            or state.weight.shape[3] != kernel or (kernel, padding) not in ((3, [1, 1]), (1, [0, 0]))):
        return None
    found = _sources(items)
    if found is None:
        return None
    layout, ups, plains, shape = found
    n, c, h, w = shape
    # The route the module gave the upsampled tensor's signature (cpu._route's key: shape, channels_last strides,
    # dtype, no gradient): oneDNN, so the module call would compute act(conv + bias) there.
    if state.routes.get((shape, (c * h * w, 1, w * c, c), torch.float32, False)) is not cpu.ONEDNN:
        return None
    x_up = ups[0] if len(ups) == 1 else torch.cat(ups, 1).contiguous(memory_format=_CL)
    x_plain = None if not plains else plains[0] if len(plains) == 1 else torch.cat(plains, 1).contiguous(
        memory_format=_CL)
    plan = _entry(state, layout, kernel, x_up, x_plain)
    if plan is None:
        return None
    y = cpu._pointwise(x_up, plan.up, plan.up_bias, *plan.up_tail)
    if not y.is_contiguous(memory_format=_CL):
        y = y.contiguous(memory_format=_CL)  # the views below assume oneDNN's dense channels_last output
    if x_plain is None:
        out = torch.empty((n, state.weight.shape[0], h, w), dtype=y.dtype, memory_format=_CL)
        src, dst = phase_view(y, out) if kernel == 3 else nearest_blocks(out, y, 2, 2)
        dst.copy_(src)
        return out
    out = cpu._pointwise(x_plain, plan.plain, state.bias, *plan.plain_tail)
    if not out.is_contiguous(memory_format=_CL):
        out = out.contiguous(memory_format=_CL)
    src, dst = phase_view(y, out) if kernel == 3 else nearest_blocks(out, y, 2, 2)
    dst.add_(src)
    if state.act is not None:
        out = apply_activation(out, state.act[0], state.act[1], inplace=True)
    return out


def upsample_conv(state, module, items: list, dim):
    """`fused_call(state, module, upsample_cat(items, dim))` (`dim` None: the single item's `F.interpolate`), computed
    at the source resolution where the module doc allows."""
    if state is not None:
        try:
            y = _at_source_resolution(state, items)
        except RuntimeError:
            y = None  # oneDNN refused a call: the graph's own calls below raise or answer as eager would
        if y is not None:
            return y
    x = _eager(items[0]) if dim is None else upsample_cat(items, dim)
    return fused_call(state, module, x)


def _between_only_reads(first: fx.Node, last: fx.Node) -> bool:
    """Nothing but reads (`operator.getitem` of the per-forward states and leaves, attribute reads) runs between
    `first` and `last`."""
    node = first.next
    while node is not last:
        if node.op != "get_attr" and (node.op != "call_function" or node.target is not operator.getitem):
            return False
        node = node.next
    return True


def fuse_upsample_conv(graph: fx.Graph) -> int:
    """Make each `fused_call(state, module, upsampled)` the module doc allows one `upsample_conv` call; returns how
    many."""
    done = 0
    for call in list(graph.nodes):
        if call.op != "call_function" or call.target is not fused_call or len(call.args) != 3 or call.kwargs:
            continue
        state, module, x = call.args
        if not isinstance(x, fx.Node) or len(x.users) != 1 or not _between_only_reads(x, call):
            continue
        if x.op == "call_function" and x.target is upsample_cat and len(x.args) == 2 and not x.kwargs:
            items, dim = x.args
        else:
            nearest = _nearest_args(x)
            if nearest is None:
                continue
            items, dim = [tuple(nearest)], None
        with graph.inserting_before(call):
            new = graph.call_function(upsample_conv, (state, module, items, dim))
        call.replace_all_uses_with(new)
        graph.erase_node(call)
        graph.erase_node(x)
        done += 1
    return done
