"""The update modulators under their original module path.

The modulators are balancing methods and live in :mod:`modbalance.methods.modulators`, the
shares function in :mod:`modbalance.metrics`; ``from modbalance.modulation import ...`` keeps
working for code written against the earlier layout.
"""

from modbalance.methods import modulators as _modulators
from modbalance.methods.modulators import *  # noqa: F403  (the same objects, re-exported)
from modbalance.metrics import pase_shares

__all__ = [*_modulators.__all__, "pase_shares"]
