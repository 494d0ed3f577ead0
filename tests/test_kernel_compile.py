"""Ahead-of-time compile of every Triton kernel variant x autotune config for sm_80 and sm_90, without a GPU.

`fusedconv.kernels.aot_variants()` describes each variant (implicit-GEMM and depthwise kernels): the JIT
function, its signature, constexprs, num_warps / num_stages, dtype, whether tensor cores are expected, and
optionally `divisible_by_16` (argument names to compile with the JIT's multiple-of-16 specialisation). Each is
compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` down to PTX and cubin (ptxas
validates the PTX), for cap 80 (A100) and 90 (H100).

Checks per variant and target: the compile succeeds and PTX is produced; variants that expect tensor cores
contain an `mma` (sm_80) / `wgmma` or `mma` (sm_90) instruction with the variant's input type (f16, bf16, or
tf32 for fp32 with TF32); variants that do not (IEEE fp32, the direct depthwise kernel, epilogue-only kernels)
contain none — an IEEE fp32 conv that used TF32 tensor cores would silently lose precision.

How it runs: compiling needs real JITFunctions (TRITON_INTERPRET unset) and takes a while, so a module fixture
starts this file as a script in a few parallel worker processes (one per CPU, at most 8) that share a queue of
the selected (variant, target) pairs (largest tiles first), compile into a fresh Triton cache and write JSON
summaries; the tests, parametrised per variant and target, assert on the merged summary. Only the pairs
selected in the session (`-k`, node ids) are compiled. `python tests/test_kernel_compile.py --list` prints the
variants.

Triton 3.6 as well: the GPU machine runs triton 3.6 while CI's torch brings a newer one, so
`test_every_variant_compiles_with_gpu_machine_triton` installs triton 3.6.0 (`pip install --no-deps --target`)
into the ignored `.cache/triton-3.6.0/` once and runs this file's sm_90 compile tests again (the GPU machine is an
H200) in a child pytest with that directory first on PYTHONPATH: an API that 3.6 lacks fails here, not on the GPU
machine. That child starts when the test loop starts (conftest.py calls this module's `start_in_background`) and
compiles beside the other tests; the test waits for it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import pytest

TARGETS = (80, 90)
#: Wall-clock limit for all worker processes together (FUSEDCONV_AOT_TIMEOUT_S overrides: a shared, busy
#: machine compiles several times slower).
COMPILE_TIMEOUT_S = int(os.environ.get("FUSEDCONV_AOT_TIMEOUT_S", "900"))
MAX_WORKERS = 8

# A tensor-core instruction: optional predicate, then mma.* / wgmma.* with its type suffixes.
_TENSOR_CORE_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:wgmma|mma)\.[\w.]+)", re.MULTILINE)
# A TMA bulk-tensor copy (global -> shared through a tensor descriptor).
_BULK_TENSOR_RE = re.compile(r"\bcp\.async\.bulk\.tensor\.")
# A TMA bulk-tensor store (shared -> global through a tensor descriptor: the TMA-store epilogue).
_BULK_TENSOR_STORE_RE = re.compile(r"\bcp\.async\.bulk\.tensor\.\d+d\.global\.shared::cta")
_MMA_TYPE = {"float16": ".f16", "bfloat16": ".bf16", "float32": ".tf32"}


# ------------------------------------------------------------------------------------------------ compiling
def _attrs_for(signature: dict, divisible: tuple, target):
    """ASTSource attrs marking `divisible` arguments as multiples of 16, in this triton's format ({} if unknown)."""
    if not divisible:
        return {}
    from triton.compiler import make_backend

    backend = make_backend(target)
    attr = backend.parse_attr("D") if hasattr(backend, "parse_attr") else [["tt.divisibility", 16]]
    names = list(signature)
    return {(names.index(a),): attr for a in divisible if a in names}


def make_source(fn, signature: dict, constexprs: dict, divisible: tuple, target):
    """An ASTSource for `fn`, whichever form this triton's ASTSource takes.

    triton >= 3.2 (incl. 3.6-3.9): signature {name: type} with "constexpr" entries, `constexprs` by name (or
    index tuple), attrs {(index,): [[attr, value]]}. Older: signature {index: type} of the runtime arguments
    only, `constants` {index: value}; divisibility hints are then left out (the code still compiles).
    """
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn, signature, constexprs=constexprs, attrs=_attrs_for(signature, divisible, target))
    names = list(signature)
    old_sig = {i: t for i, (n, t) in enumerate(signature.items()) if t != "constexpr"}
    constants = {names.index(k): v for k, v in constexprs.items()}
    return ASTSource(fn, old_sig, constants)


