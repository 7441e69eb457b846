"""Metrics for multimodal sentiment and emotion analysis, and modality-imbalance diagnostics.

The sentiment metrics reproduce the conventions of the MMSA toolkit (thuiar/MMSA,
``utils/metricsTop.py``) exactly, so that numbers computed here can be put next to the MMSA
reproduction tables: the same clipping, the same half-to-even rounding (``np.round``), the same
treatment of zero labels and the same *weighted* F1 (each class's F1 weighted by its support in the
ground truth). The IEMOCAP metrics follow the MulT layout (four binary emotion tasks).

The imbalance diagnostics summarise how much each modality contributes: :func:`shapley_shares`
turns Shapley contributions into shares, :func:`imbalance_index` maps shares to one number in
``[0, 1]`` and :func:`probe_score` measures how much a frozen representation linearly knows.

Every function accepts :class:`torch.Tensor` or :class:`numpy.ndarray` inputs (any device; the
computation runs in float64 on the CPU, these are evaluation utilities, not training losses).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from modbalance._checks import ModbalanceError, check_signal

__all__ = [
    "IEMOCAP_EMOTIONS",
    "iemocap_metrics",
    "imbalance_index",
    "msa_regression_metrics",
    "pase_shares",
    "probe_score",
    "shapley_shares",
    "sims_regression_metrics",
]

#: Emotion order of the MulT IEMOCAP pickles (second axis of the (N, 4, 2) labels).
IEMOCAP_EMOTIONS: tuple[str, ...] = ("Neutral", "Happy", "Sad", "Angry")


# ----------------------------------------------------------------------------------------------
# input conversion
# ----------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a tensor / array / sequence to a float64 or integer numpy array (no validation)."""
    if isinstance(x, Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        return x.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise TypeError(f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}.")


def _as_float_array(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ModbalanceError(f"`{name}` must not be empty, got shape {tuple(arr.shape)}.")
    if not np.all(np.isfinite(arr)):
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~np.isfinite(arr)).sum()) - n_nan
        raise ModbalanceError(
            f"`{name}` must contain only finite values, got {n_nan} NaN and {n_inf} infinite "
            f"value(s) in an array of shape {tuple(arr.shape)}."
        )
    return arr


