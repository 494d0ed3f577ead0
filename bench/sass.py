"""Reading NVIDIA SASS (nvdisasm output) and cuobjdump resource usage: the K loop, MMA kind, async loads.

Pure text functions, so they are tested on small hand-written listings and used by `bench.aot` on real ones.

The K loop of a GEMM-like kernel is taken to be the innermost loop that issues tensor-core instructions: among
the regions spanned by a backward branch (a branch whose target label comes before it), the smallest one that
contains an HGMMA (Hopper wgmma) or HMMA (mma.sync) instruction. Its instruction count per iteration is what
the SM's four warp schedulers must issue besides the MMAs for every K step of the tile.

A K loop with a small constant trip count (the 3x3 RGB stems: three kernel rows) is unrolled by the compiler
into straight-line code with no backward branch. For wgmma kernels `k_loop` then measures the unrolled steps:
the span from the first global load or copy to the last HGMMA, divided by the number of K steps (each step's
last HGMMA closes its group with `gsb0`); the result says `unrolled: True`. It includes the pipeline's
prologue, so it overstates a step slightly.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_INSTR_RE = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*(?:\.[\w]+)*)\s*([^;]*);")
_LABEL_RE = re.compile(r"^\s*(\.L[\w$.]*|[A-Za-z_$][\w$.]*):\s*$")
_TARGET_RE = re.compile(r"`\(([^)]+)\)")
_RESOURCE_RE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")

#: Tensor-core opcodes: Hopper warpgroup MMA, and the warp-level mma.sync family (HMMA: fp16/bf16/tf32).
WGMMA_OPS = ("HGMMA",)
MMA_SYNC_OPS = ("HMMA",)
#: Asynchronous global->shared copies: cp.async (LDGSTS) and TMA / bulk copies (UTMALDG, UBLKCP).
CP_ASYNC_OPS = ("LDGSTS",)
TMA_OPS = ("UTMALDG", "UBLKCP")


@dataclass(frozen=True)
class Instr:
    address: int
    opcode: str  # with modifiers, e.g. "HGMMA.64x128x16.F32"
    operands: str
    predicated: bool

    @property
    def base(self) -> str:
        """The opcode without modifiers: "HGMMA", "IMAD", "BRA"."""
        return self.opcode.split(".", 1)[0]


def parse(text: str) -> "Listing":
    """Instructions of an nvdisasm listing in address order; label lines attach to the next instruction."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        m = _LABEL_RE.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR_RE.search(line)
        if not m:
            continue
        instrs.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), bool(m.group(2))))
        for name in pending:
            labels[name] = len(instrs) - 1
        pending = []
    listing = Listing(instrs)
    listing.labels = labels
    return listing


