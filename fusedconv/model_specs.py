"""Model specs: build the model a short string names, give it trained-looking BatchNorm statistics, convert it.

A spec names a model without downloading anything: `torchvision:NAME`, `timm:NAME`, `smp:ARCH:ENCODER` (random
weights; `load_weights` loads a trained state_dict), or a file holding a pickled nn.Module. Used by the command
line (`fusedconv demo / convert`) and by the benchmark suite (`bench/`), so both build and check models the
same way. Bad specs raise `ModelSpecError` with a one-line message naming the argument.
"""

from __future__ import annotations

import inspect
import os

CONVERTED_FORMAT = "fusedconv.converted"  # the marker of a file written by `fusedconv convert -o FILE.pt`
SPEC_PREFIXES = ("torchvision", "timm", "smp")


class ModelSpecError(ValueError):
    """A model spec, model file or weights file that cannot be used; the message names it and what was expected."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """(kind, parts) of a spec: ("torchvision", [NAME]), ("timm", [NAME]), ("smp", [ARCH, ENCODER]) or
    ("file", [PATH])."""
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"model spec: expected torchvision:NAME, timm:NAME, smp:ARCH:ENCODER or a file, "
                             f"got {spec!r}")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in SPEC_PREFIXES:
        parts = rest.split(":")
        want = 2 if prefix == "smp" else 1
        if len(parts) != want or not all(parts):
            form = "smp:ARCH:ENCODER" if prefix == "smp" else f"{prefix}:NAME"
            raise ModelSpecError(f"model spec: expected {form}, got {spec!r}")
        return prefix, parts
    return "file", [spec]


def _build_torchvision(name: str):
    try:
        import torchvision
    except ImportError as e:
        raise ModelSpecError("model spec torchvision:...: expected torchvision to be installed, got ImportError") from e
    names = set(torchvision.models.list_models())
    if name not in names:
        raise ModelSpecError(f"model spec: unknown torchvision model {name!r} (see torchvision.models.list_models())")
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # detection / segmentation builders would otherwise download one
    return builder(**kwargs)


def _build_timm(name: str):
    try:
        import timm
    except ImportError as e:
        raise ModelSpecError("model spec timm:...: expected timm to be installed, got ImportError") from e
    if not timm.is_model(name):
        raise ModelSpecError(f"model spec: unknown timm model {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=False)


def _build_smp(arch: str, encoder: str):
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ModelSpecError("model spec smp:...: expected segmentation_models_pytorch to be installed, "
                             "got ImportError") from e
    import torch

    archs = {n.lower(): n for n in dir(smp) if isinstance(getattr(smp, n), type)
             and issubclass(getattr(smp, n), torch.nn.Module)}
    if arch.lower() not in archs:
        raise ModelSpecError(f"model spec: unknown smp architecture {arch!r} (e.g. Unet, FPN, DeepLabV3Plus)")
    encoders = set(smp.encoders.get_encoder_names()) if hasattr(smp.encoders, "get_encoder_names") else None
    if encoders is not None and encoder not in encoders:
        raise ModelSpecError(f"model spec: unknown smp encoder {encoder!r} (see smp.encoders.get_encoder_names())")
    return getattr(smp, archs[arch.lower()])(encoder_name=encoder, encoder_weights=None)


def _load_model_file(path: str, trust_pickle: bool):
    import torch

    if not os.path.isfile(path):
        raise ModelSpecError(f"model spec: expected torchvision:NAME, timm:NAME, smp:ARCH:ENCODER or an existing file, "
                             f"got {path!r} (no such file)")
    if path.endswith(".pt2") or is_torchscript(path):
        raise ModelSpecError(f"model spec {path!r}: an ExportedProgram / TorchScript file is not an nn.Module; "
                             "`fusedconv convert` converts it at the graph level (see --help)")
    if not trust_pickle:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = None
        if isinstance(obj, dict):
            if obj.get("format") == CONVERTED_FORMAT:
                raise ModelSpecError(f"model spec {path!r}: this file is already a fusedconv-converted model "
                                     "(load it with fusedconv.cli.load_converted)")
            raise ModelSpecError(f"model spec {path!r}: this file holds a state_dict, not a model — give the "
                                 "architecture as SPEC and this file as --weights")
        raise ModelSpecError(f"model spec {path!r}: loading a pickled nn.Module runs code from the file; pass "
                             "--trust-pickle if you trust it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelSpecError(f"model spec {path!r}: expected a pickled nn.Module, could not load it "
                             f"({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(obj, torch.nn.Module):
        raise ModelSpecError(f"model spec {path!r}: expected a pickled nn.Module, got {type(obj).__name__}")
    return obj


def is_torchscript(path: str) -> bool:
    """Whether `path` is a torch.jit.save archive (not a torch.save one)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        # torch.jit.save archives carry the compiled code; torch.save archives only data.pkl + tensors.
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def build_model(spec: str, *, trust_pickle: bool = False):
    """The nn.Module a spec names, in eval mode, with random weights (or the pickled module of a file)."""
    kind, parts = parse_spec(spec)
    if kind == "torchvision":
        model = _build_torchvision(parts[0])
    elif kind == "timm":
        model = _build_timm(parts[0])
    elif kind == "smp":
        model = _build_smp(parts[0], parts[1])
    else:
        model = _load_model_file(parts[0], trust_pickle)
    return model.eval()


def default_input_size(spec: str, model=None) -> tuple[int, int, int, int]:
    """(N, C, H, W) the model is meant for: timm's pretrained config when it has one, else 1x3x224x224."""
    if model is not None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and len(cfg.get("input_size", ())) == 3:
            c, h, w = cfg["input_size"]
            return (1, int(c), int(h), int(w))
    return (1, 3, 224, 224)


