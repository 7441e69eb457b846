"""Dual-phase training schedule: unimodal warm-up first, balanced multimodal training second."""

from __future__ import annotations

import math
from typing import Any, Literal

from modbalance._checks import ModbalanceError, check_choice, check_int, check_real

__all__ = ["DualPhaseSchedule"]


class DualPhaseSchedule:
    r"""Decide when training moves from phase 1 (unimodal warm-up) to phase 2 (balanced fusion).

    PaSE trains in two phases. Phase 1 builds a clear semantic structure in every modality: each
    encoder learns through its own unimodal head while the prototypes warm up. Phase 2 trains the
    fusion together with calibration, optimal-transport alignment and Shapley modulation. The
    switch happens at a fixed epoch, or, when ``patience`` is given, as soon as the validation
    metric of phase 1 has not improved by more than ``min_delta`` for ``patience`` consecutive
    epochs (whichever comes first). The switch is one-way.

    Call :meth:`epoch_end` once at the end of every epoch with the *validation* metric (never a
    test metric); read :attr:`phase` at the start of the next epoch.

    Improvement for ``mode="max"`` means :math:`m_t > m^\star + \delta`, and for ``mode="min"``
    :math:`m_t < m^\star - \delta`, where :math:`m^\star` is the best value seen in phase 1.

    Args:
        switch_epoch: Number of phase-1 epochs after which phase 2 starts at the latest
            (``0`` starts directly in phase 2; ``None`` disables the fixed switch).
        patience: Number of consecutive phase-1 epochs without improvement that trigger the
            switch (``None`` disables the plateau rule).
        min_delta: Minimum change that counts as an improvement.
        mode: ``"max"`` if a larger validation metric is better, ``"min"`` otherwise.
        min_phase1_epochs: Phase 1 lasts at least this many epochs even on a plateau.

    Raises:
        ModbalanceError: If both rules are disabled or an argument is out of range.

    Example:
        >>> from modbalance import DualPhaseSchedule
        >>> schedule = DualPhaseSchedule(switch_epoch=10, patience=2, mode="max")
        >>> for val in [0.50, 0.60, 0.59, 0.60]:
        ...     phase = schedule.epoch_end(val)
        >>> schedule.phase, schedule.switched_at
        (2, 4)
    """

    def __init__(
        self,
        *,
        switch_epoch: int | None = 10,
        patience: int | None = None,
        min_delta: float = 0.0,
        mode: Literal["max", "min"] = "max",
        min_phase1_epochs: int = 1,
    ) -> None:
        if switch_epoch is None and patience is None:
            raise ModbalanceError(
                "`switch_epoch` and `patience` are both None: phase 2 would never start. "
                "Give a fixed switch epoch, a plateau patience, or both."
            )
        self.switch_epoch = (
            None if switch_epoch is None else check_int(switch_epoch, "switch_epoch", low=0)
        )
        self.patience = None if patience is None else check_int(patience, "patience", low=1)
        self.min_delta = check_real(min_delta, "min_delta", low=0)
        self.mode = check_choice(mode, "mode", ("max", "min"))
        self.min_phase1_epochs = check_int(min_phase1_epochs, "min_phase1_epochs", low=0)
        self.epoch = 0
        self.switched_at: int | None = 0 if self.switch_epoch == 0 else None
        self.best = -math.inf if mode == "max" else math.inf
        self.bad_epochs = 0

    @property
    def phase(self) -> int:
        """The phase of the epoch about to run: ``1`` or ``2``."""
        return 1 if self.switched_at is None else 2

    def _improved(self, value: float) -> bool:
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def epoch_end(self, metric: float | None = None) -> int:
        """Record the end of an epoch and return the phase of the next one.

        Args:
            metric: Validation metric of the epoch that just ended. Required during phase 1 when
                the plateau rule is active; ignored in phase 2.

        Returns:
            The phase (``1`` or ``2``) of the next epoch.

        Raises:
            ModbalanceError: If the plateau rule needs a metric and none (or a non-finite one)
                was given.
        """
        self.epoch += 1
        if self.switched_at is not None:
            return 2
        if self.patience is not None:
            if metric is None:
                raise ModbalanceError(
                    "`metric` is required by DualPhaseSchedule.epoch_end during phase 1 when "
                    "`patience` is set; pass the validation metric of the epoch."
                )
            value = check_real(metric, "metric")
            if self._improved(value):
                self.best = value
                self.bad_epochs = 0
            else:
                self.bad_epochs += 1
            if self.bad_epochs >= self.patience and self.epoch >= self.min_phase1_epochs:
                self.switched_at = self.epoch
        if self.switch_epoch is not None and self.epoch >= self.switch_epoch:
            self.switched_at = self.epoch if self.switched_at is None else self.switched_at
        return self.phase

    def state_dict(self) -> dict[str, Any]:
        """Return the schedule's state (hyperparameters and progress) as a plain dict."""
        return {
            "switch_epoch": self.switch_epoch,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "min_phase1_epochs": self.min_phase1_epochs,
            "epoch": self.epoch,
            "switched_at": self.switched_at,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Raises:
            ModbalanceError: If keys are missing.
        """
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ModbalanceError(
                f"`state` is missing key(s) {sorted(missing)} for DualPhaseSchedule."
            )
        for key in self.state_dict():
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        return (
            f"DualPhaseSchedule(switch_epoch={self.switch_epoch}, patience={self.patience}, "
            f"min_delta={self.min_delta}, mode={self.mode!r}, phase={self.phase})"
        )
