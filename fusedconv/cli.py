"""The `fusedconv` command line: `fusedconv demo`, `fusedconv convert SPEC -o OUT`, `fusedconv bench`.

Model specs name a model without downloading anything: `torchvision:NAME`, `timm:NAME`, `smp:ARCH:ENCODER`
(random weights unless `--weights` gives a state_dict), or a file. Converted `.pt` files hold the fused
state_dict plus the spec that rebuilds the architecture; `load_converted(path)` turns one back into a module.

Errors are reported as one line on stderr and a non-zero exit status (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import logging
import os
import sys
import time
import warnings

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
CONVERTED_FORMAT = "fusedconv.converted"
CONVERTED_VERSION = 1
OUTPUT_EXTENSIONS = (".pt", ".pt2", ".onnx")
SPEC_PREFIXES = ("torchvision", "timm", "smp")
# Max relative error (vs the original model, same dtype) that --check and demo accept.
CHECK_TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 2e-2, "bfloat16": 5e-2}

SPEC_HELP = """\
model specs:
  torchvision:NAME      a torchvision.models builder, e.g. torchvision:resnet50 (weights=None)
  timm:NAME             a timm model, e.g. timm:repvgg_a0 (pretrained=False)
  smp:ARCH:ENCODER      a segmentation_models_pytorch model, e.g. smp:Unet:resnet34 (encoder_weights=None)
  FILE                  a pickled nn.Module (.pt/.pth), loaded only with --trust-pickle because unpickling
                        runs code from the file.
  Nothing is downloaded: models are built with random weights; pass trained ones with --weights FILE
  (a state_dict, loaded with torch.load(weights_only=True)).

  FILE.pt2              a torch.export ExportedProgram: its aten conv -> batch_norm (-> act) (-> add -> act)
                        chains are fused at the graph level (fusedconv.graph.exported); output .pt2 or .onnx.
  FILE (TorchScript)    a torch.jit.save file: converted to an ExportedProgram (example input from
                        --input-size, default 2,3,224,224), then fused the same way; output .pt2 or .onnx.
"""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status EXIT_USAGE."""


# ---------------------------------------------------------------------------------------------- model specs
def _parse_spec(spec: str) -> tuple[str, list[str]]:
    if not isinstance(spec, str) or not spec:
        raise CLIError(f"model spec: expected torchvision:NAME, timm:NAME, smp:ARCH:ENCODER or a file, got {spec!r}")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in SPEC_PREFIXES:
        parts = rest.split(":")
        want = 2 if prefix == "smp" else 1
        if len(parts) != want or not all(parts):
            form = "smp:ARCH:ENCODER" if prefix == "smp" else f"{prefix}:NAME"
            raise CLIError(f"model spec: expected {form}, got {spec!r}")
        return prefix, parts
    return "file", [spec]


def _build_torchvision(name: str):
    try:
        import torchvision
    except ImportError as e:
        raise CLIError("model spec torchvision:...: expected torchvision to be installed, got ImportError") from e
    names = set(torchvision.models.list_models())
    if name not in names:
        raise CLIError(f"model spec: unknown torchvision model {name!r} (see torchvision.models.list_models())")
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # detection / segmentation builders would otherwise download one
    return builder(**kwargs)


