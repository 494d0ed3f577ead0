"""The markdown report of the model-zoo sweep (`bench/zoo.py`): summary, findings, models not built, one row per
model."""

from __future__ import annotations

from collections import Counter

import torch

from fusedconv.comparison import SELF_CHECK_TOLERANCE

from bench.zoo import EXACT_FLOAT64, checks32_hold


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _count(conv: list[dict], key: str, tol: float | None = None) -> str:
    """"k of n within the tolerance" over the models where check `key` ran."""
    ran = [r for r in conv if r.get(key) is not None]
    within = [r for r in ran if r[key] <= (r["tol32"] if tol is None else tol)]
    return f"{len(within)} of {len(ran)} within"


def _refusing(conv: list[dict]) -> str:
    n = sum(bool(r.get("size2_note")) for r in conv)
    return f"; {n} originals refuse it" if n else ""


def _gradients_within_own(conv: list[dict]) -> str:
    """The clause for models whose input gradient is beyond 1e-10 but within twice the original's own spread
    (bench/zoo.py `own_gradient_error`: a backward that amplifies rounding)."""
    listed = [r for r in conv if r.get("grad_own64") is not None and r["grad_err64"] <= 2 * r["grad_own64"]]
    if not listed:
        return ""
    return (f", {len(listed)} of them beyond {EXACT_FLOAT64:g} but within twice the original's own spread under "
            "rounding changes (" + ", ".join(f"{r['model']}: converted {r['grad_err64']:.1e}, original "
                                             f"{r['grad_own64']:.1e}" for r in listed) + ")")


