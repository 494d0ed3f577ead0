"""Writing a results dict: `<stem>.json`, a markdown table `<stem>.md` and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
import os
import sys

from bench import metrics


def write_json(results: dict, path: str) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)  # JSON has no inf / nan
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(results), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file


def _ms(v: float) -> str:
    """Milliseconds with about three significant digits, never in exponent notation."""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_ms(row: dict) -> str:
    if row.get("status") != "ok":
        return "n/a"
    key = "latency_ms" if "latency_ms" in row else "time_ms"
    return f"{_ms(row[key])} ±{_ms(row['iqr_ms'])}"


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def markdown(results: dict, plots: list[str]) -> str:
    env = results["environment"]
    lines = [f"# fusedconv benchmark: {env['device_name']} — {env['date']}", ""]
    lines += [
        f"- device: **{env['device_name']}** ({env['device_type']})" + (
            f", CUDA {env['cuda']}, cuDNN {env['cudnn']}, TF32 for cuDNN convs: {env['cudnn_allow_tf32']}"
            if env["device_type"] == "cuda" else ""),
        f"- CPU: {env['cpu_name']}, {env['cpu_count']} logical cores; torch threads: {env['torch_threads']}",
        f"- torch {env['torch']}, triton {env['triton']}, torchvision {env['torchvision']}, timm {env['timm']}, "
        f"smp {env['segmentation_models_pytorch']}, onnxruntime {env['onnxruntime']}, fusedconv {env['fusedconv']}"
        f" (git {env['git_commit']})",
        f"- command: `{env['command']}`" + (" (**quick mode**: a subset, short timings)" if results["quick"] else ""),
        f"- run at {env['timestamp_utc']}, {results.get('elapsed_s', 0):.0f} s",
        "",
        "Times are medians (± interquartile range) in milliseconds. "
        + ("GPU: `triton.testing.do_bench` (L2 flushed before each call). " if env["device_type"] == "cuda"
           else "CPU: `torch.utils.benchmark` blocked autorange. ")
        + "Every provider's output is checked against eager first; 'n/a' cells say why in the JSON and below.",
        "",
    ]
    for note in results.get("notes", []):
        lines.append(f"> {note}")
    if results.get("notes"):
        lines.append("")
    models = results.get("models") or []
    if models:
        lines += _models_section(models)
    layers = results.get("layers") or []
    if layers:
        lines += _layers_section(results, layers)
    for suite, title in (("reparam", "Re-parameterization"), ("layers3d", "3-D layers (r3d_18)"),
                         ("guards", "Guard cost"), ("overhead", "Per-call overhead")):
        rows = results.get(suite) or []
        if rows:
            lines += [f"## {title}", ""]
            keys = []
            for r in rows:
                keys += [k for k in r if k not in keys]
            lines += _table(keys, [[_fmt(r.get(k)) for k in keys] for r in rows]) + [""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    return "\n".join(lines)


def _models_section(rows: list[dict]) -> list[str]:
    providers = []
    for r in rows:
        if r["provider"] not in providers:
            providers.append(r["provider"])
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"], r["dtype"]), {})[r["provider"]] = r
    lines = ["## Models: latency (ms)", ""]
    body = []
    for (model, batch, dtype), per in groups.items():
        cells = []
        for p in providers:
            r = per.get(p)
            if r is None:
                cells.append("")
            elif r.get("status") == "ok":
                s = _fmt_ms(r)
                if p != "eager" and r.get("speedup_vs_eager"):
                    s += f" ({r['speedup_vs_eager']:.2f}x)"
                cells.append(s)
            else:
                cells.append("n/a")
        body.append([model, batch, dtype] + cells)
    lines += _table(["model", "batch", "dtype"] + providers, body)
    lines += ["", "(x) = speed-up over eager. Throughput, setup / compile time and errors:", ""]
    detail = []
    for r in rows:
        setup = r.get("compile_s", r.get("convert_s", r.get("setup_s")))
        extra = []
        for k in ("fused", "skipped", "jit", "onnx_exporter", "ort_intra_op_threads", "compile_mode"):
            if k in r:
                extra.append(f"{k}={r[k]}")
        detail.append([r["model"], r["batch"], r["provider"], _fmt_ms(r),
                       _fmt(r.get("throughput_per_s"), ".1f"), _fmt(setup, ".2f"),
                       _fmt(r.get("max_rel_error_vs_eager"), ".1e"),
                       r.get("status") if r.get("status") != "ok" else " ".join(extra)])
    lines += _table(["model", "batch", "provider", "latency ms", "images/s", "setup/compile s",
                     "max rel err vs eager", "notes"], detail)
    return lines + [""]


def _layers_section(results: dict, rows: list[dict]) -> list[str]:
    summary = results.get("layers_summary") or []
    lines = ["## Layers: geometric-mean speed-up of fusedconv", ""]
    vs = sorted({s["vs"] for s in summary})
    groups: dict[tuple, dict] = {}
    for s in summary:
        groups.setdefault((s["net"], s["batch"], s["dtype"], s["layout"]), {})[s["vs"]] = s
    body = [[*k] + [f"{per[v]['geomean_speedup']:.2f}x ({per[v]['layers']})" if v in per else "–" for v in vs]
            for k, per in groups.items()]
    lines += _table(["net", "batch", "dtype", "layout"] + [f"vs {v}" for v in vs], body)
    lines += ["", "(n) = layers in the mean; > 1 means fusedconv is faster.", "",
              "## Layers: per layer", ""]
    providers = []
    for r in rows:
        if r["provider"] not in providers:
            providers.append(r["provider"])
    per_cfg: dict[tuple, dict] = {}
    for r in rows:
        key = (r["net"], r["layer"], r["shape"], r["batch"], r["dtype"], r["layout"])
        per_cfg.setdefault(key, {})[r["provider"]] = r
    has_peak = any("pct_roofline" in r for r in rows)
    headers = ["net", "layer", "shape", "batch", "dtype", "layout"] + [f"{p} ms" for p in providers] + \
        ["fusedconv TFLOP/s", "GB/s"] + (["% roofline"] if has_peak else [])
    body = []
    for key, per in per_cfg.items():
        fc = per.get("fusedconv", {})
        ok = fc.get("status") == "ok"
        body.append([*key] + [_fmt_ms(per[p]) if p in per else "" for p in providers]
                    + [_fmt(fc.get("tflops"), ".3f") if ok else "n/a", _fmt(fc.get("gb_s"), ".1f") if ok else "n/a"]
                    + ([_fmt(fc.get("pct_roofline"), ".0f") if ok else "n/a"] if has_peak else []))
    lines += _table(headers, body)
    reasons = sorted({(r["provider"], r["status"]) for r in rows if r.get("status") != "ok"})
    if reasons:
        lines += ["", "Unavailable cells:", ""] + [f"- {p}: {s}" for p, s in reasons]
    return lines + [""]


# ---------------------------------------------------------------------------------------------- plots
def plots(results: dict, out_dir: str, stem: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed, so no plots were written (pip install -e \".[bench]\")",
              file=sys.stderr)
        return []
    written = []
    title = f"{results['environment']['device_name']} — {results['environment']['date']}"
    models = [r for r in results.get("models") or [] if r.get("status") == "ok"]
    if models:
        written.append(_plot_models(plt, models, os.path.join(out_dir, f"{stem}-models.png"), title))
    summary = results.get("layers_summary") or []
    if summary:
        written.append(_plot_layer_summary(plt, summary, os.path.join(out_dir, f"{stem}-layers.png"), title))
    layers = [r for r in results.get("layers") or [] if r.get("status") == "ok"]
    if layers:
        written.append(_plot_roofline(plt, layers, results.get("peak"), os.path.join(out_dir, f"{stem}-roofline.png"),
                                      title))
    return written


def _plot_models(plt, rows, path, title):
    configs = sorted({(r["batch"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(len(configs), 1, figsize=(10, 3.6 * len(configs)), squeeze=False)
    for ax, (batch, dtype) in zip(axes[:, 0], configs):
        sub = [r for r in rows if r["batch"] == batch and r["dtype"] == dtype]
        model_names = list(dict.fromkeys(r["model"] for r in sub))
        providers = list(dict.fromkeys(r["provider"] for r in sub))
        width = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            xs, ys = [], []
            for j, m in enumerate(model_names):
                r = next((r for r in sub if r["model"] == m and r["provider"] == p), None)
                if r is not None and r.get("speedup_vs_eager"):
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(r["speedup_vs_eager"])
            ax.bar(xs, ys, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(model_names)))
        ax.set_xticklabels(model_names, fontsize=8)
        ax.set_ylabel("speed-up over eager")
        ax.set_title(f"models, batch {batch}, {dtype}", fontsize=10)
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_layer_summary(plt, summary, path, title):
    nets = list(dict.fromkeys(s["net"] for s in summary))
    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 4), squeeze=False)
    for ax, net in zip(axes[0], nets):
        sub = [s for s in summary if s["net"] == net]
        configs = list(dict.fromkeys((s["batch"], s["dtype"], s["layout"]) for s in sub))
        vs = list(dict.fromkeys(s["vs"] for s in sub))
        width = 0.8 / max(len(vs), 1)
        for i, v in enumerate(vs):
            xs, ys = [], []
            for j, c in enumerate(configs):
                s = next((s for s in sub if (s["batch"], s["dtype"], s["layout"]) == c and s["vs"] == v), None)
                if s is not None:
                    xs.append(j + (i - (len(vs) - 1) / 2) * width)
                    ys.append(s["geomean_speedup"])
            ax.bar(xs, ys, width, label=f"vs {v}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([f"b{b}\n{d}\n{lay}" for b, d, lay in configs], fontsize=6)
        ax.set_title(f"{net}: fusedconv geomean speed-up", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_roofline(plt, rows, peak, path, title):
    fig, ax = plt.subplots(figsize=(7, 5))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    for p in providers:
        sub = [r for r in rows if r["provider"] == p]
        ax.scatter([r["intensity"] for r in sub], [r["tflops"] for r in sub], s=10, alpha=0.6, label=p)
    if peak:
        lo = min(r["intensity"] for r in rows) / 2
        hi = max(r["intensity"] for r in rows) * 2
        for dtype, compute in peak["tflops"].items():
            if compute is None:
                continue
            xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
            ax.plot(xs, [metrics.roofline_tflops(x, compute, peak["tb_s"]) for x in xs], lw=1,
                    label=f"roofline {dtype} ({peak['name']}, datasheet)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / compulsory byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"layers: achieved throughput\n{title}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
