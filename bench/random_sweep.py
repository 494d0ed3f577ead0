"""Random home-made models (bench/random_models.py) converted and then edited, each against the original model
given the same edit, in float64: is the converted model the same function, and does it stay so after an edit?

Per seed: the generated model (random weights, BN statistics measured on an input and perturbed, float64) and
`fusedconv.convert(model)` run on the generated calls (`random_models.calls`: two batch sizes, a larger input, the
root's optional argument; a call the original rejects must raise in the converted model too), twice; an output or
a tensor the two hold under one name more than 1e-9 (relative) away from the original's is a silent error of
convert itself. Then, one at a time on fresh copies of both models,
each edit that means the same thing in both (the same path holds a module of the same class, or a tensor of the
same name and value):
  * each public setting of a module changed (`zoo_edits.setting_edits`' rule: a flag flipped, a float x1.5, ...);
  * a forward hook scaling the module's output, on every module but fusedconv's own layers;
  * each floating-point parameter and buffer the two models share by name scaled by 1.5 in place (a fused
    layer's conv weight included: it keeps the conv's name and value);
  * a module that is not a container replaced by one scaling its input (an activation whose calls a fused layer
    took over, a whole block), and a scaling module appended to each nn.Sequential;
  * both models put in training mode (their BNs then normalize by the batch);
  * conversions that change no value, `to(memory_format=torch.channels_last)` and `requires_grad_(False)`, the
    first also followed by the first tensor edit: on the converted model's armed copy they re-arm it
    (fusedconv/graph/reach.py), counted in the report.
Both run every call before the edit and twice after it, each call from the same random state (a forward adding
noise); an output, or a parameter or buffer both hold under one name (a forward updating a buffer), more than 1e-9
(relative) apart is silent, an edit only the converted model raises or warns on is loud (allowed, counted: `train()`
warns that fused layers keep their BN folded, fusedconv/training_mode.py), one the original raises on is skipped.
With `--dtype float32` both run in float32 (the CPU fast paths) and a difference above `TOL32` still passes when,
against a float64 copy of the original, the converted model is within twice the float32 original's own error (a
BatchNorm over a near-constant channel rounds badly in the original too). A generated model the original cannot run
on any call is not tested (listed).

`python -m bench.random_sweep --seeds 0-199 --md out.md`; `python -m bench.random_sweep --show 17` prints the
model of seed 17. Exit status 1 when anything was silently different.
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import sys
import time
import warnings

import torch
import torch.nn as nn

import fusedconv
from bench import random_models
from bench.env import cpu_name, git_commit
from bench.zoo_edits import TOL, Scale, _changed, _replace, _scale_output, rel_error
from fusedconv.graph.reach import arm, armed
from fusedconv.graph.specialize import original_class
from fusedconv.model_specs import randomize_batchnorm


_ABSENT = object()
# float32: the converted model against the original, both in float32 (their difference is rounding, ~1e-6 on these
# shallow models; a skipped edit or a wrong fold shows as 1e-2 and more).
TOL32 = 1e-4


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """`a` (the converted model's) and `b` (the original's) are modules of the same class, convert's guarded
    subclasses counting as their class."""
    return original_class(a) is type(b)


def _scale_named(model: nn.Module, name: str) -> None:
    tensors = dict(model.named_parameters())
    t = tensors[name] if name in tensors else model.get_buffer(name)
    with torch.no_grad():
        t.mul_(1.5)


def _set(model: nn.Module, path: str, attr: str, value) -> None:
    setattr(model.get_submodule(path), attr, value)


def _hook(model: nn.Module, path: str) -> None:
    model.get_submodule(path).register_forward_hook(_scale_output)


def _append(model: nn.Module, path: str) -> None:
    model.get_submodule(path).append(Scale())


def paired_edits(converted: nn.Module, original: nn.Module) -> list[tuple[str, object]]:
    """(name, edit(model)) for each edit that means the same in both models (module doc)."""
    out = []
    originals = dict(original.named_modules())
    for path, mod in converted.named_modules():
        other = originals.get(path)
        if other is None or type(mod).__module__.startswith("fusedconv") or not _same_module(mod, other):
            continue
        shown = path or "<root>"
        for attr, value in mod.__dict__.items():
            new = None if attr.startswith("_") or attr == "training" else _changed(value)
            if new is not None and other.__dict__.get(attr, _ABSENT) == value:
                out.append((f"{shown}.{attr} = {new!r}", lambda m, p=path, a=attr, v=new: _set(m, p, a, v)))
        out.append((f"forward hook on {shown}", lambda m, p=path: _hook(m, p)))
        if path and not mod._modules:
            out.append((f"{path} replaced", lambda m, p=path: _replace(m, p, Scale())))
        if isinstance(mod, nn.Sequential):
            out.append((f"module appended to {shown}", lambda m, p=path: _append(m, p)))
    theirs = {n: t for n, t in [*original.named_parameters(), *original.named_buffers()]}
    scaled = []
    for name, t in [*converted.named_parameters(), *converted.named_buffers()]:
        o = theirs.get(name)
        if t.is_floating_point() and o is not None and o.shape == t.shape and torch.equal(o, t):
            out.append((f"{name} *= 1.5", lambda m, n=name: _scale_named(m, n)))
            scaled.append(name)
    out.append(("train()", lambda m: m.train()))
    # Conversions that change no value: on an armed copy they run inside it and re-arm it (fusedconv/graph/reach.py
    # `rearm`), and its next forwards derive their states anew; then one followed by an edit, seen like any other.
    out.append((CONVERSIONS[0], _to_channels_last))
    out.append((CONVERSIONS[1], lambda m: m.requires_grad_(False)))
    if scaled:
        out.append((f"{CONVERSIONS[0]}, then {scaled[0]} *= 1.5",
                    lambda m, n=scaled[0]: (_to_channels_last(m), _scale_named(m, n))))
    return out


CONVERSIONS = ("to(memory_format=channels_last)", "requires_grad_(False)")


def _to_channels_last(model: nn.Module) -> None:
    model.to(memory_format=torch.channels_last)


def _run(model: nn.Module, calls: list[tuple]) -> list:
    """The outputs of `calls`, each drawn from the same random state (a forward adding noise)."""
    out = []
    with torch.no_grad():
        for i, c in enumerate(calls):
            torch.manual_seed(1000 + i)
            out.append(model(*c))
    return out


def _accepts(model: nn.Module, args: tuple) -> bool:
    """Whether the model as written runs on `args` (on a copy: a forward may update a buffer)."""
    try:
        _run(copy.deepcopy(model), [args])
    except Exception:  # noqa: BLE001 - a call the original rejects is no test of the converted model
        return False
    return True


def _state(model: nn.Module) -> dict:
    """The model's parameters and buffers by name, in float64 (an integer counter compares as a number)."""
    return {n: t.detach().double() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _state_error(fast: nn.Module, ref: nn.Module) -> float:
    """The largest relative difference of a tensor both models hold under one name (0 where none differ)."""
    mine, theirs = _state(fast), _state(ref)
    errs = [rel_error(t, theirs[n]) if t.shape == theirs[n].shape else float("inf")
            for n, t in mine.items() if n in theirs]
    return max(errs, default=0.0)


def _error(got: list, want: list) -> float:
    return max(rel_error(g, w) for g, w in zip(got, want))


def _twin64(model: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """A float64 copy of a float32 reference model, taken before its calls (None in float64: no twin needed)."""
    return random_models.to_dtype(copy.deepcopy(model), torch.float64) if dtype != torch.float64 else None


def _beyond(err: float, tol: float, got: list, want: list, twin: nn.Module | None, calls: list) -> bool:
    """Whether the converted model's error `err` against the original counts as a difference. In float32 an error
    above `tol` still passes when, against the same model run in float64 (`twin`), the converted model's error is
    at most twice the float32 original's own (the original rounds badly there: a BatchNorm over a near-constant
    channel; the standard "<= 2x PyTorch's own error")."""
    if err <= tol:
        return False
    if twin is None:
        return True
    calls64 = [tuple(a.double() if isinstance(a, torch.Tensor) else a for a in c) for c in calls]
    exact = _run(twin, calls64) + _run(twin, calls64)
    return _error(got, exact) > max(tol, 2 * _error(want, exact))


def sweep_seed(seed: int, convert=fusedconv.convert, edits: bool = True, max_blocks: int = 5,
               dtype: torch.dtype = torch.float64) -> dict:
    """One generated model: convert's error on its calls, then every paired edit (module doc). With `dtype`
    float32 the CPU fast paths run (oneDNN, in-place residual writes), against the original in float32 (`TOL32`)."""
    tol = TOL if dtype == torch.float64 else TOL32
    model, gen = random_models.build(seed, max_blocks)
    calls = random_models.calls(gen, dtype)
    randomize_batchnorm(model, seed, example_inputs=tuple(a.float() for a in calls[0]))
    model = random_models.to_dtype(model, dtype)
    res = {"seed": seed, "kinds": gen.kinds, "convert_error": None, "edits": 0, "armed_edits": 0, "rearmed": 0, "ok": 0,
           "loud": [], "silent": [], "skipped": 0, "raised": None, "tol": tol,
           "not_run": False, "wrong": False}
    rejected = [c for c in calls if not _accepts(model, c)]  # (a generated decoder may not take an odd size)
    calls = [c for c in calls if not any(c is r for r in rejected)]
    if not calls:  # a generated model its own forward cannot run (a BN normalizing a 1x1 batch of one): no test
        res["not_run"] = True
        return res
    try:
        converted = convert(model)
        got = _run(converted, calls) + _run(converted, calls)
    except Exception as e:  # noqa: BLE001 - a model its own forward runs must convert and run: recorded
        res["raised"] = f"{type(e).__name__}: {e}"[:300]
        return res
    twin = _twin64(model, dtype)
    want = _run(model, calls) + _run(model, calls)
    res["convert_error"] = max(_error(got, want), _state_error(converted, model))
    res["wrong"] = _state_error(converted, model) > tol or _beyond(_error(got, want), tol, got, want, twin, calls)
    if any(_accepts(converted, c) for c in rejected):
        res["convert_error"] = float("inf")  # a result where the original raises: as wrong as a wrong one
        res["wrong"] = True
    if res["wrong"] or not edits:
        return res
    for name, edit in paired_edits(converted, model):
        res["edits"] += 1
        fast, ref = copy.deepcopy(converted), copy.deepcopy(model)
        # The copy is as private as convert's own result: armed like it (fusedconv/graph/reach.py), so the edit
        # below must be what escapes it (counted in `armed_edits`).
        res["armed_edits"] += arm(fast)
        _run(fast, calls), _run(ref, calls)
        try:
            edit(ref)
            twin = _twin64(ref, dtype)
            want = _run(ref, calls) + _run(ref, calls)
        except Exception:  # noqa: BLE001 - an edit the original rejects proves nothing here
            res["skipped"] += 1
            continue
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                edit(fast)
                if name in CONVERSIONS and armed(fast) is not None:
                    res["rearmed"] += 1  # (the forwards below run on the states the re-armed copy derives anew)
                got = _run(fast, calls) + _run(fast, calls)
        except Exception as e:  # noqa: BLE001 - raising is allowed, only counted
            res["loud"].append(f"{name}: {type(e).__name__}")
            continue
        if any(str(w.message).startswith("fusedconv:") for w in said):
            res["loud"].append(f"{name}: warned")  # (train(): fused layers keep their BN folded, and say so)
            continue
        err = max(_error(got, want), _state_error(fast, ref))
        if _state_error(fast, ref) > tol or _beyond(_error(got, want), tol, got, want, twin, calls):
            res["silent"].append((name, err))
        else:
            res["ok"] += 1
    return res


def _seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def render(results: list[dict], meta: dict) -> str:
    n_edits = sum(r["edits"] for r in results)
    kinds = collections.Counter(k for r in results for k in r["kinds"])
    wrong = [r for r in results if r["wrong"]]
    raised = [r for r in results if r["raised"]]
    not_run = [r for r in results if r.get("not_run")]
    lines = ["# Random home-made models: converted and edited against the original (bench/random_sweep.py)", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, code {meta.get('commit', 'unknown')}, "
             f"`{meta['command']}`, {meta['seconds']:.0f} s", "",
             "| seeds | converted exactly | convert silently different | convert or its calls raised | edits | "
             "exact | raised (converted only) | silently different | skipped |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {len(results)} | {len(results) - len(wrong) - len(raised) - len(not_run)} | {len(wrong)} "
             f"| {len(raised)} "
             f"| {n_edits} "
             f"| {sum(r['ok'] for r in results)} | {sum(len(r['loud']) for r in results)} "
             f"| {sum(len(r['silent']) for r in results)} | {sum(r['skipped'] for r in results)} |", "",
             f"Edits made on an armed copy (fusedconv/graph/reach.py: the edit itself must escape it): "
             f"{sum(r.get('armed_edits', 0) for r in results)} of {n_edits}; conversions (`{CONVERSIONS[0]}`, "
             f"`{CONVERSIONS[1]}`) after which the copy was still armed (re-armed, its next forwards on states derived "
             f"anew): {sum(r.get('rearmed', 0) for r in results)}.", "",
             "Blocks generated: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())), ""]
    if not_run:
        lines += [f"Not tested: {len(not_run)} generated model(s) the original cannot run on any call (seeds "
                  f"{', '.join(str(r['seed']) for r in not_run)}).", ""]
    for r in wrong:
        lines.append(f"- seed {r['seed']} ({', '.join(r['kinds'])}): converted {r['convert_error']:.3e} away")
    for r in raised:
        lines.append(f"- seed {r['seed']} ({', '.join(r['kinds'])}) raised: {r['raised']}")
    for r in results:
        for name, err in r["silent"]:
            lines.append(f"- seed {r['seed']}: {name}: {err:.3e}")
        for entry in r["loud"]:
            lines.append(f"- seed {r['seed']} (raised): {entry}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.random_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-49", help="seeds, e.g. 0-199 or 3,17,40-45")
    p.add_argument("--no-edits", action="store_true", help="only convert's own exactness")
    p.add_argument("--max-blocks", type=int, default=5)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="float32 runs the CPU fast paths (oneDNN), against the original in float32")
    p.add_argument("--show", type=int, help="print the model source of this seed and exit")
    p.add_argument("--md", help="write the report here")
    args = p.parse_args(argv)
    if args.show is not None:
        print(random_models.model_source(args.show, args.max_blocks).source)
        return 0
    torch.set_num_threads(1)
    t0 = time.time()
    results = []
    for seed in _seeds(args.seeds):
        r = sweep_seed(seed, edits=not args.no_edits, max_blocks=args.max_blocks, dtype=getattr(torch, args.dtype))
        results.append(r)
        bad = len(r["silent"]) + bool(r["raised"]) + r["wrong"]
        print(f"seed {seed}: {', '.join(r['kinds'])}: convert {r['convert_error']}, {r['edits']} edits, "
              f"{len(r['loud'])} loud, {bad} bad", flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": cpu_name(), "torch": torch.__version__, "commit": git_commit() or "unknown",
            "command": "python -m bench.random_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": time.time() - t0}
    text = render(results, meta)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)
    return 1 if any(r["silent"] or r["raised"] or r["wrong"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