def _build_timm(name: str):
    try:
        import timm
    except ImportError as e:
        raise CLIError("model spec timm:...: expected timm to be installed, got ImportError") from e
    if not timm.is_model(name):
        raise CLIError(f"model spec: unknown timm model {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=False)


def _build_smp(arch: str, encoder: str):
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise CLIError("model spec smp:...: expected segmentation_models_pytorch to be installed, got ImportError") \
            from e
    import torch

    archs = {n.lower(): n for n in dir(smp) if isinstance(getattr(smp, n), type)
             and issubclass(getattr(smp, n), torch.nn.Module)}
    if arch.lower() not in archs:
        raise CLIError(f"model spec: unknown smp architecture {arch!r} (e.g. Unet, FPN, DeepLabV3Plus)")
    encoders = set(smp.encoders.get_encoder_names()) if hasattr(smp.encoders, "get_encoder_names") else None
    if encoders is not None and encoder not in encoders:
        raise CLIError(f"model spec: unknown smp encoder {encoder!r} (see smp.encoders.get_encoder_names())")
    return getattr(smp, archs[arch.lower()])(encoder_name=encoder, encoder_weights=None)


def _load_model_file(path: str, trust_pickle: bool):
    import torch

    if not os.path.isfile(path):
        raise CLIError(f"model spec: expected torchvision:NAME, timm:NAME, smp:ARCH:ENCODER or an existing file, "
                       f"got {path!r} (no such file)")
    if path.endswith(".pt2") or _is_torchscript(path):
        raise CLIError(f"model spec {path!r}: an ExportedProgram / TorchScript file is not an nn.Module; "
                       "`fusedconv convert` converts it at the graph level (see --help)")
    if not trust_pickle:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            obj = None
        if isinstance(obj, dict):
            if obj.get("format") == CONVERTED_FORMAT:
                raise CLIError(f"model spec {path!r}: this file is already a fusedconv-converted model "
                               "(load it with fusedconv.cli.load_converted)")
            raise CLIError(f"model spec {path!r}: this file holds a state_dict, not a model — give the architecture "
                           "as SPEC and this file as --weights")
        raise CLIError(f"model spec {path!r}: loading a pickled nn.Module runs code from the file; pass "
                       "--trust-pickle if you trust it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CLIError(f"model spec {path!r}: expected a pickled nn.Module, could not load it "
                       f"({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(obj, torch.nn.Module):
        raise CLIError(f"model spec {path!r}: expected a pickled nn.Module, got {type(obj).__name__}")
    return obj


def _is_torchscript(path: str) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        # torch.jit.save archives carry the compiled code; torch.save archives only data.pkl + tensors.
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def build_model(spec: str, *, trust_pickle: bool = False):
    """The nn.Module a spec names, in eval mode, with random weights (or the pickled module of a file)."""
    kind, parts = _parse_spec(spec)
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


def parse_input_size(text: str) -> tuple[int, int, int, int]:
    """'1,3,224,224', '1x3x224x224' or '3,224,224' (batch 1) -> (N, C, H, W)."""
    parts = text.replace("x", ",").replace(" ", ",").split(",")
    try:
        dims = [int(p) for p in parts if p]
    except ValueError:
        dims = []
    if len(dims) == 3:
        dims = [1] + dims
    if len(dims) != 4 or any(d < 1 for d in dims):
        raise CLIError(f"--input-size: expected N,C,H,W or C,H,W positive ints (e.g. 1,3,224,224), got {text!r}")
    return tuple(dims)


def load_weights(model, path: str) -> None:
    """Load a state_dict file (weights only, never arbitrary pickles) into `model`, strictly."""
    import torch

    if not os.path.isfile(path):
        raise CLIError(f"--weights: expected an existing state_dict file, got {path!r} (no such file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"--weights {path!r}: expected a state_dict saved with torch.save, could not load it "
                       f"({type(e).__name__}: {_first_line(e)})") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"--weights {path!r}: expected a dict of tensors (a state_dict), got {type(state).__name__}")
    missing, unexpected = _state_dict_mismatch(model, state)
    if missing or unexpected:
        raise CLIError(f"--weights {path!r}: does not match the model: {len(missing)} missing key(s) "
                       f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CLIError(f"--weights {path!r}: does not match the model ({_first_line(e)})") from e


def _state_dict_mismatch(model, state: dict) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict().keys())
    got = set(state.keys())
    return sorted(expected - got), sorted(got - expected)


def randomize_batchnorm(model, seed: int = 0):
    """Give every BatchNorm random statistics and affine parameters, in place.

    A model built with random weights has BN statistics (mean 0, var 1) that make folding look exact even when
    it is wrong; randomized statistics make the error check mean something.
    """
    import torch
    from fusedconv import fold

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not fold.is_batchnorm(m) or getattr(m, "running_mean", None) is None:
                continue
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def max_rel_error(out, ref) -> float:
    """max |out - ref| / max |ref| over every tensor of (possibly nested) outputs."""
    import torch

    outs, refs = _flat_tensors(out), _flat_tensors(ref)
    if len(outs) != len(refs):
        raise ValueError(f"outputs: expected {len(refs)} tensors like the original, got {len(outs)}")
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = o.detach().double().cpu(), r.detach().double().cpu()
        if o.shape != r.shape:
            raise ValueError(f"outputs: expected shape {tuple(r.shape)} like the original, got {tuple(o.shape)}")
        worst = max(worst, float((o - r).abs().max() / r.abs().max().clamp_min(1e-30)) if r.numel() else 0.0)
        if not torch.isfinite(o).all():
            return float("inf")
    return worst


def _flat_tensors(x) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flat_tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat_tensors(v)]
    return []


