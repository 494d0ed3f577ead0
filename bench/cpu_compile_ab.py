"""fusedconv against torch.compile + Inductor freezing on CPU, paired per round (A/B tool for the CPU target).

For each model: eager, `fusedconv.convert(model)` (the default path, fed NCHW), `fusedconv.convert(model,
freeze=True)` (fusedconv_frozen: fusedconv/frozen.py) and `torch.compile(model)` with
`torch._inductor.config.freezing = True`, and on request (`--variants ...,fusedconv_compile_freeze`) the converted
model compiled the same way — what a user who compiles the converted model gets, paired with compile_freeze —
and, on request, the converted model after `.to("cpu").float()` (fusedconv_moved: still armed) and after a
reach into it (fusedconv_reached: `vars(model)`, full checks on every forward from then on), each checked against
eager in float64 first, then `--rounds`
interleaved rounds of `--calls` calls each, the order of the variants reversed every other round (so neither side
always runs right after the other). Per model: each variant's median and minimum ms per call and, per round, the
ratios fusedconv / every other variant, fusedconv_frozen / every variant not fusedconv's and
fusedconv_compile_freeze / compile_freeze — median and
quartiles. On a noisy shared machine the per-round ratio holds where
absolute times drift by 2x between minutes: "ahead" = fusedconv faster in at least 3 rounds of 4 (p75 < 1),
"behind" = slower in at least 3 of 4 (p25 > 1), else "level".

`--autocast bfloat16` (or float16) runs every call of every variant, warm-up included, inside
`torch.autocast("cpu", dtype=...)` (a converted model computes in the region's dtype there: fusedconv/autocast.py).

`python -m bench.cpu_compile_ab [--models a,b] [--threads 2] [--size 224] [--rounds 30] [--calls 5]
[--variants eager,fusedconv,fusedconv_frozen,compile_freeze[,fusedconv_compile_freeze,fusedconv_moved,
fusedconv_reached]] [--autocast DTYPE]
[--md PATH] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time

import torch

MODELS = ["torchvision:resnet50", "torchvision:mobilenet_v2", "timm:repvgg_a0", "smp:Unet:resnet34"]
VARIANTS = ("eager", "fusedconv", "fusedconv_frozen", "compile_freeze")
KNOWN = VARIANTS + ("fusedconv_compile_freeze", "fusedconv_moved", "fusedconv_reached")


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    from bench.metrics import quantile

    return quantile(values, 0.25), statistics.median(values), quantile(values, 0.75)


def _build(spec: str, variants: tuple[str, ...]) -> tuple[dict, torch.nn.Module]:
    import fusedconv
    from fusedconv.model_specs import build_model, randomize_batchnorm

    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(spec).eval(), 0)
    built = {}
    for name in variants:
        if name == "eager":
            built[name] = model
        elif name == "fusedconv":
            built[name] = fusedconv.convert(model)
        elif name == "fusedconv_frozen":
            built[name] = fusedconv.convert(model, freeze=True)
        elif name == "fusedconv_moved":
            # Converted, then moved and cast where it already is: a conversion keeps the model armed.
            built[name] = fusedconv.convert(model).to("cpu").float()
        elif name == "fusedconv_reached":
            built[name] = fusedconv.convert(model)
            vars(built[name])  # a reach: every forward runs the full checks of its modules and tensors
        elif name in ("compile_freeze", "fusedconv_compile_freeze"):
            # (Inductor freezing is on for the whole of `measure`, where these compile on their first call.)
            source = copy.deepcopy(model) if name == "compile_freeze" else fusedconv.convert(model)
            built[name] = torch.compile(source)
        else:
            raise ValueError(f"variants: expected names from {KNOWN}, got {name!r}")
    return built, model


def measure(spec: str, variants: tuple[str, ...] = VARIANTS, size: int = 224, rounds: int = 30,
            calls: int = 5, autocast: torch.dtype | None = None) -> dict:
    """One model's row: per-variant times (ms per call, every round) and the per-round ratios to fusedconv; with
    `autocast`, every call inside a CPU autocast region of that dtype."""
    import torch._inductor.config as inductor_config

    # Freezing for this measurement only: set for good, it froze every later torch.compile in the process (a test
    # suite's float64 models among them, whose conv weights Inductor's prepacking refuses).
    with inductor_config.patch(freezing=True):
        return _measure(spec, variants, size, rounds, calls, autocast)


def _measure(spec, variants, size, rounds, calls, autocast) -> dict:
    from bench.models import input_shape

    built, model = _build(spec, variants)
    # (1, 3, size, size), or the model's own input shape (a video model's clip, bench/models.py INPUT_SHAPES).
    x = torch.randn(*input_shape(spec, 1, size), generator=torch.Generator().manual_seed(0))
    region = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    with torch.no_grad(), region:
        errors = {}
        for name, fn in built.items():
            for _ in range(3):  # warm-up: the layout check, compilation, oneDNN packing
                out = fn(x)
            errors[name] = float((out.double() - reference).abs().max() / reference.abs().max())
        times: dict[str, list[float]] = {name: [] for name in built}
        order = list(built)
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                fn = built[name]
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(x)
                times[name].append((time.perf_counter() - t0) / calls * 1e3)
    # Whether the default converted model was still armed after its timed calls (fusedconv/graph/reach.py): the
    # path a user who converts and calls the model gets; a reach into it during the run would have timed the other.
    from fusedconv.model_reach import armed

    still_armed = {n: armed(m) is not None for n, m in built.items()
                   if n in ("fusedconv", "fusedconv_moved", "fusedconv_reached")}
    row = {"model": spec, "size": size, "input": list(x.shape), "rounds": rounds, "calls": calls,
           "max_rel_err_vs_fp64": errors, "armed": still_armed,
           "autocast": None if autocast is None else str(autocast).replace("torch.", ""),
           "ms": {n: {"min": min(t), "median": statistics.median(t)} for n, t in times.items()},
           "times_ms": times, "ratios": {}}
    # fusedconv against every other variant, its frozen form against the ones that are not fusedconv's, and the
    # compiled converted model against the compiled original.
    pairs = [("fusedconv", n) for n in times if n != "fusedconv"] + \
        [("fusedconv_frozen", n) for n in times if not n.startswith("fusedconv")] + \
        [("fusedconv_compile_freeze", "compile_freeze")]
    for a, b in pairs:
        if a not in times or b not in times:
            continue
        per_round = [x / y for x, y in zip(times[a], times[b])]
        p25, med, p75 = _quartiles(per_round)
        row["ratios"][f"{a} / {b}"] = {"p25": p25, "median": med, "p75": p75,
                                       "verdict": "ahead" if p75 < 1 else "behind" if p25 > 1 else "level"}
    return row


def markdown(rows: list[dict], env_line: str) -> str:
    lines = ["# fusedconv vs torch.compile + Inductor freezing on CPU (paired rounds)", "", env_line, "",
             "Per-round ratio a / b: median (p25-p75); ahead = p75 < 1, behind = p25 > 1, else level.", "",
             "| model | " + " | ".join(f"{n} ms (median / min)" for n in rows[0]["ms"]) + " | "
             + " | ".join(rows[0]["ratios"]) + " |",
             "|---|" + "---|" * (len(rows[0]["ms"]) + len(rows[0]["ratios"]))]
    for row in rows:
        ms = " | ".join(f"{v['median']:.2f} / {v['min']:.2f}" for v in row["ms"].values())
        ratios = " | ".join(f"{v['median']:.3f} ({v['p25']:.3f}-{v['p75']:.3f}) {v['verdict']}"
                            for v in row["ratios"].values())
        lines.append(f"| {row['model']} | {ms} | {ratios} |")
    armed = [f"{row['model']}: " + ", ".join(f"{n} {'yes' if a else 'no'}" for n, a in row["armed"].items())
             for row in rows if row.get("armed")]
    if armed:
        lines += ["", "Still armed after the timed calls (fusedconv/graph/reach.py: no reach into it, so its forwards "
                  "skipped the checks of its modules and tensors): " + "; ".join(armed) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_compile_ab", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--autocast", choices=("bfloat16", "float16"), default=None,
                   help="run every call inside torch.autocast('cpu', dtype=...)")
    p.add_argument("--md")
    p.add_argument("--json")
    args = p.parse_args(argv)
    autocast = getattr(torch, args.autocast) if args.autocast else None
    variants = tuple(v for v in args.variants.split(",") if v)
    if "fusedconv" not in variants:
        p.error("--variants: must include fusedconv (every ratio is fusedconv / other)")
    torch.set_num_threads(args.threads)
    from bench.zoo import environment

    env = environment(list(sys.argv[1:] if argv is None else argv), prog="bench.cpu_compile_ab")
    rows = []
    for spec in args.models.split(","):
        row = measure(spec, variants, args.size, args.rounds, args.calls, autocast)
        rows.append(row)
        print(f"{spec}: " + "  ".join(f"{n} {v['median']:.2f} ms" for n, v in row["ms"].items()) + "  " +
              "  ".join(f"{n} {v['median']:.3f} ({v['p25']:.3f}-{v['p75']:.3f}) {v['verdict']}"
                        for n, v in row["ratios"].items()), flush=True)
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    region = f" inside torch.autocast('cpu', {args.autocast})" if args.autocast else ""
    env_line = (f"{env['machine']}, {versions}; {args.threads} thread(s), batch 1, {args.size}x{args.size} "
                f"float32 input (video models: their clip, bench/models.py INPUT_SHAPES){region}, {args.rounds} "
                f"rounds x {args.calls} calls; `{env['command']}`; "
                f"{env['date']}")
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows, env_line))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
