"""torch.compile sweep of the model zoo: does a converted model compile once, and compute what the original does?

`python -m bench.zoo_compile [--models SPEC,SPEC|--set default|tiny] [--size 64] [--batch 2] [--backend eager]
[--fullgraph] [--json PATH] [--md PATH]`

Per model of bench/zoo_models.py (random weights, BatchNorm statistics randomized as `bench.zoo` does, eval mode,
float32 NCHW input at `--size`, raised to the model's minimum): `torch.compile(fusedconv.convert(model),
backend=...)` is called once, then twice more on new inputs of the same shape under
`torch.compiler.set_stance("fail_on_recompile")`, which raises if Dynamo has to compile again. Nothing in the
converted model's forward may change Python state that Dynamo guards on (a counter in a guard table did: every call
compiled again). The outputs of those calls are compared with the original's (max relative error over output
tensors, float32; above the convert self-check tolerance it is a finding). Where the converted model compiles
again, the original is put through the same three calls: a model whose own forward fills a cache on its first call
(timm's attention-bias caches) recompiles either way.

`--fullgraph` compiles with `fullgraph=True`: a graph break then fails the check as a recompile does (and the
original is put through the same calls).

The default backend is "eager" (Dynamo's tracing and guards, which decide recompiles, without Inductor's code
generation): the sweep then runs on any machine in minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

import fusedconv
from bench.zoo import (add_input_arguments, add_sweep_arguments, environment, first_line, rel_error, selected_models,
                       parse_sweep_arguments, sweep, with_timeout)
from bench.zoo_models import ZooModel
from fusedconv.comparison import SELF_CHECK_TOLERANCE
from fusedconv.model_specs import randomize_batchnorm


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable(text: str) -> str:
    """`text` without this machine's directories (results files are committed): installed packages from their
    package directory on, this checkout's files from its root."""
    return re.sub(r"[^\s'\"]*?(?:site|dist)-packages/", "", text).replace(_ROOT + os.sep, "")


def compiles_once(model: torch.nn.Module, inputs: list[torch.Tensor], backend: str, fullgraph: bool = False):
    """(True, outputs of the calls after the first) when `torch.compile(model)` called on `inputs` compiles on the
    first call only (and, with `fullgraph`, as one graph); (False, the error's first line) otherwise."""
    from torch._dynamo.exc import Unsupported

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    with torch.no_grad():
        try:
            compiled(inputs[0])
            with torch.compiler.set_stance("fail_on_recompile"):
                return True, [compiled(x) for x in inputs[1:]]
        except Unsupported as e:
            if not fullgraph:
                raise
            return False, portable(first_line(e))
        except RuntimeError as e:
            if "recompile" not in str(e):
                raise
            return False, portable(first_line(e))


def run_model(entry: ZooModel, size: int = 64, batch: int = 2, backend: str = "eager", fullgraph: bool = False,
              seed: int = 0) -> dict:
    res: dict = {"model": entry.spec, "source": entry.source, "compiles_once": None, "findings": []}
    torch.manual_seed(seed)
    model = entry.build(size)
    shape = entry.input_shape(size, batch)
    example = torch.randn((max(2, shape[0]),) + tuple(shape[1:]), generator=torch.Generator().manual_seed(seed + 7))
    randomize_batchnorm(model, seed, example_inputs=example)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = [torch.randn(shape, generator=gen) for _ in range(3)]
    converted = fusedconv.convert(model)
    once, outcome = compiles_once(converted, inputs, backend, fullgraph)
    res["compiles_once"] = once
    if once:
        with torch.no_grad():
            res["err32"] = max(rel_error(out, model(x)) for out, x in zip(outcome, inputs[1:]))
        if not res["err32"] <= SELF_CHECK_TOLERANCE[torch.float32]:
            res["findings"].append(f"float32 error {res['err32']:.1e} against the original")
    else:
        res["recompile"] = outcome
        res["original_compiles_once"] = compiles_once(model, inputs, backend, fullgraph)[0]
        if res["original_compiles_once"]:
            res["findings"].append("the converted model compiles again where the original does not")
    return res


def run_one(entry: ZooModel, size: int, batch: int, backend: str, fullgraph: bool, timeout: int) -> dict:
    res = with_timeout(entry, timeout, lambda: run_model(entry, size, batch, backend, fullgraph), compiles_once=None)
    if "error" in res:
        res["error"] = portable(res["error"])
    return res


def render_markdown(results: list[dict], meta: dict) -> str:
    once = [r for r in results if r.get("compiles_once")]
    again = [r for r in results if r.get("compiles_once") is False]
    own = [r for r in again if r.get("original_compiles_once") is False]
    failed = [r for r in results if r.get("compiles_once") is None]
    worst = max((r["err32"] for r in once), default=None)
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = ["# Model zoo under torch.compile: converted models compile once", "",
             f"{meta['machine']}, {versions}; `{meta['command']}`; {meta['date']}", "",
             f"{len(results)} models: {len(once)} compile once (worst float32 error against the original "
             f"{'n/a' if worst is None else f'{worst:.1e}'}), {len(again)} compile again ({len(own)} of them as the "
             f"original does too), {len(failed)} not checked (error or timeout); findings: "
             f"{sum(len(r['findings']) for r in results if r.get('compiles_once') is not None)}.", "", "## Models", "",
             "| model | compiles once | float32 error | original compiles once | note |", "|---|---|---|---|---|"]
    for r in results:
        err = r.get("err32")
        orig = r.get("original_compiles_once")
        note = r.get("recompile") or r.get("error") or "; ".join(r["findings"])
        lines.append(f"| {r['model']} | {r.get('compiles_once')} | {'' if err is None else f'{err:.1e}'} | "
                     f"{'' if orig is None else orig} | {note.replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.zoo_compile", description=__doc__.splitlines()[0])
    add_sweep_arguments(p)
    add_input_arguments(p, size=64, threads=2)
    p.add_argument("--backend", default="eager", help="torch.compile backend (eager: Dynamo only)")
    p.add_argument("--fullgraph", action="store_true", help="compile with fullgraph=True (a graph break fails)")
    args = parse_sweep_arguments(p, argv, ("batch", "threads"))
    sweep(selected_models(args), lambda entry: run_one(entry, args.size, args.batch, args.backend, args.fullgraph,
                                                     args.timeout),
          _status_line, render_markdown, environment(argv, "bench.zoo_compile"), args.json, args.md)
    return 0


def _status_line(res: dict) -> str:
    return (f"{res['model']:45s} compiles once: {res.get('compiles_once')}  err32 {res.get('err32')}  "
            f"{res.get('recompile') or res.get('error') or ''}  {res['total_s']} s")


if __name__ == "__main__":
    sys.exit(main())
