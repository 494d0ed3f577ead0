"""Edits after convert, swept over models: does the converted model see every hook, appended module and replaced
stand-in the way its own forward would?

Per model (built with random weights, BN statistics measured on an input and perturbed, float64): convert it once,
then for every submodule path of the converted model, one edit at a time on a fresh copy —
  * a forward hook scaling the output by 1.5 (not on fusedconv's own layers: a hook on a fused layer sees the fused
    output, README "Architecture"), and with `--pre-hooks` a pre-hook halving the input;
  * an nn.Identity (a folded BN's stand-in) replaced by a module scaling by 1.5;
  * a module scaling by 1.5 appended to an nn.Sequential;
  * with `--settings`, each public setting of a module that is not fusedconv's own changed (`setting_edits`: a float
    times 1.5, a bool flipped, an int or a tuple of ints one more, a string swapped for another the same torch
    argument takes: an activation's slope or bound, a pool's size or ceil_mode, a block's flag);
  * with `--tensors`, each floating-point parameter and buffer scaled by 1.5 in place (fusedconv's own included: the
    fused layers' weight, scale and shift, which their version counters must show as edited) —
run the converted model as convert left it (its guarded rewrites and whole-model flat forward) and, as the
reference, a copy of it with every guarded block sent to its exact fallback (the block's own forward over stand-ins
computing what the original children computed, graph/roles.py; the flat root's fallback is the model's own forward).
Both get the same edit. An output that differs by more than 1e-9 (relative) is a silent error; an edit only the
converted model raises on is listed as loud (allowed, counted); an edit the reference raises on is skipped.

`python -m bench.zoo_edits --models torchvision:mobilenet_v2,torchvision:resnet18 --md out.md` (one torch thread;
~1-2 s per edit on a 2-core CPU at 64x64).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys

import torch
import torch.nn as nn

import fusedconv
from bench.env import cpu_name, git_commit
from bench.zoo_models import BY_SPEC, resolve
from fusedconv.graph.specialize import guard_table
from fusedconv.model_specs import build_model, randomize_batchnorm

TOL = 1e-9


class Scale(nn.Module):
    def forward(self, x):
        return x * 1.5 if torch.is_tensor(x) else x


def _scale_output(module, args, output):
    return output * 1.5 if torch.is_tensor(output) else output


def _halve_input(module, args):
    return tuple(a * 0.5 if torch.is_tensor(a) else a for a in args)


def rel_error(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(rel_error(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return max(rel_error(a[k], b[k]) for k in a)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def all_fallback(model: nn.Module) -> nn.Module:
    """`model` (in place) with every guarded block sent to its fallback: its dispatch runs the fallback, and its
    select answers "no specialization" (owned_input.OwnedInputSequential and the flat forward ask it)."""
    for m in model.modules():
        t = guard_table(m)
        if t is not None:
            t.dispatch = (lambda t: lambda self, *a, **k: t.fallback(self, *a, **k))(t)
            t.select = lambda self, *a, **k: -1
    return model


# A string setting's other value (the same argument of a torch layer or function takes both).
_OTHER_STRING = {"none": "tanh", "tanh": "none", "nearest": "bilinear", "bilinear": "nearest", "zeros": "reflect",
                 "reflect": "zeros", "mean": "sum", "sum": "mean"}


def _changed(value):
    """`value` changed the way the module doc says, or None when there is no such change."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 if value else 0.25
    if isinstance(value, str):
        return _OTHER_STRING.get(value)
    if isinstance(value, tuple) and value and all(type(v) is int for v in value):
        return tuple(v + 1 for v in value)
    return None


def setting_edits(converted: nn.Module) -> list[tuple[str, object]]:
    """(name, edit(model)) for each public setting of each module of `converted` not fusedconv's own (module doc):
    its instance attributes but `training`."""
    out = []
    for path, mod in converted.named_modules():
        if type(mod).__module__.startswith("fusedconv"):
            continue
        for attr, value in mod.__dict__.items():
            new = None if attr.startswith("_") or attr == "training" else _changed(value)
            if new is not None:
                out.append((f"{path or '<root>'}.{attr} = {new!r}",
                            lambda m, p=path, a=attr, v=new: setattr(m.get_submodule(p), a, v)))
    return out


def _scale_tensor(model: nn.Module, name: str) -> None:
    params = dict(model.named_parameters())
    t = params[name] if name in params else model.get_buffer(name)
    with torch.no_grad():
        t.mul_(1.5)


def tensor_edits(converted: nn.Module) -> list[tuple[str, object]]:
    """(name, edit(model)) scaling each floating-point parameter and buffer of `converted` in place (module doc)."""
    names = [n for n, t in [*converted.named_parameters(), *converted.named_buffers()] if t.is_floating_point()]
    return [(f"{n} *= 1.5", lambda m, n=n: _scale_tensor(m, n)) for n in names]


