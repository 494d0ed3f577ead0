"""The models suite: whole networks, eager vs fusedconv vs the alternatives a user would reach for.

Providers:
- eager               the model as built (random weights, randomized BN statistics).
- fusedconv           fusedconv.convert(model).
- fusedconv_blocks    fusedconv.convert(model, flatten=False): the per-block structure without the whole-model flat
                      forward (the A/B of fusedconv/graph/flat.py).
- fusedconv_cl        fusedconv.convert(model).to(memory_format=torch.channels_last), fed a channels_last input:
                      the documented fast path on CPU (oneDNN fused conv + activation with pre-packed weights).
- fusedconv_frozen    fusedconv.convert(model, freeze=True): the converted model frozen (fusedconv/frozen.py: its own
                      copy, checked per forward only for what lies outside it), like compile_freeze's constants.
- fx_fuse             torch.fx.experimental.optimization.fuse (folds Conv+BN of symbolically traceable models).
- jit                 torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(m))), traced when
                      scripting fails (recorded).
- compile             torch.compile(model, mode=...); compile time recorded separately.
- fusedconv_compile   torch.compile(fusedconv.convert(model)) — the two composed (GPU by default).
- compile_freeze      torch.compile(model) with Inductor freezing (torch._inductor.config.freezing, weights
                      folded as constants, oneDNN weight prepacking on CPU), under no_grad: the strongest
                      in-PyTorch CPU path (CPU default; skipped by --quick like the other compiles).
- onnxruntime         the eager model exported to ONNX, run by onnxruntime's CPU execution provider with the
                      same thread count as torch (CPU only).

Every provider's output is compared with eager (same dtype) before it is timed; the error is recorded.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import time
import warnings

import torch

from bench.nets1d import ResNet1d18
from bench.timing import time_cpu_interleaved, time_fn
from fusedconv.comparison import max_rel_error
from fusedconv.model_specs import build_model, randomize_batchnorm, run_convert

MODELS = ("torchvision:resnet50", "torchvision:mobilenet_v2", "timm:repvgg_a0", "smp:Unet:resnet34",
          "torchvision:r3d_18", "bench:resnet1d18")
# Models built here (`bench:` specs), and inputs other than (batch, 3, image_size, image_size): a video clip
# (C, T, H, W) and a 1-D signal (C, L).
LOCAL_MODELS = {"bench:resnet1d18": ResNet1d18}
INPUT_SHAPES = {"torchvision:r3d_18": (3, 8, 112, 112), "torchvision:r2plus1d_18": (3, 8, 112, 112),
                "bench:resnet1d18": (2, 4096)}


def input_shape(spec: str, batch: int, image_size: int) -> tuple[int, ...]:
    return (batch, *INPUT_SHAPES.get(spec, (3, image_size, image_size)))


def memory_format(spec: str, device: torch.device, image_size: int = 224) -> torch.memory_format:
    """channels_last (channels_last_3d for video) on CUDA; 1-D signals and every CPU model stay contiguous."""
    rank = len(input_shape(spec, 1, image_size))
    if device.type != "cuda" or rank == 3:
        return torch.contiguous_format
    return torch.channels_last_3d if rank == 5 else torch.channels_last
PROVIDERS = ("eager", "fusedconv", "fusedconv_blocks", "fusedconv_cl", "fusedconv_frozen", "fx_fuse", "jit", "compile",
             "fusedconv_compile", "onnxruntime", "compile_freeze")
# Errors above this (relative to eager in the same dtype) mean the provider computes something else.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _na(e: BaseException) -> str:
    return f"n/a: {type(e).__name__}: {_first_line(e)}"


def _max_rel_error(out, ref) -> float:
    return max_rel_error(out, ref)


def build(spec: str, seed: int = 0):
    torch.manual_seed(seed)
    model = LOCAL_MODELS[spec]().eval() if spec in LOCAL_MODELS else build_model(spec)
    return randomize_batchnorm(model, seed)


def prepare(provider: str, model, x: torch.Tensor, *, compile_mode: str, threads: int):
    """(callable, info dict) for one provider; raises on failure (the caller records 'n/a: reason')."""
    info: dict = {}
    if provider == "eager":
        return (lambda: model(x)), info
    if provider in ("fusedconv", "fusedconv_blocks", "fusedconv_cl", "fusedconv_frozen", "fusedconv_compile"):
        t0 = time.perf_counter()
        options = {"fusedconv_blocks": {"flatten": False}, "fusedconv_frozen": {"freeze": True}}.get(provider, {})
        fused, report = run_convert(copy.deepcopy(model), example_inputs=(x,), **options)
        info.update(convert_s=time.perf_counter() - t0, fused=len(report.fused), skipped=len(report.skipped))
        if provider in ("fusedconv", "fusedconv_blocks", "fusedconv_frozen"):
            return (lambda: fused(x)), info
        if provider == "fusedconv_cl":
            fused_cl = fused.to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            info["layout"] = "channels_last"
            return (lambda: fused_cl(x_cl)), info
        compiled = torch.compile(fused, mode=compile_mode)
        info["compile_mode"] = compile_mode
        return (lambda: compiled(x)), info
    if provider == "fx_fuse":
        import torch.fx.experimental.optimization as fx_opt

        t0 = time.perf_counter()
        fused = fx_opt.fuse(copy.deepcopy(model))
        info["setup_s"] = time.perf_counter() - t0
        return (lambda: fused(x)), info
    if provider == "jit":
        t0 = time.perf_counter()
        with torch.no_grad():
            try:
                scripted = torch.jit.script(model)
                info["jit"] = "script"
            except Exception as e:  # many models are not scriptable; tracing is the documented fallback
                scripted = torch.jit.trace(model, (x,), check_trace=False)
                info["jit"] = f"trace (script failed: {type(e).__name__})"
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))
        info["setup_s"] = time.perf_counter() - t0
        return (lambda: frozen(x)), info
    if provider == "compile":
        compiled = torch.compile(model, mode=compile_mode)
        info["compile_mode"] = compile_mode
        return (lambda: compiled(x)), info
    if provider == "compile_freeze":
        import torch._inductor.config as inductor_config

        compiled = torch.compile(model, mode=compile_mode)
        info.update(compile_mode=compile_mode, inductor_freezing=True)

        def run_frozen():
            # Freezing is read when Inductor compiles (the first call, or a recompile): keep it on for every call.
            with torch.no_grad(), inductor_config.patch(freezing=True):
                return compiled(x)
        return run_frozen, info
    if provider == "onnxruntime":
        if x.device.type != "cpu":
            raise _Unavailable("n/a: run on CPU only in this suite")
        import onnxruntime as ort

        t0 = time.perf_counter()
        path = os.path.join(tempfile.mkdtemp(prefix="fusedconv-bench-"), "model.onnx")
        exporter = None
        errors = []
        for dynamo in (False, True):  # the TorchScript exporter is much faster; dynamo when it fails
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (x,), path, dynamo=dynamo, external_data=False)
                exporter = "dynamo" if dynamo else "torchscript"
                break
            except Exception as e:
                errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(e).__name__}: {_first_line(e)}")
        if exporter is None:
            raise _Unavailable("n/a: ONNX export failed (" + "; ".join(errors) + ")")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: x.numpy()}
        info.update(setup_s=time.perf_counter() - t0, onnx_exporter=exporter, ort_intra_op_threads=threads,
                    ort_inter_op_threads=1)

        def run_ort():
            return [torch.from_numpy(o) for o in sess.run(None, feed)]
        return run_ort, info
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def _record(row: dict, t, batch: int) -> None:
    row.update(status="ok", latency_ms=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, runs=t.runs, timer=t.method,
               throughput_per_s=batch / t.median_s)


class _Unavailable(Exception):
    """A provider that does not apply here; its message is the row's status."""


