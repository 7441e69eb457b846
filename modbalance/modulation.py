"""The update modulators under their original module path.

The modulators are balancing methods and live in :mod:`modbalance.methods.modulators`, the
shares function in :mod:`modbalance.metrics`; ``from modbalance.modulation import ...`` keeps
working for code written against the earlier layout.
"""

from modbalance.methods.modulators import (
    ModulatorHandle,
    OGMGEModulator,
    ShapleyGradModulator,
    ogmge_coefficients,
    pase_coefficients,
)
from modbalance.metrics import pase_shares

__all__ = [
    "ModulatorHandle",
    "OGMGEModulator",
    "ShapleyGradModulator",
    "ogmge_coefficients",
    "pase_coefficients",
    "pase_shares",
]
