"""Benchmark entry for the 3-D layers: every distinct Conv3d -> BatchNorm3d -> ReLU (+ residual) layer of
torchvision's r3d_18 video ResNet, timed per provider on the layer shapes r3d_18 sees for one clip.

Providers (each computes act(bn(conv(x)) [+ residual]) for the same layer):
- eager      nn.Conv3d -> nn.BatchNorm3d (eval) -> [+ residual] -> activation.
- folded     BN folded into the conv's weight and bias: one F.conv3d (cuDNN / oneDNN), then [+ residual] and the
             activation as separate ops.
- fusedconv  fusedconv.FusedConv3d: the Triton 3-D implicit-GEMM kernel on CUDA, the folded fallback elsewhere.

Layers are read from a real r3d_18 (forward hooks on its Conv3d modules), so the shapes are the model's own:
the stem (3x7x7), the 3x3x3 convs with and without the residual add, the 1x1x1 stride-2 downsamples. Weights
and BN statistics are random (randomized, not the defaults). Every provider's output is checked against eager
before it is timed.

    python -m bench --suite layers3d [--quick] [--device cpu|cuda]

`run(device, quick)` returns one dict per (layer, provider) (the bench suite collects these).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.timing import time_cpu_interleaved, time_fn
from fusedconv import fold
from fusedconv.fused_layers import FusedConv3d

PROVIDERS = ("eager", "folded", "fusedconv")
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def r3d_18_layers(clip: tuple[int, int, int]) -> list[dict]:
    """The distinct Conv3d layers of torchvision r3d_18 for a (T, H, W) clip: geometry, input shape, whether
    the block adds its residual after this conv (then ReLU), and the activation; with how often each occurs."""
    from torchvision.models.video import r3d_18

    model = r3d_18(weights=None).eval()
    seen: dict = {}

    def hook(name):
        def record(mod, inputs, _out):
            if name.endswith("conv2.0"):
                role = ("relu", True)  # BasicBlock: relu(bn(conv2(.)) + identity)
            elif ".downsample." in name:
                role = ("identity", False)
            else:
                role = ("relu", False)
            key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                   tuple(inputs[0].shape[1:]), role)
            entry = seen.setdefault(key, {"layer": name, "count": 0})
            entry["count"] += 1
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, *clip))
    for h in handles:
        h.remove()
    return [{"layer": v["layer"], "count": v["count"], "cin": k[0], "cout": k[1], "kernel": k[2], "stride": k[3],
             "padding": k[4], "in_shape": k[5], "activation": k[6][0], "residual": k[6][1]}
            for k, v in seen.items()]


def _layer(case: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv3d(case["cin"], case["cout"], case["kernel"], case["stride"], case["padding"], bias=False)
    bn = nn.BatchNorm3d(case["cout"])
    with torch.no_grad():
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        bn.running_mean.copy_(torch.randn(case["cout"], generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(case["cout"], generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(case["cout"], generator=g) + 0.5)
        bn.bias.copy_(torch.randn(case["cout"], generator=g) * 0.2)
    act = nn.ReLU() if case["activation"] == "relu" else nn.Identity()
    return conv.eval(), bn.eval(), act


def _providers(conv, bn, act, x, residual) -> dict:
    def eager():
        y = bn(conv(x))
        return act(y if residual is None else y + residual)

    w, b = fold.fold_layer_bn_weights(conv, bn)

    def folded():
        y = F.conv3d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        return act(y if residual is None else y + residual)

    fused = FusedConv3d.from_modules(conv, bn, act).to(device=x.device, dtype=x.dtype)

    def fusedconv():
        return fused(x, residual)

    return {"eager": eager, "folded": folded, "fusedconv": fusedconv}


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


@torch.no_grad()
def run(device: torch.device | str = "cpu", quick: bool = False, *, clip: tuple[int, int, int] | None = None,
        batch: int = 1, dtype: torch.dtype | None = None, deadline: float | None = None,
        max_layers: int | None = None) -> list[dict]:
    """One row per (layer, provider): median / IQR ms, speed-up over eager, error vs eager, status.

    `deadline` (a time.perf_counter() value): layers not started by then get one "time box reached" row.
    `max_layers`: only the first that many distinct layers (the bench layer suite's --max-layers)."""
    device = torch.device(device)
    clip = clip or ((4, 56, 56) if quick else (8, 112, 112))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    fmt = torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format
    rows = []
    for i, case in enumerate(r3d_18_layers(clip)[:max_layers]):
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({"net": "r3d_18", "layer": case["layer"], "status": "n/a: time box reached"})
            continue
        conv, bn, act = _layer(case, seed=i)
        conv, bn = conv.to(device=device, dtype=dtype), bn.to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(batch, *case["in_shape"], generator=g).to(device=device, dtype=dtype, memory_format=fmt)
        out_shape = conv(x).shape
        residual = (torch.randn(out_shape, generator=g).to(device=device, dtype=dtype, memory_format=fmt)
                    if case["residual"] else None)
        base = {"net": "r3d_18", "layer": case["layer"], "count_in_net": case["count"],
                "shape": f"{case['cin']}->{case['cout']} k{'x'.join(map(str, case['kernel']))} "
                         f"s{'x'.join(map(str, case['stride']))} in {'x'.join(map(str, case['in_shape'][1:]))}",
                "activation": case["activation"], "residual": case["residual"], "batch": batch,
                "dtype": str(dtype).replace("torch.", ""), "device": device.type}
        fns = _providers(conv, bn, act, x, residual)
        ref = fns["eager"]().clone()
        ready, case_rows = {}, {}
        for name in PROVIDERS:
            row = case_rows[name] = dict(base, provider=name)
            rows.append(row)
            try:
                err = _rel_error(fns[name](), ref)
                row["max_rel_error_vs_eager"] = err
                if not err <= TOLERANCE[dtype]:
                    row["status"] = f"n/a: wrong result (max rel error {err:.2e} vs eager)"
                    continue
                ready[name] = fns[name]
            except Exception as e:  # one failing provider is a result, not a crash of the suite
                row["status"] = f"n/a: {type(e).__name__}: {str(e).strip()[:200]}"
        if device.type == "cuda":
            timings = {n: time_fn(fn, device, quick=quick, cuda_graph=True) for n, fn in ready.items()}
        elif ready:
            timings = time_cpu_interleaved(ready, min_run_time=(0.1 if quick else 0.3) * len(ready))
        else:
            timings = {}
        for name, t in timings.items():
            case_rows[name].update(median_ms=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, status="ok")
        eager_ms = case_rows["eager"].get("median_ms")
        for row in case_rows.values():
            if eager_ms and row.get("median_ms"):
                row["speedup_vs_eager"] = eager_ms / row["median_ms"]
    return rows
