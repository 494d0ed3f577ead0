"""The model zoo swept by `python -m bench.zoo`: which models, how to build them without downloads, what input.

Each entry names a model as `source:name` (torchvision / timm / smp / home) and says how to build it with random
weights (`weights=None`, `pretrained=False`, `encoder_weights=None`), the keyword arguments it needs, and its
input: image models take (N, 3, size, size) with the sweep's size unless they need a larger minimum; video
models take (N, 3, T, H, W). The default set is chosen for architectural diversity (residual, depthwise,
squeeze-excite, split-attention, multi-branch re-parameterizable blocks, same-padding convs, mixed kernels,
dense / dual-path connections, no BatchNorm at all, attention + BN, LayerNorm / GroupNorm nets, 3-D convs,
segmentation decoders) at a cost a 1-2 core machine sweeps in well under half an hour at 64x64.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: `spec` ("source:name[:encoder]"), builder keyword arguments, input geometry.

    min_size: the smallest image size the architecture accepts (the sweep's --size is raised to it);
    fixed_size: an architecture whose size is baked in at build time gets `img_size` = the input size;
    frames: > 0 for video models, input (N, 3, frames, size, size).
    """

    spec: str
    kwargs: dict = field(default_factory=dict)
    min_size: int = 0
    fixed_size: bool = False
    frames: int = 0
    video_size: int = 32

    @property
    def source(self) -> str:
        return self.spec.split(":", 1)[0]

    def input_shape(self, size: int, batch: int) -> tuple[int, ...]:
        if self.frames:
            return (batch, 3, self.frames, self.video_size, self.video_size)
        s = max(size, self.min_size)
        return (batch, 3, s, s)

    def build(self, size: int) -> nn.Module:
        """The model with random weights (nothing downloaded), in eval mode."""
        kind, _, rest = self.spec.partition(":")
        kwargs = dict(self.kwargs)
        if self.fixed_size:
            kwargs["img_size"] = max(size, self.min_size)
        if kind == "torchvision":
            import torchvision

            builder = torchvision.models.get_model_builder(rest)
            kwargs.setdefault("weights", None)
            if "weights_backbone" in inspect.signature(builder).parameters:
                kwargs.setdefault("weights_backbone", None)  # segmentation builders would download one
            model = builder(**kwargs)
        elif kind == "timm":
            import timm

            model = timm.create_model(rest, pretrained=False, **kwargs)
        elif kind == "smp":
            import segmentation_models_pytorch as smp

            arch, encoder = rest.split(":")
            model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, **kwargs)
        elif kind == "home":
            model = HOME_MODELS[rest]()
        else:
            raise ValueError(f"spec: expected torchvision:, timm:, smp: or home:, got {self.spec!r}")
        return model.eval()


class ConvOutputReused(nn.Module):
    """The conv's output is read twice (by the BN and by a side branch): folding the BN would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.head(F.relu(self.bn(y)) + y)


class SharedBatchNorm(nn.Module):
    """One BN module after two different convs: convert may fold it into each conv on its own."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.a(x))) + self.bn(self.b(x))


