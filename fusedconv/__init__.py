"""fusedconv: run Conv -> BatchNorm -> activation (+ residual add) blocks of trained CNNs as one fused op.

    model = fusedconv.convert(model.eval())
"""

from fusedconv._checkout import map_checkout_kernels

map_checkout_kernels()  # before the first import of fusedconv.kernels (a checkout run as is)

from fusedconv._version import __version__
from fusedconv.activations import ActivationSpec
from fusedconv.convert import convert
from fusedconv.frozen import FrozenModel
from fusedconv.fused_layers import FusedConv1d, FusedConv2dPostBN, FusedConv3d
from fusedconv.fused_linear import FusedLinear
from fusedconv.graph.specialize import GuardMiss
from fusedconv.fused_transpose import FusedConvTranspose1d, FusedConvTranspose2d, FusedConvTranspose3d
from fusedconv.modules import FusedConv2d, check_state_dict
from fusedconv.refresh import refresh
from fusedconv.reparam import reparameterize
from fusedconv.report import ConversionReport, ReportRow
from fusedconv.tuning import warmup

__all__ = ["ActivationSpec", "ConversionReport", "FrozenModel", "FusedConv1d", "FusedConv2d", "FusedConv2dPostBN",
           "FusedConv3d", "FusedConvTranspose1d", "FusedConvTranspose2d", "FusedConvTranspose3d", "FusedLinear",
           "GuardMiss", "ReportRow", "__version__", "check_state_dict", "convert", "refresh", "reparameterize",
           "warmup"]