def run_model(spec: str, batch: int, dtype: torch.dtype, device: torch.device, providers, *, quick: bool,
              compile_ok, compile_mode: str, image_size: int = 224, min_run_time: float | None = None,
              progress=None) -> list[dict]:
    """One row per provider for `spec` at `batch`."""
    fmt = memory_format(spec, device, image_size)
    model = build(spec).to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(input_shape(spec, batch, image_size), generator=torch.Generator().manual_seed(1))
    x = x.to(device=device, dtype=dtype, memory_format=fmt)
    with torch.no_grad():
        ref = model(x)
    threads = torch.get_num_threads()
    rows = []
    ready = {}  # CPU: timed together in interleaved rounds once every provider is prepared
    for provider in providers:
        layout = "NCHW" if fmt == torch.contiguous_format else str(fmt).replace("torch.", "")
        row = {"model": spec, "batch": batch, "dtype": str(dtype).replace("torch.", ""), "image_size": image_size,
               "layout": layout, "provider": provider}
        rows.append(row)
        if progress is not None:
            progress(f"{spec} b{batch} {provider}")
        if provider in ("compile", "fusedconv_compile", "compile_freeze") and compile_ok is not True:
            row["status"] = compile_ok
            continue
        try:
            fn, info = prepare(provider, model, x, compile_mode=compile_mode, threads=threads)
            row.update(info)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
            if "compile" in provider:
                row["compile_s"] = first
            err = _max_rel_error(out, ref)
            row["max_rel_error_vs_eager"] = err
            if not err <= TOLERANCE[dtype]:
                row["status"] = f"n/a: wrong result (max rel error {err:.2e} vs eager)"
                continue
            if device.type == "cuda":
                _record(row, time_fn(fn, device, quick=quick), batch)
            else:
                ready[provider] = (fn, row)
        except _Unavailable as e:
            row["status"] = str(e)
        except Exception as e:  # a provider failing is a result, never a crash of the suite
            row["status"] = _na(e)
    if ready:
        per = min_run_time if min_run_time is not None else (0.5 if quick else 1.5)
        try:
            timings = time_cpu_interleaved({p: fn for p, (fn, _) in ready.items()},
                                           min_run_time=per * len(ready))
            for p, (_, row) in ready.items():
                _record(row, timings[p], batch)
        except Exception as e:
            for _, row in ready.values():
                row["status"] = _na(e)
    eager = next((r for r in rows if r["provider"] == "eager" and r.get("status") == "ok"), None)
    if eager is not None:
        for r in rows:
            if r.get("status") == "ok":
                r["speedup_vs_eager"] = eager["latency_ms"] / r["latency_ms"]
    return rows
