"""Nearest upsampling written straight into a concatenation, in the whole-model flat forward (flat.py).

A U-Net decoder step is `torch.cat([F.interpolate(x, size=2x, mode="nearest"), skip], dim=1)`: eager upsamples
into a new tensor, then cat copies it again into the output. `fuse_upsample_cat(graph)` turns each such cat into
one call of `upsample_cat`, which allocates the cat's output once and writes every part into its channel slice:
an upsampled part as a strided copy of its source (each source pixel to its 2x2 block), a plain part as a copy.
On smp's Unet(resnet34) at 224x224 that is four upsampled tensors (~4 MB) neither written nor read again per
forward.

Exact, not approximate: for factors 1 and 2 ATen's nearest source index is `dst` and `dst >> 1` (its
`nearest_idx`), so every output element is a copy of one input element, whatever the dtype. The fast path also
keeps eager's output layout: it runs only when every tensor is unambiguously in the same memory format (all
channels_last, or all contiguous), the format both interpolate and cat then return. Anything else — another
factor or mode, mixed layouts, gradients to record, a tensor subclass — runs the very ops the graph had
(`F.interpolate` then `torch.cat`), so errors and results are eager's.

The graph rewrite takes a cat only where moving the upsampling to the cat cannot change what it reads: each
interpolate node is used by that cat alone, and the interpolate nodes come right before it (nothing runs between
them that could write to their inputs).
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F

_CL = torch.channels_last
_CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate)
_INTERPOLATE = inspect.signature(F.interpolate)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def upsample_cat(items: list, dim: int) -> torch.Tensor:
    """`torch.cat(parts, dim)` where an item `(x, size, scale_factor)` stands for `F.interpolate(x, size,
    scale_factor, mode="nearest")` and any other item is a tensor taken as is."""
    plan = _plan(items, dim)
    if plan is None:
        return torch.cat([_eager(item) for item in items], dim)
    shape, memory_format, parts = plan
    first = parts[0][0]
    out = torch.empty(shape, dtype=first.dtype, device=first.device, memory_format=memory_format)
    start = 0
    for x, fh, fw in parts:
        c = x.shape[1]
        _write_nearest(out.narrow(1, start, c), x, fh, fw)
        start += c
    return out


def _eager(item):
    if type(item) is tuple:
        x, size, scale_factor = item
        return F.interpolate(x, size=size, scale_factor=scale_factor, mode="nearest")
    return item


def _format(t: torch.Tensor):
    """channels_last or contiguous_format where `t` is dense in that one only; None where in neither or both
    (a 1-channel or 1-pixel tensor: eager's choice of layout would hinge on suggest_memory_format's tie-breaks)."""
    cl = t.is_contiguous(memory_format=_CL)
    if cl != t.is_contiguous():
        return _CL if cl else torch.contiguous_format
    return None


def _factors(x: torch.Tensor, size, scale_factor):
    """(fh, fw), each 1 or 2, of an exact nearest upsampling of `x` to `size` / by `scale_factor`; None otherwise."""
    h, w = x.shape[2], x.shape[3]
    if h == 0 or w == 0:
        return None
    if size is not None and scale_factor is None:
        out = (size, size) if type(size) is int else tuple(size)
        if len(out) != 2 or not all(type(v) is int for v in out):
            return None
        fh, fw = out[0] // h, out[1] // w
        if out[0] != fh * h or out[1] != fw * w:
            return None
    elif scale_factor is not None and size is None:
        scales = (scale_factor, scale_factor) if type(scale_factor) in (int, float) else tuple(scale_factor)
        if len(scales) != 2 or not all(type(s) in (int, float) for s in scales):
            return None
        fh, fw = scales
    else:
        return None
    if fh not in (1, 2) or fw not in (1, 2):
        return None
    return int(fh), int(fw)


def _plan(items: list, dim: int):
    """(output shape, memory format, [(source, fh, fw)]) when the fast path computes exactly what eager would;
    None otherwise."""
    if type(dim) is not int or dim not in (1, -3) or not items:
        return None
    grad = torch.is_grad_enabled()
    parts, memory_format, first = [], None, None
    for item in items:
        if type(item) is tuple:
            x, size, scale_factor = item
        else:
            x, size, scale_factor = item, None, None
        if type(x) not in _PLAIN_TYPES or x.dim() != 4 or x.layout != torch.strided or x.is_quantized or (
                grad and x.requires_grad):
            return None
        if type(item) is tuple:
            factors = _factors(x, size, scale_factor)
            if factors is None:
                return None
        else:
            factors = (1, 1)
        fmt = _format(x)
        if fmt is None or (memory_format is not None and fmt is not memory_format):
            return None
        memory_format = fmt
        if first is None:
            first = x
        elif x.dtype != first.dtype or x.device != first.device:
            return None
        parts.append((x, *factors))
    n, _, h, w = first.shape
    h, w = h * parts[0][1], w * parts[0][2]
    if any(x.shape[0] != n or x.shape[2] * fh != h or x.shape[3] * fw != w for x, fh, fw in parts):
        return None  # eager raises its own error
    return (n, sum(x.shape[1] for x, _, _ in parts), h, w), memory_format, parts


def nearest_blocks(dst: torch.Tensor, x: torch.Tensor, fh: int, fw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (n, c, i, a, j, b) of `x` (N, C, H, W) repeated and of `dst` (N, C, fh * H, fw * W) split into blocks,
    x's element there being the value nearest upsampling gives dst[n, c, fh*i + a, fw*j + b]: each spatial
    dimension of `dst` as (source index, offset in its block)."""
    n, c, h, w = x.shape
    sn, sc, sh, sw = dst.stride()
    blocks = dst.as_strided((n, c, h, fh, w, fw), (sn, sc, sh * fh, sh, sw * fw, sw), dst.storage_offset())
    return x[:, :, :, None, :, None].expand(n, c, h, fh, w, fw), blocks


