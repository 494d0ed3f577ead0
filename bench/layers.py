"""The layers suite: one Conv -> BN -> activation (+ residual) layer, timed per provider.

Providers (each computes exactly act(bn(conv(x)) [+ residual])):
- eager      nn.Conv2d -> nn.BatchNorm2d (eval) -> [+ residual] -> activation, three or four kernels.
- folded     BN folded into the conv's weight and bias: one cuDNN / oneDNN conv, then [+ residual] and the
             activation as separate ops. What a careful user does by hand.
- cudnn_relu torch.cudnn_convolution_relu / cudnn_convolution_add_relu on the folded weights (CUDA, ReLU only):
             cuDNN's own fused conv + bias (+ add) + ReLU.
- compile    torch.compile(mode=...) of the eager layer (compile time recorded separately).
- fusedconv  fusedconv.FusedConv2d: the Triton kernel on CUDA, the folded fallback elsewhere.

Every provider's output is checked against eager before it is timed, and the error is recorded: a fast wrong
answer must not look like a win.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import metrics
from bench.shapes import LayerCase
from bench.timing import time_cpu_interleaved, time_fn

PROVIDERS = ("eager", "folded", "cudnn_relu", "compile", "fusedconv")
_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "identity": nn.Identity, "silu": nn.SiLU,
                "hardswish": nn.Hardswish}
# Max relative error (vs eager in the same dtype) above which a provider's timing is not reported.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class EagerLayer(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x, residual=None):
        y = self.bn(self.conv(x))
        if residual is not None:
            y = y + residual
        return self.act(y)


def build_layer(case: LayerCase, seed: int = 0) -> EagerLayer:
    """The eager layer with random weights and randomized (non-default) BN statistics."""
    s = case.shape
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(s.cin, s.cout, (s.kh, s.kw), s.stride, s.padding, s.dilation, s.groups, bias=False)
    bn = nn.BatchNorm2d(s.cout)
    with torch.no_grad():
        fan_in = (s.cin // s.groups) * s.kh * s.kw
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        bn.running_mean.copy_(torch.randn(s.cout, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(s.cout, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(s.cout, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(s.cout, generator=g) * 0.2)
    return EagerLayer(conv, bn, _ACT_MODULES[case.activation]()).eval()


def _max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def make_provider(name: str, layer: EagerLayer, case: LayerCase, x: torch.Tensor, residual, *,
                  compile_mode: str = "max-autotune"):
    """A zero-argument callable running `name` on (x, residual), or a string saying why it is unavailable."""
    from fusedconv import FusedConv2d, fold
    from fusedconv.activations import apply_activation

    s = case.shape
    if name == "eager":
        return lambda: layer(x, residual)
    if name in ("folded", "cudnn_relu"):
        w, b = fold.fold_conv_bn_weights(layer.conv, layer.bn)  # float64 math, cast to the layer's dtype
        w = w.contiguous(memory_format=torch.channels_last if _channels_last(x) else torch.contiguous_format)
        if name == "folded":
            def folded():
                y = F.conv2d(x, w, b, s.stride, s.padding, s.dilation, s.groups)
                if residual is not None:
                    y = y + residual
                return apply_activation(y, case.activation, 0.0, inplace=True)
            return folded
        if x.device.type != "cuda":
            return "n/a: CUDA only"
        if case.activation != "relu":
            return f"n/a: cuDNN's fused op is ReLU only (layer uses {case.activation})"
        st, pd, dl = [s.stride] * 2, [s.padding] * 2, [s.dilation] * 2
        if residual is None:
            return lambda: torch.cudnn_convolution_relu(x, w, b, st, pd, dl, s.groups)
        return lambda: torch.cudnn_convolution_add_relu(x, w, residual, 1.0, b, st, pd, dl, s.groups)
    if name == "compile":
        compiled = torch.compile(layer, mode=compile_mode, dynamic=False)
        return lambda: compiled(x, residual)
    if name == "fusedconv":
        fused = FusedConv2d.from_modules(layer.conv, layer.bn, case.activation).to(device=x.device, dtype=x.dtype)
        if _channels_last(x):
            fused = fused.to(memory_format=torch.channels_last)
        return lambda: fused(x, residual)
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")


def run_case(case: LayerCase, batch: int, dtype: torch.dtype, layout: str, providers, device: torch.device, *,
             quick: bool, peak_key: str | None, tf32: bool, compile_ok, compile_mode: str,
             cpu_min_run_time: float | None = None) -> list[dict]:
    """Time every provider on one (layer, batch, dtype, layout); one row per provider."""
    s = case.shape
    flops = metrics.conv_flops(s, batch)
    nbytes = metrics.conv_bytes(s, batch, dtype, residual=case.residual)
    peak_c = metrics.peak_tflops(peak_key, dtype, tf32=tf32)
    peak_b = metrics.peak_tb_s(peak_key)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    layer = build_layer(case).to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(batch, s.cin, s.h, s.w, generator=g).to(device=device, dtype=dtype, memory_format=fmt)
    residual = None
    if case.residual:
        oh, ow = s.out_hw
        residual = torch.randn(batch, s.cout, oh, ow, generator=g).to(device=device, dtype=dtype, memory_format=fmt)
    base = {"net": case.net, "layer": case.name, "shape": s.label(), "cin": s.cin, "cout": s.cout, "h": s.h,
            "w": s.w, "k": s.kh, "stride": s.stride, "padding": s.padding, "groups": s.groups,
            "depthwise": s.depthwise, "activation": case.activation, "residual": case.residual,
            "count_in_net": case.count, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "layout": layout, "flops": flops, "bytes": nbytes,
            "intensity": metrics.arithmetic_intensity(flops, nbytes)}
    rows = []
    ready = {}
    # no_grad, not inference_mode: modules built under inference_mode hold inference tensors, which FusedConv2d's
    # weight cache cannot version-check (the timed calls run under no_grad too, so torch.compile guards match).
    with torch.no_grad():
        ref = layer(x, residual).clone()
        for name in providers:
            row = dict(base, provider=name)
            rows.append(row)
            if name == "compile" and compile_ok is not True:
                row["status"] = compile_ok
                continue
            try:
                t0 = time.perf_counter()
                fn = make_provider(name, layer, case, x, residual, compile_mode=compile_mode)
                if isinstance(fn, str):
                    row["status"] = fn
                    continue
                out = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                setup = time.perf_counter() - t0
                if name == "compile":
                    row["compile_s"] = setup
                    row["compile_mode"] = compile_mode
                err = _max_rel_error(out, ref)
                row["max_rel_error_vs_eager"] = err
                if not err <= TOLERANCE[dtype]:
                    row["status"] = f"n/a: wrong result (max rel error {err:.2e} vs eager)"
                    continue
                if device.type == "cuda":
                    t = time_fn(fn, device, quick=quick, cuda_graph=True)
                    _record(row, t, flops, nbytes, peak_c, peak_b)
                else:
                    ready[name] = (fn, row)
            except Exception as e:  # one failing provider is a result, not a crash of the suite
                row["status"] = _na(e)
    if ready:
        try:
            timings = time_cpu_interleaved({n: fn for n, (fn, _) in ready.items()},
                                           min_run_time=(cpu_min_run_time or (0.1 if quick else 0.25)) * len(ready))
            for name, (_, row) in ready.items():
                _record(row, timings[name], flops, nbytes, peak_c, peak_b)
        except Exception as e:
            for _, row in ready.values():
                row["status"] = _na(e)
    _add_speedups(rows)
    return rows


def _na(e: BaseException) -> str:
    text = str(e).strip()
    return f"n/a: {type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _record(row: dict, t, flops: int, nbytes: int, peak_c, peak_b) -> None:
    row.update(status="ok", time_ms=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, runs=t.runs, timer=t.method,
               tflops=metrics.tflops(flops, t.median_s), gb_s=metrics.gb_s(nbytes, t.median_s))
    if peak_c is not None:
        row["pct_peak_compute"] = 100.0 * row["tflops"] / peak_c
        row["pct_peak_bandwidth"] = 100.0 * row["gb_s"] / (peak_b * 1e3)
        row["pct_roofline"] = metrics.roofline_percent(flops, nbytes, t.median_s, peak_c, peak_b)


def _add_speedups(rows: list[dict]) -> None:
    """On the fusedconv row: its speedup over every other provider that ran."""
    fc = next((r for r in rows if r["provider"] == "fusedconv" and r.get("status") == "ok"), None)
    if fc is None:
        return
    for r in rows:
        if r is not fc and r.get("status") == "ok":
            fc[f"speedup_vs_{r['provider']}"] = metrics.speedup(r["time_ms"], fc["time_ms"])


def summarize(rows: list[dict]) -> list[dict]:
    """Geometric-mean speedup of fusedconv over each provider per (net, batch, dtype, layout) group."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        if r["provider"] != "fusedconv" or r.get("status") != "ok":
            continue
        key = (r["net"], r["batch"], r["dtype"], r["layout"])
        for k, v in r.items():
            if k.startswith("speedup_vs_"):
                groups.setdefault(key, {}).setdefault(k[len("speedup_vs_"):], []).append(v)
    out = []
    for (net, batch, dtype, layout), per in sorted(groups.items()):
        for provider, values in sorted(per.items()):
            out.append({"net": net, "batch": batch, "dtype": dtype, "layout": layout, "vs": provider,
                        "geomean_speedup": metrics.geomean(values), "layers": len(values)})
    return out
