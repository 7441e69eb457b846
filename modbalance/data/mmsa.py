"""Loaders for the MMSA and MulT feature pickles, the dataset they return and its collate function.

Two pickle layouts cover most multimodal sentiment work (see the "Bring your own MOSI / MOSEI
file" guide):

* **MMSA** (thuiar/MMSA; MOSI, MOSEI, CH-SIMS, aligned and unaligned): a dict
  ``{"train"|"valid"|"test": {"text", "text_bert", "audio", "vision", "regression_labels",
  "id", "raw_text", ["audio_lengths", "vision_lengths"], ...}}``.
* **MulT** (yaohungt/Multimodal-Transformer; also MultiBench, MMIM): a dict
  ``{"train"|"valid"|"test": {"text", "audio", "vision", "labels", ["id"]}}`` with labels
  (N, 1, 1) for sentiment or (N, 4, 2) for IEMOCAP.

Both give a :class:`MultimodalDataset` whose items hold only the *valid* frames of every modality;
:func:`collate_multimodal` pads a batch back to a rectangle and returns masks and lengths.

.. warning::
    Pickles run code when they are loaded. Only load files you trust.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from modbalance._checks import ModbalanceError, check_finite, value_checks_enabled

__all__ = [
    "MultimodalDataset",
    "collate_multimodal",
    "load_mmsa",
    "load_mult",
    "multimodal_loader",
]

_SPLITS = ("train", "valid", "test")
_MODALITIES = ("text", "audio", "vision")
_SIMS_UNIMODAL = {"text": "regression_labels_T", "audio": "regression_labels_A",
                  "vision": "regression_labels_V"}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# valid-frame detection
# ----------------------------------------------------------------------------------------------


#: Bytes of input per chunk of the whole-array passes below (bounds their temporaries).
_CHUNK_BYTES = 1 << 26


def _row_chunks(n: int, row_bytes: int) -> range:
    """Start indices of chunks of rows of about ``_CHUNK_BYTES`` each."""
    return range(0, n, max(1, _CHUNK_BYTES // max(row_bytes, 1)))


def _as_numpy(x: Tensor) -> np.ndarray | None:
    """A NumPy view of a CPU tensor (no copy), or None where NumPy cannot view it (bf16, GPU)."""
    if x.device.type != "cpu" or x.dtype in (torch.bfloat16, torch.complex32) or x.is_sparse:
        return None
    try:
        return x.detach().numpy()
    except (TypeError, RuntimeError):
        return None


def _all_finite(arr: np.ndarray) -> bool:
    """Every element of a float array is finite; chunked, so the bool temporaries stay small."""
    if arr.ndim == 0 or arr.shape[0] == 0:
        return bool(np.isfinite(arr).all())
    step = _row_chunks(arr.shape[0], arr[0].nbytes).step
    return all(bool(np.isfinite(arr[i : i + step]).all()) for i in range(0, arr.shape[0], step))


def _check_finite_features(x: Tensor, name: str) -> None:
    """:func:`check_finite` without its full-size temporaries for CPU tensors (same error)."""
    if not value_checks_enabled() or not x.is_floating_point():
        return
    arr = _as_numpy(x)
    if arr is None or not _all_finite(arr):
        check_finite(x, name)  # the device's own check, or the error message with the counts


def _frame_nonzero(x: Tensor) -> Tensor:
    """(N, T, D) -> (N, T) bool: the frame has at least one non-zero entry (chunked over N)."""
    arr = _as_numpy(x)
    if arr is not None and x.shape[0] > 0:  # NumPy's comparison + any is several times faster
        chunks = _row_chunks(x.shape[0], arr[0].nbytes)
        out = [(arr[i : i + chunks.step] != 0).any(-1) for i in chunks]
        return torch.from_numpy(np.concatenate(out) if len(out) > 1 else out[0])
    if x.shape[0] == 0:
        return torch.zeros(x.shape[:2], dtype=torch.bool)
    chunks = _row_chunks(x.shape[0], x[0].numel() * x.element_size())
    return torch.cat([(x[i : i + chunks.step] != 0).any(-1) for i in chunks])


def _spans_from_nonzero(nonzero: Tensor) -> tuple[Tensor, Tensor]:
    """Valid span = first to last non-zero frame (leading/trailing all-zero frames are padding)."""
    n, t = nonzero.shape
    if t == 0:
        z = torch.zeros(n, dtype=torch.long)
        return z, z
    any_nz = nonzero.any(1)
    first = nonzero.to(torch.uint8).argmax(1)
    last = t - nonzero.flip(1).to(torch.uint8).argmax(1)
    start = torch.where(any_nz, first, torch.zeros_like(first))
    end = torch.where(any_nz, last, torch.zeros_like(last))
    return start.long(), end.long()


def _spans_from_lengths(nonzero: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Place ``lengths[i]`` valid frames at the end whose complement is all-zero padding.

    Post-padding (valid frames first) is taken when the frames after the first ``L`` are all
    zero, pre-padding when the frames before the last ``L`` are all zero and post-padding is not
    consistent; when neither side is all zero the valid frames are the first ``L`` (what
    ``pack_padded_sequence`` and MMSA's length-aware models assume).
    """
    t = nonzero.shape[1]
    idx = torch.arange(t)
    after = idx[None, :] >= lengths[:, None]
    before = idx[None, :] < (t - lengths)[:, None]
    post_ok = ~(nonzero & after).any(1)
    pre_ok = ~(nonzero & before).any(1)
    start = torch.where(~post_ok & pre_ok, t - lengths, torch.zeros_like(lengths))
    return start, start + lengths


# ----------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------


