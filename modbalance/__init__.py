"""modbalance: plug-in PyTorch components against modality competition in multimodal learning.

The four PaSE components (:class:`PrototypeCalibrator`, :class:`SinkhornAligner`,
:class:`PrototypeGatedFusion`, :class:`ShapleyGradModulator`) each work alone inside any backbone;
together they form the PaSE reference model in ``examples/``. Every balancing method — PaSE's
:class:`ShapleyEquilibrium`, the modulators and the field's methods (:mod:`modbalance.methods`) —
follows one interface, :class:`BalancingMethod`.
"""

from modbalance._checks import ModbalanceError, value_checks, value_checks_enabled
from modbalance.balancing import (
    BalancingMethod,
    StepOutput,
    balanced_step,
    check_phases,
    combine_losses,
    task_loss,
)
from modbalance.data import (
    ClassificationCompetitionData,
    CompetitionData,
    MultimodalDataset,
    collate_multimodal,
    load_mmsa,
    load_mult,
    make_classification_competition,
    make_competition_data,
)
from modbalance.decision import Decision
from modbalance.fusion import FusionOutput, PrototypeGatedFusion
from modbalance.methods import (
    AGM,
    AUG,
    CGGM,
    DGL,
    EMC,
    G2D,
    IMTD,
    MLA,
    PMR,
    UME,
    UMT,
    GBlending,
    InfoReg,
    MMPareto,
    ModalityValuation,
    ModulatorHandle,
    OGMGEModulator,
    ReconBoost,
    ShapleyEquilibrium,
    ShapleyGradModulator,
    UnimodalLoss,
    ogmge_coefficients,
    pase_coefficients,
)
from modbalance.metrics import (
    iemocap_metrics,
    imbalance_index,
    msa_regression_metrics,
    pase_shares,
    probe_score,
    shapley_shares,
    sims_regression_metrics,
)
from modbalance.ot import (
    AlignmentResult,
    PairwiseAlignment,
    SinkhornAligner,
    SinkhornResult,
    sinkhorn,
)
from modbalance.prototypes import (
    CalibrationOutput,
    ClassMeans,
    PrototypeCalibrator,
    class_means,
    sentiment_classes,
)
from modbalance.readout import RidgeReadout
from modbalance.schedule import DualPhaseSchedule
from modbalance.shapley import (
    GameResult,
    InputMaskingGame,
    ModalityGame,
    ShapleyResult,
    coalition_masks,
    interactions_from_table,
    shapley_from_table,
    shapley_values,
)
from modbalance.teachers import TeacherOutput, UnimodalTeachers

__version__ = "0.1.0"

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
    "AlignmentResult",
    "BalancingMethod",
    "CalibrationOutput",
    "ClassMeans",
    "ClassificationCompetitionData",
    "CompetitionData",
    "Decision",
    "DualPhaseSchedule",
    "FusionOutput",
    "GBlending",
    "GameResult",
    "InfoReg",
    "InputMaskingGame",
    "MMPareto",
    "ModalityGame",
    "ModalityValuation",
    "ModbalanceError",
    "ModulatorHandle",
    "MultimodalDataset",
    "OGMGEModulator",
    "PairwiseAlignment",
    "PrototypeCalibrator",
    "PrototypeGatedFusion",
    "ReconBoost",
    "RidgeReadout",
    "ShapleyEquilibrium",
    "ShapleyGradModulator",
    "ShapleyResult",
    "SinkhornAligner",
    "SinkhornResult",
    "StepOutput",
    "TeacherOutput",
    "UnimodalLoss",
    "UnimodalTeachers",
    "__version__",
    "balanced_step",
    "check_phases",
    "class_means",
    "coalition_masks",
    "collate_multimodal",
    "combine_losses",
    "iemocap_metrics",
    "imbalance_index",
    "interactions_from_table",
    "load_mmsa",
    "load_mult",
    "make_classification_competition",
    "make_competition_data",
    "msa_regression_metrics",
    "ogmge_coefficients",
    "pase_coefficients",
    "pase_shares",
    "probe_score",
    "sentiment_classes",
    "shapley_from_table",
    "shapley_shares",
    "shapley_values",
    "sims_regression_metrics",
    "sinkhorn",
    "task_loss",
    "value_checks",
    "value_checks_enabled",
]
