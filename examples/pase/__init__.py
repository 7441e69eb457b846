"""The PaSE reference model built from modbalance components, and its training loop.

``python examples/pase_mosi.py`` is the command; this package holds the pieces so that tests and
benchmarks reuse exactly the same backbone for PaSE, its ablations and the plain late-fusion
baseline.
"""

from .model import PaSEConfig, PaSEModel, SequenceEncoder
from .train import TrainConfig, Trainer, build_datasets

__all__ = ["PaSEConfig", "PaSEModel", "SequenceEncoder", "TrainConfig", "Trainer", "build_datasets"]
