"""Balancing methods of the field, each a :class:`~modbalance.balancing.BalancingMethod`.

See the guide page "Balancing methods" for the method table (mechanism, what each needs from the
model, Adam, regression and M > 2 support) and every method's math.
"""

from modbalance.methods.agm import AGM, agm_coefficients, mono_modal_responses
from modbalance.methods.cggm import CGGM, cggm_coefficients, cggm_direction_loss, unimodal_accuracy
from modbalance.methods.dgl import DGL, encoder_only
from modbalance.methods.equilibrium import ShapleyEquilibrium
from modbalance.methods.gblending import GBlending, gblend_weights
from modbalance.methods.inforeg import InfoReg, inforeg_beta, inforeg_window_k
from modbalance.methods.mla import MLA, mla_entropy_weights, mla_fuse
from modbalance.methods.mmpareto import MMPareto, min_norm_2
from modbalance.methods.modulators import (
    ModulatorHandle,
    OGMGEModulator,
    ShapleyGradModulator,
    ogmge_coefficients,
    pase_coefficients,
)
from modbalance.methods.pmr import PMR, pmr_coefficients
from modbalance.methods.ume import UME, ume_ensemble
from modbalance.methods.unimodal import UnimodalLoss, unimodal_task_loss

__all__ = [
    "AGM",
    "CGGM",
    "DGL",
    "MLA",
    "PMR",
    "UME",
    "GBlending",
    "InfoReg",
    "MMPareto",
    "ModulatorHandle",
    "OGMGEModulator",
    "ShapleyEquilibrium",
    "ShapleyGradModulator",
    "UnimodalLoss",
    "agm_coefficients",
    "cggm_coefficients",
    "cggm_direction_loss",
    "encoder_only",
    "gblend_weights",
    "inforeg_beta",
    "inforeg_window_k",
    "min_norm_2",
    "mla_entropy_weights",
    "mla_fuse",
    "mono_modal_responses",
    "ogmge_coefficients",
    "pase_coefficients",
    "pmr_coefficients",
    "ume_ensemble",
    "unimodal_accuracy",
    "unimodal_task_loss",
]
