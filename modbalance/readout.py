r"""A closed-form fused read-out fitted on frozen features after training: :class:`RidgeReadout`.

Balancing methods make the weak encoders learn; whether the fused prediction *uses* what they
learned is a second question. A fusion head trained jointly under competition can keep relying on
the dominant modality even when the weak encoders' features carry their signal (on the
competition suite's ``msa-synthetic`` a ridge on the alone-trained encoders' concatenated
features reaches MAE 0.401, the jointly trained fusion heads about 0.415). Decoupling the
read-out from representation learning (re-fitting the classifier on frozen features, Kang et al.,
ICLR 2020; a linear probe, Alain & Bengio, 2017) answers it in closed form:

.. math::

    \hat y = \bar y + z(x)^\top W_\alpha, \qquad
    W_\alpha = (Z^\top Z + \alpha I)^{-1} Z^\top (Y - \bar y),

with :math:`z(x)` the concatenated per-modality features standardised by the training mean and
population standard deviation, :math:`Y` the training targets (one-hot rows for classification)
and :math:`\bar y` their mean (an unpenalised intercept). The ridge strength :math:`\alpha` is
chosen from ``alphas`` on held-out data (the lowest MAE for regression, the highest accuracy for
classification; ties go to the stronger :math:`\alpha`), all from one eigendecomposition of
:math:`Z^\top Z`.

Absent modalities (``present[m] = False``) enter with their training mean, i.e. a standardised
zero, at fitting and at prediction alike, so a sample's prediction never depends on the features
an encoder produced for a missing input.

Use it after training (or at every epoch, selecting the checkpoint on its validation error, as
``examples/pase`` does for regression by default). Measured on the competition suite's
``msa-synthetic`` with four fusion backbones (5 seeds, that per-epoch refit): after PaSE's
balancing it has the lower validation MAE than the fusion head on all four, and a test MAE below
joint training's on two of them (by up to 0.009) and level on the other two (within 0.002); on
joint training alone it raises MAE by 0.004 to 0.007, because the weak encoders' features carry
little to read. It has no parameters and no gradient: the fitted state lives in buffers
(resized on loading) and round-trips with ``state_dict``. Fitting reads tensors on the host (it
is not a training-step operation); :meth:`RidgeReadout.forward` does not synchronise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_int,
    check_modality_names,
    check_tensor,
)

__all__ = ["RidgeReadout"]

Split = tuple[Mapping[str, Tensor], Tensor] | tuple[Mapping[str, Tensor], Tensor, Any]


class RidgeReadout(nn.Module):
    r"""Ridge regression on the concatenated features of every modality (module docstring).

    Args:
        modalities: Modality names; features are concatenated in this order.
        task: ``"regression"`` (``(N,)`` real targets) or ``"classification"`` (``(N,)`` class
            indices in ``[0, num_outputs)``).
        num_outputs: 1 for regression, the number of classes for classification.
        alphas: Candidate ridge strengths (positive, finite); more than one needs held-out data
            in :meth:`fit` to choose from.

    Shapes:
        ``features[m]``: ``(N, D_m)``; ``present[m]``: ``(N,)`` bool (optional, all present
        by default). :meth:`forward` returns ``(N,)`` for regression and ``(N, C)`` scores for
        classification, in the features' dtype and device.

    Example:
        >>> import torch
        >>> from modbalance.readout import RidgeReadout
        >>> g = torch.Generator().manual_seed(0)
        >>> feats = {m: torch.randn(200, d, generator=g) for m, d in (("text", 4), ("audio", 3))}
        >>> y = feats["text"][:, 0] - 2 * feats["audio"][:, 1]
        >>> train = ({m: f[:150] for m, f in feats.items()}, y[:150])
        >>> valid = ({m: f[150:] for m, f in feats.items()}, y[150:])
        >>> readout = RidgeReadout(["text", "audio"]).fit(*train, valid=valid)
        >>> readout.alpha, round(readout.valid_error, 3)
        (0.1, 0.002)
        >>> readout(valid[0]).shape
        torch.Size([50])
    """

    def __init__(
        self,
        modalities: Sequence[str],
        task: Literal["regression", "classification"] = "regression",
        *,
        num_outputs: int = 1,
        alphas: Sequence[float] = (0.1, 1.0, 10.0, 30.0, 100.0, 300.0, 1000.0),
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities)
        self.task = check_choice(task, "task", ("regression", "classification"))
        self.num_outputs = check_int(num_outputs, "num_outputs", low=1)
        if self.task == "regression" and self.num_outputs != 1:
            raise ModbalanceError(f"regression has one output, got num_outputs={num_outputs}.")
        if self.task == "classification" and self.num_outputs < 2:
            raise ModbalanceError(
                f"classification needs num_outputs >= 2 classes, got {num_outputs}."
            )
        values = tuple(alphas) if not isinstance(alphas, (int, float)) else (alphas,)
        if not values or any(
            isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < math.inf
            for a in values
        ):
            raise ModbalanceError(
                f"`alphas` must be a non-empty sequence of positive finite numbers, got {alphas!r}."
            )
        #: The candidate strengths, ascending.
        self.alphas = tuple(sorted({float(a) for a in values}))
        # the fitted state, as buffers (every state_dict entry a tensor): empty until fit()
        f64 = {"dtype": torch.float64}
        self.register_buffer("mean", torch.zeros(0, **f64))
        self.register_buffer("scale", torch.zeros(0, **f64))
        self.register_buffer("weight", torch.zeros(0, self.num_outputs, **f64))
        self.register_buffer("bias", torch.zeros(self.num_outputs, **f64))
        self.register_buffer("dims", torch.zeros(0, dtype=torch.long))
        self.register_buffer("chosen", torch.full((2,), math.nan, **f64))  # alpha, valid error
        # host copy of ``dims`` (None: not fitted), so that forward never reads the device
        self._dims: tuple[int, ...] | None = None

    # ----------------------------------------------------------------------------- state
    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run (or a fitted state was loaded)."""
        return self._dims is not None

    @property
    def alpha(self) -> float:
        """The chosen ridge strength (``nan`` before :meth:`fit`)."""
        return float(self.chosen[0])

    @property
    def valid_error(self) -> float:
        """The held-out error of :attr:`alpha`: MAE, or 1 - accuracy (``nan`` without it)."""
        return float(self.chosen[1])

    def _set_fit(self, fit: Mapping[str, Tensor], alpha: float, valid_error: float) -> None:
        """Store a fitted state in the buffers (on their device, in their floating dtype)."""
        dev, dtype = self.bias.device, self.bias.dtype
        for name in ("mean", "scale", "weight", "bias"):
            setattr(self, name, fit[name].to(dev, dtype))
        self.dims = torch.tensor(fit["dims"], dtype=torch.long, device=dev)
        self.chosen = torch.tensor([alpha, valid_error], dtype=dtype, device=dev)
        self._dims = tuple(int(d) for d in fit["dims"])

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Resize the fitted-state buffers to the saved ones, then load them as usual."""
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, Tensor) and (weight.ndim != 2 or weight.shape[1] != self.num_outputs):
            raise ModbalanceError(
                f"RidgeReadout: the loaded read-out has {weight.shape[-1]} output(s), this one "
                f"{self.num_outputs}."
            )
        for name in ("mean", "scale", "weight", "dims"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor):
                mine = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=mine.dtype, device=mine.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        dims = self.dims.tolist()  # a host read at load time, never in forward
        self._dims = tuple(dims) if dims else None

    # ----------------------------------------------------------------------------- inputs
    def _matrix(
        self, features: Mapping[str, Tensor], present: Mapping[str, Tensor] | None, what: str
    ) -> tuple[Tensor, Tensor]:
        """``(X, P)``: ``(N, sum D_m)`` concatenated features and ``(N, M)`` presence."""
        if not isinstance(features, Mapping):
            raise TypeError(
                f"`{what}` must map each modality to its (N, D) features, got "
                f"{type(features).__name__}."
            )
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ModbalanceError(
                f"`{what}` has no features for {missing}; expected every one of "
                f"{list(self.modalities)}."
            )
        xs = [
            check_tensor(features[m], f"{what}[{m!r}]", ndim=2, dtype="floating")
            for m in self.modalities
        ]
        n = xs[0].shape[0]
        for m, x in zip(self.modalities, xs):
            if x.shape[0] != n:
                raise ModbalanceError(
                    f"`{what}[{m!r}]` has {x.shape[0]} rows, `{what}[{self.modalities[0]!r}]` "
                    f"{n}: every modality needs one row per sample."
                )
        if present is None:
            flags = torch.ones(n, len(xs), dtype=torch.bool, device=xs[0].device)
        else:
            cols = []
            for m in self.modalities:
                if m not in present:  # a modality without flags is present everywhere
                    cols.append(torch.ones(n, dtype=torch.bool, device=xs[0].device))
                    continue
                p = check_tensor(present[m], f"present[{m!r}]", ndim=1, dtype="bool")
                if p.shape[0] != n:
                    raise ModbalanceError(
                        f"`present[{m!r}]` has {p.shape[0]} entries for {n} samples."
                    )
                cols.append(p.to(xs[0].device))
            flags = torch.stack(cols, 1)
        return torch.cat(xs, 1), flags

    @staticmethod
    def _columns(flags: Tensor, dims: Sequence[int]) -> Tensor:
        """Per-feature presence ``(N, D)`` from per-modality presence ``(N, M)`` (no host read)."""
        return torch.cat([flags[:, i : i + 1].expand(-1, d) for i, d in enumerate(dims)], 1)

    def _standardised(
        self, x: Tensor, flags: Tensor, dims: Sequence[int], mean: Tensor, scale: Tensor
    ) -> Tensor:
        """``(x - mean) / scale``, zero (the training mean) where the modality is absent."""
        return torch.where(self._columns(flags, dims), (x - mean) / scale, 0.0)

    def _error_of(self, scores: Tensor, y: Tensor) -> float:
        """MAE, or 1 - accuracy, of ``(N, C)`` scores against :meth:`_targets`' ``(N, C)``."""
        if self.task == "regression":
            return float((scores[:, 0] - y[:, 0]).abs().mean())
        return 1.0 - float((scores.argmax(1) == y.argmax(1)).double().mean())

    def _targets(self, target: Tensor, n: int, what: str) -> Tensor:
        t = check_tensor(target, what, ndim=1, nonempty=True)
        if t.shape[0] != n:
            raise ModbalanceError(f"`{what}` has {t.shape[0]} entries for {n} samples.")
        if self.task == "regression":
            t = t.double().cpu()
            if not bool(torch.isfinite(t).all()):
                raise ModbalanceError(f"`{what}` must be finite.")
            return t[:, None]
        if t.is_floating_point() and not bool((t == t.round()).all()):
            raise ModbalanceError(f"`{what}` must hold class indices, got non-integer values.")
        labels = t.long().cpu()
        if bool(((labels < 0) | (labels >= self.num_outputs)).any()):
            raise ModbalanceError(
                f"`{what}` must hold class indices in [0, {self.num_outputs}), got values from "
                f"{int(labels.min())} to {int(labels.max())}."
            )
        return nn.functional.one_hot(labels, self.num_outputs).double()

    # ----------------------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(
        self,
        features: Mapping[str, Tensor],
        target: Tensor,
        present: Mapping[str, Tensor] | None = None,
        *,
        valid: Split | None = None,
    ) -> RidgeReadout:
        """Fit the read-out on training features; choose ``alpha`` on ``valid``.

        Args:
            features: ``{modality: (N, D_m)}`` training features (frozen: fitting trains no
                encoder).
            target: ``(N,)`` training targets.
            present: Optional ``{modality: (N,) bool}``.
            valid: ``(features, target)`` or ``(features, target, present)`` held-out data to
                choose ``alpha`` from :attr:`alphas` (needed when there is more than one).

        Returns:
            ``self``, fitted: :attr:`alpha` and :attr:`valid_error` are set.

        Raises:
            ModbalanceError: On mismatched modalities, rows or shapes, non-finite features or
                targets, out-of-range class indices, fewer than two samples, or several
                ``alphas`` without ``valid``.
            TypeError: On a non-mapping ``features`` or non-tensor inputs.
        """
        x, flags = self._matrix(features, present, "features")
        dims = [features[m].shape[1] for m in self.modalities]
        n = x.shape[0]
        if n < 2:
            raise ModbalanceError(f"fitting needs at least 2 samples, got {n}.")
        y = self._targets(target, n, "target")
        if len(self.alphas) > 1 and valid is None:
            raise ModbalanceError(
                f"choose the ridge strength on held-out data: pass valid=(features, target) or "
                f"a single alpha (alphas={self.alphas})."
            )
        if valid is not None and (not isinstance(valid, tuple) or len(valid) not in (2, 3)):
            raise ModbalanceError(
                "`valid` must be (features, target) or (features, target, present)."
            )
        x, flags = x.double().cpu(), flags.cpu()
        on = self._columns(flags, dims)
        if not bool(torch.isfinite(torch.where(on, x, 0.0)).all()):
            raise ModbalanceError("`features` must be finite where the modality is present.")
        count = on.sum(0).clamp_min(1).double()
        mean = torch.where(on, x, 0.0).sum(0) / count
        sd = (torch.where(on, x - mean, 0.0).pow(2).sum(0) / count).sqrt()
        scale = torch.where(sd > 0, sd, torch.ones_like(sd))
        z = self._standardised(x, flags, dims, mean, scale)
        bias = y.mean(0)
        evals, evecs = torch.linalg.eigh(z.T @ z)
        proj = evecs.T @ (z.T @ (y - bias))  # (D, C) in the eigenbasis
        weights = {a: evecs @ (proj / (evals.clamp_min(0) + a)[:, None]) for a in self.alphas}
        chosen, err = self.alphas[0], math.nan
        if valid is not None:  # every strength on the same standardised validation features
            xv, fv = self._matrix(valid[0], valid[2] if len(valid) == 3 else None, "valid[0]")
            if [valid[0][m].shape[1] for m in self.modalities] != dims:
                raise ModbalanceError("`valid` features must have the training features' widths.")
            yv = self._targets(valid[1], xv.shape[0], "valid[1]")
            # scored as forward() predicts (in the features' dtype), so that valid_error is
            # the error of what the fitted read-out predicts on them
            dt = xv.dtype
            zv = self._standardised(xv.cpu(), fv.cpu(), dims, mean.to(dt), scale.to(dt))
            errors = {
                a: self._error_of((zv @ w.to(dt) + bias.to(dt)).double(), yv)
                for a, w in weights.items()
            }
            # the lowest error; ties go to the stronger ridge
            chosen = min(sorted(errors, reverse=True), key=errors.__getitem__)
            err = errors[chosen]
        fit = {"mean": mean, "scale": scale, "weight": weights[chosen], "bias": bias, "dims": dims}
        self._set_fit(fit, chosen, err)
        return self

    # ----------------------------------------------------------------------------- predict
    def forward(
        self, features: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Predictions ``(N,)`` (regression) or class scores ``(N, C)`` of the fitted read-out.

        Raises:
            ModbalanceError: Before :meth:`fit`, or on features of other widths than fitted.
        """
        if self._dims is None:
            raise ModbalanceError("RidgeReadout is not fitted: call fit(...) first.")
        x, flags = self._matrix(features, present, "features")
        dims = [features[m].shape[1] for m in self.modalities]
        if tuple(dims) != self._dims:
            raise ModbalanceError(
                f"the read-out was fitted on feature widths {list(self._dims)} "
                f"(in the order {list(self.modalities)}), got {dims}."
            )
        dev, dtype = x.device, x.dtype
        z = self._standardised(x, flags, dims, self.mean.to(dev, dtype), self.scale.to(dev, dtype))
        out = z @ self.weight.to(dev, dtype) + self.bias.to(dev, dtype)
        return out.squeeze(1) if self.task == "regression" else out

    @torch.no_grad()
    def error(self, features: Mapping[str, Tensor], target: Tensor, present: Any = None) -> float:
        """MAE (regression) or 1 - accuracy (classification) of the fitted read-out."""
        pred = self(features, present).double().cpu()
        return self._error_of(
            pred.reshape(pred.shape[0], -1), self._targets(target, len(pred), "target")
        )

    def extra_repr(self) -> str:
        """Summarise the configuration and the fitted strength for ``repr``."""
        state = f"alpha={self.alpha:g}" if self.fitted else "not fitted"
        return f"modalities={list(self.modalities)}, task={self.task!r}, {state}"