def _pred_target(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_float_array(pred, "pred")
    t = _as_float_array(target, "target")
    for name, arr, other in (("pred", p, t), ("target", t, p)):
        # (N, C) beside N values: class logits or one-hot labels, not one value per sample
        if arr.ndim >= 2 and arr.size != other.size and arr.shape[0] == other.size:
            raise ModbalanceError(
                f"`{name}` must hold one regression value per sample, shape (N,) (or (N, 1)), "
                f"got shape {tuple(arr.shape)} beside {other.size} values; these are sentiment "
                "regression metrics (for (N, 4, 2) IEMOCAP scores use iemocap_metrics, for other "
                "class logits compare `pred.argmax(-1)` with the class indices)."
            )
    p, t = p.reshape(-1), t.reshape(-1)
    if p.shape != t.shape:
        raise ModbalanceError(
            f"`pred` has {p.size} element(s) and `target` has {t.size}; they must match "
            f"(both are flattened, so shapes (N,), (N, 1) and (N, 1, 1) are all accepted)."
        )
    return p, t


def _warn_undefined(function: str, out: dict[str, float], reasons: dict[str, str]) -> None:
    """One ``UserWarning`` naming the metrics that are NaN (undefined) and why."""
    undefined = [k for k in reasons if math.isnan(out[k])]
    if not undefined:
        return
    why = "; ".join(dict.fromkeys(reasons[k] for k in undefined))
    warnings.warn(
        f"{function}: {', '.join(undefined)} undefined, returned as NaN: {why}.",
        UserWarning,
        stacklevel=3,
    )


def _corr_reason(p: np.ndarray, t: np.ndarray, clipped: str = "") -> str:
    """Why the Pearson correlation of ``p`` and ``t`` is undefined (a constant input)."""
    const = [n for n, x in (("labels", t), ("predictions", p)) if np.all(x == x[0])]
    what = " and ".join(const) if const else "labels or predictions"
    verb = "are" if const else "are (numerically)"
    return f"Corr needs variance in both inputs, but the {what} {verb} constant{clipped}"


def _round(value: float, decimals: int | None) -> float:
    """Round as MMSA does: ``round(np.float64(x), 4)`` is numpy's rounding (``np.round``).

    numpy scales by ``10**decimals``, rounds half to even and scales back, so a decimal tie such
    as ``0.00125`` becomes ``0.0012``; Python's correctly rounded ``round(0.00125, 4)`` on a
    ``float`` gives ``0.0013`` (the stored binary value lies just above the tie).
    """
    value = float(value)
    if decimals is None or not math.isfinite(value):
        return value
    return float(np.round(np.float64(value), decimals))


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if y_true.size == 0:
        return float("nan")
    return float(np.mean(y_true == y_pred))


def _wa_ua(true: Any, pred: Any) -> tuple[float, float]:
    r"""Weighted (WA) and unweighted (UA) accuracy of predicted class labels, in float64.

    .. math::

        \mathrm{WA} = \frac{1}{N}\sum_i [\hat c_i = c_i], \qquad
        \mathrm{UA} = \frac{1}{|\mathcal C|}\sum_{c \in \mathcal C}
            \frac{|\{i : \hat c_i = c_i = c\}|}{|\{i : c_i = c\}|},

    with :math:`\mathcal C` the classes present in ``true`` (UA is the mean per-class recall,
    sklearn's ``balanced_accuracy_score``). The one implementation behind
    :func:`iemocap_metrics`' ``"WA"``/``"UA"``, the PaSE example's classification metrics and the
    competition suite's accuracy.

    Args:
        true: True class labels, shape (N,), tensor or array (any device).
        pred: Predicted class labels, shape (N,) (e.g. ``logits.argmax(-1)``).

    Returns:
        ``(WA, UA)`` as Python floats; ``(nan, nan)`` when N = 0.

    Example:
        >>> from modbalance.metrics import _wa_ua
        >>> _wa_ua([0, 0, 0, 1], [0, 0, 0, 0])
        (0.75, 0.5)
    """
    t = _to_numpy(true, "true").reshape(-1)
    p = _to_numpy(pred, "pred").reshape(-1)
    if t.size == 0:
        return float("nan"), float("nan")
    recalls = [np.mean(p[t == c] == c) for c in np.unique(t)]
    return _accuracy(t, p), float(np.mean(recalls))


def _weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 per class, averaged with weights = class support in ``y_true`` (sklearn 'weighted').

    The classes are the union of the labels in ``y_true`` and ``y_pred``; a class with no true
    sample gets weight 0, a class never predicted and never true has F1 0 (sklearn's
    ``zero_division`` default), so this equals ``f1_score(y_true, y_pred, average="weighted")``.
    """
    if y_true.size == 0:
        return float("nan")
    total = 0.0
    for c in np.union1d(y_true, y_pred):
        tp = float(np.sum((y_true == c) & (y_pred == c)))
        fp = float(np.sum((y_true != c) & (y_pred == c)))
        fn = float(np.sum((y_true == c) & (y_pred != c)))
        support = tp + fn
        denom = 2 * tp + fp + fn
        f1 = 2 * tp / denom if denom > 0 else 0.0
        total += support * f1
    return total / y_true.size


def _pearson(p: np.ndarray, t: np.ndarray) -> float:
    pc = p - p.mean()
    tc = t - t.mean()
    denom = math.sqrt(float(np.sum(pc * pc)) * float(np.sum(tc * tc)))
    if denom == 0.0:
        return float("nan")
    return float(np.sum(pc * tc) / denom)


# ----------------------------------------------------------------------------------------------
# sentiment regression (MMSA conventions)
# ----------------------------------------------------------------------------------------------


def msa_regression_metrics(pred: Any, target: Any, *, decimals: int | None = 4) -> dict[str, float]:
    r"""MOSI / MOSEI regression metrics, computed exactly as MMSA computes them.

    ``pred`` and ``target`` are flattened. With :math:`p` the predictions and :math:`y` the
    sentiment labels (in :math:`[-3, 3]`):

    .. math::

        \mathrm{MAE} = \frac{1}{N}\sum_i |p_i - y_i|, \qquad
        \mathrm{Corr} = \operatorname{pearson}(p, y),

        \mathrm{Mult\_acc\_}k = \frac{1}{N}\sum_i
            [\operatorname{round}(\operatorname{clip}(p_i, -c, c))
            = \operatorname{round}(\operatorname{clip}(y_i, -c, c))],
            \quad c = 3 \text{ for } k = 7,\; c = 2 \text{ for } k = 5.

    * ``MAE`` and ``Corr`` use the **unclipped** values. ``Corr`` is ``nan`` when either input is
      constant (``np.corrcoef`` gives ``nan`` there as well).
    * ``round`` is ``np.round``: halves go to the even neighbour (``0.5 -> 0``, ``1.5 -> 2``,
      ``-2.5 -> -2``).
    * ``Has0_acc_2`` / ``Has0_F1_score``: negative vs non-negative, :math:`[y \ge 0]` against
      :math:`[p \ge 0]` on every sample (zero counts as positive).
    * ``Non0_acc_2`` / ``Non0_F1_score``: samples with :math:`y = 0` exactly are dropped, then
      :math:`[y > 0]` against :math:`[p > 0]` (``nan`` if every label is 0).
    * F1 is sklearn's ``f1_score(truth, pred, average="weighted")`` (support-weighted per-class F1;
      implemented here without sklearn).
    * Each value is rounded with numpy's rounding, ``np.round(x, decimals)`` (MMSA calls
      ``round(x, 4)`` on numpy floats, which is ``np.round``): a decimal tie goes to the even
      neighbour after scaling, e.g. ``0.00125 -> 0.0012`` where Python's ``round`` on a
      ``float`` gives ``0.0013``. MMSA's result tables show these values ×100.

    Computed in float64 on the CPU. Reference: Yu et al., "Learning Modality-Specific
    Representations with Self-Supervised Multi-Task Learning" (AAAI 2021), MMSA toolkit.

    Args:
        pred: Predictions, any shape with N elements (e.g. (N,) or (N, 1)), tensor or array.
        target: Sentiment labels with the same number of elements.
        decimals: Decimal places of the returned values; ``None`` keeps full precision.

    Returns:
        dict with keys ``"Has0_acc_2"``, ``"Has0_F1_score"``, ``"Non0_acc_2"``,
        ``"Non0_F1_score"``, ``"Mult_acc_5"``, ``"Mult_acc_7"``, ``"MAE"``, ``"Corr"``.

    Raises:
        ModbalanceError: If the sizes differ (the message points out ``(N, C)`` logits given
            beside ``N`` labels), an input is empty or holds NaN/inf.
        TypeError: If an input is not a tensor/array of real numbers.

    Warns:
        UserWarning: Once per call when a metric is undefined and returned as ``nan``, naming
            the metrics and the reason: ``Non0_acc_2``/``Non0_F1_score`` when every label is 0,
            ``Corr`` when the labels or the predictions are constant.

    Example:
        >>> import torch
        >>> from modbalance.metrics import msa_regression_metrics
        >>> pred = torch.tensor([2.5, -0.4, 0.3, -3.7, 1.49])
        >>> target = torch.tensor([2.0, 0.0, 0.6, -3.0, 1.5])
        >>> m = msa_regression_metrics(pred, target)
        >>> m["Has0_acc_2"], m["Non0_acc_2"], m["Mult_acc_7"], m["MAE"]
        (0.8, 1.0, 0.6, 0.382)
    """
    p, t = _pred_target(pred, target)
    p7, t7 = np.clip(p, -3.0, 3.0), np.clip(t, -3.0, 3.0)
    p5, t5 = np.clip(p, -2.0, 2.0), np.clip(t, -2.0, 2.0)
    mult_a7 = _accuracy(np.round(t7), np.round(p7))
    mult_a5 = _accuracy(np.round(t5), np.round(p5))
    mae = float(np.mean(np.abs(p - t)))
    corr = _pearson(p, t)

    nz = t != 0
    nz_true, nz_pred = t[nz] > 0, p[nz] > 0
    has_true, has_pred = t >= 0, p >= 0
    out = {
        "Has0_acc_2": _accuracy(has_true, has_pred),
        "Has0_F1_score": _weighted_f1(has_true, has_pred),
        "Non0_acc_2": _accuracy(nz_true, nz_pred),
        "Non0_F1_score": _weighted_f1(nz_true, nz_pred),
        "Mult_acc_5": mult_a5,
        "Mult_acc_7": mult_a7,
        "MAE": mae,
        "Corr": corr,
    }
    no_nonzero = "every label is 0 (the Non0 metrics drop zero labels, so no sample is left)"
    _warn_undefined(
        "msa_regression_metrics",
        out,
        {"Non0_acc_2": no_nonzero, "Non0_F1_score": no_nonzero, "Corr": _corr_reason(p, t)},
    )
    return {k: _round(v, decimals) for k, v in out.items()}


def _bin(x: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    # class i holds the values in (edges[i], edges[i + 1]] (left-open, right-closed, like MMSA)
    inner = np.asarray(edges[1:-1], dtype=x.dtype)
    return np.searchsorted(inner, x, side="left").astype(np.int64)


def _low_precision(x: Any) -> bool:
    """Whether ``x`` holds floats of at most 32 bits (its values are exact in float32)."""
    if isinstance(x, Tensor):
        return x.is_floating_point() and x.element_size() <= 4
    arr = np.asarray(x)
    return bool(np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize <= 4)


def sims_regression_metrics(
    pred: Any, target: Any, *, decimals: int | None = 4
) -> dict[str, float]:
    r"""CH-SIMS regression metrics (labels in :math:`[-1, 1]`), computed exactly as MMSA does.

    Unlike the MOSI/MOSEI variant, predictions and labels are clipped to :math:`[-1, 1]`
    **before** everything, MAE and Corr included. The clipped values are then binned with
    left-open, right-closed intervals:

    * 2 classes: :math:`[-1, 0]`, :math:`(0, 1]` (zero counts as negative);
    * 3 classes: :math:`[-1, -0.1]`, :math:`(-0.1, 0.1]`, :math:`(0.1, 1]`;
    * 5 classes: :math:`[-1, -0.7]`, :math:`(-0.7, -0.1]`, :math:`(-0.1, 0.1]`,
      :math:`(0.1, 0.7]`, :math:`(0.7, 1]`.

    ``F1_score`` is the weighted F1 on the 2-class bins. When both inputs are float32 (or
    narrower) the binning compares in float32 as MMSA's numpy code does, so a float32 ``0.1``
    falls in :math:`(-0.1, 0.1]`; MAE and Corr are computed in float64. Values are rounded with
    numpy's rounding as in :func:`msa_regression_metrics` (an MAE of ``0.00125`` is reported as
    ``0.0012``, as MMSA reports it).

    Args:
        pred: Predictions with N elements, tensor or array.
        target: Labels with N elements.
        decimals: Decimal places of the returned values; ``None`` keeps full precision.

    Returns:
        dict with keys ``"Mult_acc_2"``, ``"Mult_acc_3"``, ``"Mult_acc_5"``, ``"F1_score"``,
        ``"MAE"``, ``"Corr"``.

    Raises:
        ModbalanceError: If the sizes differ (the message points out ``(N, C)`` logits given
            beside ``N`` labels), an input is empty or holds NaN/inf.
        TypeError: If an input is not a tensor/array of real numbers.

    Warns:
        UserWarning: Once per call when ``Corr`` is undefined and returned as ``nan``: the labels
            or the predictions are constant after clipping to :math:`[-1, 1]`.

    Example:
        >>> import numpy as np
        >>> from modbalance.metrics import sims_regression_metrics
        >>> pred, target = np.array([0.0, 0.05, 1.4, -0.8]), np.array([0.2, 0.1, 1.0, -0.6])
        >>> m = sims_regression_metrics(pred, target)
        >>> m["Mult_acc_2"], m["Mult_acc_3"], m["Mult_acc_5"], m["MAE"]
        (0.75, 0.75, 0.5, 0.1125)
    """
    p, t = _pred_target(pred, target)
    p, t = np.clip(p, -1.0, 1.0), np.clip(t, -1.0, 1.0)
    # bin in the inputs' own precision: MMSA compares float32 arrays with the bin edges rounded
    # to float32, so a float32 0.1 lies in (-0.1, 0.1]
    work = np.float32 if _low_precision(pred) and _low_precision(target) else np.float64
    pw, tw = p.astype(work), t.astype(work)
    e2 = (-1.01, 0.0, 1.01)
    e3 = (-1.01, -0.1, 0.1, 1.01)
    e5 = (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01)
    p2, t2 = _bin(pw, e2), _bin(tw, e2)
    out = {
        "Mult_acc_2": _accuracy(t2, p2),
        "Mult_acc_3": _accuracy(_bin(tw, e3), _bin(pw, e3)),
        "Mult_acc_5": _accuracy(_bin(tw, e5), _bin(pw, e5)),
        "F1_score": _weighted_f1(t2, p2),
        "MAE": float(np.mean(np.abs(p - t))),
        "Corr": _pearson(p, t),
    }
    _warn_undefined(
        "sims_regression_metrics", out, {"Corr": _corr_reason(p, t, " after clipping to [-1, 1]")}
    )
    return {k: _round(v, decimals) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# IEMOCAP (MulT layout)
# ----------------------------------------------------------------------------------------------


def iemocap_metrics(logits: Any, labels: Any, *, decimals: int | None = 4) -> dict[str, float]:
    r"""IEMOCAP metrics for the MulT layout: four binary emotion tasks plus a 4-class view.

    MulT treats each emotion of ``("Neutral", "Happy", "Sad", "Angry")`` as its own binary task:
    the model outputs 8 logits viewed as (N, 4, 2) and the label of emotion :math:`e` is
    :math:`1` when it is present. Per emotion this returns (as MulT's ``eval_iemocap``):

    * ``"<Emotion>_acc"``: accuracy of :math:`\arg\max_c \text{logits}[:, e, c]`;
    * ``"<Emotion>_F1"``: weighted F1 of the same (support-weighted over absent/present).

    The 4-class view used in speech emotion recognition keeps only samples with **exactly one**
    present emotion (``"n_4class"`` counts them); the predicted class is the emotion with the
    largest presence log-odds :math:`\text{logits}[:, e, 1] - \text{logits}[:, e, 0]`:

    .. math::

        \mathrm{WA} = \frac{1}{n}\sum_i [\hat c_i = c_i], \qquad
        \mathrm{UA} = \frac{1}{|\mathcal C|}\sum_{c \in \mathcal C}
            \frac{|\{i : \hat c_i = c_i = c\}|}{|\{i : c_i = c\}|},

    with :math:`\mathcal C` the classes present among those samples (``nan`` when ``n = 0``).

    Args:
        logits: Scores of shape (N, 4, 2) or (N, 8).
        labels: Emotion labels, either (N, 4) with values in {0, 1} or MulT's one-hot (N, 4, 2).
        decimals: Decimal places of the returned values; ``None`` keeps full precision.

    Returns:
        dict with ``"Neutral_acc"``, ``"Neutral_F1"``, ... , ``"Angry_F1"``, ``"WA"``, ``"UA"``
        and ``"n_4class"`` (a count, stored as float).

    Raises:
        ModbalanceError: On wrong shapes, non-binary labels or non-finite logits.

    Example:
        >>> import torch
        >>> from modbalance.metrics import iemocap_metrics
        >>> labels = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        >>> logits = torch.stack([1 - labels, labels], dim=-1).float()  # perfect scores
        >>> m = iemocap_metrics(logits, labels)
        >>> m["Happy_acc"], m["WA"], m["UA"], m["n_4class"]
        (1.0, 1.0, 1.0, 4.0)
    """
    lg = _as_float_array(logits, "logits")
    if lg.ndim == 2 and lg.shape[1] == 8:
        lg = lg.reshape(-1, 4, 2)
    if lg.ndim != 3 or lg.shape[1:] != (4, 2):
        raise ModbalanceError(
            f"`logits` must have shape (N, 4, 2) or (N, 8), got shape {tuple(lg.shape)}."
        )
    lb = _as_float_array(labels, "labels")
    if lb.ndim == 3 and lb.shape[1:] == (4, 2):
        if not np.all((lb == 0) | (lb == 1)) or not np.all(lb.sum(-1) == 1):
            raise ModbalanceError(
                "`labels` of shape (N, 4, 2) must be one-hot along the last dimension."
            )
        lb = lb.argmax(-1)
    if lb.ndim != 2 or lb.shape[1] != 4:
        raise ModbalanceError(
            f"`labels` must have shape (N, 4) or (N, 4, 2), got shape {tuple(lb.shape)}."
        )
    if not np.all((lb == 0) | (lb == 1)):
        raise ModbalanceError("`labels` of shape (N, 4) must hold only 0 and 1.")
    if lb.shape[0] != lg.shape[0]:
        raise ModbalanceError(
            f"`logits` has {lg.shape[0]} samples and `labels` has {lb.shape[0]}; they must match."
        )
    lb = lb.astype(np.int64)
    pred = lg.argmax(-1)
    out: dict[str, float] = {}
    for e, name in enumerate(IEMOCAP_EMOTIONS):
        out[f"{name}_acc"] = _accuracy(lb[:, e], pred[:, e])
        out[f"{name}_F1"] = _weighted_f1(lb[:, e], pred[:, e])
    single = lb.sum(1) == 1
    n = int(single.sum())
    true_c = lb[single].argmax(1)
    pred_c = (lg[single, :, 1] - lg[single, :, 0]).argmax(1)
    out["WA"], out["UA"] = _wa_ua(true_c, pred_c)
    out = {k: _round(v, decimals) for k, v in out.items()}
    out["n_4class"] = float(n)
    return out


# ----------------------------------------------------------------------------------------------
# imbalance diagnostics
# ----------------------------------------------------------------------------------------------


def _as_float_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x, dtype=np.float64))
    elif isinstance(x, (list, tuple)):
        x = torch.tensor(x, dtype=torch.float64)
    if not isinstance(x, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}."
        )
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.numel() == 0:
        raise ModbalanceError(f"`{name}` must not be empty, got shape {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise ModbalanceError(
            f"`{name}` must contain only finite values, got shape {tuple(x.shape)} with "
            f"{int((~torch.isfinite(x)).sum())} non-finite value(s)."
        )
    return x


def pase_shares(contributions: Tensor) -> Tensor:
    r"""Normalised positive shares :math:`\psi` of contributions.

    .. math::

        \psi_m = \frac{\max(\phi_m, 0)}{\sum_j \max(\phi_j, 0)},

    and :math:`\psi_m = 1/M` for every :math:`m` when no contribution is positive. The same
    formula as :func:`modbalance.metrics.shapley_shares`, which checks and converts its input
    (numpy arrays and lists too) and then calls this function: this is the one implementation.
    With value checks disabled (:func:`modbalance.value_checks`), a row holding NaN or
    :math:`\pm\infty` gets the uniform shares.

    Args:
        contributions: ``(..., M)`` floating contributions :math:`\phi` (e.g. Shapley values).

    Returns:
        ``(..., M)`` shares, non-negative and summing to one.

    Example:
        >>> import torch
        >>> from modbalance.metrics import pase_shares
        >>> pase_shares(torch.tensor([3.0, 1.0, -2.0]))
        tensor([0.7500, 0.2500, 0.0000])
    """
    check_signal(contributions, "contributions")
    pos = contributions.clamp_min(0)
    # divide by the largest entry first: the sum of huge finite values (3e38 in float32) would
    # overflow to inf and give zero shares
    peak = pos.amax(-1, keepdim=True)
    scaled = pos / torch.where(peak > 0, peak, torch.ones_like(peak))  # in [0, 1], max 1
    total = scaled.sum(-1, keepdim=True)  # >= 1 where any entry is positive, NaN if not finite
    uniform = torch.full_like(pos, 1.0 / max(pos.shape[-1], 1))
    return torch.where(total > 0, scaled / total.clamp_min(1.0), uniform)


def shapley_shares(values: Any) -> Tensor:
    r"""Turn per-modality Shapley contributions into shares that sum to one.

    Negative contributions (a modality that hurts the value) count as zero:

    .. math::

        \psi_m = \frac{\max(\phi_m, 0)}{\sum_{m'} \max(\phi_{m'}, 0)},

    and when no contribution is positive the shares are uniform, :math:`1/M`. This is the same
    formula and the same arithmetic as :func:`pase_shares` (this function
    checks and converts its input, then calls it): the results are identical; this one also
    accepts numpy arrays and lists, and converts integer input to the default float dtype.

    Args:
        values: Shapley values of shape (..., M), tensor or array.

    Returns:
        Shares of shape (..., M) (a float tensor; float64 for numpy input), each row summing to 1.

    Raises:
        ModbalanceError: If ``values`` is 0-dimensional, empty or not finite.

    Example:
        >>> import torch
        >>> from modbalance.metrics import shapley_shares
        >>> shapley_shares(torch.tensor([0.6, 0.2, -0.1]))
        tensor([0.7500, 0.2500, 0.0000])
    """
    v = _as_float_tensor(values, "values")
    if v.ndim == 0:
        raise ModbalanceError("`values` must have shape (..., M), got a 0-dimensional tensor.")
    return pase_shares(v)


def imbalance_index(shares: Any) -> float | Tensor:
    r"""One number for how unevenly the modalities contribute: 1 minus the normalised entropy.

    .. math::

        I(\psi) = 1 - \frac{-\sum_m \psi_m \log \psi_m}{\log M}
        \quad (0 \log 0 = 0),

    which is 0 when every modality contributes equally and 1 when one modality gets everything.

    Args:
        shares: Non-negative shares of shape (M,) or (..., M), each row summing to 1 (for example
            the output of :func:`shapley_shares`); M >= 2.

    Returns:
        A Python float for a 1-D input, else a tensor of shape (...).

    Raises:
        ModbalanceError: If M < 2, a share is negative or a row does not sum to 1 (tolerance 1e-4).

    Example:
        >>> from modbalance.metrics import imbalance_index
        >>> round(imbalance_index([1 / 3, 1 / 3, 1 / 3]), 6), imbalance_index([1.0, 0.0, 0.0])
        (0.0, 1.0)
        >>> round(imbalance_index([0.8, 0.1, 0.1]), 4)
        0.4183
    """
    s = _as_float_tensor(shares, "shares")
    if s.ndim == 0 or s.shape[-1] < 2:
        raise ModbalanceError(
            f"`shares` must have shape (..., M) with M >= 2 modalities, got shape {tuple(s.shape)}."
        )
    if bool((s < 0).any()):
        raise ModbalanceError(f"`shares` must be non-negative, got minimum {float(s.min()):.4g}.")
    sums = s.sum(-1)
    if bool(((sums - 1).abs() > 1e-4).any()):
        raise ModbalanceError(
            f"every row of `shares` must sum to 1, got sums in [{float(sums.min()):.4g}, "
            f"{float(sums.max()):.4g}]; use shapley_shares() to normalise."
        )
    ent = -torch.where(s > 0, s * torch.log(s.clamp_min(torch.finfo(s.dtype).tiny)), 0.0).sum(-1)
    index = (1 - ent / math.log(s.shape[-1])).clamp(0.0, 1.0)
    if index.ndim == 0:
        return float(index)
    return index


def _probe_features(train_x: Any, test_x: Any) -> tuple[Tensor, Tensor]:
    """The probe's features as float64 CPU tensors ``(N, D)``, ``(M, D)``, checked."""
    xs = []
    for name, x in (("train_x", train_x), ("test_x", test_x)):
        x = _as_float_tensor(x, name).detach().cpu().double()
        if x.ndim != 2:
            raise ModbalanceError(f"`{name}` must have shape (N, D), got shape {tuple(x.shape)}.")
        xs.append(x)
    xtr, xte = xs
    if xtr.shape[1] != xte.shape[1]:
        raise ModbalanceError(
            f"`train_x` has {xtr.shape[1]} features and `test_x` has {xte.shape[1]}; "
            "they must match."
        )
    return xtr, xte


