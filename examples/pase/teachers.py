"""Alone-trained unimodal teachers for the methods that distil from them (UMT, G2D, EBMC).

:func:`train_teachers` trains every encoder/head pair of a copy of the model on its own loss
(the library's :class:`~modbalance.methods.UME`: with the example's per-parameter AdamW this is
the same as training each modality alone), selects the epoch on the *validation* split by the
ensemble's error, and wraps the trained encoders and heads in frozen
:class:`~modbalance.teachers.UnimodalTeachers`. With a cache folder the result is kept on disk,
keyed by the model options, the training options and a fingerprint of the data, so the methods
of one task and seed share one set of teachers; the recorded training time comes back with it
(it belongs to the cost of every method that uses the teachers).

The teachers' training does not change the main run's random state: it is saved before and
restored after, so a run is the same whether the teachers came from the cache or not.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from modbalance.teachers import UnimodalTeachers

from .model import PaSEConfig

__all__ = ["teacher_inputs", "train_teachers"]


def teacher_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What each encoder takes: ``x`` for a vector modality, ``(x, mask)`` for a sequence."""
    feats, masks = batch["features"], batch["mask"]
    return {m: x if x.ndim == 2 else (x, masks[m]) for m, x in feats.items()}


def _fingerprint(dataset: Dataset) -> str:
    """A cheap digest of a split: its length and three samples (first, middle, last)."""
    n = len(dataset)
    buf = io.BytesIO()
    torch.save([n, *(dataset[i] for i in sorted({0, n // 2, n - 1}))], buf)
    return hashlib.sha1(buf.getvalue()).hexdigest()[:16]


def _key(model_config: PaSEConfig, config: Any, train: Dataset, valid: Dataset, kind: str) -> str:
    skip = ("progress", "methods", "epoch_shares")  # what changes no weight of the teachers
    train_options = {k: v for k, v in asdict(config).items() if k not in skip}
    blob = json.dumps(
        [model_config.to_dict(), train_options, _fingerprint(train), _fingerprint(valid), kind],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def train_teachers(
    model_config: PaSEConfig,
    config: Any,
    train_set: Dataset,
    valid_set: Dataset,
    *,
    model: nn.Module | None = None,
    cache: str | Path | None = None,
) -> tuple[UnimodalTeachers, float]:
    """Alone-trained unimodal teachers for ``model_config`` and ``config`` (a ``TrainConfig``).

    Args:
        model_config: The model's options (the teachers have the same encoders and heads).
        config: Training options; the teachers use its epochs, batch size, learning rate, weight
            decay and seed, with the method :class:`~modbalance.methods.UME` and no warm-up.
        train_set, valid_set: The splits; selection uses ``valid_set`` only.
        model: An untrained model of another backbone to copy (default: a new ``PaSEModel``).
        cache: A folder; the teachers are loaded from it when present, saved to it otherwise.

    Returns:
        ``(teachers, seconds)``: frozen teachers and the time their training took (recorded
        when they were trained, also for a cache hit).
    """
    from .loop import Trainer, _rng_state, _set_rng_state

    cfg = replace(config, methods=("ume",), switch_epoch=0, patience=None, progress=False)
    # the teachers are the encoders and unimodal heads: UME predicts and selects, no read-out
    model_config = replace(model_config, readout="head")
    kind = "late" if model is None else type(model).__name__
    path = None
    if cache is not None:
        path = Path(cache) / f"teachers-{_key(model_config, cfg, train_set, valid_set, kind)}.pt"
    rng = _rng_state()
    try:
        student = copy.deepcopy(model) if model is not None else None
        trainer = Trainer(model_config, cfg, train_set, valid_set, valid_set, model=student)
        if path is not None and path.exists():
            saved = torch.load(path, map_location=trainer.parts.device, weights_only=True)
            trainer.model.load_state_dict(saved["model"])
            seconds = float(saved["seconds"])
        else:
            start = time.perf_counter()
            trainer.fit()
            seconds = time.perf_counter() - start
            if path is not None:
                _save(path, trainer.model.state_dict(), seconds)
    finally:
        _set_rng_state(rng)
    m = trainer.model
    return UnimodalTeachers(m.encoders, m.unimodal_heads).to(trainer.parts.device), seconds


def _save(path: Path, state: Mapping[str, Tensor], seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parallel jobs may train the same teachers
    torch.save({"model": dict(state), "seconds": torch.tensor(seconds)}, tmp)
    tmp.replace(path)
