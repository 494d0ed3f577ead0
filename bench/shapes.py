"""The layer shapes the layers suite times, read off the real networks (not typed in by hand).

Each network is built with random weights, run once at 224x224 with forward hooks on its Conv2d modules, and
every conv becomes a `LayerCase`: its geometry, the activation that follows it in the network and whether a
residual is added before that activation. Repeated identical layers are kept once, with a count.

- ResNet-50 (torchvision): bottleneck conv1/conv2 -> ReLU, conv3 -> + identity -> ReLU, downsample -> no act.
- MobileNetV2 (torchvision): expand 1x1 and depthwise 3x3 -> ReLU6, projection 1x1 -> no act (+ residual in
  the blocks with a skip connection).
- RepVGG-A0 (timm): the 3x3 conv of each block, i.e. the single conv + ReLU a deployed (re-parameterized)
  RepVGG runs; the 1x1 and identity branches fold into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from bench.metrics import ConvShape

NETS = ("resnet50", "repvgg_a0", "mobilenet_v2")


@dataclass(frozen=True)
class LayerCase:
    net: str
    name: str  # the first module with this geometry, e.g. "layer1.0.conv2"
    shape: ConvShape
    activation: str  # a fusedconv activation name
    residual: bool
    count: int = 1  # how many layers of the network share this case

    @property
    def key(self) -> tuple:
        return (self.shape, self.activation, self.residual)

    def label(self) -> str:
        extra = (f" {self.activation}" if self.activation != "identity" else "") + (" +res" if self.residual else "")
        return f"{self.shape.label()}{extra}"


def _resnet50_role(name: str, model: nn.Module) -> tuple[str, bool]:
    if name.endswith("downsample.0"):
        return "identity", False
    if name.endswith("conv3"):
        return "relu", True
    return "relu", False


def _mobilenet_v2_role(name: str, model: nn.Module) -> tuple[str, bool]:
    # features.<i>.conv.<j>: inside an InvertedResidual the last conv of `conv` is the linear projection.
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "features" and parts[2] == "conv":
        block = model.features[int(parts[1])]
        convs = [n for n, m in block.conv.named_children() if isinstance(m, nn.Conv2d)]
        if parts[3] in convs and parts[3] == convs[-1]:
            return "identity", bool(getattr(block, "use_res_connect", False))
    return "relu6", False


def _repvgg_role(name: str, model: nn.Module) -> tuple[str, bool] | None:
    return ("relu", False) if name.endswith("conv_kxk.conv") else None


def build_net(net: str) -> nn.Module:
    if net == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None)
    if net == "mobilenet_v2":
        import torchvision

        return torchvision.models.mobilenet_v2(weights=None)
    if net == "repvgg_a0":
        import timm

        return timm.create_model("repvgg_a0", pretrained=False)
    raise ValueError(f"net: expected one of {NETS}, got {net!r}")


_ROLES = {"resnet50": _resnet50_role, "mobilenet_v2": _mobilenet_v2_role, "repvgg_a0": _repvgg_role}


@torch.no_grad()
def layer_cases(net: str, image_size: int = 224) -> list[LayerCase]:
    """The distinct conv layers of `net` in network order."""
    model = build_net(net).eval()
    role = _ROLES[net]
    seen: dict[tuple, LayerCase] = {}
    hooks = []

    def hook_for(name: str, conv: nn.Conv2d):
        def hook(module, inputs, output):
            r = role(name, model)
            if r is None:
                return
            if isinstance(conv.padding, str) or len(set(conv.padding)) != 1 or len(set(conv.stride)) != 1 \
                    or len(set(conv.dilation)) != 1:
                return  # the suite's shapes are square; none of these networks has another kind
            x = inputs[0]
            shape = ConvShape(conv.in_channels, conv.out_channels, x.shape[2], x.shape[3], conv.kernel_size[0],
                              conv.kernel_size[1], conv.stride[0], conv.padding[0], conv.dilation[0], conv.groups)
            case = LayerCase(net, name, shape, r[0], r[1])
            if case.key in seen:
                old = seen[case.key]
                seen[case.key] = LayerCase(net, old.name, shape, old.activation, old.residual, old.count + 1)
            else:
                seen[case.key] = case
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook_for(name, m)))
    try:
        model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    return list(seen.values())


def representative(cases: list[LayerCase], n: int = 3) -> list[LayerCase]:
    """A small spread of a network's cases for --quick: the first, the most expensive and a depthwise /
    residual one where the network has them (deterministic, no randomness)."""
    if len(cases) <= n:
        return list(cases)
    picked = [cases[0]]
    by_flops = sorted(cases, key=lambda c: -(c.shape.cin // c.shape.groups) * c.shape.cout * c.shape.kh * c.shape.kw
                      * c.shape.out_hw[0] * c.shape.out_hw[1])
    special = [c for c in cases if c.shape.depthwise] or [c for c in cases if c.residual]
    for group in (by_flops, special, cases[len(cases) // 2:]):
        extra = next((c for c in group if c not in picked), None)  # the group's first not already chosen
        if extra is not None and len(picked) < n:
            picked.append(extra)
    return picked