def _probe_target(y: Any, name: str, rows: int, task: str) -> Tensor:
    """One probe target per feature row: a float64 CPU tensor of shape ``(rows,)``, checked."""
    y = _as_float_tensor(y, name).detach().cpu().double()
    if y.ndim >= 2 and y.shape[0] == rows != y.numel():  # (N, C) beside N rows
        hint = (
            f"for one-hot labels pass `{name}.argmax(-1)`"
            if task == "classification"
            else "the probe fits one target per sample"
        )
        raise ModbalanceError(
            f"`{name}` must have shape (N,) (or (N, 1)), one target per sample, got shape "
            f"{tuple(y.shape)}; {hint}."
        )
    y = y.reshape(-1)
    if y.shape[0] != rows:
        raise ModbalanceError(
            f"`{name}` has {y.shape[0]} element(s) but its features have {rows} rows; "
            "they must match."
        )
    return y


def _check_class_labels(ytr: Tensor, yte: Tensor) -> None:
    """Refuse fractional classification labels (never truncated), naming the argument."""
    for name, y in (("train_y", ytr), ("test_y", yte)):
        frac = y != y.round()
        if bool(frac.any()):
            raise ModbalanceError(
                f"`{name}`: classification probe labels must be integers (class "
                f"indices), got {int(frac.sum())} fractional value(s), e.g. "
                f"{float(y[frac][0]):g}; pass integer class indices, or task='regression' "
                "for continuous targets."
            )