def _parse_labels(labels: Any) -> tuple[Tensor, str, int | None]:
    """Check the labels of a :class:`MultimodalDataset` and infer its task from them.

    Args:
        labels: (N,) float sentiment labels, (N,) integer class indices (>= 0) or (N, 4)
            integer IEMOCAP emotion indicators.

    Returns:
        ``(labels, task, num_classes)``: the labels as (N,) float32, (N,) int64 or (N, 4) int64;
        ``"regression"``, ``"classification"`` or ``"iemocap"``; ``None``,
        ``labels.max() + 1`` (0 when empty) or 4.

    Raises:
        TypeError: If ``labels`` is not a tensor.
        ModbalanceError: On another shape or dtype, negative class indices or NaN/inf
            regression labels.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
    integer = not labels.is_floating_point() and not labels.is_complex()
    integer = integer and labels.dtype != torch.bool
    if labels.ndim == 1 and labels.is_floating_point():
        return check_finite(labels.float(), "labels"), "regression", None
    if labels.ndim == 1 and integer:
        labels = labels.long()
        if labels.numel() and bool((labels < 0).any()):
            raise ModbalanceError(
                f"`labels` holds integer class indices, which must be >= 0; got "
                f"{int((labels < 0).sum())} negative value(s), e.g. {int(labels.min())}."
            )
        return labels, "classification", int(labels.max()) + 1 if labels.numel() else 0
    if labels.ndim == 2 and labels.shape[1] == 4 and not labels.is_floating_point():
        return labels.long(), "iemocap", 4
    fix = ""
    if labels.ndim >= 2 and labels.numel() == labels.shape[0]:  # (N, 1), (N, 1, 1)
        fix = "; for one label per sample pass `labels.view(-1)` (shape (N,))"
    raise ModbalanceError(
        "`labels` must be (N,) float (sentiment regression), (N,) integer (class "
        f"indices) or (N, 4) integer (IEMOCAP), got shape {tuple(labels.shape)} and dtype "
        f"{labels.dtype}{fix}."
    )


def _feature_span(m: str, x: Any, n: int, length: Any) -> tuple[Tensor, Tensor]:
    """Check ``features[m]`` and find the valid-frame span ``[start, end)`` of every sample.

    Args:
        m: The modality name (for messages).
        x: Its features, (N, T, D) (a sequence) or (N, F) (a vector).
        n: The number of labels N.
        length: ``lengths[m]``, (N,) counts of valid frames, or ``None`` (span from the
            non-zero frames).

    Returns:
        ``(start, end)``, each (N,) int64; ``0`` and ``1`` for a vector modality.

    Raises:
        TypeError: If ``x`` is not a tensor.
        ModbalanceError: On a wrong rank or sample count, NaN/inf features, lengths given for a
            vector modality or lengths out of ``[0, T]``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"`features[{m!r}]` must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim not in (2, 3):
        raise ModbalanceError(
            f"`features[{m!r}]` must have shape (N, T, D) (a sequence) or (N, F) (a "
            f"vector), got shape {tuple(x.shape)}."
        )
    if x.shape[0] != n:
        raise ModbalanceError(
            f"`features[{m!r}]` has {x.shape[0]} samples but `labels` has {n}; they must match."
        )
    _check_finite_features(x, f"features[{m!r}]")
    if x.ndim == 2:
        if length is not None:
            raise ModbalanceError(
                f"`lengths[{m!r}]` was given but `features[{m!r}]` is a vector modality "
                f"of shape {tuple(x.shape)} (no time axis); drop it from `lengths`."
            )
        return torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
    if length is None:
        return _spans_from_nonzero(_frame_nonzero(x))
    nonzero = _frame_nonzero(x)
    ln = torch.as_tensor(length).reshape(-1).long()
    if ln.shape[0] != n or bool((ln < 0).any()) or bool((ln > x.shape[1]).any()):
        raise ModbalanceError(
            f"`lengths[{m!r}]` must hold {n} integers in [0, {x.shape[1]}], got shape "
            f"{tuple(ln.shape)} with range "
            f"[{int(ln.min()) if ln.numel() else 0}, "
            f"{int(ln.max()) if ln.numel() else 0}]."
        )
    return _spans_from_lengths(nonzero, ln)


