"""PaSE's Shapley-based equilibrium under its original module path.

The method lives in :mod:`modbalance.methods.equilibrium`; ``from modbalance.equilibrium import
ShapleyEquilibrium`` keeps working for code written against the earlier layout.
"""

from modbalance.methods.equilibrium import ShapleyEquilibrium

__all__ = ["ShapleyEquilibrium"]
