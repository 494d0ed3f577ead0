"""The eager CPU path's repeated call (fusedconv/cpu.py: one tuple of the input's signature and the weight / scale /
shift snapshot, compared with the last call's, plus the identity of the three tensors).

Each test changes one thing the tuple or the identity check must notice between two calls and compares the
later output with FusedConv2d's definition, relu(conv(x, weight) * scale + shift [+ residual]), computed from
the module's tensors in float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error  # noqa: E402

from fusedconv import cpu  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

TOL_FP32 = 1e-5
CL = torch.channels_last


def make_module(seed=0):
    torch.manual_seed(seed)
    return FusedConv2d(torch.randn(6, 4, 3, 3), torch.rand(6) + 0.5, torch.randn(6), padding=1, activation="relu")


def definition64(module, x, residual=None):
    w, scale, shift = (t.detach().double() for t in (module.weight, module.scale, module.shift))
    z = F.conv2d(x.double(), w, None, 1, 1) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return torch.relu(z if residual is None else z + residual.double())


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_a_new_weight_at_the_same_address_with_the_same_version_is_seen(fmt):
    """A transposed view of the weight shares its data pointer and version counter: only the identity check can
    tell that the module now computes something else."""
    module = make_module()
    x = torch.randn(1, 4, 7, 7).contiguous(memory_format=fmt)
    with torch.no_grad():
        module(x), module(x)
        old = module.weight
        module.weight = nn.Parameter(old.transpose(2, 3), requires_grad=False)
        assert module.weight.data_ptr() == old.data_ptr() and module.weight._version == old._version
        y = module(x)
    assert max_rel_error(y, definition64(module, x)) < TOL_FP32
    assert max_rel_error(y, definition64(make_module(), x)) > 1e-3  # the edit changed the function


def test_alternating_signatures_each_take_their_own_route():
    """NCHW, channels_last, another batch size, with a residual, in turn: the last call's route must never be
    reused for a call whose signature differs."""
    module = make_module()
    torch.manual_seed(1)
    calls = [
        (torch.randn(1, 4, 7, 7), None),
        (torch.randn(1, 4, 7, 7).contiguous(memory_format=CL), None),
        (torch.randn(2, 4, 7, 7), None),
        (torch.randn(1, 4, 7, 7).contiguous(memory_format=CL), torch.randn(1, 6, 7, 7).contiguous(memory_format=CL)),
        (torch.randn(1, 4, 7, 7).contiguous(memory_format=CL), torch.randn(1, 6, 7, 7)),
    ]
    with torch.no_grad():
        for _ in range(3):
            for x, residual in calls:
                y = module(x, residual)
                fmt = CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else torch.contiguous_format
                assert y.is_contiguous(memory_format=fmt) and y.shape == (x.shape[0], 6, 7, 7)
                assert max_rel_error(y, definition64(module, x, residual)) < TOL_FP32


def test_bad_input_after_a_good_call_still_raises_every_time():
    module = make_module()
    x = torch.randn(1, 4, 7, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        module(x)
        for _ in range(2):
            with pytest.raises(ValueError, match="input: expected 4 channels"):
                module(torch.randn(1, 3, 7, 7).contiguous(memory_format=CL))
            with pytest.raises(ValueError, match="residual"):
                module(x, torch.randn(1, 6, 5, 5).contiguous(memory_format=CL))
        assert max_rel_error(module(x), definition64(module, x)) < TOL_FP32


def test_grad_mode_switch_is_part_of_the_signature():
    """The same input first under no_grad (oneDNN / folded route), then needing gradients: the second call must
    build an autograd graph, and the third (no_grad again) must not."""
    module = make_module()
    x = torch.randn(1, 4, 7, 7).contiguous(memory_format=CL).requires_grad_(True)
    with torch.no_grad():
        assert module(x).grad_fn is None
    y = module(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert module(x).grad_fn is None


@pytest.mark.parametrize("edit", ["scale", "shift", "weight"])
def test_in_place_edit_of_each_tensor_is_seen_on_the_next_call(edit):
    module = make_module()
    x = torch.randn(1, 4, 7, 7).contiguous(memory_format=CL)
    with torch.no_grad():
        module(x), module(x)
        getattr(module, edit).mul_(-1.5)
        y = module(x)
    assert max_rel_error(y, definition64(module, x)) < TOL_FP32
    assert module._cpu_state.last_call is not None  # the repeated call is cached again after the refold


def test_state_reset_by_to_forgets_the_last_call():
    module = make_module()
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        module(x)
        module.to(torch.float64)
        y = module(x.double())
    assert y.dtype == torch.float64 and max_rel_error(y, definition64(module, x)) < 1e-12
    assert cpu.FOLDED in module._cpu_state.routes.values()
