"""Helpers shared by the tests: randomised BN statistics, op counting, relative error, the global random
generators."""

from __future__ import annotations

import copy
import random
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from fusedconv.model_specs import randomize_batchnorm


#: One activation module per epilogue activation name (stateless, so tests may share the instances).
ACT_MODULES = {
    "identity": nn.Identity(),
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "leaky_relu": nn.LeakyReLU(0.2),
    "silu": nn.SiLU(),
    "hardswish": nn.Hardswish(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
}


def randomize_bn(model: nn.Module, seed: int = 0, example=None) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters (defaults hide folding mistakes); with an
    `example` input, statistics measured on it and then perturbed, which keeps a deep model's output dependent on
    every layer (model_specs.randomize_batchnorm)."""
    return randomize_batchnorm(model, seed, example_inputs=example)


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the measure the issues state tolerances in)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a forward pass executes (by overload packet name, e.g. 'convolution')."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_ops(model: nn.Module, *inputs) -> Counter:
    """Aten op counts of one forward pass of `model` on `inputs`."""
    counter = OpCounter()
    with counter:
        model(*inputs)
    return counter.counts


def batch_norm_count(counts: Counter) -> int:
    return sum(v for k, v in counts.items() if "batch_norm" in k)


def seed_global_generators(seed: int) -> None:
    """Seed torch's, Python's and numpy's global random generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def global_draws(n: int = 1) -> tuple:
    """The next `n` numbers of torch's, Python's and numpy's global generators (each generator moves by n)."""
    return torch.rand(n).tolist(), [random.random() for _ in range(n)], np.random.rand(n).tolist()


class KeepEveryOutput(TorchDispatchMode):
    """Keeps every op's output (a debugging or capture tool), and a copy of it taken when the op returned."""

    def __init__(self):
        super().__init__()
        self.kept = []
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.kept.append(out)
            self.copies.append(out.clone())
        return out


def conv3d_pair(cin, cout, act="relu", post=False, seed=0, **conv_kwargs):
    """An eval-mode Conv3d -> BatchNorm3d (random statistics) -> activation [-> BatchNorm3d] and its FusedConv3d."""
    from fusedconv.fused_layers import FusedConv3d

    torch.manual_seed(seed)
    mods = [nn.Conv3d(cin, cout, **conv_kwargs), nn.BatchNorm3d(cout), ACT_MODULES[act]]
    if post:
        mods.append(nn.BatchNorm3d(cout))
    ref = nn.Sequential(*mods)
    randomize_bn(ref, seed)
    ref.eval()
    fused = FusedConv3d.from_modules(ref[0], ref[1], ref[2], ref[3] if post else None).eval()
    return ref, fused


def conv3d_reference64(ref, x, residual=None):
    """`conv3d_pair`'s reference in float64: act(bn(conv(x)) [+ residual]) [-> post BatchNorm3d]."""
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        y = ref64[1](ref64[0](x.double()))
        if residual is not None:
            y = y + residual.double()
        for m in list(ref64)[2:]:
            y = m(y)
        return y


def count_ops_switched_off(switch: str, model: nn.Module, *inputs) -> Counter:
    """count_ops with fusedconv's CPU fast path (`switch="fusedconv"`, fusedconv.cpu.enabled) or PyTorch's oneDNN
    (`"mkldnn"`, torch.backends.mkldnn.flags) switched off for the call."""
    from fusedconv import cpu

    if switch == "fusedconv":
        cpu.enabled = False
        try:
            return count_ops(model, *inputs)
        finally:
            cpu.enabled = True
    with torch.backends.mkldnn.flags(enabled=False):
        return count_ops(model, *inputs)
