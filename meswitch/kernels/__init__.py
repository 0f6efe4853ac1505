"""Mixed-expert delta kernels: Triton on CUDA, with the PyTorch reference each is tested against.

Importing this package needs no Triton; the kernels load on first use on a CUDA device.
"""

from meswitch.kernels.bank import BankGrid, DeltaBank, ExpertRows
from meswitch.kernels.layout import LAYOUT_V1, LAYOUT_V2, repack_v1_to_v2, repack_v2_to_v1
from meswitch.kernels.ops import mixed_delta
from meswitch.kernels.reference import e4m3_rows, mixed_delta_reference

__all__ = [
    "LAYOUT_V1",
    "LAYOUT_V2",
    "BankGrid",
    "DeltaBank",
    "ExpertRows",
    "e4m3_rows",
    "mixed_delta",
    "mixed_delta_reference",
    "repack_v1_to_v2",
    "repack_v2_to_v1",
]
