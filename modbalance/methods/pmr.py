r"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023) as a :class:`BalancingMethod`.

Each modality gets a non-parametric prototype classifier (softmax over negative Euclidean
distances to its class prototypes). Its true-class probability measures how far the modality has
learned; the modality that lags behind the others is pushed toward its prototypes by a prototype
cross-entropy. The rule is transcribed from the authors' released code
(``fanyunfeng-bit/Modal-Imbalance-PMR``, ``main_Prototype_grad.py``); see :class:`PMR` for the
deviations and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_finite,
    check_int,
    check_modality_keys,
    check_real,
    check_tensor,
    value_checks_enabled,
)
from modbalance._geometry import pairwise_distance, unit
from modbalance.balancing import BalancingMethod, StepOutput
from modbalance.distributed import all_reduce_sum
from modbalance.prototypes import PrototypeCalibrator, class_means, sentiment_classes

__all__ = ["PMR", "pmr_coefficients"]

_UPDATES = ("epoch", "step", "manual")
#: Whose prototypes and what to move, as a device error of the features names them.
_HOLDER = ("PMR's prototypes", "the method")


def pmr_coefficients(scores: Tensor, alpha: float = 1.0) -> Tensor:
    r"""PMR's per-modality weights of the prototype cross-entropy from prototype scores.

    With :math:`s_m` the prototype classifier's true-class probability of modality :math:`m`
    (summed or averaged over the batch), each modality is compared with the mean of the others,

    .. math::

        \rho_m = \frac{s_m}{\frac{1}{M-1}\sum_{j \ne m} s_j}, \qquad
        k_m = \begin{cases} \alpha & \rho_m < 1 \\ 0 & \rho_m \ge 1 \end{cases},

    a hard switch: only modalities behind the others get the prototype cross-entropy, with a
    constant weight. For two modalities this is the released code exactly
    (``ratio_a_p = score_a_p / score_v_p``; ``ratio_a_p > 1`` boosts the visual modality,
    ``< 1`` the audio one, ``== 1`` neither).

    Args:
        scores: ``(..., M)`` positive scores, :math:`M \ge 2`.
        alpha: Weight :math:`\alpha \ge 0` of the boosted modalities' prototype cross-entropy.

    Returns:
        ``(..., M)`` weights in :math:`\{0, \alpha\}`.

    Example:
        >>> import torch
        >>> from modbalance.methods.pmr import pmr_coefficients
        >>> pmr_coefficients(torch.tensor([30.0, 10.0]), alpha=2.0)
        tensor([0., 2.])
        >>> pmr_coefficients(torch.tensor([0.6, 0.3, 0.2]))
        tensor([0., 1., 1.])
    """
    check_tensor(scores, "scores", dtype="floating")
    alpha = check_real(alpha, "alpha", low=0.0)
    m = scores.shape[-1] if scores.ndim else 0
    if m < 2:
        raise ModbalanceError(
            f"`scores` must hold at least 2 modalities in its last dimension, got shape "
            f"{tuple(scores.shape)}."
        )
    ratio = _ratio(scores)
    return torch.where(ratio < 1, torch.full_like(scores, alpha), torch.zeros_like(scores))