class Listing(list):
    """A list of Instr that also knows its labels ({name: index of the instruction the label precedes})."""

    labels: dict[str, int] = {}


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every backward-branch region (last is the branch)."""
    labels = getattr(instrs, "labels", {})
    found = []
    for i, ins in enumerate(instrs):
        if ins.base not in ("BRA", "BRX", "JMP"):
            continue
        m = _TARGET_RE.search(ins.operands)
        if not m or m.group(1) not in labels:
            continue
        target = labels[m.group(1)]
        if target <= i:
            found.append((target, i))
    return found


def count(instrs, bases) -> int:
    """How many instructions have one of these base opcodes."""
    return sum(1 for ins in instrs if ins.base in bases)


def k_loop(instrs: list[Instr]) -> dict | None:
    """The innermost backward-branch region containing tensor-core instructions, summarised; None if none."""
    best = None
    for first, last in loops(instrs):
        body = instrs[first:last + 1]
        if count(body, WGMMA_OPS + MMA_SYNC_OPS) and (best is None or last - first < best[1] - best[0]):
            best = (first, last)
    steps = 1
    if best is None:
        best, steps = _unrolled_span(instrs)
        if best is None:
            return None
    body = instrs[best[0]:best[1] + 1]
    bases = Counter(ins.base for ins in body)
    # Unrolled: per K step, the span's average (the opcode counts below stay the whole span's).
    summary = {"instructions": -(-len(body) // steps), "start_address": body[0].address,
               "end_address": body[-1].address,
               "mma": count(body, WGMMA_OPS + MMA_SYNC_OPS), "ldgsts": bases.get("LDGSTS", 0),
            "tma": count(body, TMA_OPS), "ldg": bases.get("LDG", 0), "sts": bases.get("STS", 0),
            "lds": bases.get("LDS", 0) + bases.get("LDSM", 0), "spill": count(body, ("STL", "LDL")),
            "imad": bases.get("IMAD", 0), "isetp": bases.get("ISETP", 0), "sel": bases.get("SEL", 0),
            "top_opcodes": dict(bases.most_common(8))}
    if steps > 1:
        summary.update(unrolled=True, steps=steps, span_instructions=len(body))
    return summary


_GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


def _unrolled_span(instrs: list[Instr]) -> tuple[tuple[int, int] | None, int]:
    """((first, last), K steps) of a fully unrolled wgmma K loop: first global load to last HGMMA, one step
    per HGMMA carrying `gsb0`; (None, 0) when there are no such steps."""
    mma = [i for i, ins in enumerate(instrs) if ins.base in WGMMA_OPS]
    steps = sum(1 for i in mma if "gsb0" in instrs[i].operands)
    if not mma or steps < 2:
        return None, 0
    loads = [i for i in range(mma[0]) if instrs[i].base in _GLOBAL_LOADS]
    first = loads[0] if loads else mma[0]
    return (first, mma[-1]), steps


def mma_kind(instrs: list[Instr], ptx: str = "") -> str:
    """"wgmma" (HGMMA), "mma.sync" (HMMA) or "none" — from the SASS, the PTX as a fallback."""
    if count(instrs, WGMMA_OPS) or "wgmma.mma_async" in ptx:
        return "wgmma"
    if count(instrs, MMA_SYNC_OPS) or re.search(r"^\s*(@\S+\s+)?mma\.sync", ptx, re.MULTILINE):
        return "mma.sync"
    return "none"


def async_loads(instrs: list[Instr], ptx: str = "") -> str:
    """How global memory reaches shared memory: "tma", "cp.async", "tma+cp.async" or "sync" (plain loads)."""
    kinds = []
    if count(instrs, TMA_OPS) or "cp.async.bulk" in ptx:
        kinds.append("tma")
    if count(instrs, CP_ASYNC_OPS) or re.search(r"cp\.async\.(ca|cg)", ptx):
        kinds.append("cp.async")
    return "+".join(kinds) or "sync"


def parse_resource_usage(text: str) -> dict:
    """{registers, stack, shared, local} of the first function in `cuobjdump --dump-resource-usage` output."""
    for line in text.splitlines():
        fields = dict(_RESOURCE_RE.findall(line))
        if "REG" in fields:
            return {"registers": int(fields["REG"]), "stack": int(fields.get("STACK", 0)),
                    "shared_static": int(fields.get("SHARED", 0)), "local": int(fields.get("LOCAL", 0))}
    raise ValueError("cuobjdump output: expected a 'REG:<n>' resource line, found none")


def issue_ratio(loop_instructions: int, num_warps: int, block_m: int, block_n: int, block_k: int,
                mma_flop_per_cycle: int) -> float:
    """Issue cycles of the K loop over the tensor-core cycles of one K step (<< 1: the MMAs can dominate).

    Each of the SM's 4 schedulers issues one instruction per cycle, so one iteration costs at least
    loop_instructions * num_warps / 4 cycles of issue; the step's MMAs need 2*BM*BN*BK / mma_flop_per_cycle
    cycles of the tensor cores (4096 dense fp16 FLOP/cycle/SM on Hopper, 2048 on Ampere).
    """
    issue = loop_instructions * num_warps / 4
    mma = 2 * block_m * block_n * block_k / mma_flop_per_cycle
    return issue / mma