def _sample_ids(ids: Sequence[str] | None, n: int, split: str) -> list[str]:
    """The N sample ids as strings (default ``"<split>_<i>"``), checked against N."""
    if ids is None:
        ids = [f"{split}_{i}" for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ModbalanceError(f"`ids` has {len(ids)} entries but `labels` has {n}.")
    return ids


def _unimodal_label_tensors(
    unimodal_labels: Mapping[str, Tensor] | None, n: int
) -> dict[str, Tensor]:
    """``{modality: (N,) float32}`` per-modality labels, checked (N entries, finite)."""
    out: dict[str, Tensor] = {}
    for m, y in (unimodal_labels or {}).items():
        y = torch.as_tensor(y).reshape(-1).float()
        if y.shape[0] != n:
            raise ModbalanceError(
                f"`unimodal_labels[{m!r}]` has {y.shape[0]} entries but `labels` has {n}."
            )
        out[m] = check_finite(y, f"unimodal_labels[{m!r}]")
    return out


class MultimodalDataset(Dataset):
    """Per-sample multimodal data: sequences with their valid-frame spans, or plain vectors.

    Each modality is either a **sequence** modality, stored as one padded tensor (N, T_m, D_m)
    exactly as in the source file together with the span ``[start, end)`` of valid frames of
    every sample, or a **vector** modality, stored as (N, F_m) (one feature vector per sample,
    no time axis; e.g. the views of a multi-view data set). Item ``i`` is a dict:

    * ``"features"``: ``{m: (L_m, D_m)}`` for a sequence modality — the valid frames only —
      or ``{m: (F_m,)}`` for a vector modality (float32 as given; ``int64`` for BERT token ids,
      see :func:`load_mmsa`);
    * ``"mask"``: ``{m: (L_m,) bool}`` all ``True`` for a sequence modality, a 0-dim ``True``
      for a vector modality (kept so that items and batches have the same keys);
    * ``"label"``: a 0-dim float32 tensor (sentiment regression, ``task == "regression"``), a
      0-dim int64 class index (``task == "classification"``, any number of classes) or, for the
      IEMOCAP MulT layout (``task == "iemocap"``), a (4,) int64 vector of present (1) / absent
      (0) emotions in the order ``("Neutral", "Happy", "Sad", "Angry")``;
    * ``"id"``: ``str``;
    * ``"unimodal_labels"``: ``{m: 0-dim float32}``, only when the file has unimodal labels
      (CH-SIMS ``regression_labels_T/_A/_V``).

    Where the valid span of a sequence comes from: explicit ``lengths`` when given (the side is
    inferred from which end is all-zero padding, defaulting to "valid frames first"), otherwise
    the frames from the first to the last frame that has a non-zero entry. The padding side is
    never assumed.

    Features and labels must be finite: the loaders (:func:`load_mmsa`, :func:`load_mult`)
    repair non-finite feature values (as MMSA does) and refuse non-finite labels before they
    build the dataset; a dataset built directly refuses both (a value check, see
    :func:`modbalance.value_checks`).

    Args:
        features: ``{modality: tensor}``, each (N, T_m, D_m) (a sequence) or (N, F_m) (a
            vector); float, or integer token ids.
        labels: (N,) float sentiment labels, (N,) integer class indices (>= 0), or (N, 4)
            integer IEMOCAP emotion indicators.
        ids: N sample ids (default ``"<split>_<i>"``).
        lengths: Optional ``{modality: (N,) int}`` counts of valid frames (sequence modalities
            only).
        split: Name of the split, kept as an attribute.
        unimodal_labels: Optional ``{modality: (N,) float}`` per-modality labels.

    Attributes:
        modalities: Tuple of modality names, in the order given.
        dims: ``{modality: D_m or F_m}`` (the last feature dimension).
        vector_modalities: Names of the vector (N, F_m) modalities, in order.
        split: The split name.
        task: ``"regression"``, ``"classification"`` or ``"iemocap"``.
        num_classes: Number of classes (``labels.max() + 1`` of *this* split for
            classification, so a split missing the top class reports fewer: take it from the
            training split; 4 for IEMOCAP) or ``None`` for regression.

    Raises:
        TypeError: If ``labels`` or a feature is not a tensor.
        ModbalanceError: On inconsistent sample counts, wrong ranks, lengths out of range,
            negative class indices or NaN/inf features or labels (the message names the
            modality or ``labels``).

    Example:
        >>> import torch
        >>> from modbalance.data import MultimodalDataset
        >>> audio = torch.zeros(2, 4, 3)
        >>> audio[0, :2] = 1.0  # sample 0: 2 valid frames, post-padded
        >>> audio[1, 1:] = 2.0  # sample 1: 3 valid frames, pre-padded
        >>> ds = MultimodalDataset({"audio": audio}, torch.tensor([0.5, -1.0]))
        >>> ds[1]["features"]["audio"].shape, ds.dims
        (torch.Size([3, 3]), {'audio': 3})
        >>> batch = ds.collate([ds[0], ds[1]])
        >>> batch["lengths"]["audio"].tolist(), batch["mask"]["audio"].tolist()
        ([2, 3], [[True, True, False], [True, True, True]])

        Vector views with integer class labels (generic classification):

        >>> views = {"pixels": torch.rand(3, 6), "profile": torch.rand(3, 4)}
        >>> ds = MultimodalDataset(views, torch.tensor([0, 2, 1]))
        >>> ds.task, ds.num_classes, ds.vector_modalities, ds[0]["mask"]["pixels"]
        ('classification', 3, ('pixels', 'profile'), tensor(True))
        >>> batch = ds.collate([ds[0], ds[1]])
        >>> batch["features"]["pixels"].shape, batch["mask"]["pixels"].tolist()
        (torch.Size([2, 6]), [True, True])
        >>> batch["label"].tolist(), batch["lengths"]["profile"].tolist()
        ([0, 2], [1, 1])
    """

    def __init__(
        self,
        features: Mapping[str, Tensor],
        labels: Tensor,
        *,
        ids: Sequence[str] | None = None,
        lengths: Mapping[str, Tensor] | None = None,
        split: str = "train",
        unimodal_labels: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not isinstance(features, Mapping) or not features:
            raise ModbalanceError(
                "`features` must be a non-empty dict {modality: (N, T, D) or (N, F) tensor}, got "
                f"{features!r:.80}."
            )
        labels, task, num_classes = _parse_labels(labels)
        self.task: str = task
        self.num_classes: int | None = num_classes
        n = labels.shape[0]
        lengths = dict(lengths or {})
        unknown = set(lengths) - set(features)
        if unknown:
            raise ModbalanceError(
                f"`lengths` has modalities {sorted(unknown)} that are not in `features` "
                f"({sorted(features)})."
            )
        self._features: dict[str, Tensor] = {}
        self._start: dict[str, Tensor] = {}
        self._end: dict[str, Tensor] = {}
        for m, x in features.items():
            self._start[m], self._end[m] = _feature_span(m, x, n, lengths.get(m))
            self._features[m] = x
        self._ids = _sample_ids(ids, n, split)
        self._unimodal: dict[str, Tensor] = _unimodal_label_tensors(unimodal_labels, n)
        self._labels = labels
        self.split = split
        self.modalities: tuple[str, ...] = tuple(self._features)
        self.vector_modalities: tuple[str, ...] = tuple(
            m for m, x in self._features.items() if x.ndim == 2
        )
        self.dims: dict[str, int] = {m: int(x.shape[-1]) for m, x in self._features.items()}

    def __len__(self) -> int:
        return self._labels.shape[0]

    @property
    def labels(self) -> Tensor:
        """All labels: (N,) float32 sentiment, (N,) int64 class indices or (N, 4) int64 IEMOCAP."""
        return self._labels

    @property
    def ids(self) -> list[str]:
        """The N sample ids."""
        return list(self._ids)

    @property
    def unimodal_labels(self) -> dict[str, Tensor]:
        """Per-modality (N,) labels when the file has them (CH-SIMS), else an empty dict."""
        return dict(self._unimodal)

    def lengths(self, modality: str) -> Tensor:
        """(N,) int64 number of valid frames of ``modality`` (all ones for a vector modality)."""
        return self._end[modality] - self._start[modality]

    def padded(self, modality: str) -> Tensor:
        """The stored (N, T, D) (or (N, F) vector) tensor of ``modality``, as in the source."""
        return self._features[modality]

    def valid_mask(self, modality: str) -> Tensor:
        """(N, T) bool mask of the valid frames of ``modality`` in :meth:`padded` layout.

        For a vector modality it is (N,) all ``True``.
        """
        if modality in self.vector_modalities:
            return torch.ones(len(self), dtype=torch.bool)
        t = torch.arange(self._features[modality].shape[1])
        s, e = self._start[modality], self._end[modality]
        return (t[None, :] >= s[:, None]) & (t[None, :] < e[:, None])

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} samples.")
        i = i % n
        feats, mask = {}, {}
        for m, x in self._features.items():
            if x.ndim == 2:
                feats[m] = x[i]
                mask[m] = torch.ones((), dtype=torch.bool)
                continue
            s, e = int(self._start[m][i]), int(self._end[m][i])
            feats[m] = x[i, s:e]
            mask[m] = torch.ones(e - s, dtype=torch.bool)
        item: dict[str, Any] = {
            "features": feats,
            "mask": mask,
            "label": self._labels[i],
            "id": self._ids[i],
        }
        if self._unimodal:
            item["unimodal_labels"] = {m: y[i] for m, y in self._unimodal.items()}
        return item

    @staticmethod
    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of items into a batch (see :func:`collate_multimodal`)."""
        return collate_multimodal(batch)

    def batch(self, indices: Sequence[int] | Tensor) -> dict[str, Any]:
        """The collated batch of the samples ``indices``, fetched with one indexing per modality.

        Equal to ``collate_multimodal([self[i] for i in indices])``, value for value, without
        building the B items: sequence modalities are gathered from their valid-frame spans and
        zero-padded after them to the longest span of the batch. :func:`multimodal_loader`
        fetches every batch this way.

        Args:
            indices: B >= 1 sample indices (negative ones count from the end), a sequence of
                ints or a (B,) integer tensor.

        Returns:
            The dict of :func:`collate_multimodal`: ``"features"``, ``"mask"``, ``"lengths"``,
            ``"label"``, ``"id"`` and, when the dataset has them, ``"unimodal_labels"``.

        Raises:
            ModbalanceError: If ``indices`` is empty or not a 1-D sequence of integers.
            IndexError: If an index is out of range.

        Example:
            >>> import torch
            >>> from modbalance.data import MultimodalDataset, collate_multimodal
            >>> seq = torch.zeros(3, 4, 2)
            >>> seq[0, 2:] = 1.0; seq[2, 1:] = 2.0        # valid frames: 2, 0 and 3
            >>> labels = torch.tensor([0.5, -1.0, 2.0])
            >>> ds = MultimodalDataset({"a": seq, "v": torch.randn(3, 5)}, labels)
            >>> out = ds.batch([2, 0])
            >>> out["features"]["a"].shape, out["lengths"]["a"].tolist(), out["id"]
            (torch.Size([2, 3, 2]), [3, 2], ['train_2', 'train_0'])
            >>> ref = collate_multimodal([ds[2], ds[0]])
            >>> all(torch.equal(out["features"][m], ref["features"][m]) for m in ds.modalities)
            True
        """
        idx = self._batch_index(indices)
        feats, masks, lens = {}, {}, {}
        for m, x in self._features.items():
            if x.ndim == 2:
                feats[m] = x[idx]
                masks[m] = torch.ones(idx.shape[0], dtype=torch.bool)
                lens[m] = torch.ones(idx.shape[0], dtype=torch.long)
                continue
            start = self._start[m][idx]
            length = self._end[m][idx] - start
            t_max = int(length.max())
            frames = torch.arange(t_max)
            valid = frames[None, :] < length[:, None]  # (B, T_max)
            if bool((start == 0).all()):  # spans at the front (post-padded): one row gather
                out = x[:, :t_max].index_select(0, idx)
            else:  # frame t of row b is frame start_b + t of the stored sample
                pos = (start[:, None] + frames[None, :]).clamp_max(max(x.shape[1] - 1, 0))
                out = x[idx[:, None], pos]
            if not bool(valid.all()):  # frames past a span are padding: zero those rows only
                pad = (~valid).reshape(-1).nonzero().squeeze(1)
                out.flatten(0, 1).index_fill_(0, pad, 0.0)  # a view: ``out`` is a fresh gather
            feats[m], masks[m], lens[m] = out, valid, length
        result: dict[str, Any] = {
            "features": feats,
            "mask": masks,
            "lengths": lens,
            "label": self._labels[idx],
            "id": [self._ids[i] for i in idx.tolist()],
        }
        if self._unimodal:
            result["unimodal_labels"] = {m: y[idx] for m, y in self._unimodal.items()}
        return result

    def _batch_index(self, indices: Sequence[int] | Tensor) -> Tensor:
        """``indices`` as a checked (B,) int64 tensor in ``[0, N)``."""
        if isinstance(indices, Tensor):
            bad = indices.ndim != 1 or indices.dtype.is_floating_point or indices.is_complex()
            bad = bad or indices.dtype == torch.bool  # a mask, not indices
            idx = indices.to(torch.long) if not bad else indices
        else:
            is_seq = isinstance(indices, Sequence) and not isinstance(indices, (str, bytes))
            # a sampler's batch is a list of ints: one pass over the types
            ints = is_seq and (
                set(map(type, indices)) == {int}
                or all(
                    isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in indices
                )
            )
            bad = not ints
            idx = self._int64(indices) if ints else None
        if bad:
            raise ModbalanceError(
                "`indices` must be a 1-D sequence (or tensor) of integer sample indices, got "
                f"{indices!r:.80}."
            )
        if idx.numel() == 0:
            raise ModbalanceError("`indices` must hold at least one sample index, got none.")
        n = len(self)
        out_of_range = (idx < -n) | (idx >= n)
        if bool(out_of_range.any()):
            i = int(idx[out_of_range][0])
            raise IndexError(f"index {i} is out of range for a dataset of {n} samples.")
        return idx % n

    def _int64(self, indices: Sequence[int]) -> Tensor:
        """Integer ``indices`` as int64; one beyond int64 is out of range (``IndexError``)."""
        try:
            return torch.tensor(list(indices), dtype=torch.long)
        except (OverflowError, RuntimeError, ValueError):
            big = next((int(i) for i in indices if not -(2**63) <= int(i) < 2**63), None)
            if big is None:  # not an overflow: torch's own error
                raise
            raise IndexError(
                f"index {big} is out of range for a dataset of {len(self)} samples."
            ) from None

    def __repr__(self) -> str:
        dims = ", ".join(
            f"{m}={d}" if m in self.vector_modalities else f"{m}={self._features[m].shape[1]}x{d}"
            for m, d in self.dims.items()
        )
        return f"MultimodalDataset(split={self.split!r}, n={len(self)}, task={self.task!r}, {dims})"


def _entry(d: Any, key: str, what: str, must: str, **words: str) -> Any:
    """``d[key]`` of a mapping ``d``; the errors name it ``what`` (``must``: the expected kind).

    ``words`` may reword the missing-key error: ``noun`` (``"key"``), ``has`` (``"keys
    present"``) and a ``hint`` appended to it.
    """
    if not isinstance(d, Mapping):
        raise ModbalanceError(f"{what} must {must} {type(d).__name__}.")
    if key not in d:
        noun, has = words.get("noun", "key"), words.get("has", "keys present")
        raise ModbalanceError(
            f"{what} has no {noun} {key!r} ({has}: {sorted(map(str, d))}){words.get('hint', '')}."
        )
    return d[key]


def _item_part(item: Any, b: int, key: str) -> Any:
    must = "be a dict as returned by MultimodalDataset.__getitem__, got"
    hint = "; every item needs 'features', 'label' and 'id'"
    return _entry(item, key, f"item {b} of `batch`", must, hint=hint)


def _shape_pattern(ref: Tensor) -> str:
    if ref.ndim == 1:
        return f"({ref.shape[0]},)"
    return "(L, " + ", ".join(str(d) for d in ref.shape[1:]) + ")"


def _stack_items(values: list[Any], what: str) -> Tensor:
    for b, v in enumerate(values):
        if not isinstance(v, Tensor):
            raise ModbalanceError(f"{what} of item {b} must be a tensor, got {type(v).__name__}.")
        if v.shape != values[0].shape:
            raise ModbalanceError(
                f"{what} of item {b} has shape {tuple(v.shape)} but that of item 0 has shape "
                f"{tuple(values[0].shape)}; they must match."
            )
    return torch.stack(values)


def _batch_features(batch: Any) -> list[Mapping[str, Any]]:
    """The ``"features"`` dict of every item of a non-empty ``batch``, checked."""
    if not isinstance(batch, Sequence) or isinstance(batch, (str, bytes)):
        raise ModbalanceError(
            f"`batch` must be a list of dataset items, got a {type(batch).__name__}."
        )
    if not batch:
        raise ModbalanceError("`batch` must contain at least one item, got an empty list.")
    item_feats = [_item_part(item, b, "features") for b, item in enumerate(batch)]
    for b, f in enumerate(item_feats):
        if not isinstance(f, Mapping):
            raise ModbalanceError(
                f"item {b} of `batch` must have 'features' as a dict {{modality: tensor}}, got "
                f"{type(f).__name__}."
            )
    return item_feats


def _modality_items(
    item_feats: list[Mapping[str, Any]], m: str, mods: tuple[str, ...]
) -> list[Tensor]:
    """Every item's features of modality ``m``: all (F,) or all (L_b, D...) with one D...

    Raises:
        ModbalanceError: If an item lacks ``m``, its features are not a tensor of rank >= 1,
            or their shape disagrees with item 0's (the message names the item).
    """
    xs: list[Tensor] = []
    for b, f in enumerate(item_feats):
        if m not in f:
            raise ModbalanceError(
                f"item {b} of `batch` has no modality {m!r} in 'features' (it has "
                f"{tuple(f)}); every item must have the modalities of item 0, {mods}."
            )
        x = f[m]
        if not isinstance(x, Tensor) or x.ndim < 1:
            raise ModbalanceError(
                f"item {b} of `batch`: features[{m!r}] must be a (L, D) or (F,) tensor, got "
                f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}."
            )
        ref = xs[0] if xs else x
        same = x.shape == ref.shape if ref.ndim == 1 else x.shape[1:] == ref.shape[1:]
        if x.ndim != ref.ndim or not same:
            want = _shape_pattern(ref)
            raise ModbalanceError(
                f"item {b} of `batch`: features[{m!r}] has shape {tuple(x.shape)} but item 0 "
                f"has shape {tuple(ref.shape)}; every item needs shape {want} for this "
                "modality (same feature size, any number of frames)."
            )
        xs.append(x)
    return xs


def _pad_modality(xs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack (F,) vectors, or zero-pad (L_b, D...) sequences after their valid frames.

    Returns:
        ``(features, mask, lengths)``: (B, F), (B,) all ``True``, (B,) ones for vectors;
        (B, T, D...), (B, T) bool (``True`` on valid frames), (B,) int64 for sequences,
        with T the longest L_b.
    """
    if xs[0].ndim == 1:  # vector modality
        ones = torch.ones(len(xs), dtype=torch.long)
        return torch.stack(xs), torch.ones(len(xs), dtype=torch.bool), ones
    lengths = torch.tensor([x.shape[0] for x in xs], dtype=torch.long)
    t_max = int(lengths.max())
    out = xs[0].new_zeros((len(xs), t_max, *xs[0].shape[1:]))
    for b, x in enumerate(xs):
        out[b, : x.shape[0]] = x
    return out, torch.arange(t_max)[None, :] < lengths[:, None], lengths


def _collate_unimodal_labels(batch: Sequence[Any]) -> dict[str, Tensor]:
    """``{modality: (B,)}`` stacked ``"unimodal_labels"`` of the items (item 0's modalities)."""
    uni = [_item_part(item, b, "unimodal_labels") for b, item in enumerate(batch)]
    out: dict[str, Tensor] = {}
    for m in uni[0]:
        vals = []
        for b, u in enumerate(uni):
            if m not in u:
                raise ModbalanceError(
                    f"item {b} of `batch` has no modality {m!r} in 'unimodal_labels'."
                )
            vals.append(u[m])
        out[m] = _stack_items(vals, f"'unimodal_labels'[{m!r}]")
    return out


def collate_multimodal(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of :class:`MultimodalDataset` items to a rectangular batch.

    Every sequence modality is padded with zeros **after** its valid frames up to the longest
    sequence of that modality in the batch (so ``x[b, :lengths[b]]`` are the valid frames). A
    vector modality (items hold ``(F,)`` features) is stacked.

    Args:
        batch: Items as returned by ``MultimodalDataset.__getitem__``.

    Returns:
        dict with ``"features"`` ``{m: (B, T_m, D_m)}`` (sequence) or ``{m: (B, F_m)}``
        (vector), ``"mask"`` ``{m: (B, T_m) bool}`` (``True`` on valid frames) or ``{m: (B,)
        bool}`` all ``True`` (vector), ``"lengths"`` ``{m: (B,) int64}`` (all ones for a vector
        modality), ``"label"`` (B,) float32, (B,) int64 or (B, 4) int64, ``"id"`` ``list[str]``
        and, when present, ``"unimodal_labels"`` ``{m: (B,)}``.

    Raises:
        ModbalanceError: If ``batch`` is empty, an item is not a dict or lacks a key, the items
            have different modalities, or a modality's feature size (or a label's shape)
            differs between items; the message names the item index and the key.

    Example:
        >>> import torch
        >>> from modbalance.data import collate_multimodal
        >>> def item(n):
        ...     return {"features": {"a": torch.ones(n, 2)},
        ...             "mask": {"a": torch.ones(n, dtype=torch.bool)},
        ...             "label": torch.tensor(0.0), "id": str(n)}
        >>> items = [item(1), item(3)]
        >>> out = collate_multimodal(items)
        >>> out["features"]["a"].shape, out["lengths"]["a"].tolist(), out["id"]
        (torch.Size([2, 3, 2]), [1, 3], ['1', '3'])
    """
    item_feats = _batch_features(batch)
    mods = tuple(item_feats[0])
    feats, masks, lens = {}, {}, {}
    for m in mods:
        feats[m], masks[m], lens[m] = _pad_modality(_modality_items(item_feats, m, mods))
    labels = [_item_part(item, b, "label") for b, item in enumerate(batch)]
    ids = [_item_part(item, b, "id") for b, item in enumerate(batch)]
    result: dict[str, Any] = {
        "features": feats,
        "mask": masks,
        "lengths": lens,
        "label": _stack_items(labels, "'label'"),
        "id": ids,
    }
    if "unimodal_labels" in batch[0]:
        result["unimodal_labels"] = _collate_unimodal_labels(batch)
    return result


class _BatchFetch(Dataset):
    """Index = a batch's list of sample indices; item = that collated batch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: list[int]) -> dict[str, Any]:
        fetch = getattr(self.dataset, "batch", None)
        if callable(fetch):
            return fetch(indices)
        return collate_multimodal([self.dataset[i] for i in indices])


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def multimodal_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: Sampler[int] | None = None,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of collated batches that fetches each batch in one go.

    It yields the batches of ``DataLoader(dataset, batch_size, shuffle=shuffle,
    sampler=sampler, generator=generator, drop_last=drop_last,
    collate_fn=collate_multimodal)``: the same samples in the same order, drawing the same random
    numbers, value for value. A dataset with a ``batch(indices)`` method
    (:meth:`MultimodalDataset.batch`) is asked for each whole batch instead of B single items
    and a collate; any other map-style dataset is read item by item and collated.

    Args:
        dataset: A :class:`MultimodalDataset`, or any map-style dataset of its items.
        batch_size: Samples per batch, >= 1.
        shuffle: Reshuffle every epoch (with ``generator``, or a seed from torch's global
            generator).
        sampler: Sample order instead of ``shuffle`` (e.g. a ``DistributedSampler``).
        generator: Random generator of the shuffle.
        drop_last: Drop the last incomplete batch.

    Returns:
        A ``DataLoader`` whose items are the dicts of :func:`collate_multimodal`.

    Raises:
        ModbalanceError: If ``batch_size`` is not a positive integer, or both ``shuffle``
            and ``sampler`` are given.

    Example:
        >>> import torch
        >>> from modbalance.data import MultimodalDataset, multimodal_loader
        >>> ds = MultimodalDataset({"v": torch.randn(10, 3)}, torch.arange(10) % 2)
        >>> [b["id"] for b in multimodal_loader(ds, 4)][-1]
        ['train_8', 'train_9']
        >>> g = torch.Generator().manual_seed(0)
        >>> [len(b["id"]) for b in multimodal_loader(ds, 4, shuffle=True, generator=g)]
        [4, 4, 2]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ModbalanceError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
    if shuffle and sampler is not None:
        raise ModbalanceError("pass `shuffle=True` or a `sampler`, not both (the sampler orders).")
    fetch = _BatchFetch(dataset)
    if sampler is None and shuffle:
        sampler = RandomSampler(fetch, generator=generator)
    elif sampler is None:
        sampler = SequentialSampler(fetch)
    batches = BatchSampler(sampler, batch_size, drop_last)
    return DataLoader(
        fetch, batch_size=None, sampler=batches, generator=generator, collate_fn=_as_is
    )


# ----------------------------------------------------------------------------------------------
# file reading
# ----------------------------------------------------------------------------------------------


def _read_pickle(path: str | os.PathLike) -> Any:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if os.path.isdir(path):
        raise ModbalanceError(f"{path!r} is a directory, expected a .pkl file.")
    try:
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:  # pickles written by Python 2
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as exc:  # fmt: skip
        raise ModbalanceError(
            f"{path!r} is not a readable pickle file ({type(exc).__name__}: {exc})."
        ) from exc


def _source(path: str | os.PathLike | Mapping[str, Any]) -> tuple[Any, str]:
    """The file's content and how messages name it: read ``path``, or take the loaded dict."""
    if isinstance(path, Mapping):
        return path, "the loaded data"
    return _read_pickle(path), repr(os.fspath(path))


def _get_split(data: Any, where: str, split: str) -> Mapping[str, Any]:
    if split not in _SPLITS:
        raise ModbalanceError(
            f"`split` must be one of {', '.join(map(repr, _SPLITS))}; got {split!r}."
        )
    must = "hold a dict with keys 'train', 'valid', 'test', got a"
    d = _entry(data, split, where, must, noun="split", has="top-level keys")
    if not isinstance(d, Mapping):
        raise ModbalanceError(
            f"split {split!r} must be a dict of arrays, got a {type(d).__name__}."
        )
    return d


def _require(d: Mapping[str, Any], key: str, split: str) -> Any:
    return _entry(d, key, f"split {split!r}", "be a dict of arrays, got a")


def _array(value: Any, key: str, split: str, ndim: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise ModbalanceError(f"key {key!r} of split {split!r} is not an array: {exc}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ModbalanceError(
            f"key {key!r} of split {split!r} must be numeric, got dtype {arr.dtype}."
        )
    if arr.ndim not in ndim:
        want = " or ".join(str(k) for k in ndim)
        raise ModbalanceError(
            f"key {key!r} of split {split!r} must have {want} dimensions, got shape "
            f"{tuple(arr.shape)}."
        )
    return arr


def _float_features(arr: np.ndarray, key: str, repaired: list[str]) -> Tensor:
    """Cast to float32 and set non-finite entries to 0 (MMSA sets -inf to 0), counting them."""
    x = np.ascontiguousarray(arr, dtype=np.float32)  # no copy when already float32
    if not _all_finite(x):  # the full-size mask only when there is something to repair
        bad = ~np.isfinite(x)
        n_nan = int(np.isnan(x).sum())
        n_ninf = int(np.isneginf(x).sum())
        n_pinf = int(bad.sum()) - n_nan - n_ninf
        parts = [f"{c} {k}" for c, k in ((n_ninf, "-inf"), (n_nan, "NaN"), (n_pinf, "+inf")) if c]
        repaired.append(f"{key}: {', '.join(parts)}")
        x = np.where(bad, np.float32(0.0), x)  # a repaired copy; the caller's array is untouched
    if not x.flags.writeable:
        x = x.copy()
    return torch.from_numpy(x)


def _check_n(arrays: Mapping[str, Any], split: str) -> int:
    sizes = {k: len(v) for k, v in arrays.items()}
    counts = Counter(sizes.values())
    n = max(counts, key=lambda size: counts[size])  # the majority names the odd key out
    ref_key = next(k for k, s in sizes.items() if s == n)
    if len(counts) == 1 and n == 0:
        raise ModbalanceError(
            f"split {split!r} is empty: every key has 0 samples (sizes: {sizes}); a split needs "
            "at least one sample (check that the file was written completely, or load another "
            "split)."
        )
    for k, s in sizes.items():
        if s != n:
            raise ModbalanceError(
                f"inconsistent lengths in split {split!r}: key {k!r} has {s} samples but key "
                f"{ref_key!r} has {n} (all keys of a split must have the same first dimension; "
                f"sizes: {sizes})."
            )
    return n


def _ids(value: Any, n: int, split: str) -> list[str]:
    if value is None:
        return [f"{split}_{i}" for i in range(n)]
    arr = np.asarray(value)
    if arr.shape[:1] != (n,):
        raise ModbalanceError(
            f"inconsistent lengths in split {split!r}: key 'id' has shape {tuple(arr.shape)}, "
            f"expected {n} entries."
        )

    def dec(v: Any) -> str:
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)

    if arr.ndim == 1:
        return [dec(v) for v in arr]
    rows = arr.reshape(n, -1)
    first = [dec(v) for v in rows[:, 0]]
    if len(set(first)) == n:
        return first
    return ["_".join(dec(v) for v in row) for row in rows]


def _warn_repaired(repaired: list[str], split: str, where: str, stacklevel: int) -> None:
    if repaired:
        warnings.warn(
            f"split {split!r} of {where}: set non-finite feature values to 0 "
            f"(as MMSA does): {'; '.join(repaired)}.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def _text_key(d: Mapping[str, Any], text_key: str, split: str) -> str:
    """``"text"`` or ``"text_bert"``: ``text_key`` checked, ``"auto"`` resolved on the split."""
    if text_key not in ("auto", "text", "text_bert"):
        raise ModbalanceError(
            f"`text_key` must be one of 'auto', 'text', 'text_bert'; got {text_key!r}."
        )
    if text_key == "auto":
        if "text" not in d and "text_bert" not in d:
            raise ModbalanceError(
                f"split {split!r} has neither key 'text' (BERT features) nor 'text_bert' (token "
                f"ids) (keys present: {sorted(map(str, d))})."
            )
        text_key = "text" if "text" in d else "text_bert"
    return text_key


def _mmsa_arrays(
    d: Mapping[str, Any], text_key: str, split: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays an MMSA split is built from, with their ranks checked.

    Returns:
        ``(raw, sims)``: ``{key: array}`` for the text key, ``audio``, ``vision``,
        ``regression_labels``, the present ``*_lengths`` and CH-SIMS unimodal labels; and
        ``sims``, ``{modality: unimodal label key}`` of the CH-SIMS keys present.
    """
    raw: dict[str, np.ndarray] = {}
    raw[text_key] = _array(_require(d, text_key, split), text_key, split, (3,))
    raw["audio"] = _array(_require(d, "audio", split), "audio", split, (3,))
    raw["vision"] = _array(_require(d, "vision", split), "vision", split, (3,))
    raw["regression_labels"] = _array(
        _require(d, "regression_labels", split), "regression_labels", split, (1, 2)
    )
    for key in ("audio_lengths", "vision_lengths"):
        if key in d and d[key] is not None:
            raw[key] = _array(d[key], key, split, (1,))
    sims = {m: k for m, k in _SIMS_UNIMODAL.items() if k in d}
    for k in sims.values():
        raw[k] = _array(d[k], k, split, (1, 2))
    return raw, sims


def _mmsa_labels(labels: np.ndarray, n: int, split: str) -> Tensor:
    """``regression_labels`` (N,) or (N, 1) as a finite (N,) float32 tensor (never repaired)."""
    flat = labels.reshape(n, -1)
    if flat.shape[1] != 1:
        raise ModbalanceError(
            f"key 'regression_labels' of split {split!r} must have one value per sample, got "
            f"shape {tuple(labels.shape)}."
        )
    labels_t = torch.from_numpy(np.array(flat[:, 0], dtype=np.float32))
    if not bool(torch.isfinite(labels_t).all()):
        raise ModbalanceError(
            f"key 'regression_labels' of split {split!r} holds "
            f"{int((~torch.isfinite(labels_t)).sum())} non-finite value(s); labels cannot be "
            "repaired."
        )
    return labels_t


def _bert_tokens(tb: np.ndarray, split: str) -> tuple[Tensor, Tensor]:
    """``text_bert`` (N, 3, T) token rows as the (N, T, 3) int64 ``"text"`` and its lengths.

    Returns:
        ``(tokens, lengths)``: (N, T, 3) int64 ``[input_ids, attention_mask, segment_ids]``
        per frame, and the (N,) number of attended tokens (the attention-mask row's non-zeros).
    """
    if np.issubdtype(tb.dtype, np.floating):
        if not np.all(np.isfinite(tb)) or not np.all(tb == np.round(tb)):
            raise ModbalanceError(
                f"key 'text_bert' of split {split!r} must hold integer token ids."
            )
    ids = torch.from_numpy(np.array(tb, dtype=np.int64))  # (N, 3, T)
    return ids.transpose(1, 2).contiguous(), ids[:, 1].ne(0).sum(1)


def _frame_counts(ln: np.ndarray, key: str, m: str, t: int, split: str) -> Tensor:
    """``<m>_lengths`` as an (N,) int64 tensor of integers in ``[0, t]`` (``t`` frames of m)."""
    if not np.all(np.isfinite(ln)) or not np.all(ln == np.round(ln)):
        raise ModbalanceError(f"key {key!r} of split {split!r} must hold integers.")
    ln_t = torch.from_numpy(np.array(ln, dtype=np.int64))
    if bool((ln_t < 0).any()) or bool((ln_t > t).any()):
        raise ModbalanceError(
            f"key {key!r} of split {split!r} must lie in [0, {t}] (the number of frames "
            f"of {m!r}), got range [{int(ln_t.min())}, {int(ln_t.max())}]."
        )
    return ln_t


def _dataset_from_mmsa_split(
    d: Mapping[str, Any], split: str, text_key: str, where: str, stacklevel: int = 4
) -> MultimodalDataset:
    text_key = _text_key(d, text_key, split)
    raw, sims = _mmsa_arrays(d, text_key, split)
    n = _check_n(raw, split)
    if text_key == "text_bert" and raw["text_bert"].shape[1] != 3:
        raise ModbalanceError(
            f"key 'text_bert' of split {split!r} must have shape (N, 3, T) (input ids, attention "
            f"mask, segment ids), got shape {tuple(raw['text_bert'].shape)}."
        )
    labels_t = _mmsa_labels(raw["regression_labels"], n, split)
    repaired: list[str] = []
    features: dict[str, Tensor] = {}
    lengths: dict[str, Tensor] = {}
    if text_key == "text":
        features["text"] = _float_features(raw["text"], "text", repaired)
    else:
        features["text"], lengths["text"] = _bert_tokens(raw["text_bert"], split)
    features["audio"] = _float_features(raw["audio"], "audio", repaired)
    features["vision"] = _float_features(raw["vision"], "vision", repaired)
    for m in ("audio", "vision"):
        key = f"{m}_lengths"
        if key in raw:
            lengths[m] = _frame_counts(raw[key], key, m, features[m].shape[1], split)
    unimodal = {}
    for m, k in sims.items():
        y = raw[k].reshape(n, -1)[:, 0].astype(np.float32)
        unimodal[m] = torch.from_numpy(np.array(y))
    ids_list = _ids(d.get("id"), n, split)
    ds = MultimodalDataset(
        features, labels_t, ids=ids_list, lengths=lengths, split=split,
        unimodal_labels=unimodal or None,
    )  # fmt: skip
    _warn_repaired(repaired, split, where, stacklevel)
    return ds


def load_mmsa(
    path: str | os.PathLike | Mapping[str, Any], *, split: str = "train", text_key: str = "auto"
) -> MultimodalDataset:
    """Load one split of an MMSA feature pickle (MOSI / MOSEI / CH-SIMS, aligned or unaligned).

    Reads ``text`` (BERT features, (N, T, 768)) or ``text_bert`` (token ids, (N, 3, T)),
    ``audio`` and ``vision`` (N, T, D), ``regression_labels`` (N,), ``id`` and, in unaligned
    files, ``audio_lengths`` / ``vision_lengths``. Other keys (``raw_text``, ``annotations``,
    ``classification_labels``, MMSA-FET's top-level ``config``...) are ignored; CH-SIMS unimodal
    labels ``regression_labels_T/_A/_V`` become ``item["unimodal_labels"]``.

    * **Non-finite features**: every NaN/±inf feature value is set to 0 (MMSA does this for
      ``-inf`` audio, and for NaN when normalising); one :class:`RuntimeWarning` per call names
      the split, the keys and the counts. Non-finite labels are an error.
    * **Valid frames**: ``audio_lengths``/``vision_lengths`` when present (their side is
      inferred from which end is zero padding, "valid first" by default); for ``text_bert`` the
      attention-mask row; otherwise the span between the first and last non-zero frame.
    * **Token ids** (``text_key="text_bert"``, or ``"auto"`` when the split has no ``text``):
      the ``"text"`` modality is then an ``int64`` tensor (L, 3) per item whose columns are
      ``[input_ids, attention_mask, segment_ids]`` (``dims["text"] == 3``); a padded batch
      ``x`` (B, T, 3) gives MMSA's BERT input as ``x.transpose(1, 2)`` (B, 3, T). Padding
      with 0 is BERT's ``[PAD]`` with attention 0.

    Nothing is returned unless the whole split is valid (no partial loads).

    **All three splits from one read**: pass the file's content (the dict ``pickle.load``
    returns) instead of its path; every call then builds its split from that dict without
    reading the file again (a MOSEI file holds about 4 GB of features). The dataset shares
    memory with float32 feature arrays of that dict (no copy), except where non-finite values
    had to be repaired; the dict itself is never modified.

    .. warning::
        Pickles run code when they are loaded. Only load files you trust.

    Args:
        path: Path of the ``.pkl`` file (e.g. ``MOSI/Processed/unaligned_50.pkl``), or its
            already-loaded content (a dict with the splits).
        split: ``"train"``, ``"valid"`` or ``"test"``.
        text_key: ``"auto"`` (``text`` if present, else ``text_bert``), ``"text"`` or
            ``"text_bert"``.

    Returns:
        A :class:`MultimodalDataset` with modalities ``("text", "audio", "vision")``.

    Raises:
        FileNotFoundError: If ``path`` does not exist (the message has the path).
        ModbalanceError: If the file is not a pickle, lacks the split or a required key, has
            keys with inconsistent sample counts or wrong ranks (the message names the key and
            the split), or holds non-finite labels.

    Example:
        >>> import os, tempfile
        >>> from modbalance.data import load_mmsa, make_competition_data
        >>> synth = make_competition_data(n_train=8, n_valid=4, n_test=4, seq_len=6)
        >>> path = os.path.join(tempfile.mkdtemp(), "aligned_50.pkl")
        >>> synth.save(path)
        >>> ds = load_mmsa(path, split="valid")
        >>> len(ds), ds.modalities, ds.dims
        (4, ('text', 'audio', 'vision'), {'text': 768, 'audio': 5, 'vision': 20})

        Every split from one read of the file:

        >>> import pickle
        >>> with open(path, "rb") as f:
        ...     data = pickle.load(f)
        >>> [len(load_mmsa(data, split=s)) for s in ("train", "valid", "test")]
        [8, 4, 4]
    """
    data, where = _source(path)
    d = _get_split(data, where, split)
    return _dataset_from_mmsa_split(d, split, text_key, where)


def load_mult(
    path: str | os.PathLike | Mapping[str, Any], *, split: str = "train"
) -> MultimodalDataset:
    """Load one split of a MulT-style pickle (``mosi_data(_noalign).pkl``, ``iemocap_data.pkl``...).

    Per split: ``text`` (N, T, 300) GloVe, ``audio``, ``vision`` (N, T, D), ``labels`` and an
    optional ``id``.

    * ``labels`` (N, 1, 1) (or (N,) / (N, 1)): sentiment regression, ``item["label"]`` is a
      0-dim float32 tensor.
    * ``labels`` (N, 4, 2), IEMOCAP one-hot per emotion ("Neutral", "Happy", "Sad",
      "Angry"): ``item["label"]`` is a (4,) int64 vector, 1 where the emotion is present
      (``labels.argmax(-1)``), and ``dataset.task == "iemocap"``; score with
      :func:`modbalance.metrics.iemocap_metrics`.
    * ``id``: strings, or MulT's (N, 3) bytes rows; the first column is used when it is unique
      within the split, else the columns are joined with ``"_"``. Without ``id`` (IEMOCAP) the
      ids are ``"<split>_<i>"``.
    * Non-finite feature values are set to 0 with one warning (MulT repairs ``-inf`` audio).
      MulT files are pre-padded; the valid frames are found from the non-zero frames.

    Like :func:`load_mmsa`, ``path`` may also be the file's already-loaded content (the dict
    of splits), to build every split from one read.

    .. warning::
        Pickles run code when they are loaded. Only load files you trust.

    Args:
        path: Path of the ``.pkl`` file, or its already-loaded content (a dict with the splits).
        split: ``"train"``, ``"valid"`` or ``"test"``.

    Returns:
        A :class:`MultimodalDataset` with modalities ``("text", "audio", "vision")``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ModbalanceError: Not a pickle, missing split/key, inconsistent sample counts, wrong
            ranks, labels of an unknown shape or non-finite labels.
    """
    data, where = _source(path)
    d = _get_split(data, where, split)
    raw = {m: _array(_require(d, m, split), m, split, (3,)) for m in _MODALITIES}
    raw["labels"] = _array(_require(d, "labels", split), "labels", split, (1, 2, 3))
    n = _check_n(raw, split)
    lab = raw["labels"]
    if not np.all(np.isfinite(lab.astype(np.float64))):
        raise ModbalanceError(
            f"key 'labels' of split {split!r} holds non-finite values; labels cannot be repaired."
        )
    if lab.ndim == 3 and lab.shape[1:] == (4, 2):
        if not np.all((lab == 0) | (lab == 1)) or not np.all(lab.sum(-1) == 1):
            raise ModbalanceError(
                f"key 'labels' of split {split!r} has IEMOCAP shape (N, 4, 2) but is not one-hot "
                "along the last dimension."
            )
        labels_t = torch.from_numpy(np.array(lab.argmax(-1), dtype=np.int64))
    elif lab.reshape(n, -1).shape[1] == 1:
        labels_t = torch.from_numpy(np.array(lab.reshape(n), dtype=np.float32))
    else:
        raise ModbalanceError(
            f"key 'labels' of split {split!r} must have shape (N, 1, 1) (sentiment) or (N, 4, 2) "
            f"(IEMOCAP), got shape {tuple(lab.shape)}."
        )
    repaired: list[str] = []
    features = {m: _float_features(raw[m], m, repaired) for m in _MODALITIES}
    ids_list = _ids(d.get("id"), n, split)
    ds = MultimodalDataset(features, labels_t, ids=ids_list, split=split)
    _warn_repaired(repaired, split, where, 3)
    return ds
