"""The conversion report: one row per pattern seen, fused or skipped with the reason, plus the self-check.

Available programmatically (`rows`, `fused`, `skipped`, `to_dict()`) and printable as a table (`str(report)`).
After a warm-up on CUDA, `layer_backends(model, x)` says which backend each fused layer runs ("triton pointer",
"triton tma", "triton tma persistent", "cudnn", "triton depthwise"); store it in `report.backends` to print it
with the report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from fusedconv.kernels import backend_log


@dataclass
class ReportRow:
    """One pattern found in the model.

    scope: dotted path of the module that holds it ("" for the root); nodes: the module names / call sites
    involved, in data-flow order; kind: "conv_bn_act" or "reparam"; status: "fused" or "skipped";
    detail: for fused rows what was fused (e.g. "bn+relu+add"), for skipped rows the reason.
    """

    scope: str
    nodes: tuple[str, ...]
    kind: str
    status: str
    detail: str = ""

    def __post_init__(self):
        if self.status not in ("fused", "skipped"):
            raise ValueError(f"status: expected 'fused' or 'skipped', got {self.status!r}")
        self.nodes = tuple(self.nodes)


@dataclass
class ConversionReport:
    rows: list[ReportRow] = field(default_factory=list)
    max_rel_error: float | None = None  # set by the self-check when example inputs were given
    notes: list[str] = field(default_factory=list)
    # Per guarded block: (scope, class name, one line per specialization saying which assumptions it checks).
    guards: list[tuple[str, str, list[str]]] = field(default_factory=list)
    # Per fused layer (module name in the converted model): the backend its launches ran (`layer_backends`).
    backends: dict[str, str] = field(default_factory=dict)

    def add_guards(self, scope: str, class_name: str, specializations: list[str]) -> None:
        """Record a block's guards (replacing what an earlier pass recorded for the same block)."""
        self.guards = [g for g in self.guards if g[0] != scope]
        self.guards.append((scope, class_name, list(specializations)))

    def add(self, scope: str, nodes, kind: str, status: str, detail: str = "") -> ReportRow:
        row = ReportRow(scope, tuple(nodes), kind, status, detail)
        self.rows.append(row)
        return row

    def extend(self, other: "ConversionReport") -> None:
        self.rows.extend(other.rows)
        self.notes.extend(other.notes)
        self.guards.extend(other.guards)

    @property
    def fused(self) -> list[ReportRow]:
        return [r for r in self.rows if r.status == "fused"]

    @property
    def skipped(self) -> list[ReportRow]:
        return [r for r in self.rows if r.status == "skipped"]

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "fused": len(self.fused), "skipped": len(self.skipped),
                "max_rel_error": self.max_rel_error, "notes": list(self.notes),
                "guards": [{"scope": s, "class": c, "specializations": list(g)} for s, c, g in self.guards],
                "backends": dict(self.backends)}

    def summary(self) -> str:
        s = f"{len(self.fused)} fused, {len(self.skipped)} skipped"
        if self.max_rel_error is not None:
            s += f", max relative error {self.max_rel_error:.2e}"
        return s

    def __str__(self) -> str:
        headers = ("status", "kind", "where", "modules", "detail")
        body = [(r.status, r.kind, r.scope or "<root>", " -> ".join(r.nodes), r.detail) for r in self.rows]
        widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        for scope, cls, specs in self.guards:
            lines.append(f"guarded: {scope or '<root>'} ({cls}) runs its fused graph when "
                         + " | ".join(f"[{g}]" for g in specs) + "; any other call runs its own forward exactly "
                         "(a re-parameterized block, whose branches are gone, raises GuardMiss instead)")
        lines += [f"note: {n}" for n in self.notes]
        if self.backends:
            lines.append(backends_text(self.backends))
        lines.append(self.summary())
        return "\n".join(lines)


def backends_text(backends: dict[str, str]) -> str:
    """"backends after warm-up: 40 triton pointer, 9 triton tma, 4 cudnn" and one line per layer."""
    counts = Counter(backends.values())
    lines = ["backends after warm-up: " + ", ".join(f"{n} {b}" for b, n in counts.most_common())]
    lines += [f"  {name or '<root>'}: {backend}" for name, backend in backends.items()]
    return "\n".join(lines)


def layer_backends(model: torch.nn.Module, *args, **kwargs) -> dict[str, str]:
    """Run `model(*args, **kwargs)` once under no_grad and return {module name: backend} for every module whose
    own forward launched a fused kernel (each launch is credited to the innermost module running it), in call
    order. A module whose launches ran different backends lists them joined by " + ". Empty where no fused
    kernel ran (CPU, the standard-conv fallback). Meant for after a warm-up: the first call of a layer is when
    the launcher times its candidates and makes its choice."""
    if getattr(type(model), "wraps_converted_model", False):
        # A FrozenModel: its layers are out of reach (no hooks can be put on them), so nothing could be credited.
        raise TypeError("model: layer_backends needs the converted model (fusedconv.convert(model)), not a "
                        "FrozenModel, whose layers are out of reach")
    owners: dict[int, str] = {}
    stack: list[int] = []
    handles = []

    def pre(module, inputs, name):
        stack.append(len(log))

    def post(module, inputs, output, name):
        start = stack.pop()
        for i in range(start, len(log)):
            owners.setdefault(i, name)

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, i, n=name: pre(m, i, n)))
        handles.append(module.register_forward_hook(lambda m, i, o, n=name: post(m, i, o, n)))
    try:
        with backend_log.recording() as log, torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    result: dict[str, list[str]] = {}
    for i, backend in enumerate(log):
        seen = result.setdefault(owners.get(i, ""), [])
        if backend not in seen:
            seen.append(backend)
    return {name: " + ".join(b) for name, b in result.items()}
