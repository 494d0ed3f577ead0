"""Where a converted model's CPU forward time goes around its whole-model flat forward (A/B tool, not a table).

One process, batch 1, 224x224 float32, the given thread count; interleaved rounds of 5 calls, wall clock, min and
median per forward in ms. Variants:
- fusedconv: `convert(model)` called as a user does (NCHW input: layout boundary hooks, the flat graph's guard);
- flat_graph_direct: the same model's flat graph called directly on a channels_last input (no hooks, no guard);
- fusedconv_module_calls: the same flat forward with every FusedConv2d call made through its module (the
  direct calls of fusedconv/graph/flat_fused.py off: `FusedLeaves.states` answering None for every leaf);
- fusedconv_blocks: `convert(model, flatten=False)` (the per-block forward);
- boundary_copy: the input's NCHW -> channels_last copy alone;
- flat_guard: the flat forward's guard alone (`GuardTable.select`);
- leaf_states: the direct calls' per-forward check alone (`FusedLeaves.states`).
`python -m bench.cpu_flat_ab [spec] [threads] [rounds]`, e.g. `python -m bench.cpu_flat_ab torchvision:mobilenet_v2 2 40`.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main(spec: str = "torchvision:mobilenet_v2", threads: int = 2, rounds: int = 40) -> dict[str, list[float]]:
    import fusedconv
    from fusedconv.graph.flat import flat_check
    from fusedconv.graph.specialize import guard_table
    from fusedconv.model_specs import build_model, randomize_batchnorm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(spec).eval(), 0)
    flat = fusedconv.convert(model)
    blocks = fusedconv.convert(model, flatten=False)
    table, check = guard_table(flat), flat_check(flat)
    if check is None:
        raise SystemExit(f"{spec}: convert built no flat forward ({table and table.describe()})")
    x = torch.randn(1, 3, 224, 224)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    graph = table.entries[0].fn
    leaves = check.fused
    states, none = leaves.states, (None,) * len(leaves.leaves)

    def module_calls():
        leaves.states = lambda *inputs: none
        try:
            return flat(x)
        finally:
            leaves.states = states

    variants = {
        "fusedconv": lambda: flat(x),
        "flat_graph_direct": lambda: graph(flat, x_cl),
        "fusedconv_module_calls": module_calls,
        "fusedconv_blocks": lambda: blocks(x),
        "boundary_copy": lambda: x.contiguous(memory_format=torch.channels_last),
        "flat_guard": lambda: table.select(flat, x),
        "leaf_states": states,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn(), fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                for _ in range(5):
                    fn()
                times[name].append((time.perf_counter() - t0) / 5 * 1e3)
    print(f"{spec}, {threads} thread(s), {rounds} rounds x 5 calls, wall clock, ms per call")
    for name, ts in times.items():
        q = sorted(ts)
        print(f"{name:24s} min {q[0]:8.3f}  p25 {q[len(q) // 4]:8.3f}  median {statistics.median(ts):8.3f}")
    return times


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "torchvision:mobilenet_v2",
         int(sys.argv[2]) if len(sys.argv) > 2 else 2, int(sys.argv[3]) if len(sys.argv) > 3 else 40)