def _ridge_predict(xtr: Tensor, ytr: Tensor, xte: Tensor, task: str, alpha: float) -> Tensor:
    r"""The closed-form ridge of :func:`probe_score` on checked float64 inputs.

    Standardises with the training mean and the *population* standard deviation (``ddof=0``,
    as ``sklearn.preprocessing.StandardScaler``; a constant feature is only centred), centres
    the targets (unpenalised intercept) and solves :math:`(X^\top X + \alpha I) W = X^\top Y`.

    Args:
        xtr: Training features (N, D), float64.
        ytr: Training targets (N,), float64 (integer-valued class labels for classification).
        xte: Test features (M, D), float64.
        task: ``"regression"`` or ``"classification"``.
        alpha: Ridge strength (> 0).

    Returns:
        (M,) predictions (regression) or predicted class labels, the arg-max of a one-hot ridge
        over the classes present in ``ytr`` (classification), float64.
    """
    mu = xtr.mean(0)
    sd = xtr.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    ztr, zte = (xtr - mu) / sd, (xte - mu) / sd
    if task == "regression":
        targets = ytr[:, None]
    else:
        classes, inverse = torch.unique(ytr, return_inverse=True)
        targets = torch.nn.functional.one_hot(inverse, len(classes)).double()
    ymu = targets.mean(0)
    gram = ztr.T @ ztr + alpha * torch.eye(ztr.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, ztr.T @ (targets - ymu))
    pred = zte @ w + ymu
    return pred[:, 0] if task == "regression" else classes[pred.argmax(1)]


