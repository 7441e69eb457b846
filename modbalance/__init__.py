"""modbalance: plug-in PyTorch components against modality competition in multimodal learning.

The four PaSE components (:class:`PrototypeCalibrator`, :class:`SinkhornAligner`,
:class:`PrototypeGatedFusion`, :class:`ShapleyGradModulator`) each work alone inside any backbone;
together they form the PaSE reference model in ``examples/``.
"""

from modbalance._checks import ModbalanceError, value_checks, value_checks_enabled
from modbalance.fusion import FusionOutput, PrototypeGatedFusion
from modbalance.prototypes import (
    CalibrationOutput,
    ClassMeans,
    PrototypeCalibrator,
    class_means,
    sentiment_classes,
)
from modbalance.schedule import DualPhaseSchedule

__version__ = "0.1.0"

__all__ = [
    "CalibrationOutput",
    "ClassMeans",
    "DualPhaseSchedule",
    "FusionOutput",
    "ModbalanceError",
    "PrototypeCalibrator",
    "PrototypeGatedFusion",
    "__version__",
    "class_means",
    "sentiment_classes",
    "value_checks",
    "value_checks_enabled",
]
