"""Class prototypes per modality: label binning, batch class means and :class:`PrototypeCalibrator`.

Prototype-guided calibration (the "PCL" component of PaSE, He et al., AAAI 2026,
`arXiv:2511.17585 <https://arxiv.org/abs/2511.17585>`_) keeps, for one modality, one prototype
per class (an exponential moving average of that class's features) and pulls every feature toward
the prototype of its class. Unlike the authors' code, the loss here carries gradient to the
encoder (the features are never detached), every class is initialised from its own first
observation (not left at zero when absent from the first batch), and float sentiment labels go
through an explicit binning (:func:`sentiment_classes`) instead of being used as indices. The
prototype classifier and its cross-entropy follow PMR (Fan et al., CVPR 2023).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_mod

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_finite,
    check_finite_sums,
    check_int,
    check_real,
    check_same_size,
    check_tensor,
    value_checks_enabled,
)
from modbalance._geometry import NORM_EPS, cosine_similarity, pairwise_distance, unit
from modbalance.distributed import all_reduce_sum

__all__ = [
    "CalibrationOutput",
    "ClassMeans",
    "PrototypeCalibrator",
    "calibrate",
    "class_means",
    "sentiment_classes",
]

_METRICS = ("cosine", "sqeuclidean")
# (clip bound, offset) of the round-and-clip bins; 2 classes use the sign instead.
_ROUND_BINS = {7: 3.0, 5: 2.0, 3: 1.0}


def sentiment_classes(y: Tensor, num_classes: int = 7) -> Tensor:
    r"""Bin continuous sentiment scores into class indices with MMSA's round-and-clip conventions.

    For ``num_classes`` in ``{7, 5, 3}`` the score is clipped to :math:`[-B, B]`, rounded to the
    nearest integer with ties to even (``numpy.round`` / :func:`torch.round`, as MMSA's
    ``Mult_acc_7``, ``Mult_acc_5`` and its ``[-1, 1]`` 3-class accuracy do) and shifted by
    :math:`B`:

    .. math::

        c(y) = \operatorname{round}\big(\operatorname{clip}(y, -B, B)\big) + B,
        \qquad B = (K - 1) / 2 .

    For ``num_classes=2`` the class is MMSA's "Has0" binary convention: non-negative vs negative,
    :math:`c(y) = [\,y \ge 0\,]` (zero counts as positive).

    ================  ==================  ============================================
    ``num_classes``   rule                class of y = -3.7, -2.5, -0.5, 0, 0.5, 1.5, 2.5, 3.2
    ================  ==================  ============================================
    7                 clip [-3, 3], +3    0, 1, 3, 3, 3, 5, 5, 6
    5                 clip [-2, 2], +2    0, 0, 2, 2, 2, 4, 4, 4
    3                 clip [-1, 1], +1    0, 0, 1, 1, 1, 2, 2, 2
    2                 y >= 0              0, 0, 0, 1, 1, 1, 1, 1
    ================  ==================  ============================================

    For 3 classes, 0 = negative, 1 = neutral, 2 = positive; ties at :math:`\pm 0.5` round to 0,
    so "neutral" is the closed interval :math:`[-0.5, 0.5]`. Values beyond :math:`\pm 3` fall into
    the extreme classes.

    Args:
        y: Float sentiment scores of any shape (MOSI/MOSEI use :math:`[-3, 3]`).
        num_classes: 7, 5, 3 or 2.

    Returns:
        A ``torch.long`` tensor of the same shape as ``y`` with values in ``[0, num_classes)``.

    Raises:
        TypeError: If ``y`` is not a floating tensor.
        ModbalanceError: If ``num_classes`` is not 7, 5, 3 or 2, or ``y`` holds NaN/inf.

    Example:
        >>> import torch
        >>> from modbalance.prototypes import sentiment_classes
        >>> y = torch.tensor([-3.7, -2.5, -0.5, 0.0, 0.5, 1.5, 2.5, 3.2])
        >>> sentiment_classes(y, 7).tolist()
        [0, 1, 3, 3, 3, 5, 5, 6]
        >>> sentiment_classes(y, 2).tolist()
        [0, 0, 0, 1, 1, 1, 1, 1]
    """
    check_choice(num_classes, "num_classes", (7, 5, 3, 2))
    check_tensor(y, "y", dtype="floating", finite=True)
    if num_classes == 2:
        return (y >= 0).long()
    bound = _ROUND_BINS[num_classes]
    return (torch.round(y.clamp(-bound, bound)) + bound).long()


class ClassMeans(NamedTuple):
    """Per-class batch statistics returned by :func:`class_means`.

    Attributes:
        means: ``(K, D)`` mean feature of each class (zeros for classes absent from the batch);
            differentiable with respect to the features.
        counts: ``(K,)`` number of (masked-in) samples of each class, in the features' dtype.
    """

    means: Tensor
    counts: Tensor


def class_means(
    features: Tensor, labels: Tensor, num_classes: int, mask: Tensor | None = None
) -> ClassMeans:
    r"""Differentiable per-class mean of a batch of features.

    .. math::

        \mu_k = \frac{\sum_i w_{ik} h_i}{\max(1, n_k)}, \qquad
        n_k = \sum_i w_{ik}, \qquad w_{ik} = [\,y_i = k\,]\,[\,\text{mask}_i\,].

    Masked-out rows (and labels outside ``[0, K)``) belong to no class; their values never enter
    the result, even when they are NaN. A NaN/inf in a row that does belong to a class is an
    error (it would silently turn that class's mean into NaN); this value check reads the data
    and so synchronises with an accelerator: switch it off with :func:`modbalance.value_checks`
    in a hot loop. Otherwise no host synchronisation and no loop over the batch.

    Args:
        features: ``(N, D)`` floating features.
        labels: ``(N,)`` integer class indices.
        num_classes: Number of classes ``K``.
        mask: Optional ``(N,)`` bool; ``False`` rows are ignored.

    Returns:
        :class:`ClassMeans` with ``means`` ``(K, D)`` and ``counts`` ``(K,)``.

    Raises:
        TypeError: If ``features`` is not floating, ``labels`` not integer or ``mask`` not bool.
        ModbalanceError: On wrong ranks, mismatched sizes, ``num_classes < 1`` or NaN/inf in a
            masked-in row of ``features`` whose label is a class.

    Example:
        >>> import torch
        >>> from modbalance.prototypes import class_means
        >>> h = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
        >>> out = class_means(h, torch.tensor([0, 0, 2]), 3)
        >>> out.means.tolist(), out.counts.tolist()
        ([[2.0, 1.0], [0.0, 0.0], [5.0, 5.0]], [2.0, 0.0, 1.0])
    """
    check_int(num_classes, "num_classes", low=1)
    check_tensor(features, "features", ndim=2, dtype="floating")
    check_tensor(labels, "labels", ndim=1, dtype="integer")
    check_same_size(features, "features", 0, labels, "labels", 0)
    valid = _check_mask(mask, features.shape[0], features.device)
    weights = _class_weights(labels, num_classes, valid)
    if value_checks_enabled():
        rows = weights.any(dim=1, keepdim=True)
        try:
            check_finite(torch.where(rows, features.detach(), 0.0), "features")
        except ModbalanceError as exc:
            raise ModbalanceError(
                f"{exc} Only rows that are masked in (mask True) and labelled with a class in "
                f"[0, {num_classes - 1}] are checked: fix the features or mask those rows out."
            ) from None
    sums, counts = _class_sums(features, weights)
    return ClassMeans(sums / counts.clamp_min(1).unsqueeze(1), counts)


def _check_mask(mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    check_tensor(mask, "mask", ndim=1, dtype="bool")
    if mask.shape[0] != n:
        raise ModbalanceError(
            f"`mask` must have shape ({n},) to match the batch, got shape {tuple(mask.shape)}."
        )
    return mask.to(device)


def _class_weights(labels: Tensor, num_classes: int, valid: Tensor) -> Tensor:
    """(N, K) bool membership; out-of-range and masked-out labels belong to no class.

    Leading dimensions broadcast: ``(M, N)`` flags give ``(M, N, K)`` (:func:`calibrate`).
    """
    classes = torch.arange(num_classes, device=labels.device)
    return (labels.unsqueeze(-1) == classes) & valid.unsqueeze(-1)


def _class_sums(features: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class sums (K, D) and counts (K,) in the features' dtype; other rows never enter."""
    rows = weights.any(dim=1, keepdim=True)
    clean = torch.where(rows, features, 0.0)
    w = weights.to(features.dtype)
    return w.transpose(0, 1) @ clean, w.sum(dim=0)


class CalibrationOutput(NamedTuple):
    """Result of :meth:`PrototypeCalibrator.forward`.

    Attributes:
        loss: Scalar calibration loss (differentiable w.r.t. the features).
        logits: ``(N, K)`` prototype logits, similarity / temperature, differentiable w.r.t.
            the features; ``-inf`` for classes that are not initialised yet. Masked-out rows are
            computed from a zero feature, so they never hold NaN, whatever the input held.
        prototypes: ``(K, D)`` snapshot of the prototypes after this step's update (detached).
        class_means: ``(K, D)`` differentiable mean of this batch's masked-in features per class,
            in the metric's space (L2-normalised features under ``"cosine"``); zeros for absent
            classes. Local to this process, never all-reduced.
        class_counts: ``(K,)`` number of masked-in samples per class in this batch, as floats.
    """

    loss: Tensor
    logits: Tensor
    prototypes: Tensor
    class_means: Tensor
    class_counts: Tensor

    def confidence(self) -> Tensor:
        r"""``(N,)`` label-free confidence of every row, from :attr:`logits`.

        The value of :meth:`PrototypeCalibrator.confidence` without labels (the top
        probability :math:`\max_k q_{ik}` over the initialised classes, ``0`` before any is
        initialised), for the prototypes of this step, without computing the similarities
        again; differentiable through :attr:`logits`. A masked-out row gives the confidence of
        a zero feature: mask it out of whatever uses it (the gated fusion does).

        Example:
            >>> import torch
            >>> from modbalance.prototypes import PrototypeCalibrator
            >>> calib = PrototypeCalibrator(3, 4)
            >>> h = torch.randn(6, 4)
            >>> out = calib(h, torch.tensor([0, 1, 2, 0, 1, 2]))
            >>> torch.allclose(out.confidence(), calib.confidence(h))
            True
        """
        logits = self.logits
        probs = F.softmax(logits.clamp_min(torch.finfo(logits.dtype).min), dim=-1)
        return torch.where(logits == float("-inf"), 0.0, probs).max(dim=-1).values


class PrototypeCalibrator(nn.Module):
    r"""Per-modality class prototypes (EMA) and a calibration loss that pulls features to them.

    Keeps :math:`K` prototypes :math:`p_k \in \mathbb{R}^D` for one modality. Let
    :math:`\phi(h) = h / \lVert h \rVert` for ``metric="cosine"`` and :math:`\phi(h) = h` for
    ``"sqeuclidean"``. In training mode every call first updates, under ``no_grad``, the
    prototype of each class present in the (masked) batch with the batch class mean
    :math:`\bar z_k = \frac{1}{n_k}\sum_{i: y_i = k} \phi(h_i)`:

    .. math::

        p_k \leftarrow
        \begin{cases}
            \bar z_k & \text{first observation of class } k,\\
            \gamma\, p_k + (1 - \gamma)\, \bar z_k & \text{otherwise,}
        \end{cases}

    with momentum :math:`\gamma` (PaSE uses 0.98). Under ``"cosine"`` both the batch mean
    :math:`\bar z_k` and the EMA result are projected onto the unit sphere
    (:math:`v \mapsto v / \lVert v \rVert`), so prototypes always have unit norm. Classes
    absent from the batch are left untouched; a class that has never been seen is
    *uninitialised* and is excluded everywhere (logits ``-inf``, no loss).

    The loss is then computed against the **updated** prototypes (so a class first seen in this
    batch already contributes) with the prototypes treated as constants (stop-gradient):

    .. math::

        s_k(h) = \begin{cases} \langle \phi(h), p_k \rangle & \text{cosine}\\
                  -\lVert h - p_k \rVert^2 & \text{sqeuclidean}\end{cases},
        \qquad \ell_{ik} = s_k(h_i) / \tau,

    .. math::

        \mathcal{L} = \frac{1}{|Q|} \sum_{i \in Q} \Big[
            \lambda_{\text{pull}}\, d(h_i, \operatorname{sg}(p_{y_i}))
            - \lambda_{\text{ce}} \log \operatorname{softmax}_k(\ell_{ik})_{y_i} \Big],

    where :math:`d = 1 - \langle\phi(h), p\rangle` (cosine) or :math:`\lVert h - p\rVert^2`
    (sqeuclidean, summed over the :math:`D` dimensions), the softmax runs over initialised
    classes only, and :math:`Q` is the set of masked-in samples whose class is initialised. If
    :math:`Q` is empty the loss is an exact zero that is still connected to the features' graph.
    The pull term is zero when every feature equals its class prototype; the cross-entropy term
    is not (it is the PMR prototype classifier's loss), so set ``ce_weight=0`` for a pure pull.

    Under :mod:`torch.distributed` the class sums and counts are summed over all ranks
    (:func:`modbalance.distributed.all_reduce_sum`) before the EMA step, so every rank holds the
    prototypes a single process would compute on the concatenated batch. Every rank must then
    call ``forward`` in training mode the same number of times. The loss, ``logits`` and
    ``class_means`` stay local to each rank.

    All state lives in buffers: ``prototypes`` ``(K, D)``, ``initialized`` ``(K,)`` bool and
    ``counts`` ``(K,)`` long (samples seen over training, summed over ranks), so
    ``state_dict()`` round-trips exactly and ``.to(device/dtype)`` moves them (the floating
    prototypes follow a dtype change; the EMA is computed in the prototypes' dtype).

    Args:
        num_classes: Number of classes :math:`K \ge 1`.
        dim: Feature dimension :math:`D`.
        momentum: EMA momentum :math:`\gamma \in [0, 1]`.
        metric: ``"cosine"`` (prototypes on the unit sphere) or ``"sqeuclidean"``.
        temperature: Logit temperature :math:`\tau > 0`.
        ce_weight: Weight :math:`\lambda_{\text{ce}} \ge 0` of the prototype cross-entropy.
        pull_weight: Weight :math:`\lambda_{\text{pull}} \ge 0` of the pull term.
        label_bins: If set (7, 5, 3 or 2), float labels are binned with
            :func:`sentiment_classes` and ``num_classes`` must equal it; if ``None``, labels must
            be integer class indices.
        adaptive: Scale the loss by the modality's *separability* :math:`\kappa \in [0, 1]`, a
            moving average (momentum 0.9, all-reduced under DDP) of how far its own prototype
            classifier's batch accuracy lies above chance, :math:`\kappa = \operatorname{clip}
            ((\text{acc} - 1/K_0) / (1 - 1/K_0), 0, 1)` over the :math:`K_0` initialised
            classes (buffer ``separability``, 0 at the start). A modality that cannot separate
            the classes yet has near-identical prototypes; pulling its features toward them would
            collapse its representation, so its calibration stays off until it separates them.

    Raises:
        ModbalanceError: On invalid hyperparameters.

    Example:
        >>> import torch
        >>> from modbalance.prototypes import PrototypeCalibrator
        >>> encoder = torch.nn.Linear(5, 8)
        >>> calib = PrototypeCalibrator(7, 8, label_bins=7)
        >>> y = torch.tensor([-2.9, -0.2, 0.4, 1.6, 2.2, 3.0])   # MOSI-style scores
        >>> out = calib(encoder(torch.randn(6, 5)), y)
        >>> out.logits.shape, calib.initialized.tolist()
        (torch.Size([6, 7]), [True, False, False, True, False, True, True])
        >>> out.loss.backward()
        >>> bool(encoder.weight.grad.abs().sum() > 0)
        True
    """

    prototypes: Tensor
    initialized: Tensor
    counts: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        momentum: float = 0.98,
        metric: str = "cosine",
        temperature: float = 0.1,
        ce_weight: float = 1.0,
        pull_weight: float = 1.0,
        label_bins: int | None = None,
        adaptive: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", low=1)
        self.dim = check_int(dim, "dim", low=1)
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
        self.metric = check_choice(metric, "metric", _METRICS)
        self.temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
        self.ce_weight = check_real(ce_weight, "ce_weight", low=0.0)
        self.pull_weight = check_real(pull_weight, "pull_weight", low=0.0)
        if label_bins is not None:
            check_choice(label_bins, "label_bins", (7, 5, 3, 2))
            if label_bins != num_classes:
                raise ModbalanceError(
                    f"`label_bins` ({label_bins}) must equal `num_classes` ({num_classes}): "
                    "binned float labels index the prototypes."
                )
        self.label_bins = label_bins
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long))
        if not isinstance(adaptive, bool):
            raise TypeError(f"`adaptive` must be a bool, got {type(adaptive).__name__}.")
        self.adaptive = adaptive
        if adaptive:
            self.register_buffer("separability", torch.zeros(()))

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, "
            f"metric={self.metric!r}, temperature={self.temperature}, "
            f"ce_weight={self.ce_weight}, pull_weight={self.pull_weight}, "
            f"label_bins={self.label_bins}, adaptive={self.adaptive}"
        )

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every prototype: zero them, clear the flags and the counts."""
        self.prototypes.zero_()
        self.initialized.zero_()
        self.counts.zero_()
        if self.adaptive:
            self.separability.zero_()

    # ----------------------------------------------------------------------------- validation
    def _check_features(
        self, features: Tensor, rows: Tensor | None = None, values: bool = True
    ) -> Tensor:
        # ``values=False``: the structural checks only (the caller checks the values)
        self._check_layout(features)
        if values and value_checks_enabled():
            if rows is None:
                check_finite_sums((features, "features"))
            else:
                check_finite(torch.where(rows.unsqueeze(1), features, 0.0), "features")
        return features

    def _check_layout(
        self,
        features: Tensor,
        name: str = "features",
        *,
        nonempty: bool = True,
        holder: tuple[str, str] = ("the prototypes", "the module"),
    ) -> Tensor:
        """Structural checks: ``(N, dim)`` floating features on the prototypes' device.

        ``holder``: whose prototypes and what to move, as the device error names them.
        """
        check_tensor(features, name, ndim=2, dtype="floating", nonempty=nonempty)
        if features.shape[1] != self.dim:
            raise ModbalanceError(
                f"`{name}` must have shape (N, {self.dim}), got shape {tuple(features.shape)}."
            )
        if features.device != self.prototypes.device:
            protos, module = holder
            raise ModbalanceError(
                f"`{name}` is on {features.device} but {protos} are on "
                f"{self.prototypes.device}; move {module} with `.to(device)`."
            )
        return features

    def _class_labels(
        self, labels: Tensor, n: int, valid: Tensor, name: str = "labels", values: bool = True
    ) -> Tensor:
        # ``values=False``: integer labels are not range-checked here (the caller checks them)
        check_tensor(labels, name, ndim=1)
        if labels.shape[0] != n:
            raise ModbalanceError(
                f"`{name}` must have shape ({n},) to match `features`, got shape "
                f"{tuple(labels.shape)}."
            )
        labels = labels.to(self.prototypes.device)
        if labels.is_floating_point():
            if self.label_bins is None:
                raise ModbalanceError(
                    f"`{name}` are floating point ({labels.dtype}) but this PrototypeCalibrator "
                    "has no binning: pass integer class indices, or construct it with "
                    "`label_bins=7|5|3|2` to bin float sentiment scores with sentiment_classes()."
                )
            safe = torch.where(valid, labels, 0.0)
            return sentiment_classes(safe, self.label_bins)
        check_tensor(labels, name, dtype="integer")
        if values and value_checks_enabled():
            bad = valid & ((labels < 0) | (labels >= self.num_classes))
            if bool(bad.any()):
                value = int(labels[bad][0])
                raise ModbalanceError(
                    f"`{name}` must be class indices in [0, {self.num_classes}) for the "
                    f"masked-in samples, got {int(bad.sum())} out-of-range value(s), e.g. {value}."
                )
        return labels

    # ------------------------------------------------------------------------------- geometry
    def _embed(self, features: Tensor) -> Tensor:
        if self.metric == "cosine":
            return unit(features)
        return features

    def _similarity(
        self, features: Tensor, prototypes: Tensor, init: Tensor, embedded: Tensor | None = None
    ) -> Tensor:
        return self._raw_similarity(features, prototypes, embedded).masked_fill(
            ~init, float("-inf")
        )

    def _raw_similarity(
        self, features: Tensor, prototypes: Tensor, embedded: Tensor | None = None
    ) -> Tensor:
        """:meth:`_similarity` before the uninitialised classes are set to ``-inf``.

        ``embedded``: ``self._embed(features)`` when the caller has it already (same values).
        """
        protos = prototypes.to(features.dtype)
        if self.metric == "cosine":  # the prototypes are unit vectors already
            emb = self._embed(features) if embedded is None else embedded
            return cosine_similarity(emb, protos, normalized=True)
        return -pairwise_distance(features, protos, "sqeuclidean")

    def _snapshot(self) -> tuple[Tensor, Tensor]:
        # Clones so that a later in-place EMA step cannot invalidate a pending backward; without
        # grad mode nothing is saved for a backward pass, and the results never alias the buffers.
        if not torch.is_grad_enabled():
            return self.prototypes.detach(), self.initialized
        return self.prototypes.detach().clone(), self.initialized.clone()

    # ------------------------------------------------------------------------------- public API
    def similarity(self, features: Tensor) -> Tensor:
        """Similarity of each feature to each prototype, ``-inf`` for uninitialised classes.

        Cosine similarity under ``metric="cosine"``, negative squared Euclidean distance under
        ``"sqeuclidean"``. Differentiable w.r.t. ``features``; never updates the prototypes.

        Args:
            features: ``(N, D)`` floating features.

        Returns:
            ``(N, K)`` similarities.
        """
        self._check_features(features)
        protos, init = self._snapshot()
        return self._similarity(features, protos, init)

    def confidence(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        r"""Agreement of each feature with the prototypes, in :math:`[0, 1]`.

        Let :math:`q_i = \operatorname{softmax}_k(\ell_{ik})` over the initialised classes. Without
        ``labels`` (inference) the confidence is :math:`\max_k q_{ik}`, the prototype
        classifier's top probability; with ``labels`` it is :math:`q_{i y_i}`, the probability of
        the true class (``0`` when that class is uninitialised). Before any class is initialised
        the confidence is ``0``. With a single initialised class the label-free confidence is
        always ``1``. Differentiable w.r.t. ``features``; detach it if the gate should not train
        the encoder.

        Args:
            features: ``(N, D)`` floating features.
            labels: Optional ``(N,)`` class indices (or float scores when ``label_bins`` is set).

        Returns:
            ``(N,)`` confidences in the features' dtype.
        """
        tiled = _tiled_confidence(self, features) if labels is None else None
        if tiled is not None:
            return tiled
        self._check_features(features)
        n = features.shape[0]
        protos, init = self._snapshot()
        # _masked_softmax of the logits, with the uninitialised classes masked once
        logits = self._raw_similarity(features, protos) / self.temperature
        probs = F.softmax(logits.masked_fill(~init, torch.finfo(logits.dtype).min), dim=-1)
        probs = torch.where(init, probs, 0.0)
        if labels is None:
            return probs.max(dim=-1).values
        valid = torch.ones(n, dtype=torch.bool, device=features.device)
        y = self._class_labels(labels, n, valid)
        y = y.clamp(0, self.num_classes - 1)
        return probs.gather(1, y.unsqueeze(1)).squeeze(1)

    def forward(
        self, features: Tensor, labels: Tensor, mask: Tensor | None = None
    ) -> CalibrationOutput:
        """Update the prototypes (training mode only) and compute the calibration loss.

        Args:
            features: ``(N, D)`` floating features of one modality (not detached: the loss
                trains the encoder through them).
            labels: ``(N,)`` integer class indices in ``[0, K)``, or float scores when
                ``label_bins`` is set.
            mask: Optional ``(N,)`` bool; ``False`` rows (padding, missing modality) neither
                update the prototypes nor enter the loss, and may hold any value (even NaN)
                and any label.

        Returns:
            :class:`CalibrationOutput` ``(loss, logits, prototypes, class_means, class_counts)``.

        Raises:
            ModbalanceError: On an empty batch, a wrong feature dimension, NaN/inf in masked-in
                features, out-of-range labels, or float labels without ``label_bins``.
            TypeError: On non-tensor inputs or wrong dtypes (e.g. a non-bool mask).
        """
        check_tensor(features, "features", ndim=2, dtype="floating", nonempty=True)
        n = features.shape[0]
        valid = _check_mask(mask, n, features.device)
        self._check_features(features, valid, values=False)
        y = self._class_labels(labels, n, valid, values=False)
        member = _class_weights(y, self.num_classes, valid)  # (N, K) bool
        in_class = member.any(dim=1)
        clean = torch.where(in_class.unsqueeze(1), features, 0.0)
        if value_checks_enabled():
            # The value checks of _check_features and _class_labels, on what is computed anyway:
            # the rows of a class are the masked-in rows unless a label is out of range, so a
            # finite sum of `clean` and no masked-in row outside every class pass both; otherwise
            # the original checks run, in their order, and raise with their messages.
            if not math.isfinite(float(clean.detach().sum())):
                self._check_features(features, valid)  # raises (unless the sum overflowed)
            if bool((valid > in_class).any()):  # masked in but of no class
                self._check_features(features, valid)
                self._class_labels(labels, n, valid)  # raises: out-of-range labels
        if _fusable(features, self.metric):
            return self._forward_fused(features, y, member, in_class, clean)
        return self._forward_composite(features, y, member, in_class, clean)

    def _forward_composite(
        self, features: Tensor, y: Tensor, member: Tensor, in_class: Tensor, clean: Tensor
    ) -> CalibrationOutput:
        """:meth:`forward` after its checks, in differentiable tensor operations."""
        emb = self._embed(clean)
        # _class_sums(emb, member) without its row mask: the rows of no class are zero already
        w = member.to(emb.dtype)
        sums, counts = w.transpose(0, 1) @ emb, w.sum(dim=0)
        means = sums / counts.clamp_min(1).unsqueeze(1)

        if self.training:
            self._ema_update(emb, member, sums)

        protos, init = self._snapshot()
        y_safe = y.clamp(0, self.num_classes - 1)
        qualified = in_class & init.index_select(0, y_safe)
        logits = self._similarity(clean, protos, init, emb) / self.temperature
        per_sample: Tensor | None = None
        if self.pull_weight > 0:
            target = protos.to(features.dtype).index_select(0, y_safe)
            if self.metric == "cosine":
                dist = 1.0 - (emb * target).sum(-1)
            else:
                dist = (clean - target).pow(2).sum(-1)
            per_sample = self.pull_weight * dist
        if self.ce_weight > 0:
            # -inf (uninitialised classes) -> the most negative finite value, as a masked_fill
            finite = logits.clamp_min(torch.finfo(logits.dtype).min)
            logp = F.log_softmax(finite, dim=-1).gather(1, y_safe.unsqueeze(1)).squeeze(1)
            ce = self.ce_weight * logp
            per_sample = -ce if per_sample is None else per_sample - ce
        if per_sample is None:
            # Ties the loss to the features' graph even when both weights are zero.
            per_sample = 0.0 * clean.sum(-1)
        total = torch.where(qualified, per_sample, 0.0).sum()
        loss = total / qualified.sum().clamp_min(1).to(total.dtype)
        return self._finish(loss, logits, protos, means, counts, y_safe, qualified, init)

    def _forward_fused(
        self, features: Tensor, y: Tensor, member: Tensor, in_class: Tensor, clean: Tensor
    ) -> CalibrationOutput:
        """:meth:`_forward_composite` (cosine) with one autograd node, :class:`_CosineCalibration`.

        The same operations on the same values, so the same outputs; the gradient is written
        out (equal to the composite one up to float rounding). The batch statistics are
        computed once, without a graph, for the prototype update and for the node.
        """
        with torch.no_grad():
            w = member.to(features.dtype)
            norm = torch.linalg.vector_norm(clean, dim=-1, keepdim=True)
            emb = clean / norm.clamp_min(NORM_EPS)  # unit(clean)
            sums, counts = w.transpose(0, 1) @ emb, w.sum(dim=0)
        if self.training:
            self._ema_update(emb, member, sums)
        protos, init = self._snapshot()
        y_safe = y.clamp(0, self.num_classes - 1)
        qualified = in_class & init.index_select(0, y_safe)
        loss, logits, means = _CosineCalibration.apply(
            features, in_class, emb, norm, w, sums, counts, protos.to(features.dtype), init,
            y_safe, qualified, self.temperature, self.pull_weight, self.ce_weight,
        )  # fmt: skip
        return self._finish(loss, logits, protos, means, counts, y_safe, qualified, init)

    def _finish(
        self,
        loss: Tensor,
        logits: Tensor,
        protos: Tensor,
        means: Tensor,
        counts: Tensor,
        y_safe: Tensor,
        qualified: Tensor,
        init: Tensor,
    ) -> CalibrationOutput:
        if self.adaptive:
            if self.training:
                self._update_separability(logits, y_safe, qualified, init)
            loss = loss * self.separability.to(loss.dtype)
        return CalibrationOutput(loss, logits, protos, means, counts)

    @torch.no_grad()
    def _update_separability(
        self, logits: Tensor, y: Tensor, qualified: Tensor, init: Tensor
    ) -> None:
        r"""EMA of the prototype classifier's accuracy above chance, :math:`\kappa \in [0, 1]`."""
        self.separability.copy_(_separability_step(self.separability, logits, y, qualified, init))

    @torch.no_grad()
    def _ema_update(self, emb: Tensor, member: Tensor, batch_sums: Tensor) -> None:
        new, present, n = _ema_step(
            self.prototypes, self.initialized, self.momentum, self.metric, emb, member, batch_sums
        )
        self.prototypes.copy_(new)
        self.initialized.logical_or_(present)
        self.counts.add_(n)


