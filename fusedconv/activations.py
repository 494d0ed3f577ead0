"""One vocabulary for activations: module / function <-> ActivationSpec <-> kernel name <-> torch function.

The fused epilogue applies an activation chosen at compile time by name (the Triton kernels take the same
names as a constexpr). Graph passes recognise an activation given as a module (`nn.ReLU()`), a function
(`F.relu`, `torch.relu`) or a method (`x.relu()`) and turn it into an `ActivationSpec`; the fallback path turns
the spec back into a torch function, so both paths compute the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The kernels own the list of epilogue activations and their PyTorch definitions; this module maps the
# ways a model can spell an activation onto those names.
from fusedconv.kernels.reference import ACTIVATIONS, apply_activation

__all__ = ["ACTIVATIONS", "ActivationSpec", "apply_activation", "as_spec", "spec_from_call", "spec_from_module"]


@dataclass(frozen=True)
class ActivationSpec:
    """An activation the fused epilogue can apply: a name from ACTIVATIONS and its one float parameter.

    `param` is the negative slope for `leaky_relu` and 0.0 for every other activation.
    """

    name: str = "identity"
    param: float = 0.0

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.name!r}")
        if not isinstance(self.param, (int, float)) or isinstance(self.param, bool) or not math.isfinite(self.param):
            raise ValueError(f"activation param: expected a finite float, got {self.param!r}")
        if self.name != "leaky_relu" and self.param != 0.0:
            raise ValueError(f"activation param: only 'leaky_relu' takes a parameter, got {self.param!r} for {self.name!r}")
        object.__setattr__(self, "param", float(self.param))

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    def __str__(self) -> str:
        return f"leaky_relu({self.param:g})" if self.name == "leaky_relu" else self.name

    def apply(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Apply the activation with PyTorch ops (the reference and the fallback)."""
        return apply_activation(x, self.name, self.param, inplace=inplace)


def spec_from_module(module: nn.Module) -> ActivationSpec | None:
    """The spec of an activation module, or None when the module is not one the epilogue can compute.

    Only exact classes are matched: a subclass may override forward, so it is not assumed to behave alike.
    """
    t = type(module)
    if t is nn.Identity:
        return ActivationSpec("identity")
    if t is nn.ReLU:
        return ActivationSpec("relu")
    if t is nn.ReLU6:
        return ActivationSpec("relu6")
    if t is nn.Hardtanh and module.min_val == 0.0 and module.max_val == 6.0:
        return ActivationSpec("relu6")
    if t is nn.LeakyReLU:
        return ActivationSpec("leaky_relu", float(module.negative_slope))
    if t is nn.SiLU:
        return ActivationSpec("silu")
    if t is nn.Hardswish:
        return ActivationSpec("hardswish")
    if t is nn.GELU:
        return ActivationSpec("gelu_tanh" if module.approximate == "tanh" else "gelu")
    return _library_spec(module)


# Activation classes of model libraries that compute an epilogue activation (timm's own Swish / GELU / ...: models
# built with them would otherwise keep their BatchNorm), by (module, class name) so that nothing is imported.
# Matched by exact class like the torch ones, and only after `_computes` has checked, once per class and forward
# function, that the class's forward gives the same values as the epilogue's definition on a float64 probe: a
# library version whose class computes something else is not recognised, never fused wrongly.
LIBRARY_ACTIVATIONS = {
    ("timm.layers.activations", "Swish"): "silu",
    ("timm.layers.activations", "GELU"): "gelu",
    ("timm.layers.activations", "GELUTanh"): "gelu_tanh",
    ("timm.layers.activations", "HardSwish"): "hardswish",
    ("timm.layers.activations_me", "SwishMe"): "silu",
    ("timm.layers.activations_me", "HardSwishMe"): "hardswish",
}
_checked: dict[tuple, bool] = {}


def _library_spec(module: nn.Module) -> ActivationSpec | None:
    t = type(module)
    name = LIBRARY_ACTIVATIONS.get((t.__module__, t.__qualname__))
    if name is None or "forward" in module.__dict__:
        return None  # unknown, or a forward replaced on the instance
    key = (t, t.forward)
    if key not in _checked:
        _checked[key] = _computes(module, name)
    return ActivationSpec(name) if _checked[key] else None


