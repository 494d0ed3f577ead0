"""Pure benchmark arithmetic: FLOPs and bytes of a convolution, device peaks, roofline %, summary statistics.

No timing and no tensors here, so every number can be checked by hand (tests/test_bench_math.py does).
Conventions:
- FLOPs count a multiply-add as 2 and only the convolution itself (the BN scale/shift, residual add and
  activation are O(output) and would flatter a slow kernel): 2 * N * Cout * OH * OW * (Cin / groups) * KH * KW.
- Bytes are the *compulsory* traffic of the fused layer: read the input, the weight, the per-channel fp32
  scale and shift (and the residual), write the output, each exactly once. Every provider is rated against the
  same byte count, so "GB/s" is an effective bandwidth: an unfused provider that moves more data than this
  simply shows a lower number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def _dtype_name(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return name


@dataclass(frozen=True)
class ConvShape:
    """The geometry of one 2-d convolution layer (batch excluded): NCHW input (cin, h, w), OIHW weight."""

    cin: int
    cout: int
    h: int
    w: int
    kh: int
    kw: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1

    def __post_init__(self):
        for name in ("cin", "cout", "h", "w", "kh", "kw", "stride", "dilation", "groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"padding: expected a non-negative int, got {self.padding!r}")
        if self.cin % self.groups or self.cout % self.groups:
            raise ValueError(f"groups: expected to divide cin={self.cin} and cout={self.cout}, got {self.groups}")
        if self.out_hw[0] < 1 or self.out_hw[1] < 1:
            raise ValueError(f"kernel {self.kh}x{self.kw} does not fit the {self.h}x{self.w} input (padding "
                             f"{self.padding}, dilation {self.dilation})")

    @property
    def out_hw(self) -> tuple[int, int]:
        def out(size, k):
            return (size + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1

        return out(self.h, self.kh), out(self.w, self.kw)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin == self.cout

    def label(self) -> str:
        oh, ow = self.out_hw
        g = "dw" if self.depthwise else (f"g{self.groups}" if self.groups > 1 else "")
        return f"{self.cin}->{self.cout} {self.kh}x{self.kw}/s{self.stride}{' ' + g if g else ''} @{self.h}x{self.w}"


def conv_flops(shape: ConvShape, batch: int) -> int:
    """Floating-point operations of the convolution (multiply-add = 2)."""
    oh, ow = shape.out_hw
    macs_per_output = (shape.cin // shape.groups) * shape.kh * shape.kw
    return 2 * batch * shape.cout * oh * ow * macs_per_output


def conv_bytes(shape: ConvShape, batch: int, dtype="float32", *, residual: bool = False,
               epilogue_dtype="float32") -> int:
    """Compulsory memory traffic of the fused layer in bytes (see the module docstring)."""
    elt = DTYPE_BYTES[_dtype_name(dtype)]
    epi = DTYPE_BYTES[_dtype_name(epilogue_dtype)]
    oh, ow = shape.out_hw
    x = batch * shape.cin * shape.h * shape.w
    wgt = shape.cout * (shape.cin // shape.groups) * shape.kh * shape.kw
    out = batch * shape.cout * oh * ow
    res = out if residual else 0
    return elt * (x + wgt + out + res) + epi * 2 * shape.cout


def arithmetic_intensity(flops: float, nbytes: float) -> float:
    """FLOPs per byte of compulsory traffic."""
    if nbytes <= 0:
        raise ValueError(f"nbytes: expected a positive byte count, got {nbytes!r}")
    return flops / nbytes


# ---------------------------------------------------------------------------------------------- device peaks
# Vendor datasheet figures (dense, no sparsity), TFLOP/s and TB/s. They are the ceiling the roofline % is taken
# against, not measured numbers. fp32 convolutions on cuDNN and Triton run on TF32 tensor cores unless TF32 is
# disabled, so the fp32 peak used is "tf32" when the benchmark records TF32 as allowed.
PEAKS = {
    "H100 SXM": {"float16": 989.0, "bfloat16": 989.0, "tf32": 494.0, "float32": 67.0, "tb_s": 3.35},
    "H200": {"float16": 989.0, "bfloat16": 989.0, "tf32": 494.0, "float32": 67.0, "tb_s": 4.8},
    "A100 SXM": {"float16": 312.0, "bfloat16": 312.0, "tf32": 156.0, "float32": 19.5, "tb_s": 2.0},
}


def peak_key(device_name: str) -> str | None:
    """Which PEAKS entry a CUDA device name refers to, or None when the table has no datasheet for it.

    Only the form factors whose figures are in the table match: an H100 PCIe / NVL or an A100 PCIe has
    different clocks and memory, so they get no peak rather than a wrong one.
    """
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return "H100 SXM"
    if "A100" in name and "SXM" in name:
        return "A100 SXM"
    return None


def peak_tflops(key: str | None, dtype, *, tf32: bool = True) -> float | None:
    if key is None:
        return None
    name = _dtype_name(dtype)
    if name == "float32" and tf32:
        name = "tf32"
    return PEAKS[key].get(name)


def peak_tb_s(key: str | None) -> float | None:
    return None if key is None else PEAKS[key]["tb_s"]


def tflops(flops: float, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"seconds: expected a positive time, got {seconds!r}")
    return flops / seconds / 1e12


def gb_s(nbytes: float, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"seconds: expected a positive time, got {seconds!r}")
    return nbytes / seconds / 1e9


def roofline_tflops(intensity: float, peak_compute_tflops: float, peak_bw_tb_s: float) -> float:
    """Attainable TFLOP/s at an arithmetic intensity: min(compute peak, intensity * bandwidth)."""
    # intensity [FLOP/B] * bandwidth [TB/s] = [TFLOP/s]
    return min(peak_compute_tflops, intensity * peak_bw_tb_s)


def roofline_percent(flops: float, nbytes: float, seconds: float, peak_compute_tflops: float | None,
                     peak_bw_tb_s: float | None) -> float | None:
    """Achieved TFLOP/s as a % of the roofline bound at this layer's intensity (None without peaks)."""
    if peak_compute_tflops is None or peak_bw_tb_s is None:
        return None
    bound = roofline_tflops(arithmetic_intensity(flops, nbytes), peak_compute_tflops, peak_bw_tb_s)
    return 100.0 * tflops(flops, seconds) / bound


# ---------------------------------------------------------------------------------------------- statistics
def median(values) -> float:
    v = sorted(values)
    if not v:
        raise ValueError("values: expected at least one value, got none")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def quantile(values, q: float) -> float:
    """Linear-interpolated quantile (numpy's default method), q in [0, 1]."""
    v = sorted(values)
    if not v:
        raise ValueError("values: expected at least one value, got none")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: expected a number in [0, 1], got {q!r}")
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def iqr(values) -> float:
    return quantile(values, 0.75) - quantile(values, 0.25)


def geomean(values) -> float | None:
    """Geometric mean of positive values; None for an empty input (a group with no successful runs)."""
    v = [float(x) for x in values]
    if not v:
        return None
    if any(not (x > 0) or math.isinf(x) for x in v):
        raise ValueError(f"values: expected positive finite numbers, got {v}")
    return math.exp(sum(math.log(x) for x in v) / len(v))


def speedup(baseline_seconds: float, candidate_seconds: float) -> float:
    """How many times faster the candidate is than the baseline (> 1 = faster)."""
    if baseline_seconds <= 0 or candidate_seconds <= 0:
        raise ValueError(f"times: expected positive seconds, got {baseline_seconds!r} and {candidate_seconds!r}")
    return baseline_seconds / candidate_seconds
