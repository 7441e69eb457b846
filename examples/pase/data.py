"""Data for the PaSE example: splits from a file or the synthetic default, loaders, the test guard.

Model selection and the phase switch use the validation split only. The test split is wrapped in
:class:`GuardedDataset`, which raises if anything touches it before the loop unlocks it for the
single final evaluation of the selected checkpoint.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from modbalance import distributed as mbdist
from modbalance.data import (
    MultimodalDataset,
    load_mmsa,
    load_mult,
    make_competition_data,
    multimodal_loader,
)
from modbalance.data.mmsa import _BatchFetch

#: Keys that only MMSA pickles have (MulT pickles have ``labels`` instead).
_MMSA_KEYS = {"regression_labels", "classification_labels", "raw_text", "text_bert", "id"}


class DataError(ValueError):
    """A data file that cannot be used, with the file's name and what to do."""


class GuardedDataset(Dataset):
    """Wrap the test split so that any access before :meth:`unlock` raises ``RuntimeError``."""

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset
        self.locked = True

    def unlock(self) -> None:
        self.locked = False

    def _check(self) -> None:
        if self.locked:
            raise RuntimeError(
                "the test split was accessed before the final evaluation; model selection must "
                "use the validation split only"
            )

    def __len__(self) -> int:
        self._check()
        return len(self._dataset)

    def __getitem__(self, i: int) -> Any:
        self._check()
        return self._dataset[i]

    def batch(self, indices: Any) -> Any:
        """A whole collated batch (:func:`~modbalance.data.multimodal_loader`), guarded too."""
        self._check()
        return _BatchFetch(self._dataset)[indices]  # the loader's own fetch of the inner split


def detect_format(path: str | os.PathLike) -> str:
    """``"mmsa"`` or ``"mult"`` from the file's content (its train split's keys).

    Raises:
        DataError: A directory, a missing or unreadable file, or neither layout.
    """
    return _format_of(_read(path), path)


def _read(path: str | os.PathLike) -> Any:
    """The unpickled content of ``path`` (read once; a DataError names the file)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"--data {path}: is a directory, expected a .pkl file (the pickle itself).")
    if not path.is_file():
        raise DataError(f"--data {path}: no such file.")
    try:  # pickles run code when loaded: only pass files you trust
        with open(path, "rb") as fh:
            try:
                return pickle.load(fh)
            except UnicodeDecodeError:  # written by Python 2, as the loaders accept
                fh.seek(0)
                return pickle.load(fh, encoding="latin1")
    except Exception as err:  # truncated, not a pickle, missing module...
        raise DataError(f"--data {path}: cannot read it as a pickle ({err!r}).") from None


def _format_of(data: Any, path: str | os.PathLike) -> str:
    """``"mmsa"`` or ``"mult"`` from a loaded file's content (its train split's keys)."""
    path = Path(path)
    split = data.get("train") if isinstance(data, Mapping) else None
    if not isinstance(split, Mapping):
        top = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise DataError(
            f"--data {path}: expected a dict with a 'train' split (MMSA or MulT layout), got {top}."
        )
    if _MMSA_KEYS & set(split):
        return "mmsa"
    if "labels" in split:
        return "mult"
    raise DataError(
        f"--data {path}: split 'train' has keys {sorted(map(str, split))}, neither MMSA's "
        f"(one of {sorted(_MMSA_KEYS)}) nor MulT's ('labels')."
    )


def build_datasets(
    data: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    synthetic: Mapping[str, Any] | None = None,
) -> tuple[MultimodalDataset, MultimodalDataset, GuardedDataset, dict[str, Any]]:
    """Train/valid/test from an MMSA or MulT pickle, or the synthetic default generated in memory.

    Returns the three splits (test guarded) and an info dict (source, ground truth if synthetic).
    The file is read once: its format and all three splits come from the same loaded content.
    The loader's own error is reported for a broken file, with the file's name.

    Raises:
        DataError: A file that cannot be used, or ``synthetic`` options together with ``data``
            (they only shape the synthetic data and would be silently ignored).
    """
    if data is not None and synthetic:
        raise DataError(
            f"--data {data}: the synthetic-data options {sorted(synthetic)} only shape the "
            "synthetic data and would be ignored with a file; drop them (or --data)."
        )
    info: dict[str, Any] = {}
    if data is None:
        generated = make_competition_data(**{"seed": seed, **(synthetic or {})})
        info["source"] = "synthetic competition data"
        info["ground_truth"] = {str(k): float(v) for k, v in generated.ground_truth.items()}
        splits = [generated.dataset(s) for s in ("train", "valid", "test")]
    else:
        content = _read(data)
        fmt = _format_of(content, data)
        loader = load_mmsa if fmt == "mmsa" else load_mult
        info["source"] = f"{data} ({fmt})"
        names, splits = ("train", "valid", "test"), []
        try:
            missing = [s for s in names if s not in content]
            if missing:  # the loader's own message, naming the splits the file has
                loader(content, split=missing[0])
            for s in names:
                splits.append(loader(content, split=s))
                if isinstance(content, dict):  # free what the split did not keep (float64
                    content.pop(s)  # originals of float32 features) before the next one
        except ValueError as err:
            raise DataError(f"--data {data} ({fmt} layout): {err}") from None
        del content
        _check_label_range(splits[0], data)
    return splits[0], splits[1], GuardedDataset(splits[2]), info


def _check_label_range(train: MultimodalDataset, path: Any) -> None:
    """MOSI/MOSEI/SIMS sentiment lies in [-3, 3]; anything beyond is a mislabelled file."""
    if getattr(train, "task", None) != "regression":
        return
    y = train.labels
    lo, hi = float(y.min()), float(y.max())
    if lo < -3.0 - 1e-6 or hi > 3.0 + 1e-6:
        raise DataError(
            f"--data {path}: training labels span [{lo:g}, {hi:g}], outside MMSA's sentiment range "
            "[-3, 3] (scaled labels, e.g. x100?); rescale them to [-3, 3]. The MMSA metrics "
            "(Acc-7, Acc-5, Non0/Has0 Acc-2) assume that range."
        )
    if hi - lo < 1e-6:
        warnings.warn(f"--data {path}: every training label is {lo:g}.", stacklevel=3)


def make_loader(
    dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0
) -> DataLoader:
    """A loader that is identical on resume: seeded by ``(seed, epoch)``; distributed-aware."""
    sampler = None
    generator = None
    if train and mbdist.is_distributed():
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, shuffle=True, seed=seed, drop_last=True
        )
        sampler.set_epoch(epoch)
    elif train:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    # the batches of DataLoader(..., collate_fn=collate_multimodal), each fetched in one go
    return multimodal_loader(
        dataset,
        batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=train and len(dataset) > batch_size,
    )


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a collated batch (and of its per-modality dicts) to ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, Mapping):
            out[k] = {m: t.to(device, non_blocking=True) for m, t in v.items()}
        else:
            out[k] = v
    return out