def load_weights(model, path: str) -> None:
    """Load a state_dict file (weights only, never arbitrary pickles) into `model`, strictly."""
    import torch

    if not os.path.isfile(path):
        raise ModelSpecError(f"--weights: expected an existing state_dict file, got {path!r} (no such file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelSpecError(f"--weights {path!r}: expected a state_dict saved with torch.save, could not load it "
                             f"({type(e).__name__}: {_first_line(e)})") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"--weights {path!r}: expected a dict of tensors (a state_dict), "
                             f"got {type(state).__name__}")
    missing, unexpected = _state_dict_mismatch(model, state)
    if missing or unexpected:
        raise ModelSpecError(f"--weights {path!r}: does not match the model: {len(missing)} missing key(s) "
                             f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelSpecError(f"--weights {path!r}: does not match the model ({_first_line(e)})") from e


def _state_dict_mismatch(model, state: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict().keys())
    got = set(state.keys())
    return sorted(expected - got), sorted(got - expected)


def randomize_batchnorm(model, seed: int = 0, example_inputs=None):
    """Give every BatchNorm random statistics and affine parameters, in place.

    A model built with random weights has BN statistics (mean 0, var 1) that make folding look exact even when
    it is wrong; randomized statistics make the error check mean something.

    Without `example_inputs`, the statistics are drawn blind (mean ~ N(0, 0.25), var in [0.5, 2]). They match no
    layer's real activations, and where a layer's output is much smaller than that (the depthwise convs of
    inverted-residual nets, whose random init gives outputs ~20x smaller than their inputs) the signal shrinks at
    every such layer: mobilenet_v2's or efficientnet_b0's logits then differ between two random 64x64 inputs by
    ~3e-7 of their size, so a wrong layer past the first few changes nothing a comparison of outputs can see. With
    `example_inputs` (a tensor or a tuple of positional arguments) the statistics are first measured — one forward
    with every BatchNorm in training mode, accumulating its batch statistics — then perturbed: each channel's mean
    shifted by N(0, 0.2^2) of the layer's standard deviation, each variance the layer's mean variance scaled by
    exp(U(-0.5, 0.5)), the affine weights in [0.5, 1.0]. Each BN then keeps its real input's size or shrinks it a
    little, and the output depends on every layer while the network stays as well conditioned as with blind
    statistics (its own float32 forward against float64 within 1.2e-6 on mobilenet_v2, efficientnet_b0 / v2_s,
    rexnet_100 and regnetz_b16 at 64x64; two inputs' outputs differ by 5e-4 to 0.3, against 1e-13 to 5e-2
    blind). A model whose
    calibration forward raises (a BatchNorm1d seeing one value per channel, a SyncBatchNorm without a process
    group) gets the blind statistics.
    """
    import torch
    from fusedconv import fold

    norms = [m for m in model.modules() if fold.is_batchnorm(m) and getattr(m, "running_mean", None) is not None]
    measured = _measured_statistics(model, norms, example_inputs) if example_inputs is not None else None
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in norms:
            c = m.running_mean.numel()
            if measured is None:
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            else:
                mean, var = measured[m]
                # The layer's scale, not each channel's: normalizing a nearly constant channel to unit variance
                # amplifies its rounding (with per-channel variances, and gains in [0.5, 1.5], efficientnet_v2_s
                # differed by 60 % between float32 and float64, its own forward, no conversion involved).
                scale = float(var.mean()) + 1e-6
                m.running_mean.copy_(mean + 0.2 * scale ** 0.5 * torch.randn(c, generator=g, dtype=var.dtype))
                m.running_var.copy_(scale * torch.exp(torch.rand(c, generator=g, dtype=var.dtype) - 0.5))
            if getattr(m, "weight", None) is not None:
                # Measured: gains in [0.5, 1.0], on the ordered side (a deep random net whose layers keep the signal's
                # size on average is chaotic: with [0.7, 1.2] efficientnet_b0 differs by 5e-5 between float32 and
                # float64, its own forward, and with [0.6, 1.1] regnetz_b16 by 4e-2; with [0.5, 1.0] both by
                # <= 1.2e-6, as with blind statistics, while two inputs' outputs still differ by >= 5e-4).
                low, width = (0.5, 1.0) if measured is None else (0.5, 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * width + low)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def _measured_statistics(model, norms: list, example_inputs) -> dict | None:
    """{norm: (mean, var)} of each BatchNorm's input over `example_inputs` (one forward, every norm in training mode
    with a cumulative average), or None when that forward raises. The model is left as it was."""
    import torch

    if not all(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in norms):
        return None  # a norm that cannot measure (torchvision's FrozenBatchNorm2d): blind statistics for all
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    saved = {m: (m.training, m.momentum, m.running_mean.clone(), m.running_var.clone(),
                 None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms}
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative: after one batch, exactly that batch's statistics
            m.train()
        with torch.no_grad():
            model(*args)
        return {m: (m.running_mean.clone(), m.running_var.clone()) for m in norms}
    except Exception:  # noqa: BLE001 - any failure: the caller draws blind statistics
        return None
    finally:
        with torch.no_grad():
            for m, (training, momentum, mean, var, count) in saved.items():
                m.train(training)
                m.momentum = momentum
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)


def run_convert(model, example_inputs=None, **options):
    """fusedconv.convert(model, return_report=True, **options), passing example inputs where this version accepts
    them."""
    import fusedconv

    kwargs = {"return_report": True, **options}
    if example_inputs is not None and "example_inputs" in inspect.signature(fusedconv.convert).parameters:
        kwargs["example_inputs"] = example_inputs
    return fusedconv.convert(model, **kwargs)
