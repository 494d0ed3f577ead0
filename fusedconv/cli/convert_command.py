"""`fusedconv convert SPEC -o OUT.{pt,pt2,onnx}`: convert a model (or an ExportedProgram / TorchScript file at
the graph level), write it, and with --check compare the result and the written file with the original."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings

from fusedconv.cli.console import Printer
from fusedconv.cli.saved_model import load_converted, save_converted
from fusedconv.cli.status import CHECK_TOLERANCE, EXIT_CHECK_FAILED, EXIT_OK, CLIError, first_line
from fusedconv.comparison import max_rel_error
from fusedconv.model_specs import (build_model, default_input_size, is_torchscript, load_weights, parse_spec,
                                   randomize_batchnorm, run_convert)

OUTPUT_EXTENSIONS = (".pt", ".pt2", ".onnx")


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
        errors.append(f"dynamo exporter: {type(e).__name__}: {first_line(e)}")
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, dynamo=False)
        return "torchscript"
    except Exception as e:
        errors.append(f"torchscript exporter: {type(e).__name__}: {first_line(e)}")
    raise CLIError("ONNX export failed (" + "; ".join(errors) + ")")


def cmd_convert(args) -> int:
    import torch

    out = Printer()
    ext = os.path.splitext(args.output)[1].lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise CLIError(f"-o/--output: expected a file ending in {', '.join(OUTPUT_EXTENSIONS)}, got {args.output!r}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise CLIError(f"-o/--output: expected an existing directory for {args.output!r}, got {out_dir!r} "
                       "(no such directory)")
    kind, parts = parse_spec(args.spec)
    if kind == "file" and os.path.isfile(parts[0]) and (parts[0].endswith(".pt2") or is_torchscript(parts[0])):
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
        raise CLIError(f"model spec {path!r}: {first_line(e)}") from e
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
