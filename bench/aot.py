"""Ahead-of-time compile of one Triton kernel specialisation for a GPU target, and what its cubin says.

No GPU is needed: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` runs the whole pipeline
down to a cubin, and Triton's package carries NVIDIA's `cuobjdump` (registers, stack frame, shared memory) and
`nvdisasm` (the SASS). `spec_from_args` reproduces what the JIT does with a real launch's arguments (an int
equal to 1 becomes a constexpr, a multiple of 16 gets the divisibility hint that vectorised, pipelined loads
need), so the compiled code is the code that would run.

`analyse(spec, cap, cache_dir)` compiles and reads one specialisation and caches the JSON result on disk under
a key of the triton version, the kernel's source hash, the specialisation and the target: a rerun costs a
file read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import tempfile
import time

from bench import sass

#: Bump when the analysis output changes, so cached entries are recomputed.
ANALYSIS_VERSION = 2


def tool(name: str) -> str:
    """Path of a CUDA binary tool shipped inside Triton's NVIDIA backend (cuobjdump, nvdisasm, ptxas)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: expected at {path} (Triton's NVIDIA backend ships it)")
    return path


def spec_from_args(fn, base_signature: dict, values: dict, constexprs: dict, *, num_warps: int,
                   num_stages: int, pointer_names=()) -> dict:
    """A compile spec for `fn` as the JIT would specialise a launch with these argument values.

    `base_signature`: {arg: "*fp16" | "i32" | "i64" | "fp32" | "constexpr"} in parameter order; `values`:
    the runtime integer arguments; `constexprs`: the constexpr arguments. Integers equal to 1 become
    constexprs and multiples of 16 (0 included) get tt.divisibility 16, as in Triton's `specialize_impl`;
    pointers are taken as 16-byte aligned (every torch allocation is).
    """
    signature = dict(base_signature)
    consts = dict(constexprs)
    divisible = []
    for name, kind in base_signature.items():
        if kind.startswith("*"):
            divisible.append(name)
        elif kind in ("i32", "i64") and name in values:
            value = int(values[name])
            if value == 1:
                signature[name] = "constexpr"
                consts[name] = 1
            elif value % 16 == 0:
                divisible.append(name)
    return {"fn": fn, "signature": signature, "constexprs": consts, "divisible_by_16": tuple(divisible),
            "num_warps": num_warps, "num_stages": num_stages}


def _attrs(signature: dict, divisible, target) -> dict:
    from triton.compiler import make_backend

    backend = make_backend(target)
    attr = backend.parse_attr("D") if hasattr(backend, "parse_attr") else [["tt.divisibility", 16]]
    names = list(signature)
    return {(names.index(a),): attr for a in divisible if a in names}


def make_source(spec: dict, target):
    """An ASTSource for the spec (triton >= 3.2 form: signature by name with constexpr entries)."""
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        raise RuntimeError("bench.aot needs triton >= 3.2 (ASTSource with constexprs)")
    return ASTSource(spec["fn"], spec["signature"], constexprs=spec["constexprs"],
                     attrs=_attrs(spec["signature"], spec["divisible_by_16"], target))


def spec_key(spec: dict, cap: int) -> str:
    """Cache key: triton version, kernel source (and its callees), specialisation, options and target."""
    import triton

    payload = {"v": ANALYSIS_VERSION, "triton": triton.__version__, "fn": spec["fn"].cache_key,
               "signature": spec["signature"], "constexprs": {k: repr(v) for k, v in spec["constexprs"].items()},
               "divisible": sorted(spec["divisible_by_16"]), "warps": spec["num_warps"],
               "stages": spec["num_stages"], "cap": cap}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def compile_cubin(spec: dict, cap: int):
    """(cubin bytes, ptx text, shared-memory bytes from the compile metadata) for sm_`cap`."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cap, 32)
    kernel = triton.compile(make_source(spec, target), target=target,
                            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    ptx = kernel.asm.get("ptx", "")
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    shared = getattr(kernel.metadata, "shared", None)
    return kernel.asm["cubin"], ptx, shared


def _run(args: list[str]) -> str:
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{os.path.basename(args[0])} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout


def read_cubin(cubin: bytes) -> tuple[dict, str]:
    """(resource usage from cuobjdump, SASS text from nvdisasm) of a cubin."""
    with tempfile.TemporaryDirectory(prefix="fusedconv-cubin-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = sass.parse_resource_usage(_run([tool("cuobjdump"), "--dump-resource-usage", path]))
        text = _run([tool("nvdisasm"), "-c", path])
    return usage, text


def analyse_uncached(spec: dict, cap: int) -> dict:
    """Compile and read one specialisation; a JSON-able dict (never raises: failures are reported in it)."""
    start = time.perf_counter()
    try:
        cubin, ptx, shared = compile_cubin(spec, cap)
        usage, text = read_cubin(cubin)
        instrs = sass.parse(text)
        loop = sass.k_loop(instrs)
        return {"ok": True, "cap": cap, "registers": usage.get("registers"), "stack_bytes": usage.get("stack"),
                "local_bytes": usage.get("local"), "shared_bytes": shared,
                "mma": sass.mma_kind(instrs, ptx), "async_loads": sass.async_loads(instrs, ptx),
                "spill_instructions": sass.count(instrs, ("STL", "LDL")), "sass_instructions": len(instrs),
                "k_loop": loop, "compile_s": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # the report shows the failure per variant; one bad variant must not stop the run
        return {"ok": False, "cap": cap, "error": f"{type(exc).__name__}: {exc}"[-2000:],
                "compile_s": round(time.perf_counter() - start, 2)}


def analyse(spec: dict, cap: int, cache_dir: str | None) -> dict:
    """`analyse_uncached`, through an on-disk JSON cache (successful results only) when `cache_dir` is set."""
    if not cache_dir:
        return analyse_uncached(spec, cap)
    path = os.path.join(cache_dir, f"{spec_key(spec, cap)}.json")
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
        result["cached"] = True
        return result
    result = analyse_uncached(spec, cap)
    if result["ok"]:
        os.makedirs(cache_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(path + ".tmp", path)
    return result
