"""Examples of modbalance (importable from a checkout as ``examples.pase``)."""