class FunctionalBatchNorm(nn.Module):
    """BN as `F.batch_norm` on the block's own buffers, a residual and an in-place activation."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        for name in ("mean", "var", "gamma", "beta"):
            self.register_buffer(name, torch.zeros(8))
        with torch.no_grad():
            self.var.fill_(1.0)
            self.gamma.fill_(1.0)

    def forward(self, x):
        x = self.stem(x)
        y = F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5)
        return F.relu(y + x, inplace=True)


HOME_MODELS = {"conv_output_reused": ConvOutputReused, "shared_bn": SharedBatchNorm,
               "functional_bn": FunctionalBatchNorm}


def _tv(name, **kw) -> ZooModel:
    return ZooModel("torchvision:" + name, **kw)


def _timm(name, **kw) -> ZooModel:
    return ZooModel("timm:" + name, **kw)


def _smp(arch, encoder, **kw) -> ZooModel:
    return ZooModel(f"smp:{arch}:{encoder}", **kw)


DEFAULT_SET: list[ZooModel] = [
    # torchvision classification
    _tv("resnet18"), _tv("resnet50"), _tv("resnext50_32x4d"), _tv("wide_resnet50_2"),
    _tv("mobilenet_v2"), _tv("mobilenet_v3_small"), _tv("mobilenet_v3_large"),
    _tv("efficientnet_b0"), _tv("efficientnet_v2_s"), _tv("regnet_x_400mf"), _tv("regnet_y_400mf"),
    _tv("shufflenet_v2_x1_0"), _tv("mnasnet0_5"), _tv("densenet121"),
    _tv("googlenet", kwargs={"aux_logits": False, "init_weights": False}),
    _tv("inception_v3", kwargs={"aux_logits": False, "init_weights": False}, min_size=80),
    _tv("squeezenet1_1"), _tv("vgg11_bn"), _tv("convnext_tiny"),
    # torchvision segmentation and video (3-D convs)
    _tv("fcn_resnet50", kwargs={"aux_loss": False}), _tv("deeplabv3_mobilenet_v3_large", kwargs={"aux_loss": False}),
    _tv("lraspp_mobilenet_v3_large"),
    _tv("r3d_18", frames=4), _tv("r2plus1d_18", frames=4),
    # timm
    _timm("resnet26d"), _timm("resnet50d"), _timm("seresnet18"), _timm("skresnet18"), _timm("resnest14d"),
    _timm("res2net50_14w_8s"), _timm("regnetx_002"), _timm("regnety_002"), _timm("regnetz_b16"),
    _timm("rexnet_100"), _timm("ghostnet_050"), _timm("ghostnetv2_100"), _timm("mobilenetv3_small_050"),
    _timm("mobilenetv4_conv_small"), _timm("efficientnet_b0"), _timm("tf_efficientnet_b0"), _timm("mixnet_s"),
    _timm("hrnet_w18_small"), _timm("dla34"), _timm("dpn68"), _timm("cspresnet50"), _timm("cspdarknet53"),
    _timm("cs3darknet_s"), _timm("darknet53"), _timm("ese_vovnet19b_dw"), _timm("repvgg_a0"),
    _timm("mobileone_s0"), _timm("fastvit_t8"), _timm("convmixer_768_32"), _timm("xception41"),
    _timm("inception_resnet_v2", min_size=80), _timm("nf_resnet26"),
    _timm("levit_128s", fixed_size=True), _timm("poolformer_s12"), _timm("edgenext_xx_small"),
    _timm("tresnet_m"), _timm("selecsls42b"), _timm("hardcorenas_a"), _timm("lcnet_050"), _timm("tinynet_e"),
    _timm("gernet_s"), _timm("ecaresnet26t"), _timm("seresnext26d_32x4d"), _timm("gcresnext26ts"),
    _timm("efficientvit_b0"), _timm("mobilevit_xxs"), _timm("repvit_m0_9"), _timm("repghostnet_050"),
    _timm("hgnetv2_b0"), _timm("fbnetc_100"), _timm("efficientformerv2_s0", fixed_size=True),
    _timm("botnet26t_256", fixed_size=True), _timm("convnext_atto"),
    # segmentation_models_pytorch
    _smp("Unet", "resnet18"), _smp("UnetPlusPlus", "mobilenet_v2"), _smp("FPN", "efficientnet-b0"),
    _smp("PSPNet", "resnet18"), _smp("DeepLabV3Plus", "mobilenet_v2"), _smp("Linknet", "resnet18"),
    _smp("MAnet", "timm-efficientnet-b0"), _smp("PAN", "resnet18", min_size=128), _smp("Unet", "tu-regnety_002"),
    # home-made blocks that must not be folded (or only partly)
    ZooModel("home:conv_output_reused"), ZooModel("home:shared_bn"), ZooModel("home:functional_bn"),
]

BY_SPEC = {m.spec: m for m in DEFAULT_SET}
TINY_SET = ["timm:test_resnet", "timm:repvgg_a0", "home:functional_bn"]


def resolve(names: list[str]) -> list[ZooModel]:
    """ZooModels for spec strings: default-set entries by spec, anything else as a plain entry."""
    return [BY_SPEC.get(n) or ZooModel(n) for n in names]
