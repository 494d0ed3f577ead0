"""Warm-up: make every fused layer pick (autotune) its kernel config before timing or CUDA-graph capture.

The Triton kernels are autotuned per distinct problem shape and dtype the first time they meet it: that first
call benchmarks several configs (seconds, many launches and allocations). Inside a CUDA-graph capture that
benchmarking would be captured or fail, and inside a timed region it distorts the numbers, so run

    fusedconv.tuning.warmup(model, x)                   # model(x) once
    fusedconv.tuning.warmup(model, x_bs1, x_bs32)       # model(x_bs1), model(x_bs32): one call per shape
    fusedconv.tuning.warmup(model, (x, mask), {"y": y}) # model(x, mask), model(y=y)

once, after `convert(...)` and `.to(device, dtype)`, with inputs of every shape the model will see. Each
positional example is one forward call: a tensor is the single argument, a tuple/list is the positional
arguments, a dict the keyword arguments. Calls whose (shape, dtype, device, memory format) signature repeats an
earlier one are skipped. Runs under torch.no_grad(), does not change train/eval mode, and synchronises CUDA at
the end so the tuning is complete when it returns. On CPU it simply runs the model (and fills FusedConv2d's
folded-weight cache), which is harmless.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["warmup"]


def _as_call(example) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def _signature(value):
    if isinstance(value, torch.Tensor):
        fmt = "cl" if value.dim() == 4 and not value.is_contiguous() and \
            value.is_contiguous(memory_format=torch.channels_last) else "std"
        return ("T", tuple(value.shape), value.dtype, str(value.device), fmt)
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return ("V", repr(value))


def warmup(model: nn.Module, *example_inputs) -> nn.Module:
    """Run `model` once per distinct input signature under no_grad so every kernel autotunes now.

    See the module docstring for how examples map to calls. Returns `model` (unchanged) for chaining.
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model: expected an nn.Module or a callable, got {type(model).__name__}")
    if not example_inputs:
        raise ValueError("example_inputs: expected at least one example input (a tensor, a tuple of arguments "
                         "or a dict of keyword arguments), got none")
    seen = set()
    devices = set()
    with torch.no_grad():
        for example in example_inputs:
            args, kwargs = _as_call(example)
            key = (_signature(args), _signature(kwargs))
            if key in seen:
                continue
            seen.add(key)
            for value in list(args) + list(kwargs.values()):
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    devices.add(value.device)
            model(*args, **kwargs)
    for device in devices:
        torch.cuda.synchronize(device)
    return model
