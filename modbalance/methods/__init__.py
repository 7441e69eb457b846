"""Balancing methods of the field, each a :class:`~modbalance.balancing.BalancingMethod`.

See the guide page "Balancing methods" for the method table (mechanism, what each needs from the
model, Adam, regression and M > 2 support) and every method's math.
"""

from modbalance.methods.agm import AGM, agm_coefficients, mono_modal_responses
from modbalance.methods.aug import AUG, aug_assignment, aug_boosting_loss
from modbalance.methods.cggm import CGGM, cggm_coefficients, cggm_direction_loss, unimodal_accuracy
from modbalance.methods.dgl import DGL, encoder_only
from modbalance.methods.ebmc import EMC, IMTD, trust_weights
from modbalance.methods.equilibrium import ShapleyEquilibrium
from modbalance.methods.g2d import G2D, g2d_logit_distance, g2d_teacher_scores, smp_mask
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
from modbalance.methods.reconboost import (
    ReconBoost,
    reconboost_boosting_loss,
    reconboost_consolidation,
    reconboost_ensemble,
    reconboost_stage,
)
from modbalance.methods.ume import UME, ume_ensemble
from modbalance.methods.umt import UMT, masked_feature_mse
from modbalance.methods.unimodal import UnimodalLoss, unimodal_task_loss
from modbalance.methods.valuation import (
    ModalityValuation,
    coalition_outputs,
    modality_rates,
    sample_contributions,
    valuation_copies,
)

__all__ = [
    "AGM",
    "AUG",
    "CGGM",
    "DGL",
    "EMC",
    "G2D",
    "IMTD",
    "MLA",
    "PMR",
    "UME",
    "UMT",
    "GBlending",
    "InfoReg",
    "MMPareto",
    "ModalityValuation",
    "ModulatorHandle",
    "OGMGEModulator",
    "ReconBoost",
    "ShapleyEquilibrium",
    "ShapleyGradModulator",
    "UnimodalLoss",
    "agm_coefficients",
    "aug_assignment",
    "aug_boosting_loss",
    "cggm_coefficients",
    "cggm_direction_loss",
    "coalition_outputs",
    "encoder_only",
    "g2d_logit_distance",
    "g2d_teacher_scores",
    "gblend_weights",
    "inforeg_beta",
    "inforeg_window_k",
    "masked_feature_mse",
    "min_norm_2",
    "mla_entropy_weights",
    "mla_fuse",
    "modality_rates",
    "mono_modal_responses",
    "ogmge_coefficients",
    "pase_coefficients",
    "pmr_coefficients",
    "reconboost_boosting_loss",
    "reconboost_consolidation",
    "reconboost_ensemble",
    "reconboost_stage",
    "sample_contributions",
    "smp_mask",
    "trust_weights",
    "ume_ensemble",
    "unimodal_accuracy",
    "unimodal_task_loss",
    "valuation_copies",
]