def _refresh_epoch_host(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``: read the loaded epoch counter once (outside the step)."""
    module._epoch_host = int(module.epoch)


def _ratio(scores: Tensor) -> Tensor:
    m = scores.shape[-1]
    others = (scores.sum(-1, keepdim=True) - scores) / (m - 1)
    return scores / others


def _given_calibrators(
    calibrators: Any, num_classes: int | None
) -> tuple[list[str], dict[str, PrototypeCalibrator], int]:
    """Names, calibrators and their common number of classes, from the user's calibrators."""
    if not isinstance(calibrators, Mapping):
        raise TypeError(
            "`calibrators` must be a mapping {modality: PrototypeCalibrator}, got "
            f"{type(calibrators).__name__}."
        )
    for name, calib in calibrators.items():
        if not isinstance(calib, PrototypeCalibrator):
            raise TypeError(
                f"`calibrators[{name!r}]` must be a PrototypeCalibrator, got "
                f"{type(calib).__name__}."
            )
    ks = {c.num_classes for c in calibrators.values()}
    if len(ks) != 1:
        raise ModbalanceError(
            "every calibrator must have the same `num_classes`, got "
            f"{ {n: c.num_classes for n, c in calibrators.items()} }."
        )
    k = ks.pop()
    if num_classes is not None and num_classes != k:
        raise ModbalanceError(f"`num_classes` ({num_classes}) differs from the calibrators' ({k}).")
    num_classes = k
    return list(calibrators), dict(calibrators), num_classes


def _new_calibrators(
    dims: Any, num_classes: int | None, label_bins: int | None, momentum: float
) -> tuple[list[str], dict[str, PrototypeCalibrator], int]:
    """Names, one new squared-Euclidean calibrator per modality, and the number of classes."""
    if dims is None:
        raise ModbalanceError("pass `dims` ({modality: feature dimension}) or `calibrators`.")
    if not isinstance(dims, Mapping):
        raise TypeError(
            f"`dims` must be a mapping {{modality: feature dimension}}, got {type(dims).__name__}."
        )
    if num_classes is None:
        num_classes = label_bins
    if num_classes is None:
        raise ModbalanceError(
            "`num_classes` is required (or `label_bins` for binned regression targets)."
        )
    check_int(num_classes, "num_classes", low=2)
    names = list(dims)
    calibs = {
        n: PrototypeCalibrator(
            num_classes,
            check_int(d, f"dims[{n!r}]", low=1),
            momentum=momentum,
            metric="sqeuclidean",
        )
        for n, d in dims.items()
    }
    return names, calibs, num_classes


def _check_pmr_names(names: list[str]) -> None:
    if len(names) < 2:
        raise ModbalanceError(f"PMR balances at least 2 modalities, got {len(names)} ({names}).")
    for n in names:
        if not isinstance(n, str) or not n or "." in n:
            raise ModbalanceError(
                f"modality names must be non-empty strings without '.', got {n!r}."
            )


class PMR(BalancingMethod):
    r"""Prototypical modal rebalance: prototype cross-entropy for the modalities that lag behind.

    For every modality :math:`m` with features :math:`h^m_i \in \mathbb{R}^{D_m}` and class
    prototypes :math:`c^m_k` (one per class, kept by a
    :class:`~modbalance.prototypes.PrototypeCalibrator`), the prototype classifier is

    .. math::

        p^m_k(h) = \operatorname{softmax}_k\bigl(-\lVert h - c^m_k \rVert_2\bigr),

    (plain Euclidean distance, no temperature, as in the released code). Its true-class
    probability gives each modality a score and the prototype cross-entropy its loss,

    .. math::

        s_m = \frac{1}{|Q_m|}\sum_{i \in Q_m} p^m_{y_i}(h^m_i), \qquad
        \mathcal{L}^m_{\text{PCE}} = -\frac{1}{|Q_m|}\sum_{i \in Q_m} \log p^m_{y_i}(h^m_i),

    over the samples :math:`Q_m` where modality :math:`m` is present and whose class has a
    prototype. With :math:`k_m` from :func:`pmr_coefficients` (a hard :math:`0/\alpha` switch on
    :math:`\rho_m = s_m / \operatorname{mean}_{j\ne m} s_j < 1`), the method adds

    .. math::

        \mathcal{L}_{\text{pmr}} = \sum_m k_m\, \mathcal{L}^m_{\text{PCE}}
        \;-\; \mu \, [\,e < E_{\text{PER}}\,] \sum_m [\,\rho_m > 1\,]\, \bar H^m,
        \qquad \bar H^m = \frac{1}{|Q_m|}\sum_{i\in Q_m} H\bigl(p^m(h^m_i)\bigr),

    to the step's losses during epochs ``start_epoch <= e <= end_epoch`` (the second term is the
    optional entropy regulariser, off by default). The coefficients are constants (no gradient);
    every loss term carries gradient to the encoders through the features.

    **Prototypes.** The released code recomputes the prototypes once an epoch, as class means of
    the features on ~10% of the training batches (model in eval mode, under ``no_grad``), folded
    with :math:`c \leftarrow (1 - \mu_c)\,\bar c + \mu_c\, c` (``momentum_coef = 0.2``); the
    first ones are computed before training. ``update`` chooses how this method keeps them:

    * ``"epoch"`` (default): the detached class sums of every training batch are accumulated and
      folded into the prototypes at :meth:`epoch_end` with that EMA; a class never seen before
      is initialised at once from its first batch (the released code's pre-training pass), so the
      loss is active from the first step. The means come from the training-mode features of the
      whole epoch instead of an eval pass over 10% of it (no extra forward pass).
    * ``"step"``: the EMA is applied on every batch (use a larger ``momentum``, e.g. 0.9).
    * ``"manual"``: the method never updates them; call :meth:`accumulate` (e.g. on an eval pass
      over some batches, exactly as the released code) and :meth:`commit` yourself, or share
      calibrators that another component trains.

    Under :mod:`torch.distributed` the accumulated class sums and counts and the batch scores are
    summed over ranks, so every rank holds the same prototypes and the same :math:`k_m` (the
    accumulator buffers ``acc_sums_*``/``acc_counts_*`` stay rank-local until :meth:`commit`).
    Every rank must then call :meth:`losses` and :meth:`epoch_end` the same number of times.

    **Deviations from the released code, on purpose.**

    * *M > 2*: each modality is compared with the mean score of the others (for two modalities
      this is the code's ``ratio_a_p`` exactly).
    * *Scores are batch means* over :math:`Q_m` rather than sums, so missing modalities (presence
      masks) do not bias the ratio; with every modality present the ratio is identical.
    * *Classes without a prototype* are excluded (the code divides by a zero count and gets NaN).
    * *Entropy regulariser (PER)*: the paper's prototypical entropy regulariser for the dominant
      modality in early training is **absent from the released code** (issues #4, #7, #9 of the
      repository). It is off by default (``entropy_weight=0``); when switched on it is the form
      above (maximise the dominant modalities' prototype entropy for the first
      ``entropy_epochs`` epochs), our reading of the paper, not a transcription.
    * *Regression* (``out.task == "regression"``): labels are binned with
      :func:`~modbalance.prototypes.sentiment_classes` (``label_bins`` = 7, 5, 3 or 2 classes;
      MOSI's Acc-7 round-and-clip for 7) and the prototypes are per bin.
    * *Calibrators with* ``metric="cosine"`` (shared with PaSE's calibration): features are
      L2-normalised before the distance, as the calibrator's prototypes live on the unit sphere.

    **Adam.** PMR adds a loss term (it does not rescale gradients), so it keeps its effect under
    adaptive optimisers.

    Args:
        dims: ``{modality: feature dimension}``, at least two modalities (ignored when
            ``calibrators`` is given).
        num_classes: Number of classes :math:`K` (for regression the number of bins; defaults to
            ``label_bins``).
        calibrators: Optional ``{modality: PrototypeCalibrator}`` to use instead of creating one
            per modality (``metric="sqeuclidean"``).
        alpha: Weight :math:`\alpha \ge 0` of the lagging modalities' prototype cross-entropy
            (released code: 1.0).
        momentum: Prototype EMA momentum :math:`\mu_c \in [0, 1]`, the weight of the old
            prototypes (released code: 0.2, once an epoch).
        update: ``"epoch"``, ``"step"`` or ``"manual"`` (see above).
        label_bins: 7, 5, 3 or 2 to bin float regression targets; ``None`` for class indices.
        start_epoch: First epoch (0-based) with the loss on (released code: 0).
        end_epoch: Last epoch with the loss on, inclusive; ``None`` for no end (released code:
            100).
        entropy_weight: Weight :math:`\mu \ge 0` of the entropy regulariser (0 = off, as the
            released code).
        entropy_epochs: Number of first epochs :math:`E_{\text{PER}}` with the regulariser on.

    Reference:
        Y. Fan, W. Xu, H. Wang, J. Wang, S. Guo, "PMR: Prototypical Modal Rebalance for
        Multimodal Learning", CVPR 2023. Code: https://github.com/fanyunfeng-bit/Modal-Imbalance-PMR

    Example:
        >>> import torch
        >>> from modbalance.balancing import StepOutput
        >>> from modbalance.methods.pmr import PMR
        >>> enc = {"audio": torch.nn.Linear(5, 4), "video": torch.nn.Linear(6, 4)}
        >>> x = {"audio": torch.randn(8, 5), "video": torch.randn(8, 6)}
        >>> y = torch.arange(8) % 3
        >>> feats = {m: enc[m](x[m]) for m in enc}
        >>> out = StepOutput(
        ...     features=feats, unimodal={}, fused=None,
        ...     present={m: torch.ones(8, dtype=torch.bool) for m in enc},
        ...     target=y, task="classification")
        >>> pmr = PMR({"audio": 4, "video": 4}, num_classes=3)
        >>> losses = pmr.losses(out, {"task": torch.tensor(0.0)})
        >>> sorted(losses)
        ['pmr', 'task']
        >>> sorted(pmr.coefficients.tolist())  # the lagging modality gets alpha = 1
        [0.0, 1.0]
        >>> losses["pmr"].backward()
        >>> pmr.epoch_end(0)  # folds this epoch's class means into the prototypes
    """

    coefficients: Tensor
    ratio: Tensor
    scores: Tensor
    epoch: Tensor

    _checked_state: ClassVar[dict[str, str]] = {"coefficients": "finite"}

    def __init__(
        self,
        dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        *,
        calibrators: Mapping[str, PrototypeCalibrator] | None = None,
        alpha: float = 1.0,
        momentum: float = 0.2,
        update: str = "epoch",
        label_bins: int | None = None,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        entropy_weight: float = 0.0,
        entropy_epochs: int = 0,
    ) -> None:
        super().__init__()
        self.alpha = check_real(alpha, "alpha", low=0.0)
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
        self.update = check_choice(update, "update", _UPDATES)
        if label_bins is not None:
            check_choice(label_bins, "label_bins", (7, 5, 3, 2))
        self.label_bins = label_bins
        self.start_epoch = check_int(start_epoch, "start_epoch", low=0)
        self.end_epoch = None if end_epoch is None else check_int(end_epoch, "end_epoch", low=0)
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ModbalanceError(
                f"`end_epoch` ({end_epoch}) must be >= `start_epoch` ({start_epoch})."
            )
        self.entropy_weight = check_real(entropy_weight, "entropy_weight", low=0.0)
        self.entropy_epochs = check_int(entropy_epochs, "entropy_epochs", low=0)

        if calibrators is not None:
            names, calibs, num_classes = _given_calibrators(calibrators, num_classes)
        else:
            names, calibs, num_classes = _new_calibrators(
                dims, num_classes, label_bins, self.momentum
            )
        _check_pmr_names(names)
        if label_bins is not None and label_bins != num_classes:
            raise ModbalanceError(
                f"`label_bins` ({label_bins}) must equal `num_classes` ({num_classes}): the "
                "binned regression targets index the prototypes."
            )
        self.num_classes: int = int(num_classes)  # type: ignore[arg-type]
        self.modalities: tuple[str, ...] = tuple(names)
        self.calibrators = nn.ModuleDict(calibs)
        m = len(names)
        for i, n in enumerate(names):
            c = calibs[n]
            self.register_buffer(f"acc_sums_{i}", torch.zeros(c.num_classes, c.dim))
            self.register_buffer(f"acc_counts_{i}", torch.zeros(c.num_classes))
        self.register_buffer("coefficients", torch.zeros(m))
        self.register_buffer("ratio", torch.full((m,), float("nan")))
        self.register_buffer("scores", torch.full((m,), float("nan")))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        # Host copy of ``epoch`` (set by epoch_end and on load): the step reads it without a
        # device sync; the buffer is what checkpoints hold.
        self._epoch_host = 0
        self.register_load_state_dict_post_hook(_refresh_epoch_host)

    def extra_repr(self) -> str:
        """Hyperparameters shown by ``repr``."""
        return (
            f"modalities={self.modalities!r}, num_classes={self.num_classes}, alpha={self.alpha}, "
            f"momentum={self.momentum}, update={self.update!r}, label_bins={self.label_bins}"
        )

    # ------------------------------------------------------------------------------ helpers
    def _labels(self, target: Tensor, task: str) -> Tensor:
        check_tensor(target, "out.target", ndim=1)
        if task == "regression" or target.is_floating_point():
            if self.label_bins is None:
                raise ModbalanceError(
                    "PMR needs class labels for its prototypes but `out.target` holds float "
                    f"regression targets (task={task!r}); construct PMR with "
                    "`label_bins=7|5|3|2` to bin them with sentiment_classes()."
                )
            return sentiment_classes(target.float(), self.label_bins)
        check_tensor(target, "out.target", dtype="integer")
        return target.long()

    def _embed(self, calib: PrototypeCalibrator, h: Tensor) -> Tensor:
        return unit(h) if calib.metric == "cosine" else h

    def _inputs(self, features: Mapping[str, Tensor], present: Mapping[str, Tensor] | None):
        check_modality_keys(features, "features", self.modalities)
        out = []
        for i, name in enumerate(self.modalities):
            calib = self.calibrators[name]
            h = calib._check_layout(
                features[name], f"features[{name!r}]", nonempty=False, holder=_HOLDER
            )
            mask = None if present is None else present.get(name)
            if mask is None:
                mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
            check_tensor(mask, f"present[{name!r}]", ndim=1, dtype="bool")
            out.append((i, name, calib, h, mask.to(h.device)))
        return out

    @torch.no_grad()
    def _fold(self, calib: PrototypeCalibrator, sums: Tensor, counts: Tensor, new_only: bool):
        """EMA of the prototypes with class means ``sums / counts`` (classes with count > 0)."""
        dtype = calib.prototypes.dtype
        sums, counts = sums.to(dtype), counts.to(dtype)
        mean = sums / counts.clamp_min(1).unsqueeze(1)
        if calib.metric == "cosine":
            mean = unit(mean)
        present = counts > 0
        init = calib.initialized
        ema = calib.momentum * calib.prototypes + (1.0 - calib.momentum) * mean
        if calib.metric == "cosine":
            ema = unit(ema)
        new = torch.where(init.unsqueeze(1), ema, mean)
        take = present & ~init if new_only else present
        calib.prototypes.copy_(torch.where(take.unsqueeze(1), new, calib.prototypes))
        calib.counts.add_(torch.where(take, counts.round().long(), 0))
        calib.initialized.logical_or_(take)

    # ------------------------------------------------------------------------------ public
    @torch.no_grad()
    def accumulate(
        self,
        features: Mapping[str, Tensor],
        target: Tensor,
        present: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Add a batch's detached class sums to the accumulators folded in by :meth:`commit`.

        Args:
            features: ``{modality: (N, D_m)}`` features.
            target: ``(N,)`` class indices, or float targets when ``label_bins`` is set.
            present: Optional ``{modality: (N,) bool}`` presence masks.
        """
        y = self._labels(target, "regression" if target.is_floating_point() else "")
        for i, _name, calib, h, mask in self._inputs(features, present):
            stats = class_means(
                self._embed(calib, h.detach()), y.to(h.device), calib.num_classes, mask
            )
            sums = getattr(self, f"acc_sums_{i}")
            counts = getattr(self, f"acc_counts_{i}")
            sums.add_((stats.means * stats.counts.unsqueeze(1)).to(sums.dtype))
            counts.add_(stats.counts.to(counts.dtype))

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the accumulated class means into the prototypes (EMA) and clear the accumulators.

        Under :mod:`torch.distributed` the sums and counts are summed over ranks first, so every
        rank must call it.
        """
        for i, name in enumerate(self.modalities):
            sums = getattr(self, f"acc_sums_{i}")
            counts = getattr(self, f"acc_counts_{i}")
            all_reduce_sum(sums)
            all_reduce_sum(counts)
            self._fold(self.calibrators[name], sums, counts, new_only=False)
            sums.zero_()
            counts.zero_()

    def prototype_logits(self, name: str, features: Tensor) -> Tensor:
        r"""``(N, K)`` PMR logits :math:`-\lVert h - c_k \rVert_2` of one modality.

        ``-inf`` for classes without a prototype; differentiable w.r.t. ``features``.
        """
        calib = self.calibrators[name]
        e = self._embed(calib, features)
        protos = calib.prototypes.detach().clone().to(e.dtype)
        # sqrt of a clamped square: the released code's distance, without a NaN gradient at 0.
        dist = pairwise_distance(e, protos, "euclidean")
        return (-dist).masked_fill(~calib.initialized, float("-inf"))

    def _active(self) -> bool:
        e = self._epoch_host  # never ``int(self.epoch)``: that would wait for the device
        return e >= self.start_epoch and (self.end_epoch is None or e <= self.end_epoch)

    @torch.no_grad()
    def _update_prototypes(self, inputs: list[Any], y: Tensor) -> None:
        """Fold (``update="step"``) or accumulate (``"epoch"``) this batch's class means."""
        for i, _name, calib, h, mask in inputs:
            stats = class_means(
                self._embed(calib, h.detach()), y.to(h.device), calib.num_classes, mask
            )
            sums = stats.means * stats.counts.unsqueeze(1)
            if self.update == "step":
                all_reduce_sum(sums)
                all_reduce_sum(stats.counts)
                self._fold(calib, sums, stats.counts, new_only=False)
            else:
                acc_s = getattr(self, f"acc_sums_{i}")
                acc_c = getattr(self, f"acc_counts_{i}")
                acc_s.add_(sums.to(acc_s.dtype))
                acc_c.add_(stats.counts.to(acc_c.dtype))
                # Classes never seen get a prototype at once (the code's initial pass).
                g_sums, g_counts = sums.clone(), stats.counts.clone()
                all_reduce_sum(g_sums)
                all_reduce_sum(g_counts)
                self._fold(calib, g_sums, g_counts, new_only=True)

    def _prototype_terms(
        self, inputs: list[Any], y: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per modality: prototype cross-entropy, entropy, and (score sum, count) of the batch."""
        pce, ent, stat = [], [], []
        for _i, name, calib, h, mask in inputs:
            yy = y.to(h.device)
            # Rows of absent samples may hold anything (even NaN); they never enter the loss.
            h = torch.where(mask.unsqueeze(1), h, 0.0)
            if value_checks_enabled():
                check_finite(h, f"out.features[{name!r}] (present rows)")
            logits = self.prototype_logits(name, h)
            init = calib.initialized
            qualified = mask & init[yy.clamp(0, self.num_classes - 1)] & (yy >= 0)
            qualified = qualified & (yy < self.num_classes)
            finite = logits.masked_fill(~init, torch.finfo(logits.dtype).min)
            logp = F.log_softmax(finite, dim=-1)
            logp_y = logp.gather(1, yy.clamp(0, self.num_classes - 1).unsqueeze(1)).squeeze(1)
            q = qualified.to(logp.dtype)
            n = q.sum()
            pce.append(-(torch.where(qualified, logp_y, 0.0)).sum() / n.clamp_min(1))
            p = logp.exp()
            h_ent = -(torch.where(init, p * logp, 0.0)).sum(-1)
            ent.append(torch.where(qualified, h_ent, 0.0).sum() / n.clamp_min(1))
            stat.append(
                torch.stack(
                    [(torch.where(qualified, logp_y.detach().exp(), 0.0)).sum(), n.detach()]
                )
            )
        return pce, ent, stat

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Add ``"pmr"`` (and ``"pmr_entropy"`` when the regulariser is on) to the losses.

        Updates the prototypes (``update="epoch"`` accumulates, ``"step"`` folds), computes the
        scores, the ratios and the coefficients (buffers ``scores``, ``ratio``,
        ``coefficients``), and outside ``[start_epoch, end_epoch]`` returns ``losses`` unchanged.
        """
        y = self._labels(out.target, out.task)
        inputs = self._inputs(out.features, out.present)
        if self.training and self.update != "manual":
            self._update_prototypes(inputs, y)
        if not self._active():
            return dict(losses)

        pce, ent, stat = self._prototype_terms(inputs, y)
        stats = torch.stack(stat, 1).to(self.coefficients)  # (2, M): score sums and counts
        all_reduce_sum(stats)
        valid = stats[1] > 0
        scores = torch.where(valid, stats[0] / stats[1].clamp_min(1), torch.nan)
        ratio = _ratio(scores)
        enough = valid.all() & (scores > 0).all()
        coef = torch.where(
            enough & (ratio < 1), torch.full_like(scores, self.alpha), torch.zeros_like(scores)
        )
        with torch.no_grad():
            self.scores.copy_(scores)
            self.ratio.copy_(ratio)
            self.coefficients.copy_(coef)
        total = pce[0] * coef[0].to(pce[0].dtype)
        for j in range(1, len(pce)):
            total = total + pce[j] * coef[j].to(pce[j].dtype)
        result = {**losses, "pmr": total}
        if self.entropy_weight > 0 and self._epoch_host < self.entropy_epochs:
            dominant = (enough & (ratio > 1)).to(ent[0].dtype)
            reg = ent[0] * dominant[0]
            for j in range(1, len(ent)):
                reg = reg + ent[j] * dominant[j]
            result["pmr_entropy"] = -self.entropy_weight * reg
        return result

    def epoch_end(self, epoch: int, evaluate: Any = None) -> None:
        """Count the epoch and, with ``update="epoch"``, fold the epoch's class means in."""
        check_int(epoch, "epoch", low=0)
        if self.update == "epoch":
            self.commit()
        with torch.no_grad():
            self.epoch.fill_(epoch + 1)
        self._epoch_host = epoch + 1
