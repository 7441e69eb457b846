"""Balancing methods of the field, each a :class:`~modbalance.balancing.BalancingMethod`."""