def _write_nearest(dst: torch.Tensor, x: torch.Tensor, fh: int, fw: int) -> None:
    """dst[n, c, fh*i + a, fw*j + b] = x[n, c, i, j]: one strided copy through `nearest_blocks`."""
    if fh == 1 and fw == 1:
        dst.copy_(x)
        return
    src, blocks = nearest_blocks(dst, x, fh, fw)
    blocks.copy_(src)


def _nearest_args(node: fx.Node):
    """(x, size, scale_factor) of an `F.interpolate` node that is a plain nearest upsampling; None otherwise."""
    if node.op != "call_function" or node.target is not F.interpolate:
        return None
    try:
        bound = _INTERPOLATE.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    args = bound.arguments
    if args.get("mode", "nearest") != "nearest" or args.get("align_corners") is not None or \
            args.get("recompute_scale_factor") not in (None, False) or args.get("antialias", False) is not False:
        return None
    return args["input"], args.get("size"), args.get("scale_factor")


def fuse_upsample_cat(graph: fx.Graph) -> int:
    """Rewrite every `torch.cat([..., F.interpolate(x, mode="nearest"), ...], dim)` of `graph` the module doc
    allows into one `upsample_cat` call; returns how many."""
    done = 0
    for cat in list(graph.nodes):
        if cat.op != "call_function" or cat.target not in _CAT_TARGETS or len(cat.args) + len(cat.kwargs) != 2:
            continue
        tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", cat.kwargs.get("axis"))
        if not isinstance(tensors, (list, tuple)) or type(dim) is not int or dim not in (1, -3):
            continue
        upsampled = {n: _nearest_args(n) for n in tensors if isinstance(n, fx.Node)}
        upsampled = {n: a for n, a in upsampled.items() if a is not None and len(n.users) == 1}
        if not upsampled:
            continue
        before, prev = set(), cat.prev  # the interpolate nodes must be the ones right before the cat
        while prev in upsampled:
            before.add(prev)
            prev = prev.prev
        if before != set(upsampled):
            continue
        items = [tuple(upsampled[n]) if n in upsampled else n for n in tensors]
        with graph.inserting_before(cat):
            new = graph.call_function(upsample_cat, (items, dim))
        cat.replace_all_uses_with(new)
        graph.erase_node(cat)
        for n in upsampled:
            graph.erase_node(n)
        done += 1
    return done