def calibrate(
    calibrators: Mapping[str, PrototypeCalibrator],
    features: Mapping[str, Tensor],
    labels: Tensor,
    present: Mapping[str, Tensor] | None = None,
) -> dict[str, CalibrationOutput]:
    """Call every modality's calibrator on its features, in one batched pass where possible.

    The same as ``{m: calibrators[m](features[m], labels, present[m]) for m in calibrators}``:
    the same prototype updates, losses, logits and class statistics, equal up to float rounding,
    and the same errors. When the calibrators share their settings (class, hyperparameters,
    training mode, prototypes' dtype and device) and the features share shape, dtype and device
    and take the fused cosine path (float32/float64 outside autocast), the M calibrations run as
    one batched computation with one autograd node and one host read for the value checks,
    instead of M of each; otherwise (subclasses, forward hooks, other settings) the calibrators
    are called one by one.

    Args:
        calibrators: ``{modality: PrototypeCalibrator}``, e.g. a model's ``nn.ModuleDict``.
        features: ``{modality: (N, D)}`` features with at least the keys of ``calibrators``.
        labels: ``(N,)`` labels shared by the modalities (see :meth:`PrototypeCalibrator.forward`).
        present: Optional ``{modality: (N,) bool}`` masks with the same keys.

    Returns:
        ``{modality: CalibrationOutput}`` in the order of ``calibrators``.

    Raises:
        ModbalanceError: On a modality of ``calibrators`` missing from ``features`` or
            ``present``, and on everything :meth:`PrototypeCalibrator.forward` refuses.

    Example:
        >>> import torch
        >>> from modbalance.prototypes import PrototypeCalibrator, calibrate
        >>> cals = {m: PrototypeCalibrator(3, 4) for m in ("text", "audio")}
        >>> feats = {m: torch.randn(6, 4, requires_grad=True) for m in cals}
        >>> out = calibrate(cals, feats, torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> sum(o.loss for o in out.values()).backward()
        >>> [o.logits.shape for o in out.values()], cals["audio"].initialized.tolist()
        ([torch.Size([6, 3]), torch.Size([6, 3])], [True, True, True])
    """
    names = list(calibrators)
    for what, mapping in (("features", features), ("present", present)):
        if mapping is None:
            continue
        if not isinstance(mapping, Mapping):
            raise TypeError(f"`{what}` must be a mapping of modality names, got {type(mapping)}.")
        missing = [m for m in names if m not in mapping]
        if missing:
            raise ModbalanceError(
                f"`{what}` has no entry for the calibrated modalities {missing}; it has "
                f"{sorted(mapping)}."
            )
    masks = {m: None if present is None else present[m] for m in names}
    cals = [calibrators[m] for m in names]
    if not _batchable(cals, [features[m] for m in names]):
        return {m: calibrators[m](features[m], labels, masks[m]) for m in names}
    outs = _calibrate_batched(cals, [features[m] for m in names], labels, list(masks.values()))
    return dict(zip(names, outs))


