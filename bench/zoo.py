"""Model-zoo sweep: does `fusedconv.convert` just work, and stay exact, on many real models?

`python -m bench.zoo [--models SPEC,SPEC|--set default|tiny] [--size 64] [--batch 2] [--json PATH] [--md PATH]`

Per model (random weights, BatchNorm statistics measured on a random input of the model's shape and then perturbed
— `randomize_batchnorm(model, seed, example_inputs)`, so that the output depends on every layer; blind statistics
leave an inverted-residual net's output nearly independent of its early layers — eval mode, nothing downloaded):
- float64: the original cast to float64 is converted (`fusedconv.convert(model, return_report=True)`) and both run
  on the same random input; error = max over output tensors of max |converted - original| / max |original|
  (per tensor). Exact means <= EXACT_FLOAT64 (1e-10): float64 rounding over a whole network stays near 1e-14 on
  most models; an ill-conditioned one amplifies it (randomly initialized regnety_016 and efficientvit_m0: 4e-11
  and 6e-11, where a 1e-12 relative change of the input moves their float64 output by 2e-8 and 7e-11), still far
  below what a wrong rewrite gives.
- float32 default path: the float32 model converted and run on NCHW float32 input (the CPU layout boundary's
  path), within the library's self-check tolerance for float32 of the original's float32 output, or of its float64
  output, or within twice the original's own float32 error against that (`_float32_checks`: models ill-conditioned
  at float32; the original's own error taken over layouts, thread counts and other float32 roundings of the
  input).
- float32 variants a user meets (`_float32_checks`): the input already channels_last, the call inside
  torch.inference_mode, another spatial size (batch 1, 32 more pixels a side; also in float64, exact), each judged
  like the float32 default path above (a model built for one size, or whose original refuses the other, skips it).
- after a reach (`_reach_checks`, last): `vars()` of the float32 converted model, then three calls; the CPU layout
  boundary compares a model no longer armed on every call (fusedconv/cpu_boundary.py `_tree`): a layout check in
  those calls (each one three forwards) is a finding, and so is the model pinned to NCHW for it; the last output's
  error against the original is recorded (`reached_err32`).
- autocast: original and converted float32 models in the same `torch.autocast("cpu", dtype=torch.bfloat16)`
  region (fusedconv/autocast.py), twice: the same output dtypes, and the converted error against the float64
  original at most twice the original's own plus one bfloat16 unit in the last place (AUTOCAST_DTYPE).
- layers: convs in the original, fused layers (by kind) and convs left in the converted model, BatchNorm modules
  left, and the batch-norm / convolution ops one forward runs before -> after (aten level: a BN module kept
  beside its fused copy is in the model but does not run);
  report rows fused / skipped with the skip reasons counted; guarded blocks.
- state_dict promise (README / docs/SUPPORT.md, graph/scope_rewrite.py): a fused layer holds `weight` (the
  conv's, unchanged), `scale`, `shift` (and `post_scale` / `post_shift` for a BN after the activation), at its
  conv's path, or, for a conv the block reaches as a grandchild (`self.convs[i]`) or whose parameters its
  forward also reads, under a new flat name (`convs_0`, `conv_fused`) with the original conv and BN kept in
  place (both in the state_dict: listed as `fused_copies`); the folded BatchNorms' keys and the fused conv's
  `bias` are gone; a BN folded into the following layer changes that layer's values (and may add its bias);
  a re-parameterized block holds `reparam_conv*` instead of its branches; every other key is unchanged, value
  included. Anything else is reported as a problem.
- guard fallbacks (`fallback_errors`): every guarded block's exact fallback (its own forward over the stand-ins of
  the children convert changed, what a call runs when it misses the block's guards) called directly, in float64,
  on the input the original model gave that block, against the original block (<= EXACT_FLOAT64).
- input gradient (`input_gradients`): in grad mode, the gradient of a fixed random weighting of the outputs with
  respect to the input, converted against original (float64, <= EXACT_FLOAT64, or within twice the original's own
  spread when only rounding changes, `own_gradient_error`, for a backward that amplifies rounding).
- `copy.deepcopy`, `torch.save` / `torch.load(weights_only=False)` of the converted model give the same output;
  a second batch size gives the original's result (float64 and float32).
Each failing check is listed in the model's `findings`.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import io
import json
import os
import platform
import re
import signal
import sys
import time
import traceback
from collections import Counter

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import fusedconv
from fusedconv.graph.flat import flat_check
from fusedconv.model_reach import armed
from fusedconv.graph.specialize import guard_table
from fusedconv import fold
from fusedconv.comparison import SELF_CHECK_TOLERANCE
from fusedconv.fused_layers import FusedAffineLayer
from fusedconv.fused_linear import FusedLinear
from fusedconv.model_specs import randomize_batchnorm
from fusedconv.modules import FusedConv2d

from bench.zoo_models import DEFAULT_SET, TINY_SET, ZooModel, resolve

EXACT_FLOAT64 = 1e-10
AUTOCAST_DTYPE = torch.bfloat16
FUSED_KEYS = {"weight", "scale", "shift", "post_scale", "post_shift"}


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def rel_error(out, ref) -> float:
    """max over tensor leaves of max |out - ref| / max |ref|; inf where finiteness differs; raises on structure."""
    outs, spec_o = tree_flatten(out)
    refs, spec_r = tree_flatten(ref)
    if spec_o != spec_r:
        raise RuntimeError(f"output structure differs: {spec_o} vs {spec_r}")
    worst = 0.0
    for o, r in zip(outs, refs):
        if not isinstance(r, torch.Tensor):
            if o != r:
                return float("inf")
            continue
        if o.shape != r.shape:
            raise RuntimeError(f"output shape {tuple(o.shape)} vs original {tuple(r.shape)}")
        if not r.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(o, r) else float("inf"))
            continue
        o, r = o.detach().double(), r.detach().double()
        if not torch.equal(o.isfinite(), r.isfinite()):
            return float("inf")
        if r.numel():
            ok = r.isfinite()
            denom = r[ok].abs().max().clamp_min(1e-30) if ok.any() else torch.tensor(1.0, dtype=torch.float64)
            worst = max(worst, float((o[ok] - r[ok]).abs().max() / denom) if ok.any() else 0.0)
    return worst


def fused_kind(m: nn.Module) -> str | None:
    if isinstance(m, FusedLinear):
        return "linear"
    if isinstance(m, (FusedConv2d, FusedAffineLayer)):
        return "conv"
    return None


def count_layers(original: nn.Module, converted: nn.Module) -> dict:
    conv = nn.modules.conv._ConvNd
    return {"convs": sum(isinstance(m, conv) for m in original.modules()),
            "bns": sum(fold.is_batchnorm(m) for m in original.modules()),
            "fused_conv": sum(fused_kind(m) == "conv" for m in converted.modules()),
            "fused_linear": sum(fused_kind(m) == "linear" for m in converted.modules()),
            "convs_left": sum(isinstance(m, conv) for m in converted.modules()),
            "bns_left": sum(fold.is_batchnorm(m) for m in converted.modules())}


def reason_key(kind: str, detail: str) -> str:
    """'kind: reason' without the names of the model's own modules, so reasons can be counted across models."""
    detail = re.sub(r"^[\w.]+: ", "", detail)  # "conv1.bn: BatchNormAct2d applies ..." names the module first
    text = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", detail)
    text = re.sub(r"\b\d+\b", "N", text)
    return f"{kind}: " + text.split(";")[0].strip()[:120]


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _kept_original(path: str, original: dict) -> str | None:
    """The original conv a fused layer registered under a new flat name stands for (`a.convs_0` for the
    ModuleList grandchild `a.convs.0`, `a.conv_fused` for `a.conv` whose parameters the forward also reads)."""
    scope, _, name = path.rpartition(".")
    prefix = scope + "." if scope else ""
    stem = name[:-len("_fused")] if name.endswith("_fused") else name
    parts = stem.split("_")
    for mask in range(2 ** (len(parts) - 1)):  # every way of reading each "_" as "." or as itself
        dotted = parts[0]
        for i, part in enumerate(parts[1:]):
            dotted += ("." if mask >> i & 1 else "_") + part
        if isinstance(original.get(prefix + dotted), (nn.modules.conv._ConvNd, nn.Linear)):
            return prefix + dotted
    return None