def _computes(module: nn.Module, name: str) -> bool:
    """Whether `type(module).forward` gives `name`'s values elementwise on a float64 probe: a dense range over
    every kink and saturation of the supported activations, signed zeros, large magnitudes and random values in
    a 4-d tensor (a function that mixed elements or changed the shape would differ). Hooks are not run (the class's
    forward is called directly); the probe is a fresh tensor, so an in-place forward changes nothing else."""
    g = torch.Generator().manual_seed(0)
    grid = torch.linspace(-12.0, 12.0, 4801, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, 3.0, -3.0, 6.0, 1e-300, -1e-300, 40.0, -40.0, 1e4, -1e4],
                           dtype=torch.float64)
    probes = [torch.cat([grid, special]).view(1, -1, 1, 1),
              torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64) * 4]
    try:
        with torch.no_grad():
            for x in probes:
                want = apply_activation(x.clone(), name, 0.0)
                got = type(module).forward(module, x.clone())
                if (not isinstance(got, torch.Tensor) or got.shape != x.shape or got.dtype != x.dtype
                        or not torch.allclose(got, want, rtol=1e-12, atol=1e-300)):
                    return False
    except Exception:  # noqa: BLE001 - a forward that cannot run on the probe is simply not recognised
        return False
    return True


# Functions (and Tensor methods, by name) that map to an activation with no extra argument.
_PLAIN_FUNCTIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.silu: "silu",
    F.hardswish: "hardswish",
}
_PLAIN_METHODS = {"relu": "relu", "relu_": "relu"}
# clamp(x, 0, 6) is ReLU6 and clamp(x, min=0) is ReLU (hand-written activations in traced models).
_CLAMP_FUNCTIONS = (torch.clamp, torch.clip)
_CLAMP_METHODS = ("clamp", "clamp_", "clip", "clip_")


def _clamp_spec(rest: tuple, kw: dict) -> ActivationSpec | None:
    lo = kw.pop("min", rest[0] if len(rest) > 0 else None)
    hi = kw.pop("max", rest[1] if len(rest) > 1 else None)
    if kw or len(rest) > 2 or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                      for v in (lo, hi)):
        return None
    if lo == 0 and hi is None:
        return ActivationSpec("relu")
    if lo == 0 and hi == 6:
        return ActivationSpec("relu6")
    return None


def spec_from_call(target, args: tuple, kwargs: dict) -> ActivationSpec | None:
    """The spec of a functional activation call `target(x, *args[1:], **kwargs)`, or None if not one.

    `target` is an fx `call_function` target (a function) or a `call_method` name (a string).
    Arguments that change the result (a slope, hardtanh bounds, GELU's approximation) are read; any argument
    that is not understood makes the call unrecognised rather than guessed.
    """
    rest = tuple(args[1:])
    kw = {k: v for k, v in kwargs.items() if k != "inplace"}
    if isinstance(target, str):
        if target in _PLAIN_METHODS and not rest and not kw:
            return ActivationSpec(_PLAIN_METHODS[target])
        if target in _CLAMP_METHODS:
            return _clamp_spec(rest, dict(kwargs))
        return None
    if target in _CLAMP_FUNCTIONS:
        return _clamp_spec(rest, dict(kwargs))
    if target in _PLAIN_FUNCTIONS:
        if rest and not (len(rest) == 1 and isinstance(rest[0], bool)):
            return None
        return ActivationSpec(_PLAIN_FUNCTIONS[target]) if not kw else None
    if target is F.leaky_relu:
        slope = kw.pop("negative_slope", rest[0] if rest else 0.01)
        if kw or len(rest) > 2 or not isinstance(slope, (int, float)):
            return None
        return ActivationSpec("leaky_relu", float(slope))
    if target is F.hardtanh:
        lo = kw.pop("min_val", rest[0] if len(rest) > 0 else -1.0)
        hi = kw.pop("max_val", rest[1] if len(rest) > 1 else 1.0)
        if kw or len(rest) > 3 or (lo, hi) != (0.0, 6.0):
            return None
        return ActivationSpec("relu6")
    if target is F.gelu:
        approx = kw.pop("approximate", rest[0] if rest else "none")
        if kw or len(rest) > 1 or approx not in ("none", "tanh"):
            return None
        return ActivationSpec("gelu_tanh" if approx == "tanh" else "gelu")
    return None


def as_spec(act) -> ActivationSpec:
    """Coerce what a user may pass as an activation into a spec.

    Accepts None (identity), an ActivationSpec, a name from ACTIVATIONS, or a supported activation module.
    """
    if act is None:
        return ActivationSpec("identity")
    if isinstance(act, ActivationSpec):
        return act
    if isinstance(act, str):
        return ActivationSpec(act)
    if isinstance(act, nn.Module):
        spec = spec_from_module(act)
        if spec is None:
            raise TypeError(
                f"act: expected one of nn.ReLU, nn.ReLU6, nn.Hardtanh(0, 6), nn.LeakyReLU, nn.SiLU, nn.Hardswish, "
                f"nn.GELU or nn.Identity, got {type(act).__name__}"
            )
        return spec
    raise TypeError(f"act: expected None, a name, an ActivationSpec or an activation module, got {type(act).__name__}")
