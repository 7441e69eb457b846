"""Data: MMSA / MulT pickle loaders, the multimodal dataset and collate, synthetic competition data.

.. warning::
    Pickles run code when they are loaded. Only load files you trust.
"""

from modbalance.data.mmsa import (
    MultimodalDataset,
    collate_multimodal,
    load_mmsa,
    load_mult,
    multimodal_loader,
)
from modbalance.data.synthetic import (
    ClassificationCompetitionData,
    CompetitionData,
    make_classification_competition,
    make_competition_data,
)

__all__ = [
    "ClassificationCompetitionData",
    "CompetitionData",
    "MultimodalDataset",
    "collate_multimodal",
    "load_mmsa",
    "load_mult",
    "make_classification_competition",
    "make_competition_data",
    "multimodal_loader",
]
