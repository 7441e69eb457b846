"""Dual-phase training schedule: unimodal warm-up first, balanced multimodal training second."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from modbalance._checks import ModbalanceError, check_choice, check_int, check_real
from modbalance.balancing import unimodal_task_loss

if TYPE_CHECKING:
    from torch import Tensor

    from modbalance.balancing import StepOutput

__all__ = ["DualPhaseSchedule"]


class DualPhaseSchedule:
    r"""The warm-up: what phase 1 trains, when phase 2 starts, when model selection may begin.

    PaSE trains in two phases, and the warm-up gives most of its gain on the competition suite
    (``benchmarks/results/``). **Phase 1** trains every encoder through its own unimodal head,
    and only that: the fusion head is not run (:attr:`runs_fusion` is ``False``) and
    :meth:`base_losses` is the mean unimodal task loss. **Phase 2** trains the fused prediction
    (:meth:`base_losses`: the fused task loss) together with the balancing methods, which act in
    phase 2 by default
    (:attr:`BalancingMethod.phases <modbalance.balancing.BalancingMethod.phases>`).

    The switch happens after ``switch_epoch`` epochs, or, when ``patience`` is given, as soon as
    the phase-1 validation metric has not improved by more than ``min_delta`` for ``patience``
    consecutive epochs (whichever comes first). The switch is one-way. Feed :meth:`epoch_end` the
    **mean unimodal validation error** in phase 1 (the fused head is untrained then; a mapping
    ``{modality: error}`` is averaged for you) — never a test metric. Model selection starts in
    phase 2: :meth:`select` returns ``True`` when the fused validation metric of a phase-2 epoch
    is the best so far, and never in phase 1.

    Improvement for ``mode="max"`` means :math:`m_t > m^\star + \delta`, and for ``mode="min"``
    :math:`m_t < m^\star - \delta`, where :math:`m^\star` is the best value seen (in phase 1
    for the switch, in phase 2 for :meth:`select`).

    Args:
        switch_epoch: Number of phase-1 epochs after which phase 2 starts at the latest
            (``0`` starts directly in phase 2; ``None`` disables the fixed switch).
        patience: Number of consecutive phase-1 epochs without improvement that trigger the
            switch (``None`` disables the plateau rule).
        min_delta: Minimum change that counts as an improvement.
        mode: ``"max"`` if a larger validation metric is better, ``"min"`` for errors.
        min_phase1_epochs: Phase 1 lasts at least this many epochs even on a plateau.
        warm_head: Also train the fusion head during the warm-up, on *detached* features
            (:meth:`fusion_inputs`), so that it does not start phase 2 untrained while the
            encoders still learn only through their own heads. On the suite's regression task
            (``msa-synthetic``, 5 seeds) it removes the MAE the warm-up otherwise costs; on
            ``cls-synthetic`` it lowered accuracy (95.3 % vs 96.4 %), so it is off by default
            and the PaSE example switches it on for regression.

    Raises:
        ModbalanceError: If both rules are disabled or an argument is out of range.

    Example:
        A user's loop (``evaluate`` returns validation errors, lower is better)::

            schedule = DualPhaseSchedule(switch_epoch=4, mode="min")
            for epoch in range(epochs):
                phase = schedule.phase
                for batch in loader:
                    out = my_step_output(batch, phase, fuse=schedule.runs_fusion)
                    balanced_step(out, schedule.base_losses(out), methods, optimizer)
                val = evaluate(model)                  # {"fused": e, "text": e_t, ...}
                if schedule.select(val["fused"]):
                    best = copy.deepcopy(model.state_dict())
                schedule.epoch_end({m: val[m] for m in modalities})

        >>> from modbalance import DualPhaseSchedule
        >>> schedule = DualPhaseSchedule(switch_epoch=10, patience=2, mode="max")
        >>> for val in [0.50, 0.60, 0.59, 0.60]:
        ...     phase = schedule.epoch_end(val)
        >>> schedule.phase, schedule.switched_at
        (2, 4)
        >>> schedule.select(0.7), schedule.select(0.65), schedule.select(0.8)
        (True, False, True)
    """

    def __init__(
        self,
        *,
        switch_epoch: int | None = 10,
        patience: int | None = None,
        min_delta: float = 0.0,
        mode: Literal["max", "min"] = "max",
        min_phase1_epochs: int = 1,
        warm_head: bool = False,
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
        if not isinstance(warm_head, bool):
            raise TypeError(f"`warm_head` must be True or False, got {warm_head!r}.")
        self.warm_head = warm_head
        self.epoch = 0
        self.switched_at: int | None = 0 if self.switch_epoch == 0 else None
        self.best = -math.inf if mode == "max" else math.inf
        self.bad_epochs = 0
        self.best_selected = -math.inf if mode == "max" else math.inf

    @property
    def phase(self) -> int:
        """The phase of the epoch about to run: ``1`` or ``2``."""
        return 1 if self.switched_at is None else 2

    @property
    def runs_fusion(self) -> bool:
        """Whether the fusion head runs this epoch: in phase 2, and in phase 1 with ``warm_head``.

        The warm-up trains the encoders through their own heads only; with ``warm_head`` the
        fusion head also learns, on :meth:`fusion_inputs` (detached features).
        """
        return self.phase == 2 or self.warm_head

    def fusion_inputs(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The features to give the fusion head: detached during the warm-up, as they are after.

        Detaching keeps the warm-up's rule (each encoder learns only through its own head) while
        a ``warm_head`` fusion head trains.
        """
        if self.phase == 1:
            return {m: f.detach() for m, f in features.items()}
        return dict(features)

    def _improved(self, value: float, best: float | None = None) -> bool:
        best = self.best if best is None else best
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta

    def base_losses(self, out: StepOutput) -> dict[str, Tensor]:
        r"""The model's own loss terms in ``out.phase``, before any balancing method.

        Phase 1: ``{"unimodal": mean_m L_m}``, each encoder trained through its own head (over
        the samples that have the modality); with ``warm_head`` also ``{"task": L(out.fused)}``,
        where ``out.fused`` must come from :meth:`fusion_inputs` (detached features). Phase 2:
        ``{"task": L(out.fused, target)}``. :math:`L` is L1 for regression and the
        cross-entropy for classification
        (:func:`~modbalance.balancing.task_loss`).

        Raises:
            ModbalanceError: Phase 2 without a fused prediction, or phase 1 without unimodal
                predictions.
        """
        from modbalance.balancing import task_loss

        if out.phase == 1:
            if not out.unimodal:
                raise ModbalanceError(
                    "the warm-up (phase 1) trains each encoder through its own head: "
                    "`out.unimodal` is empty; give the model one head per modality."
                )
            terms = [
                unimodal_task_loss(pred, out.target, out.task, out.present.get(m))
                for m, pred in out.unimodal.items()
            ]
            total = terms[0]
            for t in terms[1:]:
                total = total + t
            terms_out = {"unimodal": total / len(terms)}
            if self.warm_head:
                if out.fused is None:
                    raise ModbalanceError(
                        "warm_head=True trains the fusion head during the warm-up: `out.fused` is "
                        "None; run the head on `schedule.fusion_inputs(features)`."
                    )
                terms_out["task"] = task_loss(out.fused, out.target, out.task)
            return terms_out
        if out.fused is None:
            raise ModbalanceError(
                "phase 2 trains the fused prediction: `out.fused` is None; run the fusion head "
                "when `schedule.runs_fusion` is True."
            )
        return {"task": task_loss(out.fused, out.target, out.task)}

    def select(self, metric: float) -> bool:
        """Whether the epoch that just ended is the best for model selection so far.

        Always ``False`` in phase 1 (the fused head is untrained during the warm-up); in phase 2
        ``True`` when the *validation* ``metric`` of the fused prediction improves on the best
        phase-2 value (``mode`` as for the switch). Call it before :meth:`epoch_end`.
        """
        value = check_real(metric, "metric")
        if self.phase != 2 or not self._improved(value, self.best_selected):
            return False
        self.best_selected = value
        return True

    def epoch_end(self, metric: float | Mapping[str, float] | None = None) -> int:
        """Record the end of an epoch and return the phase of the next one.

        Args:
            metric: Validation metric of the epoch that just ended: in phase 1 the mean unimodal
                validation error (a mapping ``{modality: error}`` is averaged). Required during
                phase 1 when the plateau rule is active; ignored in phase 2.

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
            if isinstance(metric, Mapping):
                if not metric:
                    raise ModbalanceError(
                        "`metric` is an empty mapping: give one error per modality."
                    )
                metric = sum(check_real(v, f"metric[{k!r}]") for k, v in metric.items()) / len(
                    metric
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
            "best_selected": self.best_selected,
            "warm_head": self.warm_head,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        Raises:
            ModbalanceError: If keys are missing.
        """
        # checkpoints written before `select` and `warm_head` existed
        state = {"best_selected": self.best_selected, "warm_head": self.warm_head, **state}
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
            f"min_delta={self.min_delta}, mode={self.mode!r}, warm_head={self.warm_head}, "
            f"phase={self.phase})"
        )