def _settings(c: PrototypeCalibrator) -> tuple[Any, ...]:
    return (
        c.num_classes, c.dim, c.momentum, c.metric, c.temperature, c.ce_weight,
        c.pull_weight, c.label_bins, c.adaptive, c.training, c.prototypes.dtype,
        c.prototypes.device,
    )  # fmt: skip


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run forward hooks (its own or global ones)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
    )


def _batchable(cals: list[PrototypeCalibrator], feats: list[Any]) -> bool:
    """Whether :func:`calibrate` may run the calibrators as one batched computation."""
    if len(cals) < 2 or any(type(c) is not PrototypeCalibrator for c in cals):
        return False
    if any(_has_hooks(c) for c in cals):  # a hook must see its module called
        return False
    if any(not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] == 0 for x in feats):
        return False
    first, x0 = _settings(cals[0]), feats[0]
    return (
        all(_settings(c) == first for c in cals[1:])
        and all(
            x.shape == x0.shape and x.dtype == x0.dtype and x.device == x0.device for x in feats
        )
        and x0.shape[1] == cals[0].dim
        and x0.device == cals[0].prototypes.device
        and _fusable(x0, cals[0].metric)
    )


def _calibrate_batched(
    cals: list[PrototypeCalibrator],
    feats: list[Tensor],
    labels: Tensor,
    masks: list[Tensor | None],
) -> list[CalibrationOutput]:
    """:meth:`PrototypeCalibrator.forward` of every calibrator (same settings) at once."""
    c0 = cals[0]
    n = feats[0].shape[0]  # the layout is checked by _batchable
    valids = [_check_mask(m, n, feats[0].device) for m in masks]
    valid = torch.stack(valids)  # (M, N)
    y = c0._class_labels(labels, n, valid, values=False)  # (M, N) binned, or (N,) indices
    member = _class_weights(y, c0.num_classes, valid)  # (M, N, K)
    in_class = member.any(dim=-1)
    stacked = torch.stack(feats)  # (M, N, D)
    clean = torch.where(in_class.unsqueeze(-1), stacked, 0.0)
    if value_checks_enabled():
        # forward()'s value checks, one host read each for all the modalities; on a failure the
        # per-modality checks run in forward()'s order and raise its messages
        bad_values = not math.isfinite(float(clean.detach().sum()))
        if bad_values or bool((valid > in_class).any()):
            for c, x, v in zip(cals, feats, valids):
                c._check_features(x, v)
                c._class_labels(labels, n, v)
    with torch.no_grad():
        w = member.to(clean.dtype)
        norm = torch.linalg.vector_norm(clean, dim=-1, keepdim=True)
        emb = clean / norm.clamp_min(NORM_EPS)
        sums, counts = w.transpose(-1, -2) @ emb, w.sum(dim=-2)
    old = torch.stack([c.prototypes for c in cals])
    init = torch.stack([c.initialized for c in cals])
    if c0.training:
        protos, present, n_seen = _ema_step(old, init, c0.momentum, c0.metric, emb, member, sums)
        init = init | present
        torch._foreach_copy_([c.prototypes for c in cals], list(protos.unbind(0)))
        torch._foreach_copy_([c.initialized for c in cals], list(init.unbind(0)))
        torch._foreach_add_([c.counts for c in cals], list(n_seen.unbind(0)))
    else:
        protos = old  # a stack is a copy: later updates of the buffers cannot reach it
    y_safe = y.clamp(0, c0.num_classes - 1).expand(len(cals), n)
    qualified = in_class & init.gather(-1, y_safe)
    loss, logits, means = _CosineCalibration.apply(
        stacked, in_class, emb, norm, w, sums,
        counts, protos.to(clean.dtype), init, y_safe, qualified, c0.temperature,
        c0.pull_weight, c0.ce_weight,
    )  # fmt: skip
    if c0.adaptive:
        separability = torch.stack([c.separability for c in cals])
        if c0.training:
            separability = _separability_step(separability, logits, y_safe, qualified, init)
            torch._foreach_copy_([c.separability for c in cals], list(separability.unbind(0)))
        loss = loss * separability.to(loss.dtype)
    return [
        CalibrationOutput(*parts)
        for parts in zip(
            loss.unbind(0), logits.unbind(0), protos.unbind(0), means.unbind(0), counts.unbind(0)
        )
    ]


