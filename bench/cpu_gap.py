"""Where the CPU gap between fusedconv.convert(model) and torch.compile + Inductor freezing goes (A/B tool).

One process, one torch thread (`--threads N` for more), batch 1, 224x224 float32; every variant runs in interleaved
rounds (A B C ... A B C) timed with the calling thread's CPU time (with more threads: the calling thread's, which
includes its waits at oneDNN's barriers), min and median per forward in ms. Variants:
- fusedconv / compile_freeze: the whole forwards (fusedconv fed NCHW, its default path);
- fusedconv_no_inplace: the fusedconv forward with its in-place residual route refused (`cpu._writable` answering
  False), the A/B of that route;
- fc_onednn_alone: the oneDNN calls one fusedconv forward made (recorded with their arguments), replayed alone;
- ind_conv_alone: the `mkldnn::_convolution_pointwise` calls (.default and the in-place `_convolution_pointwise_
  .binary`) one compiled forward made, recorded by wrapping the overloads Inductor's wrapper code calls, replayed;
- fc_rest_no_conv: the fusedconv forward with every oneDNN call returning its recorded output (everything else);
- fc_alone_inplace_residual: fusedconv's recorded calls with every residual conv written in place into its
  residual (what Inductor emits; a measurement only: the recorded residuals are overwritten);
- fc_alone_inplace_downsample_only: the same for the residuals a block produces itself (torchvision's downsample
  branch), the only ones a proof local to the block allows (with fusedconv's in-place route on, convert already
  takes it for those: then this equals fc_onednn_alone).
Then, for a model with a whole-model flat forward, its per-forward tree check and leaf states timed alone, right
after a real forward and back to back (`flat_check_costs`).
Then each recorded conv call timed alone (min over 5 rounds of 3 calls, both sides' calls interleaved in each
round), summed per (input shape, weight shape, stride) for both sides.
A measurement tool, not a results table: `python -m bench.cpu_gap [spec] [rounds] [--threads N]`; `python -m
bench.cpu_gap [spec] [rounds] inplace` times only fusedconv against fusedconv_no_owned_input (identity residuals not written in
place: graph/owned_input.py off) and fusedconv_no_inplace (no compile, more rounds per minute).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch


def _record_fusedconv(fc, x):
    """(kind, args, output, id of the output tensor) of every oneDNN call one fusedconv forward makes; kind 'u'
    unary, 'b' binary, 'i' binary written in place into its residual (args[0]: a copy of the residual taken before
    the call, so a replay writes into that copy). `output` is a copy taken right after the call (a later in-place
    call may overwrite the tensor itself). Returns (calls, unary op, binary op, in-place binary op)."""
    from fusedconv import cpu
    calls = []
    unary, binary, in_place = cpu._pointwise, cpu._pointwise_binary, cpu._pointwise_binary_inplace

    def wrap(kind, fn):
        def call(*args):
            before = (args[0].clone(memory_format=torch.preserve_format),) + args[1:] if kind == "i" else args
            y = fn(*args)
            calls.append((kind, before, y.clone(memory_format=torch.preserve_format), id(y)))
            return y
        return call

    cpu._pointwise, cpu._pointwise_binary = wrap("u", unary), wrap("b", binary)
    if in_place is not None:
        cpu._pointwise_binary_inplace = wrap("i", in_place)
    try:
        fc(x)
    finally:
        cpu._pointwise, cpu._pointwise_binary, cpu._pointwise_binary_inplace = unary, binary, in_place
    return calls, unary, binary, in_place


def _record_inductor(compiled, x):
    """(overload, args, kwargs) of the oneDNN conv and mkl linear calls one compiled forward makes."""
    calls = []
    targets = [(torch.ops.mkldnn._convolution_pointwise, "default"),
               (torch.ops.mkldnn._convolution_pointwise_, "binary"), (torch.ops.mkl._mkl_linear, "default")]
    saved = [getattr(packet, name) for packet, name in targets]

    def wrap(op):
        def call(*args, **kwargs):
            calls.append((op, args, kwargs))
            return op(*args, **kwargs)
        return call

    # The generated wrapper looks the overloads up on every call, so replacing the attribute intercepts them.
    for (packet, name), op in zip(targets, saved):
        setattr(packet, name, wrap(op))
    try:
        compiled(x)
    finally:
        for (packet, name), op in zip(targets, saved):
            setattr(packet, name, op)
    return calls


def _conv_key(kind, inp, weight, stride):
    return tuple(inp.shape), tuple(weight.shape), tuple(stride), kind


def inplace_ab(spec: str = "torchvision:resnet50", rounds: int = 41, threads: int = 1) -> None:
    """fusedconv with its in-place residual routes, with the identity-residual one off (the residuals blocks make
    themselves only) and with both off, interleaved (`threads` torch threads, thread CPU time)."""
    torch.set_num_threads(threads)
    import torch.nn as nn

    import fusedconv
    from fusedconv import cpu
    from fusedconv.graph.owned_input import OwnedInputSequential
    from fusedconv.model_specs import build_model, randomize_batchnorm

    torch.manual_seed(0)
    model = build_model(spec).eval()
    randomize_batchnorm(model)
    x = torch.randn(1, 3, 224, 224)
    fc = fusedconv.convert(model)
    writable, owned_forward = cpu._writable, OwnedInputSequential.forward

    def run(allow, owned):
        cpu._writable = writable if allow else (lambda x, residual: False)
        # Without the owned mark the Sequentials run nn.Sequential's loop: no block input is written in place.
        OwnedInputSequential.forward = owned_forward if owned else nn.Sequential.forward
        try:
            fc(x)
        finally:
            cpu._writable, OwnedInputSequential.forward = writable, owned_forward

    variants = {"fusedconv": (True, True), "fusedconv_no_owned_input": (True, False),
                "fusedconv_no_inplace": (False, False)}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for args in variants.values():
            run(*args)
        for _ in range(rounds):
            for name, args in variants.items():
                t0 = time.thread_time()
                for _ in range(5):
                    run(*args)
                times[name].append((time.thread_time() - t0) / 5 * 1e3)
    for name, ts in times.items():
        print(f"{name:26s} min {min(ts):7.2f}  median {statistics.median(ts):7.2f} ms")
    for other in ("fusedconv_no_owned_input", "fusedconv_no_inplace"):
        diffs = sorted(a - b for a, b in zip(times["fusedconv"], times[other]))
        q = len(diffs) // 4
        print(f"per-round difference (fusedconv - {other}): median {statistics.median(diffs):+.2f} ms, "
              f"quartiles {diffs[q]:+.2f} / {diffs[-q - 1]:+.2f} ms")


def flat_check_costs(fc, x, rounds: int) -> dict:
    """Per forward of the whole-model flat graph (graph/flat.py), its two checks timed alone (thread CPU time, ms):
    the tree check (every module on the graph's paths, by identity, with what the forward read on them) and the
    leaves' states (graph/flat_fused.py: hooks, and each FusedConv2d's tensors against their snapshot). Each is
    timed right after a real forward, as in use (the forward has streamed the weights through the caches), and back
    to back (warm). Returns {name: (after-a-forward samples, back-to-back samples)}; {} without a flat graph."""
    from fusedconv.graph.flat import flat_check

    check = flat_check(fc)
    if check is None:
        return {}
    parts = {"flat_check (tree)": lambda: check(fc), "flat_states (leaves)": check.fused.states}
    out = {name: ([], []) for name in parts}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in parts.items():
                fc(x)
                t0 = time.thread_time()
                fn()
                t1 = time.thread_time()
                fn()
                t2 = time.thread_time()
                out[name][0].append((t1 - t0) * 1e3)
                out[name][1].append((t2 - t1) * 1e3)
    return out


def main(spec: str = "torchvision:resnet50", rounds: int = 9, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    import torch._inductor.config as inductor_config

    import fusedconv
    from fusedconv import cpu
    from fusedconv.model_specs import build_model, randomize_batchnorm

    inductor_config.freezing = True
    torch.manual_seed(0)
    model = build_model(spec).eval()
    randomize_batchnorm(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fc = fusedconv.convert(model)
        compiled = torch.compile(model)
        compiled(x), fc(x)
        fc_calls, unary, binary, fc_in_place = _record_fusedconv(fc, x)
        ind_calls = _record_inductor(compiled, x)
    print("fusedconv oneDNN calls:", collections.Counter(k for k, _, _, _ in fc_calls))
    print("Inductor calls:", collections.Counter(str(op) for op, _, _ in ind_calls))
    in_place = torch.ops.mkldnn._convolution_pointwise_.binary
    ops_of = {"u": unary, "b": binary, "i": fc_in_place}
    # Outputs of unary calls with no post-op (a downsample branch's conv + folded BN): residuals made in the block.
    made_in_block = {y_id for kind, args, _, y_id in fc_calls if kind == "u" and args[7] == "none"}

    def replay_fc(in_place_when=lambda residual: False):
        for kind, args, _, _ in fc_calls:
            if kind == "b" and in_place_when(args[1]):
                x_, residual, w, b, pad, stride, dil, groups, _, _, unary_attr, scalars, algorithm = args
                in_place(residual, x_, w, b, pad, stride, dil, groups, "add", 1.0, unary_attr, scalars, algorithm)
            else:
                ops_of[kind](*args)

    def replay_inductor():
        for op, args, kwargs in ind_calls:
            if "_mkl_linear" not in str(op):
                op(*args, **kwargs)

    canned = [y for _, _, y, _ in fc_calls]
    position = [0]

    def recorded_output(*args):
        y = canned[position[0] % len(canned)]
        position[0] += 1
        return y

    def fc_without_convs():
        position[0] = 0
        cpu._pointwise = cpu._pointwise_binary = cpu._pointwise_binary_inplace = recorded_output
        try:
            fc(x)
        finally:
            cpu._pointwise, cpu._pointwise_binary, cpu._pointwise_binary_inplace = unary, binary, fc_in_place

    def fc_no_inplace():
        writable = cpu._writable
        cpu._writable = lambda x, residual: False
        try:
            fc(x)
        finally:
            cpu._writable = writable

    variants = {
        "fusedconv": lambda: fc(x),
        "fusedconv_no_inplace": fc_no_inplace,
        "compile_freeze": lambda: compiled(x),
        "fc_onednn_alone": replay_fc,
        "ind_conv_alone": replay_inductor,
        "fc_alone_inplace_residual": lambda: replay_fc(lambda residual: True),
        "fc_alone_inplace_downsample_only": lambda: replay_fc(lambda residual: id(residual) in made_in_block),
        "fc_rest_no_conv": fc_without_convs,
    }
    times = collections.defaultdict(list)
    with torch.no_grad():
        for fn in variants.values():
            fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                t0 = time.thread_time()
                for _ in range(5):
                    fn()
                times[name].append((time.thread_time() - t0) / 5 * 1e3)
    for name, ts in times.items():
        print(f"{name:34s} min {min(ts):7.2f}  median {statistics.median(ts):7.2f} ms")
    for name, (cold, warm) in flat_check_costs(fc, x, rounds * 5).items():
        print(f"{name:34s} after a forward: median {statistics.median(cold):7.3f} ms; "
              f"back to back: median {statistics.median(warm):7.3f} ms")

    # Each recorded call timed alone (3 calls per sample), both sides interleaved round by round, min per call.
    def sample(fn, args, kwargs):
        t0 = time.thread_time()
        for _ in range(3):
            fn(*args, **kwargs)
        return (time.thread_time() - t0) / 3 * 1e3

    timed = []  # (key, side, fn, args, kwargs): side 0 fusedconv, 1 Inductor
    for kind, args, _, _ in fc_calls:
        if kind == "i":  # (residual, input, weight, bias, padding, stride, ...)
            key = _conv_key("b", args[1], args[2], args[5])
        else:
            key = _conv_key(kind, args[0], args[2] if kind == "b" else args[1], args[5] if kind == "b" else args[4])
        timed.append((key[:3], 0, ops_of[kind], args, {}))
    for op, args, kwargs in ind_calls:
        if "_mkl_linear" in str(op):
            continue
        if "binary" in str(op):  # (residual written in place, input, weight, bias, padding, stride, ...)
            key = _conv_key("b", args[1], args[2], args[5])
        else:
            key = _conv_key("u", args[0], args[1], args[4])
        timed.append((key[:3], 1, op, args, kwargs))
    best = [float("inf")] * len(timed)
    with torch.no_grad():
        for _ in range(5):
            for i, (_, _, fn, args, kwargs) in enumerate(timed):
                best[i] = min(best[i], sample(fn, args, kwargs))
    per_shape = collections.defaultdict(lambda: [0.0, 0.0, 0, 0])
    for (key, side, _, _, _), t in zip(timed, best):
        per_shape[key][side] += t
        per_shape[key][side + 2] += 1
    print("input shape | weight shape | stride | fusedconv ms (calls) | Inductor ms (calls) | difference")
    for key, (a, b, na, nb) in sorted(per_shape.items(), key=lambda kv: kv[1][1] - kv[1][0]):
        print(f"{key[0]} | {key[1]} | {key[2]} | {a:.2f} ({na}) | {b:.2f} ({nb}) | {a - b:+.2f}")
    print(f"sum of per-call minima: fusedconv {sum(r[0] for r in per_shape.values()):.2f}  "
          f"Inductor {sum(r[1] for r in per_shape.values()):.2f} ms")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_gap", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", default="torchvision:resnet50")
    parser.add_argument("rounds", nargs="?", type=int, default=None, help="default 9 (41 for inplace)")
    parser.add_argument("mode", nargs="?", choices=["inplace"], help="time only the in-place residual A/B")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected a positive thread count, got {args.threads}")
    return args


if __name__ == "__main__":
    _args = _parse(sys.argv[1:])
    if _args.mode == "inplace":
        inplace_ab(_args.spec, 41 if _args.rounds is None else _args.rounds, _args.threads)
    else:
        main(_args.spec, 9 if _args.rounds is None else _args.rounds, _args.threads)
