"""The conversion report: one row per pattern seen, fused or skipped with the reason, plus the self-check.

Available programmatically (`rows`, `fused`, `skipped`, `to_dict()`) and printable as a table (`str(report)`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
                "guards": [{"scope": s, "class": c, "specializations": list(g)} for s, c, g in self.guards]}

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
        lines.append(self.summary())
        return "\n".join(lines)
