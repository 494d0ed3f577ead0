"""Which schedule a conv GEMM launches with — data-parallel tiles, split-K or stream-K — from a cost model.

The schedule is a launch decision, not an autotuned one: split-K needs a workspace and a second kernel,
stream-K another kernel with a workspace and tile counters, so the launcher fixes it per shape and SM count
before the autotuner (whose key includes it) picks tiles.

The model (an H100-class part; only ratios matter) rates each tile shape of the pointer kernel's config table
(128x128 down to 16x64, capped to the problem as the config pruning caps them) under each schedule:

* compute: the programs run in rounds on `num_sms` SMs — as many at once per SM as its shared memory and
  registers hold (`resident_programs`) — sharing the per-SM share of the fp16 dense tensor-core rate times the
  tile shape's efficiency (smaller tiles re-read more operands per FLOP);
* memory latency: a program keeps about `STAGES_IN_FLIGHT` K steps of loads in flight (the pipeline
  depth), so by Little's law one K step takes at least `LOAD_LATENCY_S / STAGES_IN_FLIGHT` however small the
  tile (co-resident programs overlap theirs) — small tiles and short grids are latency-bound, which is why
  spreading K over more SMs, or more programs per SM, pays at batch 1;
* memory bandwidth: the layer's compulsory bytes (input, weight, output; a split adds its fp32 workspace,
  written once and read once) move at most at `_HBM_BYTES_PER_S`, stream-K's partial tiles (written and read
  back while the grid runs) through L2 at `_L2_BYTES_PER_S`: so splitting a layer that is already
  bandwidth-bound buys nothing and its extra bytes cost time;
* fixed costs: every tile a program starts pays one load latency before its pipeline streams
  (`LOAD_LATENCY_S`); a split pays the epilogue kernel's launch; a stream-K tile shared by several programs
  pays, on the completing program's critical path, reading the other contributors' fp32 partial tiles from L2
  at that program's share of the L2 bandwidth.

Stream-K runs one program per SM, or — where a small tile's work units number between one and two per SM —
as many programs as give each a whole number of K steps (`streamk_program_counts`): at batch 1 a short-K
layer then runs one K step per program, so no program pays a second tile's pipeline start, and the extra
programs share SMs (`model_resident`) while their load latencies overlap. A slice's cost counts the tiles it
may touch and the partial tiles it leaves (`streamk_slices`, the kernel's balanced slicing: floor(units /
programs) units per program, the first units % programs one more, so no program is idle or short while
another runs, unless there are fewer units than programs).

A schedule's time is max(K loop + tile latencies, bytes / HBM bandwidth) plus its fixed costs.
`choose_schedule` fills the GPU first — it prefers a schedule that keeps the SMs busy as far as the layer's
work allows while that is modelled within FILL_TOLERANCE of the fastest — then takes the fastest, and leaves
data-parallel only when another schedule wins clearly (the model is coarse). The constants are assumptions
of this model, not measurements: the GPU check is what calibrates them.

Work units: one K step of one output tile. No schedule can keep more programs busy than a layer has work
units (a stream-K program needs at least one K step), so `achievable_waves` — the units of the smallest tile
over the SM count, capped at 1 — is the most of the GPU any schedule can fill; the static report states every
layer against it.
"""

from __future__ import annotations

import math

_PEAK_FLOPS = 750e12
_HBM_BYTES_PER_S = 3e12
# Loaded-HBM latency of a K step's loads, and how many K steps a program keeps in flight (num_stages - 1 of
# the 3-4 stage configs): assumptions of the model, for the GPU check to calibrate.
LOAD_LATENCY_S = 0.8e-6
STAGES_IN_FLIGHT = 3
# L2 read bandwidth shared by all SMs (H100-class, measured figures are ~5.5-7 TB/s: the low end).
_L2_BYTES_PER_S = 5.5e12
EPILOGUE_LAUNCH_S = 1.5e-6

#: Shared memory and registers of one SM (H100-class), and the most programs the model lets share it.
SMEM_PER_SM = 227 * 1024
REGISTERS_PER_SM = 65536
_MAX_RESIDENT = 16