def _ridge_probe(
    xtr: Any, ytr: Any, xte: Any, yte: Any, *, task: str = "regression", alpha: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Check the inputs of :func:`probe_score` and fit its ridge probe: the one implementation.

    :func:`probe_score` scores these predictions; the competition suite
    (``benchmarks/competition.py``, its ``alone-probe`` reference) feeds them to its fused metrics.

    Args:
        xtr: Training features (N, D), ``train_x`` of :func:`probe_score`.
        ytr: Training targets (N,), ``train_y``.
        xte: Test features (M, D), ``test_x``.
        yte: Test targets (M,), ``test_y`` (checked; returned as float64).
        task: ``"regression"`` or ``"classification"``.
        alpha: Ridge strength (> 0) on standardised features.

    Returns:
        ``(pred, test_y)``: the (M,) predictions of :func:`_ridge_predict` (class labels for
        classification) and the checked (M,) test targets, both float64 on the CPU.

    Raises:
        ModbalanceError: As :func:`probe_score`.
    """
    if task not in ("regression", "classification"):
        raise ModbalanceError(
            f"`task` must be one of 'regression', 'classification'; got {task!r}."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ModbalanceError(f"`alpha` must be a real number > 0, got {alpha!r}.")
    xtr, xte = _probe_features(xtr, xte)
    ytr = _probe_target(ytr, "train_y", xtr.shape[0], task)
    yte = _probe_target(yte, "test_y", xte.shape[0], task)
    if xtr.shape[0] < 2:
        raise ModbalanceError(f"`train_x` needs at least 2 samples, got {xtr.shape[0]}.")
    if task == "classification":
        _check_class_labels(ytr, yte)
    return _ridge_predict(xtr, ytr, xte, task, alpha), yte


def _r2(y: Tensor, pred: Tensor) -> float:
    """Coefficient of determination of ``pred`` for ``y`` (as ``sklearn.metrics.r2_score``).

    A constant ``y`` gives 1.0 for a perfect prediction and 0.0 otherwise.
    """
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def probe_score(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    task: str = "regression",
    alpha: float = 1.0,
) -> float:
    r"""Fit a closed-form ridge linear probe on frozen features and score it on held-out data.

    Features are standardised with the training mean and standard deviation, targets centred,
    and the ridge solution

    .. math::

        W = (X^\top X + \alpha I)^{-1} X^\top Y

    is computed in float64 (intercept unpenalised). The score on the test set is

    * ``task="regression"``: the coefficient of determination
      :math:`R^2 = 1 - \sum (y - \hat y)^2 / \sum (y - \bar y_{\text{test}})^2` (as
      ``sklearn.metrics.r2_score``; can be negative);
    * ``task="classification"``: accuracy of the arg-max of a one-hot ridge regression on integer
      class labels.

    Use it per modality on the pooled encoder features to see how much each encoder has learned
    (an under-trained modality has a low probe score).

    Args:
        train_x: Training features (N, D).
        train_y: Training targets (N,) (float for regression, integer classes for classification).
        test_x: Test features (M, D).
        test_y: Test targets (M,).
        task: ``"regression"`` or ``"classification"``.
        alpha: Ridge strength (> 0) on standardised features.

    Returns:
        The test score as a Python float.

    Raises:
        ModbalanceError: On inconsistent shapes (one target per sample: one-hot ``(N, C)``
            labels are refused), non-finite values, an unknown task, fewer than
            2 training samples, or fractional classification labels (never truncated).

    Example:
        >>> import torch
        >>> from modbalance.metrics import probe_score
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 5, generator=g)
        >>> y = x @ torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0]) + 0.1 * torch.randn(400, generator=g)
        >>> probe_score(x[:300], y[:300], x[300:], y[300:]) > 0.99
        True
    """
    pred, yte = _ridge_probe(train_x, train_y, test_x, test_y, task=task, alpha=alpha)
    if task == "regression":
        return _r2(yte, pred)
    return _accuracy(yte.numpy(), pred.numpy())