@torch.no_grad()
def _separability_step(
    old: Tensor, logits: Tensor, y: Tensor, qualified: Tensor, init: Tensor
) -> Tensor:
    """The new separability of :meth:`PrototypeCalibrator._update_separability` (``(...)``)."""
    hit = (logits.argmax(-1) == y) & qualified
    stats = torch.stack([hit.sum(-1), qualified.sum(-1)], dim=-1).to(old.dtype)
    all_reduce_sum(stats)
    acc = stats[..., 0] / stats[..., 1].clamp_min(1.0)
    chance = 1.0 / init.sum(-1).clamp_min(1).to(acc.dtype)
    kappa = ((acc - chance) / (1.0 - chance).clamp_min(1e-6)).clamp(0.0, 1.0)
    kappa = torch.where(stats[..., 1] > 0, kappa, old)
    return old * 0.9 + 0.1 * kappa


@torch.no_grad()
def _ema_step(
    old: Tensor,
    initialized: Tensor,
    momentum: float,
    metric: str,
    emb: Tensor,
    member: Tensor,
    batch_sums: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The prototype update of :meth:`PrototypeCalibrator._ema_update`, without writing it.

    ``old`` ``(..., K, D)`` prototypes, ``initialized`` ``(..., K)``, ``emb`` ``(..., N, D)``,
    ``member`` ``(..., N, K)``, ``batch_sums`` ``(..., K, D)`` (leading dimensions: one per
    calibrator, :func:`calibrate`). Returns ``(new prototypes, classes present, counts)``, the
    counts and sums summed over ranks under :mod:`torch.distributed`.
    """
    dtype = old.dtype
    if emb.dtype == dtype:
        sums = batch_sums.detach().clone()  # never reduce in place into the autograd graph
    else:
        sums = member.to(dtype).transpose(-1, -2) @ emb.detach().to(dtype)
    n = member.sum(dim=-2)  # exact integer counts, (..., K) long
    # The only step that differs between one process and several: global class statistics.
    all_reduce_sum(sums)
    all_reduce_sum(n)
    present = n > 0
    batch_mean = sums / n.clamp_min(1).to(dtype).unsqueeze(-1)
    if metric == "cosine":
        batch_mean = unit(batch_mean)
    ema = momentum * old + (1.0 - momentum) * batch_mean
    if metric == "cosine":
        ema = unit(ema)
    new = torch.where(initialized.unsqueeze(-1), ema, batch_mean)
    new = torch.where(present.unsqueeze(-1), new, old)
    return new, present, n


#: Set by :class:`~modbalance.shapley.ModalityGame` (``masking="present"``) on the features it
#: repeats for the coalitions: ``(base, count)``, the rows being ``base`` ``count`` times over.
_TILES = "_modbalance_tiles"


def _tiled_confidence(calibrator: PrototypeCalibrator, features: Tensor) -> Tensor | None:
    """The label-free confidence of game features once per sample, repeated; else ``None``.

    A row-wise function of the features: on the ``count``-fold repeat of ``base`` it is the
    confidence of ``base`` repeated (without grad mode only, inside the game). The result is
    marked the same way, so that the gated fusion can compute its gate scores per sample too.
    """
    tiles = getattr(features, _TILES, None)
    if tiles is None or torch.is_grad_enabled():
        return None
    base, count = tiles
    if base.shape[0] * count != features.shape[0] or base.shape[1:] != features.shape[1:]:
        return None
    conf = calibrator.confidence(base)
    out = torch.cat([conf] * count)  # as conf.repeat(count), cheaper on CPU
    setattr(out, _TILES, (conf, count))
    return out


def _fusable(features: Tensor, metric: str) -> bool:
    """Whether :class:`_CosineCalibration` computes :meth:`PrototypeCalibrator.forward`.

    The cosine metric in float32/float64 outside autocast (whose casts the node does not
    replay) and outside torch.func transforms (the node has no vmap rule); otherwise the
    composite operations run.
    """
    return (
        metric == "cosine"
        and features.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled(features.device.type)
        and not torch._C._are_functorch_transforms_active()
    )


class _CosineCalibration(torch.autograd.Function):
    """Loss, logits and class means of the cosine calibration as one autograd node.

    Forward: the operations of :meth:`PrototypeCalibrator._forward_composite` (cosine) from the
    unit features ``emb = clean / max(|clean|, 1e-12)``, ``clean`` the features with the rows
    of no class zeroed, computed by the caller. Backward: their gradient with respect to the
    features, written out: with ``s = emb P^T`` the similarities,

    * ``d s`` = ``g_logits / T`` + the cross-entropy's ``-ce g_i (onehot(y_i) - softmax_i) / T``
      (zero for uninitialised classes) + the pull term's ``-pull g_i onehot(y_i)``, where
      ``g_i = g_loss [i qualified] / |Q|``;
    * ``d emb = d s P + W (g_means / n)`` (``W`` the class membership, ``n`` the counts);
    * ``d clean = (d emb - emb (emb . d emb) [|clean| >= 1e-12]) / max(|clean|, 1e-12)``,
      zero on the rows of no class.

    One calibrator: features ``(N, D)``, prototypes ``(K, D)``, a scalar loss. Several of the
    same settings (:func:`calibrate`): a leading dimension on every input, ``(M, N, D)``,
    ``(M, K, D)``, labels ``(M, N)``, and ``(M,)`` losses, one per calibrator.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        features: Tensor,
        in_class: Tensor,
        emb: Tensor,
        norm: Tensor,
        w: Tensor,
        sums: Tensor,
        counts: Tensor,
        protos: Tensor,
        init: Tensor,
        y: Tensor,
        qualified: Tensor,
        temperature: float,
        pull_weight: float,
        ce_weight: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        sizes = counts.clamp_min(1).unsqueeze(-1)
        means = sums / sizes
        logits = cosine_similarity(emb, protos, normalized=True)
        logits = logits.masked_fill(~init.unsqueeze(-2), float("-inf")) / temperature
        per_sample: Tensor | None = None
        target = probs = None
        if pull_weight > 0:
            target = _rows(protos, y)
            per_sample = pull_weight * (1.0 - (emb * target).sum(-1))
        if ce_weight > 0:
            log_probs = F.log_softmax(logits.clamp_min(torch.finfo(logits.dtype).min), dim=-1)
            ce = ce_weight * log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            per_sample = -ce if per_sample is None else per_sample - ce
            probs = log_probs.exp()
        if per_sample is None:
            per_sample = torch.zeros_like(emb[..., 0])
        total = torch.where(qualified, per_sample, 0.0).sum(-1)
        size = qualified.sum(-1).clamp_min(1).to(total.dtype)
        loss = total / size
        ctx.save_for_backward(in_class, emb, norm, w, sizes, protos, init, y, qualified, size)
        ctx.target, ctx.probs = target, probs
        ctx.scalars = (temperature, pull_weight, ce_weight)
        return loss, logits, means

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_loss: Tensor | None, g_logits: Tensor | None, g_means: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        in_class, emb, norm, w, sizes, protos, init, y, qualified, size = ctx.saved_tensors
        temperature, pull_weight, ce_weight = ctx.scalars
        nones = (None,) * 13
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        g_sim = None  # gradient w.r.t. s = emb @ protos^T
        g_emb = None
        if g_loss is not None:
            g_row = torch.where(qualified, (g_loss / size).unsqueeze(-1), 0.0).unsqueeze(-1)
            if ce_weight > 0:  # g_row: (..., N, 1)
                # d(-ce log softmax_y) / d logits = ce (softmax - onehot_y)
                g_sim = ctx.probs * (ce_weight * g_row)
                g_sim.scatter_add_(-1, y.unsqueeze(-1), g_row * -ce_weight)
            if pull_weight > 0:
                g_emb = ctx.target * (g_row * -pull_weight)
        if g_logits is not None:
            g_sim = g_logits if g_sim is None else g_sim + g_logits
        if g_sim is not None:
            g_sim = torch.where(init.unsqueeze(-2), g_sim, 0.0) / temperature
            g_emb = g_sim @ protos if g_emb is None else _addmm(g_emb, g_sim, protos)
        if g_means is not None:
            g_class = g_means / sizes
            g_emb = w @ g_class if g_emb is None else _addmm(g_emb, w, g_class)
        if g_emb is None:
            return (torch.zeros_like(emb), *nones)
        # F.normalize's backward (the norm only where it is not clamped), then the row mask
        radial = torch.where(norm < NORM_EPS, 0.0, (emb * g_emb).sum(-1, keepdim=True))
        g_clean = torch.addcmul(g_emb, emb, radial, value=-1.0) / norm.clamp_min(NORM_EPS)
        return (torch.where(in_class.unsqueeze(-1), g_clean, 0.0), *nones)


def _rows(protos: Tensor, y: Tensor) -> Tensor:
    """``protos[y]`` row by row: ``(K, D)`` and ``(N,)``, or ``(M, K, D)`` and ``(M, N)``."""
    if protos.ndim == 2:
        return protos.index_select(0, y)
    return torch.take_along_dim(protos, y.unsqueeze(-1), dim=-2)


def _addmm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c + a @ b`` in one kernel, for 2-D or matching 3-D batches."""
    return torch.addmm(c, a, b) if c.ndim == 2 else torch.baddbmm(c, a, b)


def _masked_softmax(logits: Tensor, init: Tensor) -> Tensor:
    """Softmax over initialised classes; rows are all zeros when no class is initialised."""
    finite = logits.masked_fill(~init, torch.finfo(logits.dtype).min)
    probs = F.softmax(finite, dim=-1)
    return torch.where(init, probs, 0.0)
