"""GPU check, stream-K planning: which program counts each stream-K config runs at, and which layer times the
"streamk" warm-up candidate. Planning only (no GPU): the counts come from the library's own schedule rule for a
given SM count, so the CPU tests can inspect the case list the GPU machine will run.

Why several counts: the stream-K kernels (pointer and TMA) split work units (K steps of output tiles) over P
programs, floor(units / P) each and the first units % P one more; the rule runs P = the SM count, more programs
than SMs on batch-1 short-K layers (`schedule.streamk_program_counts`, up to two per SM) and, where the rule's
pick leaves the GPU short, a filling count timed at warm-up. Each count gives other slices, other shared tiles
and other fix-up paths, so every config meets the float64 reference at each of them — plus, where none of those
counts leaves a remainder for that config's tile, one count that does (some programs one step more). Extra
counts cost run time only: the program count is the grid, not a compile-time constant.
"""

from __future__ import annotations

import torch

#: The schedules of the check's stream-K runs: the pointer stream-K kernel, the TMA stream-K kernels (where a
#: TMA kernel is eligible), and the launcher's "streamk" warm-up candidate on a layer that offers it.
STREAMK_SCHEDULES = ("stream-K", "tma-stream-K")
WARMUP_SCHEDULE = "streamk-warmup"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layer_plan(g, batch: int, dtype: torch.dtype, num_sms: int) -> dict:
    """The launcher's plan (`conv_plan._plan`) of this layer in channels_last with `num_sms` SMs: schedule,
    stream-K programs, filling stream-K count. Metadata only."""
    from fusedconv.kernels import conv_plan

    oh, ow = g.out_hw()
    x_shape = (batch, g.cin, g.h, g.w)
    w_shape = (g.cout, g.cin // g.groups, g.kh, g.kw)
    x_stride = conv_plan._dense_strides(x_shape, True)
    w_stride = conv_plan._dense_strides(w_shape, True)
    out_shape = (batch, g.cout, oh, ow)
    res_meta = (out_shape, conv_plan._dense_strides(out_shape, True), dtype) if g.residual else None
    act_param = 0.01 if g.activation == "leaky_relu" else 0.0
    return conv_plan._plan(x_shape, x_stride, dtype, torch.device("cuda"), w_shape, w_stride, dtype, (g.cout,),
                           (g.cout,), res_meta, g.stride, g.padding, g.dilation, g.groups, g.activation, act_param,
                           None, dtype == torch.float32, True, None, sm_count=lambda device: num_sms)


def rule_program_counts(g, batch: int, dtype: torch.dtype, num_sms: int) -> list[int]:
    """Every program count the library may launch this layer's stream-K kernels with on `num_sms` SMs: one per
    SM, the rule's counts above it (`schedule.streamk_program_counts`), the rule's pick and the filling count."""
    from fusedconv.kernels import schedule

    plan = layer_plan(g, batch, dtype, num_sms)
    counts = {num_sms}
    groups = plan["cout"] // plan["cout_g"]
    k_guess = k_steps(g, 64)
    counts.update(schedule.streamk_program_counts(plan["m"], plan["cout_g"], groups, k_guess, num_sms))
    counts.update(p for p in (plan["streamk_programs"], plan["filling_streamk"]) if p)
    return sorted(counts)


def k_steps(g, block_k: int) -> int:
    """K steps per output tile of the pointer kernel's loop for this layer at `block_k` (the launcher's
    loop choice: row-K, flattened K or per-tap channel blocks)."""
    from fusedconv.kernels import conv_plan

    cin_g = g.cin // g.groups
    is_1x1 = g.kh == g.kw == 1 and g.padding == (0, 0)
    small_cin = not is_1x1 and g.kh * g.kw > 1 and cin_g < conv_plan._FLAT_K_BELOW
    row_k = small_cin and g.kw * cin_g <= conv_plan._ROW_K_MAX_WIDTH
    return conv_plan._k_iterations_guess(g.kh, g.kw, cin_g, row_k, small_cin and not row_k, block_k)


def work_units(g, batch: int, cfg, kernel: str) -> int:
    """Work units (K steps x output tiles) of one stream-K launch of `kernel` ("streamk", "tma1x1_streamk",
    "tmakxk_streamk") with config `cfg`, as the kernel splits them."""
    kw = cfg.kwargs
    oh, ow = g.out_hw()
    cout_g = g.cout // g.groups
    if kernel == "tmakxk_streamk":  # tiles of BLOCK_H x BLOCK_W output pixels of one image
        tiles = batch * _cdiv(oh, kw["BLOCK_H"]) * _cdiv(ow, kw["BLOCK_W"]) * _cdiv(g.cout, kw["BLOCK_N"])
        return tiles * g.kh * g.kw * _cdiv(g.cin, kw["BLOCK_K"])
    tiles = _cdiv(batch * oh * ow, kw["BLOCK_M"]) * _cdiv(cout_g, kw["BLOCK_N"]) * g.groups
    if kernel == "tma1x1_streamk":
        return tiles * _cdiv(g.cin, kw["BLOCK_K"])
    return tiles * k_steps(g, kw["BLOCK_K"])


def uneven(units: int, programs: int) -> bool:
    """Whether `programs` programs get unequal slices of `units` (some one step more), none of them empty."""
    return units > programs and units % programs != 0


def config_program_counts(counts: list[int], units: int) -> list[int]:
    """The counts one config runs at: `counts` and, where none of them splits its `units` unevenly, one that
    does (units // 2 + 1 programs: one step each, the first units - P two) when the config has >= 3 units."""
    out = sorted(set(counts))
    if units >= 3 and not any(uneven(units, p) for p in out):
        out.append(units // 2 + 1)
    return out


def warmup_case(layers, batches, dtype: torch.dtype, num_sms: int):
    """(geometry, batch) of the first layer whose plan offers the "streamk" warm-up candidate on `num_sms`
    SMs (the rule's pick leaves the GPU short and a stream-K schedule fills it), or None."""
    for batch in batches:
        for g in layers:
            if not g.depthwise and layer_plan(g, batch, dtype, num_sms)["filling_streamk"]:
                return g, batch
    return None
