"""`fusedconv demo`: build a model, convert it, print the report, the error against the original and the
latency before and after on the best device present; on CUDA, which backend each fused layer chose after the
timed runs (Triton pointer / TMA kernel or cuDNN's fused op)."""

from __future__ import annotations

import time

from fusedconv.cli.console import Printer
from fusedconv.cli.latency import measure_latencies
from fusedconv.cli.status import CHECK_TOLERANCE, EXIT_CHECK_FAILED, EXIT_OK, CLIError
from fusedconv.comparison import max_rel_error
from fusedconv.model_specs import build_model, load_weights, randomize_batchnorm, run_convert


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


def cmd_demo(args) -> int:
    import torch

    out = Printer()
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
    # CUDA: channels_last for both models (the fast layout of cuDNN and the fused kernels). CPU: what a user gets
    # by default — NCHW model and input; the converted model picks its own layout inside (fusedconv/cpu_boundary.py).
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    # Convert the model where it will run: a FrozenModel cannot be moved or cast (`.to()` raises), and moving a
    # converted model reaches into it, after which its forwards check every module and tensor again
    # (fusedconv/graph/reach.py) — not the path a user who converts the model they run gets.
    model = model.to(device=device, dtype=dtype, memory_format=fmt)
    x = x.to(device=device, dtype=dtype, memory_format=fmt)
    t0 = time.perf_counter()
    with out.status("Converting"):
        fused, report = run_convert(model, example_inputs=(x,), freeze=args.freeze)
    convert_s = time.perf_counter() - t0

    out.heading("Conversion report")
    out.line(str(report))
    out.line(f"Fused: {len(report.fused)} conv chain(s) ({len(report.skipped)} skipped), converted in "
             f"{convert_s:.2f} s")

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
    out.line(f"fusedconv: {after * 1e3:9.3f} ms   ({before / after:.2f}x){' (frozen)' if args.freeze else ''}")
    if device.type == "cpu":
        out.line(f"(CPU, {torch.get_num_threads()} threads; medians of torch.utils.benchmark, interleaved rounds)")
    else:
        # After the timed runs every layer has made its choice (Triton pointer / TMA kernel or cuDNN's fused op).
        from fusedconv.report import backends_text, layer_backends

        # (a FrozenModel's layers are out of reach: no per-layer backends to show)
        report.backends = {} if args.freeze else layer_backends(fused, x)
        if report.backends:
            out.heading("Backend per fused layer")
            out.line(backends_text(report.backends))
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _device_label(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"