# ---------------------------------------------------------------------------------------------- conversion
def run_convert(model, example_inputs=None):
    """fusedconv.convert(model, return_report=True), passing example inputs where this version accepts them."""
    import fusedconv

    kwargs = {"return_report": True}
    if example_inputs is not None and "example_inputs" in inspect.signature(fusedconv.convert).parameters:
        kwargs["example_inputs"] = example_inputs
    return fusedconv.convert(model, **kwargs)


def module_structure(model) -> list[tuple[str, str]]:
    """(name, class) of every module: what a rebuilt conversion must reproduce for a state_dict to fit."""
    return [(n, type(m).__module__ + "." + type(m).__qualname__) for n, m in model.named_modules()]


def save_converted(path: str, fused_model, *, spec: str, input_size, report=None) -> None:
    """Write the fused state_dict plus what is needed to rebuild the module (see load_converted)."""
    import torch

    import fusedconv

    payload = {
        "format": CONVERTED_FORMAT,
        "version": CONVERTED_VERSION,
        "fusedconv_version": fusedconv.__version__,
        "spec": spec,
        "input_size": list(input_size),
        "structure": [list(t) for t in module_structure(fused_model)],
        "report": report.to_dict() if report is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in fused_model.state_dict().items()},
    }
    torch.save(payload, path)


def load_converted(path: str, *, trust_pickle: bool = False, map_location="cpu"):
    """Rebuild a model written by `fusedconv convert ... -o model.pt`: an eval-mode module with fused layers.

    The architecture is rebuilt from the saved spec, converted again, checked to have exactly the saved module
    structure, then the saved fused state_dict is loaded strictly. Only tensors and plain data are unpickled.
    """
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: expected a file written by `fusedconv convert -o FILE.pt`, got {path!r} "
                                "(no such file)")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CONVERTED_FORMAT:
        raise ValueError(f"path: expected a fusedconv-converted .pt file, got {path!r} (no {CONVERTED_FORMAT!r} "
                         "marker; was it written by `fusedconv convert`?)")
    if payload.get("version") != CONVERTED_VERSION:
        raise ValueError(f"path: expected format version {CONVERTED_VERSION}, got {payload.get('version')!r}")
    model = build_model(payload["spec"], trust_pickle=trust_pickle)
    fused, _ = run_convert(model, example_inputs=(torch.zeros(*payload["input_size"]),))
    saved = [tuple(t) for t in payload["structure"]]
    now = module_structure(fused)
    if saved != now:
        diff = next(((a, b) for a, b in zip(saved, now) if a != b), (saved[len(now):len(now) + 1],
                                                                      now[len(saved):len(saved) + 1]))
        raise ValueError(f"path: the saved conversion of {payload['spec']!r} does not match this fusedconv's "
                         f"conversion (first difference: saved {diff[0]}, now {diff[1]}); re-run fusedconv convert")
    fused.load_state_dict(payload["state_dict"], strict=True)
    return fused.eval()