def state_dict_problems(original: nn.Module, converted: nn.Module, report=None) -> tuple[list[str], list[str]]:
    """(keys / values of the converted model's state_dict the documented promise does not explain, fused layers
    kept beside their original conv under a new name: `new <- original`)."""
    before, after = original.state_dict(), converted.state_dict()
    modules = dict(original.named_modules())
    fused = {n for n, m in converted.named_modules() if fused_kind(m)}
    bn_paths = {n for n, m in modules.items() if fold.is_batchnorm(m)}
    reparam_blocks = {_owner(n) for n, _ in converted.named_modules()
                      if re.fullmatch(r"reparam_conv(_\d+)?", n.rsplit(".", 1)[-1])}
    # convert folds a BN directly before a conv / linear into that layer's own weight and bias (report kind
    # "bn_before_layer"): that layer's values change, its keys stay (a bias may appear).
    absorbed = {".".join(filter(None, (r.scope, r.nodes[-1]))) for r in (report.fused if report else ())
                if r.kind == "bn_before_layer"}
    copies = {p: _kept_original(p, modules) for p in fused if before.get(p + ".weight") is None}
    problems = []
    for key in sorted(set(before) - set(after)):
        owner, leaf = _owner(key), key.rsplit(".", 1)[-1]
        if owner in bn_paths or (owner in fused and leaf == "bias") \
                or any(_under(owner, b) for b in reparam_blocks):
            continue
        problems.append(f"missing {key}")
    for key in sorted(set(after) - set(before)):
        owner, leaf = _owner(key), key.rsplit(".", 1)[-1]
        if (owner in fused and leaf in FUSED_KEYS) or any(_under(owner, b) for b in reparam_blocks) \
                or (owner in absorbed and leaf == "bias"):
            continue
        problems.append(f"unexpected {key}")
    for key in sorted(set(before) & set(after)):
        a, b = before[key], after[key]
        if any(_under(_owner(key), r) for r in reparam_blocks) or _owner(key) in absorbed:
            continue
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b)):
            problems.append(f"changed {key}")
    kept = []
    for path, orig in sorted(copies.items()):
        if orig is None:
            if not any(_under(path, b) for b in reparam_blocks):  # (a merged conv stands for its branches)
                problems.append(f"fused layer {path} stands for no conv / linear of the original")
        elif not torch.equal(after[path + ".weight"], before[orig + ".weight"]):
            problems.append(f"fused layer {path}: weight differs from {orig}.weight")
        else:
            kept.append(f"{path} <- {orig}")
    return problems, kept


