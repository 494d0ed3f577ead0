"""Triton kernels and their launchers: pure functions on tensors, no nn.Module knowledge.

`conv_bn_act(x, weight, scale, shift, *, stride, padding, dilation, groups, activation, residual)` computes
act(conv(x, weight) * scale + shift [+ residual]) in one kernel; `pack_weight` lays a weight out the way the
kernels read it fastest; `conv_bn_act_ref` is the plain-PyTorch reference.
"""

from fusedconv.kernels.reference import ACTIVATIONS, apply_activation, conv_bn_act_ref

__all__ = ["ACTIVATIONS", "apply_activation", "conv_bn_act_ref"]