def export_onnx(model, example, path: str) -> str:
    """ONNX export: `fusedconv.export.export_onnx` (dynamo exporter, BN fold constant-folded into the Conv
    initializers), the TorchScript exporter if that fails; returns which exporter was used."""
    import torch

    from fusedconv.export import export_onnx as export_folded

    errors = []
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_folded(model, (example,), path)
        return "dynamo"
    except Exception as e:  # record and try the other exporter
        errors.append(f"dynamo exporter: {type(e).__name__}: {_first_line(e)}")
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, dynamo=False)
        return "torchscript"
    except Exception as e:
        errors.append(f"torchscript exporter: {type(e).__name__}: {_first_line(e)}")
    raise CLIError("ONNX export failed (" + "; ".join(errors) + ")")


# ---------------------------------------------------------------------------------------------- output
class _Printer:
    """rich when installed and writing to a terminal, plain text otherwise."""

    def __init__(self):
        self.console = None
        if sys.stdout.isatty():
            try:
                from rich.console import Console

                self.console = Console(highlight=False)
            except ImportError:
                pass

    def heading(self, text: str) -> None:
        if self.console is not None:
            self.console.rule(f"[bold]{text}")
        else:
            print(f"== {text}")

    def line(self, text: str = "") -> None:
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text)

    def status(self, text: str):
        if self.console is not None:
            return self.console.status(text)
        print(f"{text} ...", flush=True)
        return contextlib.nullcontext()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- latency