class _OpCounter(TorchDispatchMode):
    """Counts the batch-norm and convolution ops one forward runs (aten level, whatever module runs them)."""

    def __init__(self):
        super().__init__()
        self.bn = self.conv = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.bn += "batch_norm" in name
        self.conv += "convolution" in name
        return func(*args, **(kwargs or {}))


def ops_run(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(batch-norm ops, convolution ops) of one forward."""
    counter = _OpCounter()
    with counter:
        model(x)
    return counter.bn, counter.conv


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("model took longer than --timeout")


def run_model(entry: ZooModel, size: int = 64, batch: int = 2, seed: int = 0) -> dict:
    """Every check of the sweep on one model; a dict of plain values (see the module docstring)."""
    res: dict = {"model": entry.spec, "source": entry.source, "build": False, "convert": False, "findings": []}
    find = res["findings"].append
    try:
        torch.manual_seed(seed)
        model = entry.build(size)
        shape = entry.input_shape(size, batch)
        example = torch.randn((max(2, shape[0]),) + tuple(shape[1:]),
                              generator=torch.Generator().manual_seed(seed + 7))
        randomize_batchnorm(model, seed, example_inputs=example)
        res["build"] = True
    except Timeout:
        raise
    except Exception as e:  # noqa: BLE001 - a model that does not build is listed, not fatal
        res["build_error"] = first_line(e)
        return res
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    res["input"] = list(shape)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x_other = torch.randn((1,) + shape[1:], generator=gen, dtype=torch.float64)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        try:
            ref = model64(x)
        except Timeout:
            raise
        except Exception as e:  # noqa: BLE001
            res["build_error"] = "original forward: " + first_line(e)
            res["build"] = False
            return res
        t0 = time.perf_counter()
        try:
            fused64, report = fusedconv.convert(model64, return_report=True)
        except Timeout:
            raise
        except Exception as e:  # noqa: BLE001 - a crash in convert is a finding
            res["convert_error"] = first_line(e)
            find("convert (float64) raised " + first_line(e))
            return res
        res["convert_s"] = round(time.perf_counter() - t0, 3)
        res["convert"] = True
        # Armed (fusedconv/graph/reach.py: no reach yet, its forwards skip the checks of its modules and tensors)?
        # Its first float64 forward, right here, runs that path; everything below reaches into it.
        res["armed"] = armed(fused64) is not None
        first64 = _checked(lambda: rel_error(fused64(x), ref), res, "float64 forward (armed)")
        res["armed_after_call"] = armed(fused64) is not None
        dims = {t.dim() for t in model64.parameters()} & {4, 5}
        if res["armed_after_call"] and len(dims) == 1:
            # Conversions that change no value keep it armed (graph/reach.py `rearm`): the weights to channels_last
            # (a video model's to channels_last_3d; PyTorch refuses either on a model holding both kinds of conv)
            # and back, each followed by a forward on the states derived anew; both errors count in err64.
            after = []
            for fmt in (torch.channels_last if dims == {4} else torch.channels_last_3d, torch.contiguous_format):
                fused64.to(memory_format=fmt)
                after.append(_checked(lambda: rel_error(fused64(x), ref), res, "float64 forward after .to()"))
            res["armed_after_to"] = armed(fused64) is not None
            if first64 is not None and None not in after:
                first64 = max(first64, *after)
        res.update(count_layers(model64, fused64))
        res["rows_fused"] = len(report.fused)
        res["fused_kinds"] = dict(Counter(r.detail for r in report.fused))
        res["skip_reasons"] = dict(Counter(reason_key(r.kind, r.detail) for r in report.skipped))
        res["skipped_detail"] = [f"{r.kind} {r.scope or '<root>'}: {' -> '.join(r.nodes)}: {r.detail}"
                                 for r in report.skipped]
        res["guards"] = len(report.guards)
        res["notes"] = list(report.notes)
        flat_table = guard_table(fused64)
        res["flat"] = flat_check(fused64) is not None
        res["err64"] = _checked(lambda: rel_error(fused64(x), ref), res, "float64 forward")
        if first64 is not None and res["err64"] is not None:
            res["err64"] = max(res["err64"], first64)  # (the armed call's error counts too)
        res["exact64"] = res["err64"] is not None and res["err64"] <= EXACT_FLOAT64
        if res["err64"] is not None and not res["exact64"]:
            find(f"float64 mismatch {res['err64']:.3e}")
        res["state_dict_problems"], res["fused_copies"] = state_dict_problems(model64, fused64, report)
        if res["state_dict_problems"]:
            find(f"state_dict: {len(res['state_dict_problems'])} unexplained key(s), "
                 f"e.g. {res['state_dict_problems'][0]}")
        counts = _checked(lambda: (ops_run(model64, x), ops_run(fused64, x)), res, "op count")
        if counts is not None:
            (res["bn_ops"], res["conv_ops"]), (res["bn_ops_left"], res["conv_ops_left"]) = counts
        own = _checked(lambda: fused64(x), res, "converted forward")
        if own is not None:
            res["deepcopy_err"] = _checked(lambda: rel_error(copy.deepcopy(fused64)(x), own), res, "deepcopy")
            res["pickle_err"] = _checked(lambda: rel_error(_save_load(fused64)(x), own), res, "torch.save/load")
            for what in ("deepcopy_err", "pickle_err"):
                if res[what] is not None and res[what] > 0:
                    find(f"{what[:-4]} round trip changes the output by {res[what]:.3e}")
        if res["flat"]:
            # Every float64 call above (both batch sizes, the copies' own tables aside) took the flat graph?
            res["flat_fallbacks"] = flat_table.fallback_calls
            if flat_table.fallback_calls:
                find(f"flat forward left on {flat_table.fallback_calls} call(s) of an unchanged model")
        fallbacks = _checked(lambda: fallback_errors(model64, fused64, x), res, "guard fallbacks")
        if fallbacks is not None:
            res["fallback_blocks"] = len(fallbacks)
            res["fallback_err64"] = max(fallbacks.values(), default=None)
            wrong = {p: e for p, e in fallbacks.items() if not e <= EXACT_FLOAT64}
            if wrong:
                path, err = max(wrong.items(), key=lambda kv: kv[1])
                find(f"guard fallback: {len(wrong)} of {len(fallbacks)} guarded blocks differ from the original "
                     f"when their own forward runs, worst {path or '<root>'} {err:.3e}")
        try:
            grads = input_gradients(model64, x)
        except Timeout:
            raise
        except Exception as e:  # noqa: BLE001 - the original's own backward fails: nothing to compare
            grads, res["grad_note"] = None, "original: " + first_line(e)
        if grads is not None:
            res["grad_err64"] = _checked(lambda: rel_error(input_gradients(fused64, x), grads), res, "input gradient")
            if res["grad_err64"] is not None and not res["grad_err64"] <= EXACT_FLOAT64:
                # Ill-conditioned backward (attention with random weights): judged against the original's own spread.
                own = _checked(lambda: own_gradient_error(model64, x, grads), res, "input gradient spread")
                res["grad_own64"] = own
                if own is None or not res["grad_err64"] <= 2 * own:
                    find(f"input gradient differs from the original's by {res['grad_err64']:.3e} (the original's "
                         f"own spread {own if own is None else format(own, '.3e')})")
        ref_other = _checked(lambda: model64(x_other), res, "batch 1 float64 original")
        if ref_other is not None:
            res["batch1_err64"] = _checked(lambda: rel_error(fused64(x_other), ref_other), res, "batch 1 float64")
        if res.get("batch1_err64") is not None and res["batch1_err64"] > EXACT_FLOAT64:
            find(f"batch 1 float64 mismatch {res['batch1_err64']:.3e}")
        # Another spatial size (batch 1; 32 more pixels a side, a multiple of 32 stays one), unless the model is
        # built for one size (fixed_size / clips) or the original refuses it.
        size2 = None
        if not entry.fixed_size and not entry.frames:
            x_size2 = torch.randn(entry.input_shape(max(size, entry.min_size) + 32, 1), generator=gen,
                                  dtype=torch.float64)
            try:
                size2 = (x_size2, model64(x_size2))
            except Timeout:
                raise
            except Exception as e:  # noqa: BLE001 - the original's own limit: nothing to compare
                res["size2_note"] = first_line(e)
        if size2 is not None:
            res["size2_err64"] = _checked(lambda: rel_error(fused64(size2[0]), size2[1]), res,
                                          "second size float64")
            if res["size2_err64"] is not None and res["size2_err64"] > EXACT_FLOAT64:
                find(f"second size float64 mismatch {res['size2_err64']:.3e}")
        fused32 = _float32_checks(model, x, x_other, res, ref, ref_other, size2)
        if fused32 is not None:
            _autocast_checks(model, fused32, x.float(), ref, res)
            _reach_checks(model, fused32, x.float(), res)  # last: it ends the converted model's armed state
    return res


def _reach_checks(model: nn.Module, fused32: nn.Module, x32: torch.Tensor, res: dict) -> None:
    """After a reach (the CPU layout boundary then compares the model's modules, tensors and settings on every call,
    fusedconv/cpu_boundary.py `_tree`), three calls: the layout checks they ran, 0 unless the model changes itself
    in a way the check cannot tell from an edit (a finding: three forwards per call), whether that pinned it to
    NCHW, and the last output's error against the original float32 model's (`reached_err32`, recorded)."""
    reached = _checked(lambda: _after_reach(fused32, x32), res, "float32 forwards after a reach")
    if reached is None:
        return
    y, res["layout_checks_after_reach32"], res["pinned32"] = reached
    res["reached_err32"] = _checked(lambda: rel_error(y, model(x32)), res, "float32 after a reach")
    if res["layout_checks_after_reach32"]:
        res["findings"].append(f"after a reach, {res['layout_checks_after_reach32']} layout check(s) in 3 calls of "
                               f"an unchanged model{' (pinned to NCHW)' if res['pinned32'] else ''}")


def fallback_errors(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per guarded block of `converted` (a convert table: graph/specialize.py), the error of its exact fallback —
    the block's own forward over the stand-ins of the children the rewrite changed (graph/roles.py), what a call
    runs when it misses the block's guards; for a whole-model flat forward (graph/flat.py), the converted model's
    forward as if it had none — against the original block at the same path, on the input the
    original model's forward gave that block (its first call; relative error, inf when only one of them raises).
    A call that misses a guard is rare (an attribute or call pattern changed), so no output check of the whole
    model reaches this code: it is called here directly."""
    blocks = {path: m for path, m in converted.named_modules()
              if (t := guard_table(m)) is not None and t.kind == "convert"}
    calls: dict[str, tuple] = {}
    handles = []

    def record(path):
        def hook(module, args, kwargs):
            if path not in calls:
                calls[path] = _cloned((args, kwargs))
        return hook

    originals = dict(original.named_modules())
    for path in blocks:
        if path in originals:
            handles.append(originals[path].register_forward_pre_hook(record(path), with_kwargs=True))
    try:
        with torch.no_grad():
            original(x)
    finally:
        for h in handles:
            h.remove()
    errors = {}
    for path, (args, kwargs) in calls.items():
        def run(fn):
            a, k = _cloned((args, kwargs))  # (a block may write into its input)
            try:
                with torch.no_grad():
                    return fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - compared below: raising on one side only is a difference
                return e
        want = run(originals[path])
        block = blocks[path]
        got = run(lambda *a, **k: guard_table(block).fallback(block, *a, **k))
        if isinstance(want, Exception) or isinstance(got, Exception):
            errors[path] = 0.0 if type(want) is type(got) else float("inf")
        else:
            errors[path] = rel_error(got, want)
    return errors


def _cloned(tree):
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, tree)