#: Tile shapes the model rates (the pointer kernel's 16-bit config table, largest accumulator first).
MODEL_TILES = ((128, 128), (64, 128), (64, 64), (32, 64), (16, 64))
_SPLITS = (1, 2, 4, 8, 16)
# A schedule other than plain data-parallel must beat it by this factor to be chosen.
_CLEAR_WIN = 0.95
#: A schedule that fills the GPU is preferred while modelled at most this factor slower than the fastest.
FILL_TOLERANCE = 1.10
#: Share of the achievable waves that counts as filling the GPU (see `fills`).
FILL_FRACTION = 0.9
# A split slice keeps at least this many K iterations (each slice's pipeline still streams).
_MIN_SPLIT_STEPS = 2
#: Stream-K needs at least this many K iterations per tile (with one there is nothing to share).
STREAMK_MIN_K_ITERS = 2
#: Largest stream-K tile (BLOCK_M * BLOCK_N): sizes the per-program workspace slots.
STREAMK_MAX_TILE = 128 * 128
# Most stream-K programs per SM the rule launches: the launcher gives every program two workspace slots of
# STREAMK_MAX_TILE fp32 values (128 KiB), so two per SM already reserve ~34 MB on 132 SMs; one-step slices
# that would need more programs run as longer slices instead.
_STREAMK_PROGRAMS_PER_SM = 2


def tile_efficiency(block_m: int, block_n: int) -> float:
    """Relative per-SM tensor-core rate of a BLOCK_M x BLOCK_N tile: its operand intensity (FLOP per byte of
    A and B fed to the MMAs, BM·BN / (BM + BN)) against a 128x128 tile's, to the power 0.7 (fits the usual
    Hopper GEMM picture: 64x128 ~0.75, 64x64 ~0.6, 128x128 and larger 1.0)."""
    return min(1.0, (block_m * block_n / (block_m + block_n)) / 64.0) ** 0.7


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


def model_tiles(m: int, cout_g: int) -> list[tuple[int, int]]:
    """MODEL_TILES capped to the problem like the config pruning caps them (M and N to the power of two >= 16
    at or above them), duplicates removed."""
    cap_m, cap_n = _pow2_at_least_16(m), _pow2_at_least_16(cout_g)
    out = []
    for bm, bn in MODEL_TILES:
        tile = (min(bm, cap_m), min(bn, cap_n))
        if tile not in out:
            out.append(tile)
    return out


def work_units(m: int, cout_g: int, groups: int, k_iters: int, block_m: int, block_n: int) -> int:
    """K steps of all output tiles of a BLOCK_M x BLOCK_N tiling: the most programs any schedule can keep busy."""
    return _cdiv(m, block_m) * _cdiv(cout_g, block_n) * groups * max(k_iters, 1)


def achievable_waves(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int) -> float:
    """The largest fraction of `num_sms` SMs any schedule can fill (capped at 1.0): the work units of the
    smallest model tile over the SM count. Below 1.0 the layer has less work than the GPU has SMs."""
    if num_sms <= 0 or m <= 0 or cout_g <= 0:
        return 0.0
    units = max(work_units(m, cout_g, groups, k_iters, bm, bn) for bm, bn in model_tiles(m, cout_g))
    return min(1.0, units / num_sms)


def layer_bytes(m: int, cout_g: int, groups: int, k_iters: int, block_k: int = 64, input_k: int | None = None,
                elem_bytes: int = 2) -> float:
    """Compulsory bytes of the conv GEMM: the input (`input_k` channels per output row and group, default the
    GEMM's K: a kxk conv re-reads its halo from L2, not HBM), the weight and the output."""
    k = k_iters * block_k
    input_k = k if input_k is None else input_k
    return float(elem_bytes * groups * (m * input_k + cout_g * k + m * cout_g))


def _step_s(bm: int, bn: int, block_k: int, num_sms: int, resident: int = 1) -> float:
    """One K step of `resident` programs sharing an SM: their tensor-core time at the per-SM rate, or the
    latency floor (which co-resident programs overlap)."""
    compute = 2.0 * bm * bn * block_k / (_PEAK_FLOPS / max(num_sms, 1) * tile_efficiency(bm, bn))
    return max(resident * compute, LOAD_LATENCY_S / STAGES_IN_FLIGHT)