def measure_latencies(fns: dict, device, *, min_run_time: float = 1.0, rounds: int = 4) -> dict:
    """Median seconds per call of each callable: do_bench / CUDA events on GPU; on CPU torch.utils.benchmark in
    interleaved rounds (A B A B ...) so that load from other processes affects both alike."""
    import torch

    with torch.inference_mode():
        for fn in fns.values():
            fn()
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return {name: _cuda_latency(fn, device, min_run_time) for name, fn in fns.items()}
        from torch.utils import benchmark

        timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                  for name, fn in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, timer in timers.items():
                times[name] += list(timer.blocked_autorange(min_run_time=min_run_time / rounds).times)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _cuda_latency(fn, device, min_run_time: float) -> float:
    import torch

    try:
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=int(min_run_time * 1000), return_mode="median") / 1e3
    except ImportError:
        times = []
        for _ in range(50):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e) / 1e3)
        return sorted(times)[len(times) // 2]


def _pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device: expected auto, cpu or cuda[:N], got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device: expected an available device, got {name!r} but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device: expected auto, cpu or cuda[:N], got {name!r}")
    return dev


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise CLIError(f"--dtype: expected one of {sorted(table)}, got {name!r}")
    return table[name]


# ---------------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    import torch

    out = _Printer()
    device = _pick_device(args.device)
    dtype_name = args.dtype or ("float16" if device.type == "cuda" else "float32")
    dtype = _dtype(dtype_name)
    if device.type == "cpu" and dtype != torch.float32:
        raise CLIError(f"--dtype: expected float32 on CPU, got {dtype_name}")
    if args.batch < 1 or args.size < 8:
        raise CLIError(f"--batch/--size: expected batch >= 1 and size >= 8, got {args.batch} and {args.size}")
    torch.manual_seed(args.seed)
    with out.status(f"Building {args.model}"):
        model = build_model(args.model)
    if args.weights:
        load_weights(model, args.weights)
        out.line(f"Model: {args.model} with weights from {args.weights}")
    else:
        randomize_batchnorm(model, args.seed)
        out.line(f"Model: {args.model} (random weights, nothing downloaded; BatchNorm statistics randomized so the "
                 "error check below is meaningful — default statistics would hide folding mistakes)")
    x = torch.randn(args.batch, 3, args.size, args.size)
    t0 = time.perf_counter()
    with out.status("Converting"):
        fused, report = run_convert(model, example_inputs=(x,))
    convert_s = time.perf_counter() - t0

    out.heading("Conversion report")
    out.line(str(report))
    out.line(f"Fused: {len(report.fused)} conv chain(s) ({len(report.skipped)} skipped), converted in "
             f"{convert_s:.2f} s")

    # CUDA: channels_last for both models (the fast layout of cuDNN and the fused kernels). CPU: what a user gets
    # by default — NCHW model and input; the converted model picks its own layout inside (fusedconv/cpu_boundary.py).
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device=device, dtype=dtype, memory_format=fmt)
    fused = fused.to(device=device, dtype=dtype, memory_format=fmt)
    x = x.to(device=device, dtype=dtype, memory_format=fmt)
    with torch.inference_mode():
        ref = model(x)
        got = fused(x)
    err = max_rel_error(got, ref)
    tol = CHECK_TOLERANCE[dtype_name]
    ok = err <= tol
    out.line(f"Max relative error vs the original: {err:.2e} ({dtype_name} on {device.type}, tolerance {tol:g}) "
             f"{'OK' if ok else 'FAILED'}")

    if device.type == "cuda":
        layout = "channels_last"
    else:
        from fusedconv.cpu_boundary import layout_used

        layout = f"NCHW input; the converted model runs {layout_used(fused, x)} inside"
    out.heading(f"Latency ({_device_label(device)}, {dtype_name}, batch {args.batch}, {args.size}x{args.size}, "
                f"{layout})")
    with out.status("Timing the original and the converted model"):
        lat = measure_latencies({"original": lambda: model(x), "fused": lambda: fused(x)}, device,
                                min_run_time=args.min_time)
    before, after = lat["original"], lat["fused"]
    out.line(f"Original:  {before * 1e3:9.3f} ms")
    out.line(f"fusedconv: {after * 1e3:9.3f} ms   ({before / after:.2f}x)")
    if device.type == "cpu":
        out.line(f"(CPU, {torch.get_num_threads()} threads; medians of torch.utils.benchmark, interleaved rounds)")
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def cmd_convert(args) -> int:
    import torch

    out = _Printer()
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise CLIError(f"-o/--output: expected a file ending in {', '.join(OUTPUT_EXTENSIONS)}, got {args.output!r}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CLIError(f"-o/--output: expected an existing directory for {args.output!r}, got {out_dir!r} "
                       "(no such directory)")
    kind, parts = _parse_spec(args.spec)
    if kind == "file" and os.path.isfile(parts[0]) and (parts[0].endswith(".pt2") or _is_torchscript(parts[0])):
        return _convert_program_file(out, args, parts[0], ext)
    if kind == "file" and ext == ".pt":
        raise CLIError("-o/--output: a .pt output stores a spec to rebuild the model from; a pickled-module input "
                       "has none — write .pt2 or .onnx instead")
    model = build_model(args.spec, trust_pickle=args.trust_pickle)
    size = parse_input_size(args.input_size) if args.input_size else default_input_size(args.spec, model)
    if args.weights:
        load_weights(model, args.weights)
    example = torch.randn(*size, generator=torch.Generator().manual_seed(0))
    fused, report = run_convert(model, example_inputs=(example,))
    out.heading(f"Conversion report: {args.spec}")
    out.line(str(report))

    status = EXIT_OK
    if args.check:
        status = _self_check(out, args, model, fused, example)

    fused = fused.eval()
    if ext == ".pt":
        save_converted(args.output, fused, spec=args.spec, input_size=size, report=report)
        how = "fused state_dict + spec (load with fusedconv.cli.load_converted)"
    elif ext == ".pt2":
        with torch.no_grad():
            ep = torch.export.export(fused, (example,))
        torch.export.save(ep, args.output)
        how = f"torch.export ExportedProgram for input {tuple(size)} (load with torch.export.load)"
    else:
        how = f"ONNX ({export_onnx(fused, example, args.output)} exporter) for input {tuple(size)}"
    out.line(f"Wrote {args.output}: {how}")
    if args.check:
        status = max(status, _check_written(out, ext, args, fused, example))
    return status


