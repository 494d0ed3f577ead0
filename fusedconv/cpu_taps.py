"""A conv to one output channel on CPU as one matrix product and a sum of shifted planes.

A KxK conv with C_in inputs equals, tap by tap, a 1x1 conv of the input shifted by that tap's offset. With few
output channels all taps fit in one matrix product, `(K*K*C_out, C_in) @ (C_in, H*W)`, whose K*K*C_out planes are
then added, each at its offset, into the output. oneDNN and PyTorch's own kernels are built for many output
channels and run a conv to one channel (a binary segmentation head, a depth or saliency map) far below their speed.
Measured (`python -m bench.bench_cpu_taps`, 2 threads / 1 thread, batch 1, float32, channels_last input): 16 -> 1
3x3 at 224x224 0.47 / 0.50 ms here against 1.20 / 2.15 ms on the best of oneDNN and F.conv2d; 128 -> 1 at 56x56
0.25 / 0.29 against 0.55 / 1.11 ms. With 2 or 3 output channels the result moved between runs on two threads
(16 -> 2: 0.58 against 1.16 ms in one run, 1.9 against 1.25 ms in another; level inside smp's Unet with 2 or 3
classes), so the route takes one output channel only.

The sum runs in another order than a direct conv's (per tap, then across taps), so float32 results differ from
F.conv2d's by rounding only (~2e-7 relative); float64 agrees to ~1e-15. Stride 1, groups 1 and zero padding only
(the shifted planes are then plain slices); any dilation. `conv_taps` itself takes any number of output channels.
"""

from __future__ import annotations

import torch

# Kernel taps the route takes (a 5x5 at most): 64 -> 1 5x5 at 56x56 measured 0.43 / 0.68 ms here against 0.75 /
# 1.51 ms (2 / 1 threads); 7x7 and larger were not measured.
MAX_TAPS = 25
# Fewer output pixels than this and the ~12 small ops of this route cost about what the conv does (one thread):
# 64 -> 1 3x3 at 28x28 0.21 ms here against 0.16-0.19 ms on the other routes, 16 -> 1 at 32x32 0.11-0.21 ms
# against 0.05-0.07 ms; from 56x56 on it wins clearly (128 -> 1: 0.29 against 1.11 ms).
MIN_OUTPUT_PIXELS = 2500


def eligible(out_channels: int, kernel_size, stride, groups: int, padding_mode: str = "zeros") -> bool:
    """Whether a conv's geometry can take this route (whatever its input): one output channel, stride 1, groups 1,
    zero padding, a kernel of 2 to MAX_TAPS taps."""
    kh, kw = kernel_size
    return (out_channels == 1 and tuple(stride) == (1, 1) and groups == 1 and padding_mode == "zeros"
            and 1 < kh * kw <= MAX_TAPS)


def worth_it(out_shape) -> bool:
    """Whether an output this large repays the route's fixed cost (MIN_OUTPUT_PIXELS)."""
    return out_shape[-1] * out_shape[-2] >= MIN_OUTPUT_PIXELS


def tap_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, KH, KW) -> (KH*KW*C_out, C_in): row (i*KW + j)*C_out + o is tap (i, j) of output channel o."""
    c_out, c_in, kh, kw = weight.shape
    return weight.permute(2, 3, 0, 1).reshape(kh * kw * c_out, c_in).contiguous()


def conv_taps(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, kernel_size, padding, dilation,
              out_hw) -> torch.Tensor:
    """conv2d(x, weight, bias, stride=1, padding, dilation) with `taps = tap_weight(weight)`, for x (N, C, H, W)
    dense in NCHW or channels_last. Returns a contiguous (N, C_out, Ho, Wo) tensor (for C_out = 1 also
    channels_last-contiguous)."""
    n, c, h, w = x.shape
    kh, kw = kernel_size
    (ph, pw), (dh, dw) = padding, dilation
    ho, wo = out_hw
    c_out = taps.shape[0] // (kh * kw)
    # x as (N, C, H*W) is a view for both layouts (channels_last: strides (HWC, 1, C), read transposed by BLAS).
    planes = torch.matmul(taps, x.reshape(n, c, h * w)).view(n, kh * kw * c_out, h, w)
    y = torch.empty((n, c_out, ho, wo), dtype=x.dtype, device=x.device)
    if bias is None:
        y.zero_()
    else:
        y.copy_(bias.view(1, c_out, 1, 1).expand(n, c_out, ho, wo))
    for i in range(kh):
        # Output row r reads input row r + i*dh - ph: the rows where that lies inside the input.
        r0, r1 = max(0, ph - i * dh), min(ho, h + ph - i * dh)
        if r0 >= r1:
            continue
        for j in range(kw):
            q0, q1 = max(0, pw - j * dw), min(wo, w + pw - j * dw)
            if q0 >= q1:
                continue
            t = (i * kw + j) * c_out
            y[:, :, r0:r1, q0:q1] += planes[:, t:t + c_out, r0 + i * dh - ph:r1 + i * dh - ph,
                                            q0 + j * dw - pw:q1 + j * dw - pw]
    return y
