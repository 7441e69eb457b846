"""Balancing methods of the field, each a :class:`~modbalance.balancing.BalancingMethod`.

See the guide page "Balancing methods" for the method table (mechanism, what each needs from the
model, Adam, regression and M > 2 support) and every method's math.
"""

from modbalance.methods.agm import AGM, agm_coefficients, mono_modal_responses
from modbalance.methods.gblending import GBlending, gblend_weights
from modbalance.methods.mmpareto import MMPareto, min_norm_2
from modbalance.methods.unimodal import UnimodalLoss, unimodal_task_loss

__all__ = [
    "AGM",
    "GBlending",
    "MMPareto",
    "UnimodalLoss",
    "agm_coefficients",
    "gblend_weights",
    "min_norm_2",
    "mono_modal_responses",
    "unimodal_task_loss",
]
