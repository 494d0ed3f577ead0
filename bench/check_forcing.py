"""GPU check helpers that make the library's launcher run one exact thing: a forced autotune config of any
kernel (`forced_config`), or the launcher's "streamk" warm-up candidate (`pinned_warmup`).

Why: the autotuner and the variant choice run only their winner, so a config or candidate that computes
garbage but is never fastest stays hidden; the check (bench/check_correctness.py) forces each in turn through
the real launcher instead of calling kernels directly, so the launch code is checked with them.
"""

from __future__ import annotations

import contextlib
import importlib


def _conv_module():
    # The package binds the launcher function over its module's name: import the module itself.
    return importlib.import_module("fusedconv.kernels.conv_bn_act")


@contextlib.contextmanager
def forced_config(cfg, depthwise: bool, kernel: str = "gemm"):
    """Run the library's launcher with exactly `cfg` (an autotuner holding one config never benchmarks).

    Under TRITON_INTERPRET=1 the launcher runs its fixed interpreter config instead; nothing is forced there
    (the CPU dry run exercises this code path, not the configs).
    """
    import triton

    if depthwise:
        dw = importlib.import_module("fusedconv.kernels.depthwise")
        saved = dw._autotuned
        single = triton.autotune(configs=[cfg], key=dw.AUTOTUNE_KEY)(dw._depthwise_kernel)
        dw._autotuned = lambda *args: single
        try:
            yield
        finally:
            dw._autotuned = saved
        return
    if kernel in ("tma1x1_streamk", "tmakxk_streamk"):
        sk = importlib.import_module("fusedconv.kernels.conv_tma_streamk")
        fn = sk._conv1x1_tma_streamk_kernel if kernel == "tma1x1_streamk" else sk._conv_kxk_tma_streamk_kernel
        single = triton.autotune(configs=[cfg], key=["M"] if kernel == "tma1x1_streamk" else ["N"])(fn)
        saved = sk._autotuned_kernel
        sk._autotuned_kernel = lambda kind, programs: single  # every program count: this config
        try:
            yield
        finally:
            sk._autotuned_kernel = saved
        return
    if kernel in ("tma1x1", "tmakxk"):
        tma_mod = importlib.import_module("fusedconv.kernels.conv_tma" if kernel == "tma1x1"
                                          else "fusedconv.kernels.conv_tma_kxk")
        fn = tma_mod._conv1x1_tma_kernel if kernel == "tma1x1" else tma_mod._conv_kxk_tma_kernel
        keys = (["M", "CIN", "COUT", "OW", "HAS_RESIDUAL", "ACTIVATION"] if kernel == "tma1x1"
                else ["N", "OH", "OW", "CIN", "COUT", "KH", "KW", "HAS_RESIDUAL"])
        saved = tma_mod._autotuned
        tma_mod._autotuned = triton.autotune(configs=[cfg], key=keys)(fn)
        try:
            yield
        finally:
            tma_mod._autotuned = saved
        return
    mod = _conv_module()
    if not hasattr(mod, "_autotuned_kernel"):
        raise RuntimeError("fusedconv.kernels.conv_bn_act has no _autotuned_kernel: the GPU check cannot force a "
                           "config; update bench/check_correctness.forced_config")
    if not hasattr(mod, "_get_autotuned_streamk"):
        raise RuntimeError("fusedconv.kernels.conv_bn_act has no _get_autotuned_streamk: the GPU check cannot force "
                           "a stream-K config; update bench/check_correctness.forced_config")
    saved = mod._autotuned_kernel, mod._get_autotuned_streamk
    mod._autotuned_kernel = triton.autotune(configs=[cfg], key=mod._configs.AUTOTUNE_KEY)(mod._conv_gemm_kernel)
    # The stream-K kernel gets the same config at every program count (only tiles that fit its workspace
    # slots are ever run through it: `check_item` runs stream-K with stream-K candidates only).
    single_streamk = triton.autotune(configs=[cfg], key=mod._configs.STREAMK_AUTOTUNE_KEY)(mod._conv_streamk_kernel)
    mod._get_autotuned_streamk = lambda programs: single_streamk
    try:
        yield
    finally:
        mod._autotuned_kernel, mod._get_autotuned_streamk = saved


@contextlib.contextmanager
def pinned_warmup(active: bool):
    """While active, the launcher's variant choice takes its "streamk" warm-up candidate (no timing, nothing
    cached); raises if the launcher does not offer one, so a layer planned to offer it fails loudly."""
    if not active:
        yield
        return
    mod = _conv_module()
    saved = mod._variant_choice

    class _PickStreamK:
        @staticmethod
        def choose(key, candidates, device, output=None):
            if "streamk" not in candidates:
                raise RuntimeError(f"the launcher offered no 'streamk' warm-up candidate (offered: "
                                   f"{sorted(candidates)})")
            return "streamk"

    mod._variant_choice = _PickStreamK
    try:
        yield
    finally:
        mod._variant_choice = saved
