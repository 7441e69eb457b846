"""The PaSE reference model built from modbalance components: build(), the one train_step(), a loop.

``python examples/pase_mosi.py`` is the command. The pieces live here so that tests and
benchmarks reuse exactly the same backbone and step for PaSE, its ablations, the plain
late-fusion baseline and every other balancing method:

* :mod:`.model` — :class:`PaSEModel` (bring your own encoders, or the default Transformer / MLP)
  and its :class:`PaSEConfig`, whose defaults are the measured recipe;
* :mod:`.step` — :func:`build` returns the :class:`Parts` from a :class:`PaSEConfig` and a
  :class:`TrainConfig`; :func:`train_step` is the one step; :data:`METHODS` names the methods;
* :mod:`.loop` — :class:`Trainer`: epochs, evaluation, selection, checkpoints, logs;
* :mod:`.data` — splits from a file or the synthetic default, loaders, the test-split guard.
"""

from .data import DataError, GuardedDataset, build_datasets, detect_format, make_loader
from .loop import CheckpointError, Trainer, error_of, metrics_of
from .model import PAPER_SWITCHES, MLPEncoder, PaSEConfig, PaSEModel, SequenceEncoder
from .step import METHODS, Parts, TrainConfig, build, make_methods, train_step

__all__ = [
    "METHODS",
    "PAPER_SWITCHES",
    "CheckpointError",
    "DataError",
    "GuardedDataset",
    "MLPEncoder",
    "PaSEConfig",
    "PaSEModel",
    "Parts",
    "SequenceEncoder",
    "TrainConfig",
    "Trainer",
    "build",
    "build_datasets",
    "detect_format",
    "error_of",
    "make_loader",
    "make_methods",
    "metrics_of",
    "train_step",
]