def resident_programs(shared_bytes: float, registers: int, num_warps: int,
                      smem_per_sm: int = SMEM_PER_SM) -> int:
    """How many programs of a kernel fit on one SM at once (shared memory, registers; at most
    _MAX_RESIDENT): small tiles hide each other's load latency."""
    by_smem = int(smem_per_sm // max(shared_bytes, 1))
    by_regs = REGISTERS_PER_SM // max(registers * 32 * num_warps, 1)
    return max(1, min(by_smem, by_regs, _MAX_RESIDENT))


def model_resident(bm: int, bn: int, block_k: int = 64, elem_bytes: int = 2) -> int:
    """`resident_programs` of a model tile as the config table builds it: 8 warps from 128x128 up (3 stages),
    else 4 warps (4 stages); about 64 registers per thread besides the accumulator."""
    warps, stages = (8, 3) if bm * bn >= 128 * 128 else (4, 4)
    smem = (bm + bn) * block_k * elem_bytes * stages
    return resident_programs(smem, bm * bn // (32 * warps) + 64, warps)


def estimate_time(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int, split: int,
                  block_k: int = 64, nbytes: float | None = None,
                  tiles: tuple | None = None) -> tuple[float, tuple[int, int]]:
    """Modelled seconds of a data-parallel conv GEMM with `split` K slices, and the tile that achieves it
    (among `tiles`, default `model_tiles`)."""
    nbytes = layer_bytes(m, cout_g, groups, k_iters, block_k) if nbytes is None else nbytes
    sms = max(num_sms, 1)
    best = (float("inf"), (128, 128))
    for bm, bn in tiles or model_tiles(m, cout_g):
        programs = _cdiv(m, bm) * _cdiv(cout_g, bn) * groups * split
        per_sm = min(model_resident(bm, bn, block_k), _cdiv(programs, sms))  # programs sharing an SM
        rounds = _cdiv(programs, sms * per_sm)
        loop = rounds * (_cdiv(k_iters, split) * _step_s(bm, bn, block_k, sms, per_sm) + LOAD_LATENCY_S)
        moved = nbytes + (2.0 * split * m * cout_g * groups * 4 if split > 1 else 0.0)
        t = max(loop, moved / _HBM_BYTES_PER_S)
        if split > 1:
            t += EPILOGUE_LAUNCH_S
        if t < best[0]:
            best = (t, (bm, bn))
    return best


def streamk_fixup_s(block_m: int, block_n: int, k_iters: int, per_prog: int, num_sms: int) -> float:
    """Critical-path seconds a shared stream-K tile adds: the completing program reads the other contributors'
    fp32 partial tiles (k_iters / per_prog - 1 of them on average, at least one) from L2 at its share of the L2
    bandwidth (`num_sms`: the programs sharing it at once); 0 when every program covers whole tiles."""
    if per_prog % k_iters == 0:
        return 0.0
    partials = max(1.0, k_iters / per_prog - 1.0) if per_prog < k_iters else 1.0
    return partials * block_m * block_n * 4 / (_L2_BYTES_PER_S / max(num_sms, 1))


def streamk_slices(units: int, k_iters: int, programs: int) -> dict:
    """How `programs` stream-K programs split `units` work units (tile-major, `k_iters` per tile), as the
    kernel does (`conv_streamk.streamk_slice`: balanced contiguous slices, floor(units / programs) units each
    and the first units % programs one more):

    `per_prog` the longest slice (ceil(units / programs): the critical path); `busy` programs with a non-empty
    slice (all of them, unless there are fewer units than programs); `touched` the most tiles one slice
    may touch (each costs its program a pipeline start): a slice of L units starting at any offset of a
    k-unit tile touches at most ceil((L - 1) / k) + 1 tiles — one when it is a single K step. The bound holds
    for any offset because where slices start within tiles depends on the tile the autotuner picks, not
    the model's. `segments`: the tile segments that are not a whole tile (each is written to the workspace
    once and read back once), counted for this tiling.
    """
    k = max(k_iters, 1)
    programs = max(programs, 1)
    base, extra = divmod(max(units, 0), programs)
    per_prog = base + (1 if extra else 0)
    busy = min(programs, max(units, 0))
    tiles = _cdiv(units, k)
    touched = min(tiles, _cdiv(per_prog - 1, k) + 1) if busy else 0
    segments = 0
    if busy:
        # the `extra` long slices from unit 0, then the short ones (none when base is 0)
        segments = _run_segments(0, base + 1, extra, k)
        if base:
            segments += _run_segments(extra * (base + 1), base, programs - extra, k)
    return {"per_prog": per_prog, "busy": busy, "touched": touched, "segments": segments}


def _run_segments(offset: int, length: int, count: int, k: int) -> int:
    """Partial tile segments of `count` back-to-back slices of `length` units from unit `offset`. Only a
    slice's first and last tile can be partial (the tiles between are whole), and that depends only on where
    it starts within a tile, which repeats every k / gcd(length, k) slices: count one period and scale."""
    if count <= 0 or length <= 0:
        return 0
    period = k // math.gcd(length, k)
    once = [_partial_segments(offset + p * length, offset + (p + 1) * length, k) for p in range(min(count, period))]
    return (count // period) * sum(once) + sum(once[:count % period]) if count > period else sum(once)


def _partial_segments(start: int, end: int, k: int) -> int:
    """Partial tiles (0-2) of the slice [start, end) of k-unit tiles: its first and its last tile."""
    first, last = start // k, (end - 1) // k
    return int(start > first * k or end < (first + 1) * k) + int(last != first and end < (last + 1) * k)


def streamk_program_counts(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int) -> list[int]:
    """Program counts the rule weighs for stream-K: one per SM and, for each model tile with more work units
    than SMs, the most programs up to _STREAMK_PROGRAMS_PER_SM per SM that split its units into whole slices
    of at most s units (ceil(units / s) programs, s the shortest slice that fits): at batch 1 a layer with a
    few more work units than SMs (MobileNetV2 features.4.conv.2: 49 tiles of 16x32 x 3 K steps = 147 units)
    otherwise runs slices of 2 steps that straddle tiles — two pipeline starts — where 147 programs of one
    step each, two per SM on some SMs, pay one."""
    counts = {num_sms}
    for bm, bn in model_tiles(m, cout_g):
        if bm * bn > STREAMK_MAX_TILE:
            continue
        units = work_units(m, cout_g, groups, k_iters, bm, bn)
        if units > num_sms:
            programs = _cdiv(units, _cdiv(units, _STREAMK_PROGRAMS_PER_SM * num_sms))
            if programs > num_sms:
                counts.add(programs)
    return sorted(counts)


def estimate_streamk_time(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int,
                          block_k: int = 64, nbytes: float | None = None,
                          tiles: tuple | None = None, programs: int | None = None) -> tuple[float, tuple[int, int]]:
    """Modelled seconds of the stream-K schedule on `programs` programs (default `num_sms`), and the tile that
    achieves it (among `tiles`, default `model_tiles`). Programs beyond the SM count share SMs as far as
    `model_resident` allows (their tensor-core time adds up, their load latencies overlap) and run in rounds
    beyond that, as data-parallel programs do in `estimate_time`."""
    nbytes = layer_bytes(m, cout_g, groups, k_iters, block_k) if nbytes is None else nbytes
    sms = max(num_sms, 1)
    programs = sms if programs is None else max(programs, 1)
    best = (float("inf"), (128, 128))
    for bm, bn in tiles or model_tiles(m, cout_g):
        if bm * bn > STREAMK_MAX_TILE:
            continue
        slices = streamk_slices(work_units(m, cout_g, groups, k_iters, bm, bn), k_iters, programs)
        per_sm = min(model_resident(bm, bn, block_k), _cdiv(slices["busy"], sms))
        rounds = _cdiv(slices["busy"], sms * per_sm)
        loop = rounds * (slices["per_prog"] * _step_s(bm, bn, block_k, sms, per_sm)
                         + slices["touched"] * LOAD_LATENCY_S)
        # partials are written once and read once right after, by programs running at the same time: L2 traffic
        partials = 2.0 * slices["segments"] * bm * bn * 4
        t = max(loop, nbytes / _HBM_BYTES_PER_S + partials / _L2_BYTES_PER_S)
        # the read-back runs at one SM's share of L2, or less where co-resident programs read at once
        t += streamk_fixup_s(bm, bn, k_iters, slices["per_prog"], max(sms, min(slices["busy"], sms * per_sm)))
        if t < best[0]:
            best = (t, (bm, bn))
    return best


def choose_split_k(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int, *,
                   nbytes: float | None = None) -> int:
    """Number of K slices of the data-parallel kernel: the power of two (1..16) with the lowest
    `estimate_time` on `num_sms` SMs.

    Deterministic (a function of the shape and the SM count only; the epilogue sums slices in a fixed order).
    A split only counts when each slice keeps at least _MIN_SPLIT_STEPS K iterations and wins clearly.
    """
    if m <= 0 or cout_g <= 0 or num_sms <= 0 or k_iters < 2 * _MIN_SPLIT_STEPS:
        return 1
    best_split, best_time = 1, estimate_time(m, cout_g, groups, k_iters, num_sms, 1, nbytes=nbytes)[0]
    for split in _SPLITS[1:]:
        if k_iters // split < _MIN_SPLIT_STEPS:
            break
        t = estimate_time(m, cout_g, groups, k_iters, num_sms, split, nbytes=nbytes)[0]
        if t < best_time * _CLEAR_WIN:  # a split must win clearly: the model is coarse
            best_split, best_time = split, t
    return best_split


def schedule_options(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int, *,
                     nbytes: float | None = None) -> list[dict]:
    """Every schedule the rule weighs: data-parallel and each split the K allows, stream-K where the K allows —
    each with its modelled seconds and the fraction of the SMs its programs (or work units, for stream-K) keep
    busy, capped at 1, both at the schedule's best tile (the fastest; of equally fast ones the busiest). The
    launcher fixes the schedule, the autotuner the tile: so a schedule counts as filling the GPU only if it
    does so at the tile it would most likely run with. Data-parallel comes first."""
    sms = max(num_sms, 1)
    out = []

    def best_of(kind, value, rated):
        best = min(rated, key=lambda r: (r[0], -r[1]))
        out.append({"kind": kind, "value": value, "time": best[0], "waves": best[1], "tile": best[2]})

    for split in _SPLITS:
        if split > 1 and (k_iters < 2 * _MIN_SPLIT_STEPS or k_iters // split < _MIN_SPLIT_STEPS):
            break
        rated = []
        for bm, bn in model_tiles(m, cout_g):
            t = estimate_time(m, cout_g, groups, k_iters, num_sms, split, nbytes=nbytes, tiles=((bm, bn),))[0]
            programs = _cdiv(m, bm) * _cdiv(cout_g, bn) * groups * split
            rated.append((t, min(1.0, programs / sms), (bm, bn)))
        best_of("split_k", split, rated)
    if k_iters >= STREAMK_MIN_K_ITERS:
        for programs in streamk_program_counts(m, cout_g, groups, k_iters, sms):
            rated = []
            for bm, bn in model_tiles(m, cout_g):
                if bm * bn > STREAMK_MAX_TILE:
                    continue
                t = estimate_streamk_time(m, cout_g, groups, k_iters, num_sms, nbytes=nbytes, tiles=((bm, bn),),
                                          programs=programs)[0]
                # programs with work: all, unless the tile has fewer units than programs
                busy = streamk_slices(work_units(m, cout_g, groups, k_iters, bm, bn), k_iters, programs)["busy"]
                rated.append((t, min(1.0, busy / sms), (bm, bn)))
            best_of("stream_k", programs, rated)
    return out


def pick(options: list[dict], achievable: float) -> dict:
    """The rule over `schedule_options` (see `choose_schedule`)."""
    fastest = min(o["time"] for o in options)
    pool = [o for o in options if fills(o["waves"], achievable) and o["time"] <= fastest * FILL_TOLERANCE]
    pool = pool or options
    best = min(pool, key=lambda o: (o["time"], -o["waves"]))
    plain = options[0]  # data-parallel
    if plain in pool and plain["time"] * _CLEAR_WIN <= best["time"]:
        best = plain
    return best


def schedule_candidates(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int, *,
                        nbytes: float | None = None) -> list[dict]:
    """The schedules a launch weighs, as `schedule_options` entries: the rule's pick (`pick`, what
    `choose_schedule` returns) first and, where that pick does not fill the GPU (`fills` against
    `achievable_waves`) but a stream-K option does, the fastest such option as well (ties: the busier).

    Why: the rule fixes the schedule from an uncalibrated model before the autotuner runs, and on a few
    layers (ResNet-50 layer3.1.conv1 at batch 32, ...) that model rates every filling schedule 8-58 % slower
    than a data-parallel grid that leaves SMs idle. Only a GPU can say which is right, so the launcher times
    the second entry at warm-up beside the first (`variant_choice`, candidate "streamk") and keeps the faster.
    Empty without SMs or work."""
    if m <= 0 or cout_g <= 0 or num_sms <= 0:
        return []
    options = schedule_options(m, cout_g, groups, k_iters, num_sms, nbytes=nbytes)
    reach = achievable_waves(m, cout_g, groups, k_iters, num_sms)
    best = pick(options, reach)
    out = [best]
    if not fills(best["waves"], reach):
        filling = [o for o in options if o["kind"] == "stream_k" and fills(o["waves"], reach)]
        if filling:
            out.append(min(filling, key=lambda o: (o["time"], -o["waves"])))
    return out


def filling_streamk(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int, *,
                    nbytes: float | None = None) -> int:
    """Programs of the filling stream-K schedule timed at warm-up beside the rule's pick (the second entry of
    `schedule_candidates`), or 0 where there is none (the pick fills, or no stream-K option does)."""
    cands = schedule_candidates(m, cout_g, groups, k_iters, num_sms, nbytes=nbytes)
    return cands[1]["value"] if len(cands) > 1 else 0


def fills(waves: float, achievable: float) -> bool:
    """Whether a schedule keeping `waves` of the SMs busy fills the GPU as far as the layer allows: at least
    FILL_FRACTION of `achievable` (split-K's slice counts are powers of two, so 128 programs on 132 SMs is a
    split-K schedule at its best)."""
    return waves >= FILL_FRACTION * min(1.0, achievable) - 1e-9


def choose_schedule(m: int, cout_g: int, groups: int, k_iters: int, num_sms: int, *,
                    nbytes: float | None = None) -> tuple[str, int]:
    """("stream_k", num_sms) or ("split_k", slices) — slices 1 is the plain data-parallel grid.

    The rule: fill the GPU, then be fast. Among `schedule_options`, those that fill the SMs as far as the layer
    allows (`fills` against `achievable_waves`) are preferred as long as one of them is modelled within
    FILL_TOLERANCE of the fastest option of all (ties go to the option with more SMs busy) — an idle SM is a
    certain loss, the model's rating of the filling schedule's extra costs is not; where none is, the fastest
    option runs (the static report names such layers). Within the preferred options the fastest wins, but
    data-parallel stays unless another option beats it clearly (_CLEAR_WIN). Stream-K needs
    STREAMK_MIN_K_ITERS K steps per tile, a split _MIN_SPLIT_STEPS per slice; without SMs (num_sms 0: no GPU)
    the plain grid. `nbytes`: the layer's compulsory bytes (default `layer_bytes` of a 1x1-like fp16 GEMM; a
    kxk conv passes input_k = its input channels).
    """
    if m <= 0 or cout_g <= 0 or num_sms <= 0:
        return "split_k", 1
    options = schedule_options(m, cout_g, groups, k_iters, num_sms, nbytes=nbytes)
    best = pick(options, achievable_waves(m, cout_g, groups, k_iters, num_sms))
    return best["kind"], best["value"]
