"""torch.fx symbolic tracing of converted models: every fused module is recorded as one leaf call.

`torch.fx.symbolic_trace` (and tools built on it: torchvision's `create_feature_extractor`, FX graph-mode
quantization) traces into any module whose class is not from `torch.nn`, calling its forward with `fx.Proxy`
arguments. A fused module's forward validates real tensors, reads data pointers and version counters and picks a
backend, none of which a Proxy has, so tracing into it cannot work. Instead, when a fused module is called with a
Proxy, it records itself as a `call_module` node — exactly what a tracer does for a leaf module — and the resulting
GraphModule calls the real module (copied by its qualified name) at run time, with its caches and kernels.
"""

from __future__ import annotations

import torch.fx as fx


def leaf_call(module, args: tuple, kwargs: dict):
    """The Proxy of a `call_module` node for `module(*args, **kwargs)` when an argument is an fx Proxy (symbolic
    tracing), else None (a real call)."""
    proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy)), None)
    if proxy is None:
        return None
    tracer = proxy.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)