def input_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """d(sum of the outputs, each weighted by a fixed random tensor) / d(input), in grad mode: the path a user who
    differentiates through the model takes (FusedConv2d's differentiable route, fusedconv/modules.py; the CPU
    layout boundary and the flat forward's direct calls step aside for it). None when no output depends on the
    input through autograd."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        outs = [t for t in tree_flatten(model(x))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        gen = torch.Generator().manual_seed(3)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outs)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None
        return torch.autograd.grad(loss, x)[0]


def own_gradient_error(model: nn.Module, x: torch.Tensor, grads: torch.Tensor) -> float:
    """How far the original's own float64 input gradient moves from `grads` when only rounding changes: the input
    channels_last (another summation order in its convs), or times 1 + 1e-15 noise (two seeds). A model whose
    backward amplifies rounding (measured, random weights at 224x224: levit_conv_128s 9.8e-8 channels_last and 1.1e-7
    perturbed; efficientvit_m0 1.8e-8 / 1.5e-8) gives converted gradients as far off; the sweep allows twice this."""
    variants = [x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()])] \
        if x.dim() in (4, 5) else []
    for seed in (5, 6):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
        variants.append(x * (1 + 1e-15 * noise))
    return max(rel_error(input_gradients(model, v), grads) for v in variants)


def _checked(fn, res: dict, what: str):
    try:
        return fn()
    except Timeout:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a check is a finding
        res["findings"].append(f"{what} raised {first_line(e)}")
        return None


def _save_load(model: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# The float32 checks of `_float32_checks`: the first three always run, the others where they apply.
CHECKS32 = ("err32", "batch1_err32", "repeat_err32")
VARIANTS32 = ("cl_err32", "inference_err32", "size2_err32")


def checks32_hold(res: dict, ok) -> bool:
    """`ok(name)` holds for every float32 check of a model's results: each of CHECKS32 (which must have run) and
    each of VARIANTS32 that ran."""
    return all(res.get(w) is not None and ok(w) for w in CHECKS32) and all(
        ok(w) for w in VARIANTS32 if res.get(w) is not None)


def _float32_checks(model: nn.Module, x: torch.Tensor, x_other: torch.Tensor, res: dict, ref64=None,
                    ref64_other=None, size2=None) -> nn.Module | None:
    """The float32 model converted, run on NCHW float32 input at both batch sizes, a third time at the first, and
    in variants a user meets: the input already channels_last (4-d), the call inside torch.inference_mode, and
    another spatial size (`size2`: its float64 input and the original's float64 output, batch 1); the converted
    model (None when convert raised).

    A float32 difference above the tolerance is a finding unless the converted float32 output is within the
    tolerance of the original's float64 output on that input (`ref64` / `ref64_other`), or within twice the
    original's own float32 error against it (the project's "at most twice PyTorch's own error" rule, for models
    ill-conditioned at float32, which amplify rounding so much that two float32 forwards of the same function differ
    by more than the tolerance). The original's own error is the largest over a few ways PyTorch computes it and
    over a few other float32 roundings of the input (`_own_float32_error`): on such a model it spreads over an order
    of magnitude (randomly initialized efficientvit_m0 at 224x224: 2.8e-3 NCHW at one thread, 1.5e-2 channels_last
    at two, up to 4e-2 on its input perturbed within float32 rounding; a 1e-12 relative change of its input moves
    its float64 output by 7e-11). Such a check is listed (`within_own_error32`), with both distances, rather than
    reported as a mismatch."""
    tol = SELF_CHECK_TOLERANCE[torch.float32]
    res["tol32"] = tol
    x32, x32_other = x.float(), x_other.float()
    try:
        ref, ref_other = model(x32), model(x32_other)
        fused32 = fusedconv.convert(model)
    except Timeout:
        raise
    except Exception as e:  # noqa: BLE001
        res["findings"].append("convert (float32) raised " + first_line(e))
        return None
    got = {"err32": _checked(lambda: fused32(x32), res, "float32 forward"),
           "batch1_err32": _checked(lambda: fused32(x32_other), res, "batch 1 float32")}
    # A third call at the first size: signatures routed, so a flat forward's fused calls may go direct
    # (fusedconv/graph/flat_fused.py); its result must match too.
    direct = _checked(lambda: _direct_calls(fused32, x32), res, "float32 repeated forward")
    if direct is not None:
        got["repeat_err32"], res["direct32"], res["module_calls32"] = direct
    # Per check: its float64 input, the original's float32 output and its float64 output on it.
    wants = {"err32": (x, ref, ref64), "batch1_err32": (x_other, ref_other, ref64_other),
             "repeat_err32": (x, ref, ref64)}
    if x32.dim() == 4:
        got["cl_err32"] = _checked(lambda: fused32(x32.contiguous(memory_format=torch.channels_last)), res,
                                   "channels_last float32")
        wants["cl_err32"] = wants["err32"]
    got["inference_err32"] = _checked(lambda: _in_inference_mode(fused32, x32), res, "inference_mode float32")
    wants["inference_err32"] = wants["err32"]
    if size2 is not None:
        x2 = size2[0].float()
        ref2 = _checked(lambda: model(x2), res, "second size float32 original")
        if ref2 is not None:
            got["size2_err32"] = _checked(lambda: fused32(x2), res, "second size float32")
            wants["size2_err32"] = (size2[0], ref2, size2[1])
    for what, y in got.items():
        if y is not None:
            res[what] = _checked(lambda: rel_error(y, wants[what][1]), res, what)
    for what in CHECKS32 + VARIANTS32:
        if res.get(what) is None or res[what] <= tol:
            continue
        x_what, want, want64 = wants[what]
        distances = None if want64 is None else _checked(
            lambda: (_own_float32_error(model, x_what, want64), rel_error(got[what], want64)), res,
            what + " against float64")
        if distances is not None:
            own, converted = distances
            res.setdefault("vs_float64_32", {})[what] = {"original": own, "converted": converted}
            if converted <= max(tol, 2 * own):
                res.setdefault("within_own_error32", []).append(what)
                continue
        against = "" if distances is None else (f" (against float64: converted {distances[1]:.3e}, the original's "
                                                f"own up to {distances[0]:.3e})")
        res["findings"].append(f"{what}: float32 mismatch {res[what]:.3e} > {tol:g}{against}")
    res["match32"] = checks32_hold(res, lambda w: res[w] <= tol)
    return fused32


def _in_inference_mode(model: nn.Module, x: torch.Tensor):
    with torch.inference_mode():
        return model(x)


# How many other float32 roundings of a float32 check's input the original also runs (`_own_float32_error`).
INPUT_ROUNDINGS = 4


def _own_float32_error(model: nn.Module, x64: torch.Tensor, want64) -> float:
    """The original float32 model's error against its float64 output `want64` on the float64 input `x64`: the
    largest over NCHW and channels_last input (channels_last_3d for clips) at the sweep's thread count and at two
    threads, and over INPUT_ROUNDINGS other roundings of `x64` to float32 (`_rounded_inputs`): the spread of float32
    results PyTorch itself gives this model for this input (`_float32_checks`)."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    x32 = x64.float()
    layouts = [torch.contiguous_format] + ([formats[x32.dim()]] if x32.dim() in formats else [])
    threads = torch.get_num_threads()
    errors = [rel_error(model(x), want64) for x in _rounded_inputs(x64, INPUT_ROUNDINGS)]
    try:
        for n in dict.fromkeys((threads, 2)):
            torch.set_num_threads(n)
            errors += [rel_error(model(x32.contiguous(memory_format=f)), want64) for f in layouts]
    finally:
        torch.set_num_threads(threads)
    return max(errors)