def compile_one(variant: dict, cap: int) -> dict:
    """Compile one variant for sm_`cap`; a JSON-able summary (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cap, 32)
    start = time.perf_counter()
    try:
        src = make_source(variant["fn"], variant["signature"], variant["constexprs"],
                          tuple(variant.get("divisible_by_16", ())), target)
        kernel = triton.compile(src, target=target, options={"num_warps": variant["num_warps"],
                                                             "num_stages": variant["num_stages"]})
        ptx = kernel.asm.get("ptx", "")
        if isinstance(ptx, bytes):
            ptx = ptx.decode()
        return {"ok": True, "ptx_chars": len(ptx), "cubin": bool(kernel.asm.get("cubin")),
                "tensor_core_ops": sorted(set(_TENSOR_CORE_RE.findall(ptx))),
                "bulk_tensor_copies": len(_BULK_TENSOR_RE.findall(ptx)),
                "bulk_tensor_stores": len(_BULK_TENSOR_STORE_RE.findall(ptx)),
                "spill_bytes": _spill_bytes(kernel.asm.get("cubin")) if variant.get("expects_tma_store") else None,
                "shared_bytes": getattr(kernel.metadata, "shared", None),
                "target_line": next((ln.strip() for ln in ptx.splitlines() if ln.startswith(".target")), ""),
                "seconds": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # reported per variant by the tests
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:],
                "seconds": round(time.perf_counter() - start, 2)}


def _spill_bytes(cubin) -> int | None:
    """Stack + local bytes of a cubin per `cuobjdump --dump-resource-usage` (Triton ships the tool), None without
    the tool: the bytes a kernel spills registers to."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.isfile(tool):
        return None
    with tempfile.TemporaryDirectory(prefix="fusedconv-cubin-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=120)
    fields = dict(re.findall(r"\b(STACK|LOCAL):(\d+)", out.stdout))
    return int(fields["STACK"]) + int(fields["LOCAL"]) if {"STACK", "LOCAL"} <= set(fields) else None


def _cost(variant: dict) -> int:
    """Rough relative compile cost (tile size), so the biggest compiles start first and workers finish together."""
    cost = 1
    for key, value in variant["constexprs"].items():
        if isinstance(key, str) and key.startswith("BLOCK_") and isinstance(value, int):
            cost *= value
    return cost * (4 if variant["expects_tensor_cores"] else 1)


def _worker(pairs_path: str, claims_dir: str, out_path: str) -> None:
    """Compile (variant name, cap) pairs from `pairs_path`, each claimed atomically in `claims_dir` so parallel
    workers share the queue dynamically; JSON summaries to `out_path` after each compile."""
    from fusedconv.kernels import aot_variants

    by_name = {v["name"]: v for v in aot_variants()}
    with open(pairs_path) as f:
        pairs = json.load(f)
    pairs.sort(key=lambda p: -_cost(by_name[p[0]]) if p[0] in by_name else 0)
    results: dict[str, dict] = {}
    for name, cap in pairs:
        try:  # claim: exactly one worker creates this file
            os.close(os.open(os.path.join(claims_dir, f"{name}.sm{cap}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        if name not in by_name:
            summary = {"ok": False, "error": f"variant {name!r} is not in aot_variants() of the worker process"}
        else:
            summary = compile_one(by_name[name], cap)
        results.setdefault(name, {})[str(cap)] = summary
        with open(out_path + ".tmp", "w") as f:  # partial results survive a timeout
            json.dump(results, f)
        os.replace(out_path + ".tmp", out_path)


# ------------------------------------------------------------------------------------------------ collection
def _variant_meta() -> list[dict]:
    pytest.importorskip("triton")
    from fusedconv.kernels import aot_variants

    return [{**{k: v[k] for k in ("name", "dtype", "expects_tensor_cores")}, "expects_tma": v.get("expects_tma", False),
             "expects_tma_store": v.get("expects_tma_store", False), "programs_per_sm": v.get("programs_per_sm")}
            for v in aot_variants()]


_VARIANTS = _variant_meta() if __name__ != "__main__" else []  # script mode needs no collection


def test_variant_names_are_unique():
    names = [v["name"] for v in _VARIANTS]
    assert names, "aot_variants() returned no variants"
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_kernel_dtype_is_covered():
    """fp16, bf16 and fp32 variants exist, and at least one variant of each dtype expects tensor cores."""
    dtypes = {v["dtype"] for v in _VARIANTS}
    assert {"float16", "bfloat16", "float32"} <= dtypes, dtypes
    with_tc = {v["dtype"] for v in _VARIANTS if v["expects_tensor_cores"]}
    # Depthwise-only variant lists (no GEMM kernel) legitimately have no tensor-core variant.
    if any(not v["name"].startswith("dw_") for v in _VARIANTS):
        assert {"float16", "bfloat16"} <= with_tc, with_tc


@pytest.fixture(scope="module")
def compile_results(request):
    """Compile the selected (variant, target) pairs in parallel worker processes; {name: {cap: summary}}."""
    pairs = sorted({(item.callspec.params["variant"]["name"], item.callspec.params.get("cap", 90))
                    for item in request.session.items
                    if item.module is request.module and hasattr(item, "callspec")
                    and "variant" in item.callspec.params})
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(pairs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="fusedconv-aot-") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")  # fresh: every variant really compiles
        pairs_path, claims = os.path.join(tmp, "pairs.json"), os.path.join(tmp, "claims")
        os.mkdir(claims)
        with open(pairs_path, "w") as f:
            json.dump(pairs, f)
        outs = [os.path.join(tmp, f"worker{i}.json") for i in range(workers)]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--pairs", pairs_path, "--claims",
                                   claims, "--out", out], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for out in outs]
        deadline = time.monotonic() + COMPILE_TIMEOUT_S
        logs = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                out = f"[worker timed out after {COMPILE_TIMEOUT_S} s]\n" + (out or "")
            logs.append(f"worker exit {proc.returncode}:\n{(out or '')[-3000:]}")
        merged: dict[str, dict] = {}
        for out in outs:
            if os.path.exists(out):
                with open(out) as f:
                    for name, per_cap in json.load(f).items():
                        merged.setdefault(name, {}).update(per_cap)
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    # Wall time depends on machine load; the workers' CPU time does not (printed with -s).
    print(f"\n[aot] compiled {len(pairs)} variant x target pairs with {workers} workers in "
          f"{time.perf_counter() - start:.0f} s wall, {cpu:.0f} s CPU")
    merged["__logs__"] = "\n".join(logs)
    return merged


def _result(compile_results, name: str, cap: int) -> dict:
    result = compile_results.get(name, {}).get(str(cap))
    if result is None:
        pytest.fail(f"no compile result for {name} on sm_{cap} (worker crashed or timed out):\n"
                    f"{compile_results['__logs__']}", pytrace=False)
    if not result["ok"]:
        pytest.fail(f"{name} failed to compile for sm_{cap}:\n{result['error']}", pytrace=False)
    return result


@pytest.mark.parametrize("cap", TARGETS, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda v: v["name"])
def test_compiles_to_ptx(compile_results, variant, cap):
    result = _result(compile_results, variant["name"], cap)
    assert result["ptx_chars"] > 0, "empty PTX"
    assert result["cubin"], "ptxas produced no cubin"
    assert result["target_line"].startswith(f".target sm_{cap}"), result["target_line"]
    ops = result["tensor_core_ops"]
    if variant["expects_tensor_cores"]:
        wanted = ("mma.",) if cap == 80 else ("wgmma.", "mma.")
        used = [op for op in ops if op.startswith(wanted)]
        assert used, f"expected tensor-core instructions ({' or '.join(wanted)}) in the sm_{cap} PTX, found none"
        type_tag = _MMA_TYPE[variant["dtype"]]
        assert any(type_tag in op for op in used), \
            f"expected {type_tag} tensor-core instructions for {variant['dtype']}, found {used}"
    else:
        assert not ops, f"variant expects no tensor cores (IEEE fp32 / direct kernel) but its PTX has {ops}"


@pytest.mark.parametrize("variant", [v for v in _VARIANTS if v["expects_tma"]], ids=lambda v: v["name"])
def test_tma_variants_use_bulk_tensor_copies_and_wgmma(compile_results, variant):
    """On sm_90 the TMA kernels load through the copy engine (cp.async.bulk.tensor) into wgmma; a silent fallback
    to per-thread loads would still compile and pass the other checks."""
    result = _result(compile_results, variant["name"], 90)
    assert result["bulk_tensor_copies"] > 0, "no cp.async.bulk.tensor in the sm_90 PTX"
    assert any(op.startswith("wgmma.") for op in result["tensor_core_ops"]), result["tensor_core_ops"]


@pytest.mark.parametrize("variant", [v for v in _VARIANTS if v["expects_tma_store"]], ids=lambda v: v["name"])
def test_tma_store_epilogue_variants_store_through_the_copy_engine(compile_results, variant):
    """The TMA-store-epilogue variants (conv_tma's TMA_EPILOGUE configs) write their output tile with a bulk
    tensor store on sm_90, keep wgmma, and spill nothing; the pointer-store variants have no such store."""
    result = _result(compile_results, variant["name"], 90)
    assert result["bulk_tensor_stores"] > 0, "no cp.async.bulk.tensor ... global.shared::cta store in the PTX"
    assert any(op.startswith("wgmma.") for op in result["tensor_core_ops"]), result["tensor_core_ops"]
    assert result["spill_bytes"] == 0, f"spills {result['spill_bytes']} bytes (stack + local)"


#: Shared memory of one Hopper SM (sm_90: 228 KB), of which the runtime reserves 1 KB per resident program.
SM90_SHARED_PER_SM, SHARED_RESERVED_PER_PROGRAM = 228 * 1024, 1024


@pytest.mark.parametrize("variant", [v for v in _VARIANTS if v["programs_per_sm"]], ids=lambda v: v["name"])
def test_persistent_variants_fit_their_programs_per_sm(compile_results, variant):
    """A persistent config launches PROGRAMS_PER_SM programs per SM and relies on all of them being resident
    at once (a program left waiting runs its whole share of tiles after the others): the compiled kernel's shared
    memory, times that count, fits one SM."""
    result = _result(compile_results, variant["name"], 90)
    shared = result["shared_bytes"]
    assert shared is not None, "the compiled kernel reports no shared-memory size"
    per_sm = variant["programs_per_sm"]
    assert (shared + SHARED_RESERVED_PER_PROGRAM) * per_sm <= SM90_SHARED_PER_SM, \
        f"{per_sm} programs x ({shared} + {SHARED_RESERVED_PER_PROGRAM}) bytes > {SM90_SHARED_PER_SM}"


def test_pointer_store_tma_variants_have_no_bulk_store(compile_results):
    """Counterpart of the check above, so it cannot pass on a regex that matches the loads: the pointer-store
    TMA 1x1 variants compiled in the same session — a TMA_EPILOGUE config launched without output descriptors
    (`_nodesc`) among them — have bulk-tensor loads and no bulk-tensor store."""
    names = [v["name"] for v in _VARIANTS if v["expects_tma"] and not v["expects_tma_store"]
             and v["name"].startswith("tma_conv1x1_") and v["name"] in compile_results]
    if not names:
        pytest.skip("no pointer-store TMA 1x1 variant selected in this session")
    for name in names:
        result = _result(compile_results, name, 90)
        assert result["bulk_tensor_copies"] > 0 and result["bulk_tensor_stores"] == 0, (name, result)


# ------------------------------------------------------------------------------------------------ other triton
#: The triton of the GPU machine (its torch's pin); compiled against in a child process.
GPU_MACHINE_TRITON = "3.6.0"
GPU_MACHINE_CAP = 90  # the GPU machine's architecture (an H200): the triton 3.6 child compiles for it alone
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXPECT_ENV = "FUSEDCONV_EXPECT_TRITON"  # set in the child: the triton version it must have imported
CHILD_TIMEOUT_S = 3 * COMPILE_TIMEOUT_S


def test_imported_triton_is_the_expected_one():
    """In the child run, the triton on PYTHONPATH (not the venv's) is the one being compiled with."""
    import triton

    expected = os.environ.get(_EXPECT_ENV)
    if not expected:
        pytest.skip(f"only meaningful in the triton-{GPU_MACHINE_TRITON} child run ({_EXPECT_ENV} unset)")
    assert triton.__version__ == expected, (triton.__version__, triton.__file__)


def install_triton(version: str) -> tuple[str | None, str]:
    """(directory holding triton `version`, "") — installed there with pip on first use — or (None, reason)."""
    target = os.path.join(_REPO_ROOT, ".cache", f"triton-{version}")
    if os.path.isfile(os.path.join(target, "triton", "__init__.py")):
        return target, ""
    tmp = f"{target}.partial-{os.getpid()}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", tmp, f"triton=={version}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"pip install triton=={version} did not finish: {exc}"
    if out.returncode != 0:
        return None, f"pip install triton=={version} failed ({out.returncode}): {out.stderr.strip()[-500:]}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(tmp, target)  # atomic: a concurrent run sees a complete directory or none
    except OSError:
        if not os.path.isfile(os.path.join(target, "triton", "__init__.py")):
            raise
    return target, ""


_TRITON36_TEST = "test_every_variant_compiles_with_gpu_machine_triton"
_triton36_run: dict = {}  # the child run started by start_in_background: proc, log, deadline (or skip)


def _start_triton36_child() -> dict:
    """Start this file's compile tests in a child pytest with triton 3.6 first on PYTHONPATH (not waited for)."""
    target, reason = install_triton(GPU_MACHINE_TRITON)
    if target is None:
        return {"skip": f"cannot install triton {GPU_MACHINE_TRITON} (no wheel reachable): {reason}"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([target] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[_EXPECT_ENV] = GPU_MACHINE_TRITON
    env["FUSEDCONV_AOT_TIMEOUT_S"] = str(2 * COMPILE_TIMEOUT_S)  # the child's workers; the test's own limit is 3x
    # sm_90 only: the GPU machine that runs triton 3.6 is an H200; triton 3.6 for sm_80 would check no machine of
    # ours, and the compiles were a large part of the suite's CPU time on CI's two cores.
    others = " or ".join(f"sm{cap}" for cap in TARGETS if cap != GPU_MACHINE_CAP)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", f"not ({others})",
           os.path.abspath(__file__)]
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: nobody reads it while it runs
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=_REPO_ROOT)
    return {"proc": proc, "log": log, "deadline": time.monotonic() + CHILD_TIMEOUT_S}


def start_in_background(session) -> None:
    """Called by conftest.py when the test loop starts: the triton-3.6 child run (several minutes of compiling)
    starts then, beside the in-process tests, instead of when its test is reached; the test waits for it."""
    selected = any(getattr(item, "originalname", None) == _TRITON36_TEST and item.module.__name__ == __name__
                   for item in session.items)
    if selected and not os.environ.get(_EXPECT_ENV) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") \
            and not _triton36_run:
        _triton36_run.update(_start_triton36_child())


def stop_background() -> None:
    """Called by conftest.py at the end of the session: a child run nobody waited for (e.g. -x) is killed."""
    proc = _triton36_run.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    log = _triton36_run.get("log")
    if log is not None and not log.closed:
        log.close()


@pytest.mark.skipif(bool(os.environ.get(_EXPECT_ENV)), reason="already the child run")
def test_every_variant_compiles_with_gpu_machine_triton():
    """Every variant compiles for sm_90 (and passes the PTX checks above) with triton 3.6 in a child pytest."""
    if not _triton36_run:  # not started when the loop began (e.g. this file run without the conftest)
        _triton36_run.update(_start_triton36_child())
    if "skip" in _triton36_run:
        pytest.skip(_triton36_run["skip"])
    proc, log = _triton36_run["proc"], _triton36_run["log"]
    try:
        proc.wait(timeout=max(1.0, _triton36_run["deadline"] - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_background()
        pytest.fail(f"the triton {GPU_MACHINE_TRITON} child run took over {CHILD_TIMEOUT_S} s", pytrace=False)
    log.seek(0)
    tail = log.read()[-6000:]
    log.close()
    assert proc.returncode == 0, f"triton {GPU_MACHINE_TRITON} child run failed:\n{tail}"
    summary = re.search(r"(\d+) passed", tail)
    assert summary and int(summary.group(1)) >= len(_VARIANTS), f"too few tests passed in the child:\n{tail}"


# ------------------------------------------------------------------------------------------------ script mode
def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", help="JSON list of [variant name, cap] pairs to compile")
    parser.add_argument("--claims", help="directory shared by the workers for claiming pairs")
    parser.add_argument("--out", help="JSON file for this worker's compile summaries")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        from fusedconv.kernels import aot_variants

        for v in aot_variants():
            print(v["name"], v["dtype"], "tensor-cores" if v["expects_tensor_cores"] else "no-tensor-cores")
        return
    if not (args.pairs and args.claims and args.out):
        parser.error("--pairs, --claims and --out are required unless --list is given")
    _worker(args.pairs, args.claims, args.out)


if __name__ == "__main__":
    _main()