def _error(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def _flat_reason(r: dict) -> str:
    """Why a converted model got no flat forward, from its report note (a short key)."""
    note = next((n for n in r.get("notes", []) if n.startswith("flat forward:")), None)
    if note is None:
        return "only leaves under the root"
    for key in ("already rewritten", "does not trace", "whose contents a guard cannot check", "does not hold",
                "not built"):
        if key in note:
            return {"already rewritten": "root rewritten itself", "does not trace": "does not trace as one graph",
                    "whose contents a guard cannot check": "reads a stateful object",
                    "does not hold": "guard does not hold", "not built": "error"}[key]
    return note[:60]


def _within_own_error(conv: list[dict]) -> str:
    """The summary's clause for models whose float32 difference is within twice the original's own float32 error
    against float64 (bench/zoo.py `_float32_checks`), or nothing."""
    def within(r) -> bool:  # every float32 check either within the tolerance or within the original's own error
        return checks32_hold(r, lambda w: r[w] <= r["tol32"] or w in r.get("within_own_error32", ()))

    listed = [r for r in conv if not r.get("match32") and within(r)]
    if not listed:
        return ""
    worst = [max(r["vs_float64_32"].values(), key=lambda d: d["converted"]) for r in listed]
    return (f"; {len(listed)} more within twice the original's own float32 error against float64 (models "
            "ill-conditioned at float32: " + ", ".join(f"{r['model']}: converted {d['converted']:.1e}, original "
                                                      f"{d['original']:.1e}" for r, d in zip(listed, worst)) + ")")


def render_markdown(results: list[dict], meta: dict) -> str:
    """The report: summary (counts, top skip reasons, findings), then one table row per model."""
    built = [r for r in results if r["build"]]
    conv = [r for r in built if r["convert"]]
    exact = [r for r in conv if r.get("exact64")]
    m32 = [r for r in conv if r.get("match32")]
    reasons: Counter = Counter()
    for r in conv:
        reasons.update(r.get("skip_reasons", {}))
    total = sum(r["convs"] for r in conv)
    fused = sum(r["fused_conv"] for r in conv)
    lines = ["# Model-zoo sweep of fusedconv.convert", "",
             f"Date {meta['date']}; machine {meta['machine']}, {meta['threads']} thread(s); python "
             f"{meta['python']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
             f"Command: `{meta['command']}`", "", "## Summary", "",
             f"- models: {len(results)} listed, {len(built)} built, {len(conv)} converted, {len(exact)} exact in "
             f"float64 (max relative error <= {EXACT_FLOAT64:g}: max |converted - original| / max |original| per "
             f"output tensor, worst tensor), {len(m32)} match in float32 on the default CPU path at both batch "
             f"sizes (<= {SELF_CHECK_TOLERANCE[torch.float32]:g})" + _within_own_error(conv),
             f"- variants (bench/zoo.py `_float32_checks`): float32 input already channels_last "
             f"{_count(conv, 'cl_err32')}, inside torch.inference_mode {_count(conv, 'inference_err32')}, another "
             f"spatial size {_count(conv, 'size2_err32')} (float64: {_count(conv, 'size2_err64', EXACT_FLOAT64)}"
             f"{_refusing(conv)})",
             f"- conv layers (converted models): {fused} fused of {total} in the originals "
             f"(re-parameterized branches merge several convs into one fused layer)",
             f"- whole-model flat forward (convert's default `flatten=True`): {sum(bool(r.get('flat')) for r in conv)}"
             f" of {len(conv)} converted models; the others, by reason: "
             + (", ".join(f"{n} x {why}" for why, n in Counter(
                 _flat_reason(r) for r in conv if not r.get("flat")).most_common()) or "none"),
             f"- armed after convert (fusedconv/graph/reach.py; its first float64 call, in err64, runs the armed "
             f"path): {sum(bool(r.get('armed')) for r in conv)} of {len(conv)}, still armed after that call "
             f"{sum(bool(r.get('armed_after_call')) for r in conv)}, and after `.to(memory_format=channels_last)` "
             f"(channels_last_3d for a video model) and back, each followed by a float64 call counted in err64: "
             f"{sum(bool(r.get('armed_after_to')) for r in conv)}",
             f"- float32 direct calls (fusedconv/graph/flat_fused.py), on a third float32 call at the first size: "
             f"{sum(r.get('direct32') or 0 for r in conv)} oneDNN convolutions run directly and "
             f"{sum(r.get('module_calls32') or 0 for r in conv)} FusedConv2d module calls, over "
             f"{sum(bool(r.get('direct32')) for r in conv)} models with direct calls (module calls left: layers "
             "routed to F.conv2d, such as 1x1 feature maps, and models without a flat forward)",
             f"- torch.autocast (CPU, bfloat16; bench/zoo.py): {sum(bool(r.get('autocast_ok')) for r in conv)} of "
             f"{len(conv)} converted models give the original's output dtypes within twice its error against "
             f"float64; worst converted / original error "
             + _ratio(max((r["autocast_err"] / max(r["autocast_err_original"], 1e-30) for r in conv
                           if r.get("autocast_err") is not None), default=None))
             + "; " + (", ".join(f"{r['model']} ({r['autocast_note']})" for r in conv if r.get("autocast_note"))
                      or "no original refused the region"),
             f"- guard fallbacks (each guarded block's own forward over the stand-ins of its changed children, what a "
             f"call missing its guards runs, called directly in float64 on the input the original gave that block): "
             f"{sum(r.get('fallback_blocks') or 0 for r in conv)} blocks over "
             f"{sum(bool(r.get('fallback_blocks')) for r in conv)} models, worst error "
             + _error(max((r["fallback_err64"] for r in conv if r.get("fallback_err64") is not None), default=None)),
             f"- input gradients (grad mode, float64: the gradient of a fixed random weighting of the outputs with "
             f"respect to the input, converted against original): {sum(r.get('grad_err64') is not None for r in conv)}"
             f" of {len(conv)} converted models compared, worst error "
             + _error(max((r["grad_err64"] for r in conv if r.get("grad_err64") is not None), default=None))
             + _gradients_within_own(conv)
             + "; " + (", ".join(f"{r['model']} ({r['grad_note']})" for r in conv if r.get("grad_note"))
                      or "every original differentiable"),
             f"- models with findings: {sum(bool(r['findings']) for r in results)}",
             "- fused layers kept beside their original conv + BN under a new name (both in the state_dict): "
             + (", ".join(f"{r['model']} {len(r['fused_copies'])}" for r in conv if r.get("fused_copies"))
                or "none"), "",
             "Top skip reasons (report rows, all models):", ""]
    lines += [f"- {n} x {reason}" for reason, n in reasons.most_common(12)] or ["- none"]
    lines += ["", "## Findings", ""]
    for r in results:
        for f in r["findings"]:
            lines.append(f"- {r['model']}: {f}")
    if not any(r["findings"] for r in results):
        lines.append("- none")
    not_built = [r for r in results if not r["build"]]
    if not_built:
        lines += ["", "## Not built", ""] + [f"- {r['model']}: {r.get('build_error')}" for r in not_built]
    lines += ["", "## Models", "",
              "| model | input | convs | fused | convs left | BN ops run | conv ops run | skipped rows | guards |"
              " err fp64 | err fp32 | batch-1 fp64 | state_dict | deepcopy / save | convert s | total s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in conv:
        sd = "ok" if not r.get("state_dict_problems") else f"{len(r['state_dict_problems'])} problem(s)"
        if r.get("fused_copies"):
            sd += f" ({len(r['fused_copies'])} kept)"
        rt = "ok" if r.get("deepcopy_err") == 0 and r.get("pickle_err") == 0 else \
            f"{_fmt(r.get('deepcopy_err'))} / {_fmt(r.get('pickle_err'))}"
        lin = f" +{r['fused_linear']} linear" if r.get("fused_linear") else ""
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['convs']} | {r['fused_conv']}{lin} | "
                     f"{r['convs_left']} | {r.get('bn_ops', '?')} -> {r.get('bn_ops_left', '?')} | "
                     f"{r.get('conv_ops', '?')} -> {r.get('conv_ops_left', '?')} | "
                     f"{sum(r['skip_reasons'].values())} | {r['guards']} | "
                     f"{_fmt(r.get('err64'))} | {_fmt(r.get('err32'))} | {_fmt(r.get('batch1_err64'))} | {sd} | "
                     f"{rt} | {r['convert_s']} | {r['total_s']} |")
    for r in [r for r in built if not r["convert"]]:
        lines.append(f"| {r['model']} | - | - | convert failed: {r.get('convert_error')} ||||||||||||")
    return "\n".join(lines) + "\n"