def _rounded_inputs(x64: torch.Tensor, count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` float32 copies of `x64`, each element rounded to one of its two nearest float32 values at random
    (stochastic rounding) instead of to the nearest one. Each is as faithful a float32 copy of the float64 input as
    `x64.float()` (within one float32 unit in the last place of every element), so where the original's outputs on
    them differ from its output on `x64.float()` by more than the tolerance, no float32 computation of the model
    can be expected to be closer than that: the model amplifies the rounding of its own input (measured on randomly
    initialized efficientvit_m0 at 224x224, batch 1: its input perturbed by up to 2^-24 relative per element moved
    its float32 output 1.6e-2 to 4.0e-2 from float64)."""
    gen = torch.Generator().manual_seed(seed)
    nearest = x64.float()
    # The float32 neighbours below and above each element (equal where x64 is a float32 value already).
    below = torch.where(nearest.double() > x64, torch.nextafter(nearest, nearest.new_tensor(-float("inf"))), nearest)
    above = torch.where(below.double() < x64, torch.nextafter(below, below.new_tensor(float("inf"))), below)
    return [torch.where(torch.rand(x64.shape, generator=gen) < 0.5, below, above) for _ in range(count)]


def _dtypes(out) -> list:
    return [t.dtype for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _autocast_checks(model: nn.Module, fused32: nn.Module, x32: torch.Tensor, ref64, res: dict) -> None:
    """Original and converted in one CPU autocast region (module doc): output dtypes and errors against float64."""
    try:
        with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
            want = model(x32)
    except Timeout:
        raise
    except Exception as e:  # noqa: BLE001 - a model that does not run under autocast has nothing to compare
        res["autocast_note"] = "original raised " + first_line(e)
        return
    res["autocast_err_original"] = rel_error(want, ref64)
    for call in (1, 2):  # the second call takes the routes and caches the first one set up
        with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
            got = _checked(lambda: fused32(x32), res, f"autocast call {call}")
        if got is None:
            return
        if _dtypes(got) != _dtypes(want):
            res["findings"].append(f"autocast call {call}: output dtypes {_dtypes(got)}, original {_dtypes(want)}")
            return
        res["autocast_err"] = rel_error(got, ref64)
    bound = 2 * res["autocast_err_original"] + torch.finfo(AUTOCAST_DTYPE).eps
    res["autocast_ok"] = res["autocast_err"] <= bound
    if not res["autocast_ok"]:
        res["findings"].append(f"autocast: error {res['autocast_err']:.3e} > 2 x the original's "
                               f"{res['autocast_err_original']:.3e} + {torch.finfo(AUTOCAST_DTYPE).eps:g}")


def _after_reach(model: nn.Module, x: torch.Tensor, calls: int = 3) -> tuple:
    """vars(model) (a reach), then `calls` calls: (the last output, the CPU layout boundary's checks they ran,
    whether it pinned the model to NCHW)."""
    from fusedconv import cpu_boundary
    checks = []
    real = cpu_boundary._check
    cpu_boundary._check = lambda *args: checks.append(1) or real(*args)
    try:
        vars(model)
        for _ in range(calls):
            y = model(x)
    finally:
        cpu_boundary._check = real
    return y, len(checks), cpu_boundary._boundary(model).pinned


def _direct_calls(model: nn.Module, x: torch.Tensor) -> tuple:
    """model(x), with the number of oneDNN convolutions run outside a FusedConv2d module call (the flat forward's
    direct calls) and the number of FusedConv2d module calls on the CPU path."""
    from fusedconv import cpu
    counts = {"direct": 0, "module": 0, "depth": 0}
    saved = {name: getattr(cpu, name) for name in ("eager_forward", "_pointwise", "_pointwise_binary",
                                                    "_pointwise_binary_inplace")}

    def module_call(*args, **kwargs):
        counts["module"] += 1
        counts["depth"] += 1
        try:
            return saved["eager_forward"](*args, **kwargs)
        finally:
            counts["depth"] -= 1

    def op(name):
        def call(*args, **kwargs):
            if not counts["depth"]:
                counts["direct"] += 1
            return saved[name](*args, **kwargs)
        return call

    cpu.eager_forward = module_call
    for name in ("_pointwise", "_pointwise_binary", "_pointwise_binary_inplace"):
        if saved[name] is not None:
            setattr(cpu, name, op(name))
    try:
        y = model(x)
    finally:
        for name, fn in saved.items():
            setattr(cpu, name, fn)
    return y, counts["direct"], counts["module"]


def portable_traceback(limit: int = 2000) -> str:
    """The exception being handled, formatted without this machine's directories (results files are committed):
    installed packages from their package directory on, this checkout's files from its root."""
    text = re.sub(r'File "[^"]*?(?:site|dist)-packages/', 'File "', traceback.format_exc())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return text.replace(root + os.sep, "")[-limit:]


def with_timeout(entry: ZooModel, timeout: int, measure, **failed) -> dict:
    """`measure()` (one model's row) under a SIGALRM of `timeout` seconds; a timeout or any exception becomes the
    model's row instead (`failed` holds the caller's fields for a model that was not measured), so the sweep goes
    on. `total_s`: the seconds it took."""
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        res = measure()
    except Timeout as e:
        res = {"model": entry.spec, "source": entry.source, **failed, "error": str(e),
               "findings": [f"timed out after {timeout} s"]}
    except Exception as e:  # noqa: BLE001 - the sweep goes on
        res = {"model": entry.spec, "source": entry.source, **failed, "error": first_line(e),
               "findings": ["runner error " + first_line(e)], "traceback": portable_traceback()}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    return res


def run_one(entry: ZooModel, size: int, batch: int, timeout: int) -> dict:
    res = with_timeout(entry, timeout, lambda: run_model(entry, size, batch), build=False, convert=False)
    if "error" in res and "build_error" not in res:
        res["build_error"] = res["error"]  # the report lists it under "Not built"
    return res


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """--models / --set, --timeout, --json and --md: the arguments the zoo's sweeps share."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--models", help="comma-separated specs (torchvision:NAME, timm:NAME, smp:ARCH:ENCODER, home:NAME)")
    g.add_argument("--set", choices=("default", "tiny"), default="default")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model")
    p.add_argument("--json", help="write the results as JSON here (after every model)")
    p.add_argument("--md", help="write the markdown report here")


def add_input_arguments(p: argparse.ArgumentParser, size: int, threads: int, batch: bool = True) -> None:
    """--size (raised to a model's minimum), --batch (where the sweep takes one) and --threads, with these
    defaults."""
    p.add_argument("--size", type=int, default=size, help="image size (raised to a model's minimum)")
    if batch:
        p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=threads)


def parse_sweep_arguments(p: argparse.ArgumentParser, argv: list[str], counts: tuple[str, ...]) -> argparse.Namespace:
    """`argv` parsed; --size must be at least 8 and every option named in `counts` at least 1 (else `p.error`
    naming them); torch's thread count set from --threads."""
    args = p.parse_args(argv)
    if args.size < 8 or any(getattr(args, name) < 1 for name in counts):
        names = " / ".join(f"--{name}" for name in ("size",) + counts)
        got = " / ".join(str(getattr(args, name)) for name in ("size",) + counts)
        p.error(f"{names}: expected size >= 8 and the others >= 1, got {got}")
    torch.set_num_threads(args.threads)
    return args


def sweep(entries: list[ZooModel], run, status, render, meta: dict, json_path: str | None = None,
          md_path: str | None = None, **json_fields) -> list[dict]:
    """`run(entry)` for every model, its `status(row)` line printed as it comes; the JSON report (`meta`,
    `json_fields`, the rows) written after every model, so a sweep cut short keeps what it measured; the markdown
    report `render(rows, meta)` written at the end and its summary (the part before "## Models") printed."""
    results = []
    for entry in entries:
        res = run(entry)
        results.append(res)
        print(status(res), flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump({"meta": meta, **json_fields, "results": results}, f, indent=1, default=str)
    text = render(results, meta)
    if md_path:
        with open(md_path, "w") as f:
            f.write(text)
    print(text.split("## Models")[0])
    return results


def selected_models(args) -> list[ZooModel]:
    return resolve(args.models.split(",")) if args.models else (
        DEFAULT_SET if args.set == "default" else resolve(TINY_SET))


def environment(argv: list[str], prog: str = "bench.zoo") -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    from bench.env import cpu_name

    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": f"python -m {prog} " + " ".join(argv), "machine": cpu_name(),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "versions": {p: version(p) for p in ("torch", "torchvision", "timm", "segmentation_models_pytorch",
                                                  "triton", "fusedconv")}}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.zoo", description=__doc__.splitlines()[0])
    add_sweep_arguments(p)
    add_input_arguments(p, size=64, threads=1)
    args = parse_sweep_arguments(p, argv, ("batch", "threads"))
    from bench.zoo_report import render_markdown

    sweep(selected_models(args), lambda entry: run_one(entry, args.size, args.batch, args.timeout), status_line,
          render_markdown, environment(argv), args.json, args.md, exact_float64=EXACT_FLOAT64)
    return 0


def status_line(res: dict) -> str:
    if not res["build"]:
        return f"{res['model']:45s} BUILD FAILED {res.get('build_error') or res['findings']}"
    if not res["convert"]:
        return f"{res['model']:45s} CONVERT FAILED {res.get('convert_error')}"
    err = res.get("err64")
    return (f"{res['model']:45s} fused {res['fused_conv']:3d}/{res['convs']:3d} conv, err64 "
            f"{'n/a' if err is None else f'{err:.1e}'}, err32 {res.get('err32')}, "
            f"{res['total_s']} s, findings: {len(res['findings'])}")


if __name__ == "__main__":
    sys.exit(main())