def _convert_program_file(out, args, path: str, ext: str) -> int:
    """`fusedconv convert` of an ExportedProgram (.pt2) or TorchScript file: the graph-level pass
    (`fusedconv.graph.exported`), written as .pt2 or, decomposed to standard aten ops, as .onnx."""
    import torch

    from fusedconv.graph.exported import convert_exported, convert_torchscript, decompose_fused

    if ext == ".pt":
        raise CLIError("-o/--output: a .pt output stores a spec to rebuild the model from; an ExportedProgram / "
                       "TorchScript input has none — write .pt2 or .onnx instead")
    if args.weights:
        raise CLIError("--weights: not supported for .pt2 / TorchScript inputs (their weights are inside the file)")
    try:
        if path.endswith(".pt2"):
            ep = torch.export.load(path)
            fused, report = convert_exported(ep, check=args.check, return_report=True)
        else:
            size = parse_input_size(args.input_size) if args.input_size else (2, 3, 224, 224)
            example = torch.randn(*size, generator=torch.Generator().manual_seed(0))
            fused, report = convert_torchscript(path, (example,), check=args.check, return_report=True)
    except (RuntimeError, ValueError, TypeError, FileNotFoundError) as e:
        raise CLIError(f"model spec {path!r}: {_first_line(e)}") from e
    out.heading(f"Conversion report: {path}")
    out.line(str(report))
    if ext == ".pt2":
        torch.export.save(fused, args.output)
        how = "torch.export ExportedProgram (load with torch.export.load after `import fusedconv`)"
    else:
        args_in = fused.example_inputs[0] if fused.example_inputs else None
        if args_in is None:
            raise CLIError("-o/--output: the converted program stores no example inputs to export ONNX with")
        torch.onnx.export(decompose_fused(fused), tuple(args_in), args.output, dynamo=True)
        how = "ONNX (the fused op spelled in standard ops)"
    out.line(f"Wrote {args.output}: {how}")
    return EXIT_OK


def _self_check(out, args, model, fused, example) -> int:
    """Compare the converted model with the original on a random input (and, for random weights, on a copy
    with randomized BN statistics, because default statistics would hide folding mistakes)."""
    import copy

    import torch

    with torch.inference_mode():
        err = max_rel_error(fused(example), model(example))
    worst = err
    out.line(f"Self-check: max relative error vs the original {err:.2e} (float32, input {tuple(example.shape)})")
    if not args.weights:
        probe = randomize_batchnorm(copy.deepcopy(model), seed=1)
        probe_fused, _ = run_convert(probe, example_inputs=(example,))
        with torch.inference_mode():
            err2 = max_rel_error(probe_fused(example), probe(example))
        worst = max(worst, err2)
        out.line(f"Self-check with randomized BatchNorm statistics: max relative error {err2:.2e}")
    tol = CHECK_TOLERANCE["float32"]
    if worst <= tol:
        out.line(f"Self-check passed (tolerance {tol:g})")
        return EXIT_OK
    print(f"fusedconv: error: self-check failed: max relative error {worst:.2e} > tolerance {tol:g}", file=sys.stderr)
    return EXIT_CHECK_FAILED


def _check_written(out, ext: str, args, fused, example) -> int:
    """Load the file just written back the way a user would and compare it with the converted model."""
    import torch

    if ext == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            out.line("Check of the written file skipped: onnxruntime is not installed")
            return EXIT_OK
        sess = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"])
        got = [torch.from_numpy(g) for g in sess.run(None, {sess.get_inputs()[0].name: example.numpy()})]
        how = "onnxruntime"
    elif ext == ".pt2":
        with torch.no_grad():
            got = torch.export.load(args.output).module()(example)
        how = "torch.export.load"
    else:
        loaded = load_converted(args.output, trust_pickle=args.trust_pickle)
        with torch.no_grad():
            got = loaded(example)
        how = "fusedconv.cli.load_converted"
    with torch.no_grad():
        err = max_rel_error(got, fused(example))
    tol = CHECK_TOLERANCE["float32"]
    out.line(f"Check of {args.output} ({how}) vs the converted model: max relative error {err:.2e}")
    if not err <= tol:
        print(f"fusedconv: error: the written file's check failed: max relative error {err:.2e} > tolerance {tol:g}",
              file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _import_bench():
    """The benchmark suite lives in the source checkout's bench/ package, not in the installed wheel."""
    try:
        from bench import run as bench_run  # noqa: F401

        if hasattr(bench_run, "main"):
            return bench_run
    except ImportError:
        pass
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.getcwd(), here):
        if os.path.isfile(os.path.join(root, "bench", "run.py")) and os.path.isfile(
                os.path.join(root, "bench", "metrics.py")):
            sys.path.insert(0, root)
            sys.modules.pop("bench", None)
            from bench import run as bench_run

            return bench_run
    raise CLIError("bench: the benchmark suite ships with the source checkout (bench/); run `fusedconv bench` "
                   "from a fusedconv checkout or use `python -m bench` there")