def edits(converted: nn.Module, pre_hooks: bool = False, settings: bool = False,
          only_settings: bool = False, tensors: bool = False) -> list[tuple[str, object]]:
    """(name, edit(model)) for every submodule path of `converted` (module doc)."""
    out = setting_edits(converted) if settings or only_settings else []
    out += tensor_edits(converted) if tensors else []
    for path, mod in [] if only_settings else converted.named_modules():
        if not path:
            continue
        if not type(mod).__module__.startswith("fusedconv"):
            out.append((f"forward hook on {path}",
                        lambda m, p=path: m.get_submodule(p).register_forward_hook(_scale_output)))
            if pre_hooks:
                out.append((f"pre-hook on {path}",
                            lambda m, p=path: m.get_submodule(p).register_forward_pre_hook(_halve_input)))
        if type(mod) is nn.Identity:
            out.append((f"{path} replaced", lambda m, p=path: _replace(m, p, Scale())))
        if isinstance(mod, nn.Sequential):
            out.append((f"module appended to {path}", lambda m, p=path: m.get_submodule(p).append(Scale())))
    return out


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    (model.get_submodule(parent) if parent else model)._modules[name] = new


def sweep_model(model: nn.Module, x: torch.Tensor, convert=fusedconv.convert, pre_hooks: bool = False,
                settings: bool = False, only_settings: bool = False, tensors: bool = False) -> dict:
    """Every edit of `edits` on `model` (float64, eval) converted by `convert`; counts and the silent ones."""
    converted = convert(model)
    res = {"edits": 0, "ok": 0, "loud": [], "silent": [], "skipped": 0}
    for name, edit in edits(converted, pre_hooks, settings, only_settings, tensors):
        res["edits"] += 1
        fast, ref = copy.deepcopy(converted), all_fallback(copy.deepcopy(converted))
        with torch.no_grad():
            fast(x)
            fast(x)  # routes chosen, flat forward in place
            try:
                edit(ref)
                want = ref(x)
            except Exception:  # noqa: BLE001 - an edit the model's own forward rejects proves nothing here
                res["skipped"] += 1
                continue
            try:
                edit(fast)
                got = [fast(x), fast(x)]
            except Exception as e:  # noqa: BLE001 - raising is allowed, only counted
                res["loud"].append(f"{name}: {type(e).__name__}")
                continue
        err = max(rel_error(g, want) for g in got)
        if err > TOL:
            res["silent"].append((name, err))
        else:
            res["ok"] += 1
    return res


def run(spec: str, size: int, pre_hooks: bool, settings: bool = False, only_settings: bool = False,
        tensors: bool = False) -> dict:
    torch.manual_seed(0)
    # (the zoo's own entries, `home:` models included, as bench/zoo.py builds them)
    model = resolve([spec])[0].build(size).eval() if spec in BY_SPEC else build_model(spec).eval()
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    randomize_batchnorm(model, 0, example_inputs=example)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return sweep_model(model.double(), x, pre_hooks=pre_hooks, settings=settings, only_settings=only_settings,
                       tensors=tensors)


def render(results: dict, meta: dict) -> str:
    lines = ["# Edits after convert (bench/zoo_edits.py)", "",
             f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, code {meta.get('commit', 'unknown')}, "
             f"`{meta['command']}`", "",
             "| model | edits | exact | raised (converted only) | silently different | skipped |",
             "|---|---|---|---|---|---|"]
    for spec, r in results.items():
        lines.append(f"| {spec} | {r['edits']} | {r['ok']} | {len(r['loud'])} | {len(r['silent'])} | {r['skipped']} |")
    for spec, r in results.items():
        for name, err in r["silent"]:
            lines.append(f"- {spec}: {name}: {err:.3e}")
        for entry in r["loud"]:
            lines.append(f"- {spec} (raised): {entry}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.zoo_edits", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="comma-separated model specs (source:name[:encoder])")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pre-hooks", action="store_true", help="also a pre-hook on every path")
    p.add_argument("--settings", action="store_true", help="also change every module setting (module doc)")
    p.add_argument("--only-settings", action="store_true",
                   help="the setting edits (and --tensors ones) without the hooks, stand-ins and appends")
    p.add_argument("--tensors", action="store_true", help="also scale every parameter and buffer in place")
    p.add_argument("--md", help="write the table here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for spec in args.models.split(","):
        results[spec] = r = run(spec, args.size, args.pre_hooks, args.settings, args.only_settings, args.tensors)
        print(f"{spec}: {r['edits']} edits, {r['ok']} exact, {len(r['loud'])} raised, {len(r['silent'])} silent",
              flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": cpu_name(), "torch": torch.__version__, "commit": git_commit() or "unknown",
            "command": "python -m bench.zoo_edits " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = render(results, meta)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    print(text)
    return 1 if any(r["silent"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
