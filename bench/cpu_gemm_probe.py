"""1x1 convs as a packed MKL GEMM instead of oneDNN on CPU: the probe of a route fusedconv does not take.

A 1x1 stride-1 conv on a channels_last input is a matrix product of the (N*H*W, C) view of the input with the
folded weight. `mkldnn::_convolution_pointwise` (the oneDNN route convert takes, and the op Inductor's freezing
emits) costs some tens of microseconds per call however small the conv, where an MKL GEMM on a weight packed once
(`mkl::_mkl_linear`, what Inductor emits for nn.Linear) costs a few; mobilenet_v2's late 1x1 convs compute for
about as long. So the probe asks whether taking those convs off oneDNN pays, in three measurements (one process,
`--threads` torch threads, batch 1, float32, the model built as the benchmarks build it, random BN statistics):

1. `fixed`: the per-call cost of a tiny 1x1 conv (1x8x2x2 -> 8 channels) through `_convolution_pointwise` with a
   packed weight, through F.conv2d (PyTorch's native kernel at this size) and through `_mkl_linear` on its NHWC view,
   with `x + 1` as the floor of any op call (median of single-call timings);
2. `alone`: each 1x1 stride-1 conv of the converted model on its own recorded input, timed alone through the
   oneDNN call the model makes and through the GEMM (`_mkl_linear` with the folded bias, then the activation and
   the residual add as in-place ops, the output viewed back as channels_last), with the GEMM's largest difference
   from the oneDNN output relative to its largest magnitude;
3. `in_model`: the converted model's forward with no such call swapped to the GEMM, with every one swapped and
   with only those that ran at least 10 % faster alone on the GEMM swapped (`cpu._pointwise` /
   `cpu._pointwise_binary_inplace` patched for the run, keyed on the call's packed weight), in interleaved
   rounds: the forward's time and the probed layers' summed time inside it.

A measurement tool, not a route: `python -m bench.cpu_gemm_probe [--model SPEC] [--rounds N] [--threads N]
[--md PATH] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


# A layer counts as faster on the GEMM when it ran this much faster alone (the third forward variant).
FASTER_ALONE = 0.9


def _median_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _gemm_call(weight: torch.Tensor, bias: torch.Tensor, act, shape):
    """The 1x1 conv of `weight` (folded, (Cout, Cin, 1, 1)) + `bias` as `_mkl_linear` on the NHWC view of a
    channels_last input of `shape`, then the residual (in place into the residual, as the oneDNN in-place route
    writes it) and the activation; the output viewed back as (N, Cout, H, W) channels_last."""
    n, c, h, w = shape
    rows = n * h * w
    w2 = weight.reshape(weight.shape[0], c).contiguous()
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w2, rows)

    def call(x, residual=None):
        call.calls += 1
        y = torch.ops.mkl._mkl_linear(x.permute(0, 2, 3, 1).reshape(rows, c), packed, w2, bias, rows)
        if residual is not None:
            y = residual.permute(0, 2, 3, 1).reshape(rows, -1).add_(y)
        if act is not None:
            if act[0] == "relu":
                y = y.relu_()
            elif act[0] == "relu6":
                y = y.clamp_(0.0, 6.0)
            else:
                raise ValueError(f"activation {act[0]!r} is not covered by the probe")
        if residual is not None:
            return residual
        # The (N, Cout, H, W) channels_last tensor over the product's memory, as a tensor of its own rather than a
        # view (a view's `_base` would keep it from being written in place as a later block's residual, which
        # the oneDNN outputs it stands in for allow).
        out_channels = y.shape[1]
        return torch.empty(0).set_(y.untyped_storage(), 0, (n, out_channels, h, w),
                                   (h * w * out_channels, 1, w * out_channels, out_channels))
    call.calls = 0  # calls made (the probe counts those of its swapped forward)
    return call


def fixed_costs(calls: int) -> list[dict]:
    from fusedconv import cpu

    if not cpu.available():
        raise SystemExit("this PyTorch has no mkldnn::_convolution_pointwise (oneDNN): nothing to probe")
    x = torch.randn(1, 8, 2, 2).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(8, 8, 1, 1), torch.randn(8)
    packed = cpu.pack_weight(weight, [0, 0], [1, 1], [1, 1], 1, list(x.shape))
    gemm = _gemm_call(weight, bias, None, tuple(x.shape))
    variants = {
        "mkldnn._convolution_pointwise (packed)":
            lambda: cpu._pointwise(x, packed, bias, [0, 0], [1, 1], [1, 1], 1, "none", [], ""),
        "F.conv2d": lambda: F.conv2d(x, weight, bias),
        "mkl._mkl_linear on the NHWC view": lambda: gemm(x),
        "x + 1": lambda: x + 1,
    }
    return [{"call": name, "us": round(_median_us(fn, calls), 2)} for name, fn in variants.items()]


def _one_by_one_calls(model, x):
    """(leaf, state, kind, input, residual) for every 1x1 stride-1 dense conv the converted model's forward sends
    to oneDNN (kind 'u': `_pointwise`, 'i': written in place into its residual), recorded in one forward."""
    from fusedconv import cpu
    from fusedconv.graph.flat import flat_check

    check = flat_check(model)
    if check is None or check.fused is None:
        raise SystemExit("--model: the converted model has no whole-model flat forward; the probe needs one")
    states = check.fused.states(x)
    by_packed = {}
    for leaf, state in zip(check.fused.leaves, states):
        if (state is not None and state.packed is not None and tuple(leaf.kernel_size) == (1, 1)
                and tuple(leaf.stride) == (1, 1) and tuple(leaf.padding) == (0, 0) and leaf.groups == 1):
            by_packed[id(state.packed)] = (leaf, state)
    seen = []
    unary, in_place = cpu._pointwise, cpu._pointwise_binary_inplace

    def record_unary(x_, packed, bias, *tail):
        if id(packed) in by_packed:
            seen.append((*by_packed[id(packed)], "u", x_.clone(), None))
        return unary(x_, packed, bias, *tail)

    def record_in_place(residual, x_, packed, bias, *tail):
        if id(packed) in by_packed:
            seen.append((*by_packed[id(packed)], "i", x_.clone(), residual.clone()))
        return in_place(residual, x_, packed, bias, *tail)

    cpu._pointwise, cpu._pointwise_binary_inplace = record_unary, record_in_place
    try:
        model(x)
    finally:
        cpu._pointwise, cpu._pointwise_binary_inplace = unary, in_place
    return seen


def probe(spec: str, rounds: int, calls: int, size: int = 224) -> dict:
    import fusedconv
    from bench.models import build
    from fusedconv import cpu

    model = build(spec)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        converted = fusedconv.convert(model)
        converted(x), converted(x)
        recorded = _one_by_one_calls(converted, x)
        unary, in_place = cpu._pointwise, cpu._pointwise_binary_inplace
        gemms, alone = {}, []
        for leaf, state, kind, xi, ri in recorded:
            gemm = _gemm_call(state.weight, state.bias, state.act, tuple(xi.shape))
            gemms[id(state.packed)] = gemm
            if kind == "u":
                ref = unary(xi, state.packed, state.bias, *state.unary_tail)
                out = gemm(xi)
                t_onednn = _median_us(lambda: unary(xi, state.packed, state.bias, *state.unary_tail), calls)
                t_gemm = _median_us(lambda: gemm(xi), calls)
            else:
                ref = in_place(ri.clone(), xi, state.packed, state.bias, *state.inplace_tail)
                out = gemm(xi, ri.clone())
                r1, r2 = ri.clone(), ri.clone()  # (the residual is overwritten call after call: a timing only)
                t_onednn = _median_us(lambda: in_place(r1, xi, state.packed, state.bias, *state.inplace_tail),
                                      calls)
                t_gemm = _median_us(lambda: gemm(xi, r2), calls)
            alone.append({"input": list(xi.shape), "out_channels": state.weight.shape[0], "kind": kind,
                          "act": state.act[0] if state.act else "identity", "onednn_us": round(t_onednn, 1),
                          "gemm_us": round(t_gemm, 1),
                          "gemm_rel_err": float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))})
        # The variants of the forward: no layer swapped, every one, and only those whose GEMM ran at least 10 %
        # faster alone (`FASTER_ALONE`).
        faster = {id(state.packed) for (_, state, *_), r in zip(recorded, alone)
                  if r["gemm_us"] < FASTER_ALONE * r["onednn_us"]}
        variants = {"onednn": set(), "gemm": set(gemms), "gemm_faster_alone": faster}
        now = {"variant": "onednn", "swap": set()}
        inside = dict.fromkeys(variants, 0.0)

        def patched_unary(x_, packed, bias, *tail):
            gemm = gemms.get(id(packed))
            if gemm is None:
                return unary(x_, packed, bias, *tail)
            t0 = time.perf_counter()
            y = gemm(x_) if id(packed) in now["swap"] else unary(x_, packed, bias, *tail)
            inside[now["variant"]] += time.perf_counter() - t0
            return y

        def patched_in_place(residual, x_, packed, bias, *tail):
            gemm = gemms.get(id(packed))
            if gemm is None:
                return in_place(residual, x_, packed, bias, *tail)
            t0 = time.perf_counter()
            y = gemm(x_, residual) if id(packed) in now["swap"] else in_place(residual, x_, packed, bias, *tail)
            inside[now["variant"]] += time.perf_counter() - t0
            return y

        def use(variant):
            now["variant"], now["swap"] = variant, variants[variant]

        cpu._pointwise, cpu._pointwise_binary_inplace = patched_unary, patched_in_place
        try:
            use("onednn")
            reference = converted(x)
            use("gemm")
            made = sum(g.calls for g in gemms.values())
            out = converted(x)
            gemm_calls = sum(g.calls for g in gemms.values()) - made
            forward_err = float((out - reference).abs().max() / reference.abs().max())
            inside = dict.fromkeys(variants, 0.0)
            times = {v: [] for v in variants}
            made = dict.fromkeys(variants, 0)  # GEMM calls made by each variant's forwards
            for _ in range(rounds):
                for variant in variants:
                    use(variant)
                    before = sum(g.calls for g in gemms.values())
                    t0 = time.perf_counter()
                    for _ in range(5):
                        converted(x)
                    times[variant].append((time.perf_counter() - t0) / 5 * 1e3)
                    made[variant] += sum(g.calls for g in gemms.values()) - before
        finally:
            cpu._pointwise, cpu._pointwise_binary_inplace = unary, in_place

    def ratio(variant):
        ratios = [g / o for g, o in zip(times[variant], times["onednn"])]
        q = statistics.quantiles(ratios, n=4)
        return {"median": round(statistics.median(ratios), 3), "p25": round(q[0], 3), "p75": round(q[2], 3)}

    return {"model": spec, "layers": len(alone), "gemm_calls_per_swapped_forward": gemm_calls,
            "faster_alone": len(faster), "alone": alone,
            "alone_onednn_us": round(sum(r["onednn_us"] for r in alone), 1),
            "alone_gemm_us": round(sum(r["gemm_us"] for r in alone), 1),
            "forward_ms": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "forward_ratio_over_onednn": {v: ratio(v) for v in variants if v != "onednn"},
            "in_model_layers_ms_per_forward": {k: round(v / (rounds * 5) * 1e3, 3) for k, v in inside.items()},
            "gemm_calls_per_forward": {k: v / (rounds * 5) for k, v in made.items()},
            "forward_rel_err": forward_err}


def markdown(fixed: list[dict], rows: list[dict], env_line: str) -> str:
    lines = ["# 1x1 convs as a packed MKL GEMM instead of oneDNN (CPU probe)", "", env_line, "",
             "Module doc: `bench/cpu_gemm_probe.py`. Single-call medians in microseconds; forward times are medians "
             "of interleaved rounds of 5 forwards.", "", "## Fixed cost per call (1x8x2x2 input, 1x1 conv to 8 "
             "channels)", "", "| call | us |", "|---|---|"]
    lines += [f"| {r['call']} | {r['us']:.2f} |" for r in fixed]
    for row in rows:
        inside, ms = row["in_model_layers_ms_per_forward"], row["forward_ms"]
        lines += ["", f"## {row['model']}: {row['layers']} 1x1 stride-1 convs", "",
                  f"- alone, summed: oneDNN {row['alone_onednn_us'] / 1e3:.3f} ms, GEMM "
                  f"{row['alone_gemm_us'] / 1e3:.3f} ms; the GEMM {round((1 - FASTER_ALONE) * 100)} % or more "
                  f"faster alone on {row['faster_alone']} of them",
                  f"- output difference of the forward with every layer swapped: {row['forward_rel_err']:.1e} "
                  "(relative to the largest magnitude)", "",
                  "| forward | ms | / oneDNN per round, median (p25-p75) | the probed layers' time in it, ms |",
                  "|---|---|---|---|",
                  f"| every layer on oneDNN | {ms['onednn']:.3f} | - | {inside['onednn']:.3f} |"]
        names = {"gemm": "every layer on the GEMM",
                 "gemm_faster_alone": "the GEMM where it ran faster alone"}
        for variant, r in row["forward_ratio_over_onednn"].items():
            lines.append(f"| {names[variant]} | {ms[variant]:.3f} | {r['median']:.3f} ({r['p25']:.3f}-"
                         f"{r['p75']:.3f}) | {inside[variant]:.3f} |")
        lines += ["", "| input | out channels | call | activation | oneDNN us | GEMM us | GEMM rel. difference |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {'x'.join(map(str, r['input']))} | {r['out_channels']} | "
                  f"{'in place into the residual' if r['kind'] == 'i' else 'plain'} | {r['act']} | "
                  f"{r['onednn_us']:.1f} | {r['gemm_us']:.1f} | {r['gemm_rel_err']:.1e} |" for r in row["alone"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_gemm_probe", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="torchvision:mobilenet_v2,torchvision:resnet50")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=200, help="single-call timings per median")
    p.add_argument("--md")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.rounds < 4 or args.calls < 1 or args.threads < 1 or args.size < 32:
        p.error("--rounds: expected at least 4; --calls, --threads: expected at least 1; --size: at least 32")
    torch.set_num_threads(args.threads)
    from bench.zoo import environment

    env = environment(list(sys.argv[1:] if argv is None else argv), prog="bench.cpu_gemm_probe")
    fixed = fixed_costs(args.calls * 5)
    for r in fixed:
        print(f"fixed: {r['call']}: {r['us']:.2f} us", flush=True)
    rows = []
    for spec in args.models.split(","):
        row = probe(spec, args.rounds, args.calls, args.size)
        rows.append(row)
        print(f"{spec}: {row['layers']} layers; alone oneDNN {row['alone_onednn_us']:.0f} us, GEMM "
              f"{row['alone_gemm_us']:.0f} us; in the forward {row['in_model_layers_ms_per_forward']}; forward "
              f"{row['forward_ms']}, / oneDNN {row['forward_ratio_over_onednn']}", flush=True)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    env_line = (f"{env['machine']}, {versions}; {args.threads} thread(s), batch 1, {args.size}x{args.size} float32 "
                f"input; `{env['command']}`; {env['date']}")
    result = {"environment": env, "fixed": fixed, "rows": rows}
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(fixed, rows, env_line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