def cmd_bench(args) -> int:
    bench_run = _import_bench()
    return bench_run.main(list(args.bench_args), prog="fusedconv bench")


# ---------------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedconv", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fuse Conv -> BatchNorm -> activation (+ residual) chains of CNNs into one op.",
        epilog=SPEC_HELP)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", metavar="{demo,convert,bench}")

    demo = sub.add_parser("demo", help="convert a model and show the report, the error and the speed-up",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SPEC_HELP,
                          description="Build a model (default torchvision resnet50, random weights, no download), "
                                      "convert it, print the report, fused count, max error vs the original and "
                                      "latency before/after on the best available device.")
    demo.add_argument("--model", default="torchvision:resnet50", metavar="SPEC", help="model spec (see below)")
    demo.add_argument("--weights", metavar="FILE", help="state_dict to load instead of random weights")
    demo.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    demo.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    demo.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    demo.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float16 on CUDA, "
                                                   "float32 on CPU)")
    demo.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per model (default 2)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the input and BN statistics")
    demo.set_defaults(func=cmd_demo)

    conv = sub.add_parser("convert", help="convert a model and save it as .pt, .pt2 or .onnx",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SPEC_HELP + """
outputs (by extension):
  .pt    the fused state_dict + the spec to rebuild it: fusedconv.cli.load_converted(path) returns the module
         (needs the same library that built it: torchvision / timm / smp)
  .pt2   torch.export ExportedProgram of the converted model for --input-size (torch.export.load)
  .onnx  ONNX export of the converted model for --input-size (runs in onnxruntime)
""", description="Convert a model and save the result.")
    conv.add_argument("spec", metavar="SPEC", help="model spec (see below)")
    conv.add_argument("-o", "--output", required=True, metavar="OUT", help="output file: .pt, .pt2 or .onnx")
    conv.add_argument("--weights", metavar="FILE", help="state_dict to load into the model before converting")
    conv.add_argument("--check", action="store_true", help="compare the converted model with the original "
                                                           "(and the ONNX file in onnxruntime); exit 1 on failure")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="allow SPEC to be a pickled nn.Module file (unpickling runs code from the file)")
    conv.add_argument("--input-size", metavar="N,C,H,W", help="example input shape for export and the check "
                                                              "(default: the model's, else 1,3,224,224)")
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="run the benchmark suite (from a source checkout)", add_help=False,
                           description="Runs `python -m bench` with the remaining arguments (try --help).")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `bench` belongs to the suite's own parser (including --help).
    if "bench" in argv:
        i = argv.index("bench")
        if all(a.startswith("-") for a in argv[:i]):
            args = parser.parse_args(argv[:i + 1])
            args.bench_args = argv[i + 1:]
        else:
            args = parser.parse_args(argv)
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if not args.debug:
        warnings.filterwarnings("ignore")
        # torch.utils.benchmark imports cpp_extension, which logs a CUDA_HOME notice on machines without CUDA.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"fusedconv: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fusedconv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unexpected still gets one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"fusedconv: error: {args.command}: {type(e).__name__}: {_first_line(e)} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return EXIT_CHECK_FAILED if args.command == "bench" else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
