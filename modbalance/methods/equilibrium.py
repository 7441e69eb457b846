r"""PaSE's Shapley-based equilibrium as a balancing method: :class:`ShapleyEquilibrium`.

The paper's rule (``rule="pase"``) turns Shapley shares into coefficients that slow the dominant
modality's updates (:class:`~modbalance.methods.modulators.ShapleyGradModulator`). Measured on the
competition suite, slowing a modality does not make another one learn what its gradient does not
ask for: the weak encoders stay under-trained. The default rule, ``"unimodal"``, acts on *what
each encoder learns*: every encoder keeps a gradient-carrying unimodal loss through its own head
after the warm-up, weighted from its Shapley share of the fused head,

.. math::

    w_m = \lambda\,\max\bigl(0,\; 1 + \beta\,(1 - M\,\bar\psi_m)\bigr), \qquad
    \mathcal L \leftarrow \mathcal L + \sum_m w_m \mathcal L_m,

where :math:`\bar\psi` are the shares (:func:`~modbalance.metrics.pase_shares` of the exact
Shapley values of the batch's game), smoothed with momentum :math:`\mu`. A modality with less
than its fair share :math:`1/M` gets more unimodal signal, the dominant one less; with
:math:`\beta = 0` every modality gets :math:`\lambda`.

**Learnability.** A share of zero has two causes: an *under-trained* modality (more unimodal
signal helps) or an *uninformative* one (its input carries nothing learnable: more signal makes
its encoder fit noise, and the fused error rises — measured on a backbone fed time-averaged audio
and vision that carried no signal: MAE +0.049, worse on every seed). The two look alike at the
start of phase 2 (on the suite's ``msa-synthetic`` the weak modalities' heads do no better than a
constant after the warm-up, and need about three epochs of unimodal signal to pull ahead), so a
modality gets a trial: its weight is multiplied by

.. math::

    \ell_m = \operatorname{clip}\bigl(2 - s_m / P,\; 0,\; 1\bigr), \qquad
    g_m = 1 - \bar L_m / \bar L^{c},

where :math:`s_m` counts the steps since the gain :math:`g_m` last reached the margin
:math:`\tau` (``learnable_margin``), :math:`P` is ``patience`` (full weight for :math:`P` steps,
then a linear fade to 0 over the next :math:`P`), :math:`\bar L_m` a moving average of the
modality's unimodal loss on each batch *before* the step's update, and :math:`\bar L^{c}` that of
the best constant predictor on the same batches (the median target for L1 regression; the
batch's class frequencies for cross-entropy). An informative modality, even a weak one, reaches
the margin and keeps its weight; a modality that never beats a constant fades out, and comes back
as soon as it does. On ``msa-synthetic`` with an added pure-noise modality the weak modalities'
gains rise to 0.06–0.18 within 3–5 epochs of phase 2 while the noise modality's stays between
−0.03 and 0 for the whole run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_int,
    check_modality_names,
    check_real,
    check_replace,
)
from modbalance.balancing import (
    BalancingMethod,
    StepOutput,
    check_phases,
    check_unimodal,
    unimodal_task_loss,
)
from modbalance.methods.modulators import ShapleyGradModulator
from modbalance.metrics import pase_shares

__all__ = ["ShapleyEquilibrium"]


class ShapleyEquilibrium(BalancingMethod):
    r"""Shapley-weighted unimodal losses (default) or the paper's update modulation.

    ``rule="unimodal"``: in the phases listed (phase 2 by default, after the warm-up) the method
    replaces the step's detached ``"readout"`` term by unimodal task losses that reach the
    encoders, weighted by :math:`w_m` (module docstring), and reads the shares from
    :attr:`StepOutput.game <modbalance.balancing.StepOutput.game>` (a step without a game keeps
    the last shares; before the first one they are uniform, :math:`w_m = \lambda`).
    ``rule="pase"``: the paper's coefficients :math:`k_m = \exp(\psi_{\min}/\psi_m - 1)`
    scale each encoder's update through a
    :class:`~modbalance.methods.modulators.ShapleyGradModulator` (needs ``groups``); no loss is
    added.

    Why the default: on the competition suite (``benchmarks/results/``, 5 seeds) the paper's
    rule alone closes 35 %, 0 % and 0 % of the weak modalities' probe gap (cls-synthetic, mfeat,
    msa-synthetic) and the warm-up 81 %, 53 % and 44 %, while the warm-up followed by this
    method (with the residual decision of the PaSE example) closes 98 %, 86 % and 117 %; the PaSE
    guide has the full tables.

    Args:
        modalities: Modality names (at least two).
        rule: ``"unimodal"`` (default) or ``"pase"``.
        weight: :math:`\lambda \ge 0`, the unimodal loss weight.
        beta: :math:`\beta \ge 0`, how strongly the shares tilt the weights (0: equal weights;
            1, the default, measured best on the validation split of the suite's
            ``cls-synthetic`` task: 98.4 ± 0.2 % vs 98.3 ± 0.1 % for 0, 3 seeds;
            ``benchmarks/results/tuning_cls-synthetic.md``).
        momentum: :math:`\mu \in [0, 1)` of the shares' moving average.
        groups: ``{modality: module or parameters}``, only for ``rule="pase"``.
        replace: Loss terms the unimodal losses replace (e.g. ``("readout",)``, the example's
            detached read-out); none by default.
        phases: Phases in which the method acts.
        learnable_margin: :math:`\tau > 0`, the gain over the constant predictor that counts as
            learning; ``None`` switches the learnability factor off (the rule of the earlier
            releases).
        patience: :math:`P`, steps of full weight a modality gets without reaching the margin
            (then as many steps of fade-out). About three epochs of a MOSI-sized data set.
        learn_momentum: Momentum of the moving averages :math:`\bar L_m, \bar L^{c}`.

    Example:
        >>> import torch
        >>> from modbalance.balancing import StepOutput
        >>> from modbalance.methods.equilibrium import ShapleyEquilibrium
        >>> from modbalance.shapley import GameResult
        >>> eq = ShapleyEquilibrium(["text", "audio"], momentum=0.0, replace=["readout"])
        >>> game = GameResult(torch.tensor([0.0, 0.9, 0.1, 1.0]), torch.tensor([0.9, 0.1]),
        ...                   torch.zeros(2, 2), ("text", "audio"))
        >>> pred = {m: torch.zeros(4, requires_grad=True) for m in ("text", "audio")}
        >>> out = StepOutput({m: torch.zeros(4, 2) for m in pred}, pred, torch.zeros(4),
        ...                  {m: torch.ones(4, dtype=torch.bool) for m in pred},
        ...                  torch.tensor([1.0, -1.0, 2.0, 0.0]),
        ...                  "regression", game=game)
        >>> terms = eq.losses(out, {"task": torch.tensor(1.0), "readout": torch.tensor(2.0)})
        >>> sorted(terms), [round(w, 2) for w in eq.coefficients.tolist()]
        (['task', 'unimodal_audio', 'unimodal_text'], [0.2, 1.8])
        >>> eq.gain   # zero predictions do not beat the constant (median) predictor: a trial
        tensor([0., 0.])
    """

    _checked_state: ClassVar[dict[str, str]] = {
        "shares": "nonnegative",
        "unimodal_loss": "nonnegative",
        "constant_loss": "nonnegative",
        "stalled_steps": "nonnegative",
    }

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        rule: Literal["unimodal", "pase"] = "unimodal",
        weight: float = 1.0,
        beta: float = 1.0,
        momentum: float = 0.9,
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]] | None = None,
        replace: Iterable[str] = (),
        phases: Iterable[int] = (2,),
        learnable_margin: float | None = 0.02,
        patience: int = 60,
        learn_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        names = check_modality_names(modalities, minimum=2)
        self.modalities = names
        self.rule = check_choice(rule, "rule", ("unimodal", "pase"))
        self.weight = check_real(weight, "weight", low=0.0)
        self.beta = check_real(beta, "beta", low=0.0)
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
        self.replace = check_replace(replace)
        self.phases = check_phases(phases)
        self.learnable_margin = (
            None
            if learnable_margin is None
            else check_real(learnable_margin, "learnable_margin", low=0.0, low_inclusive=False)
        )
        self.patience = check_int(patience, "patience", low=1)
        self.learn_momentum = check_real(
            learn_momentum, "learn_momentum", low=0.0, high=1.0, high_inclusive=False
        )
        self.modulator: ShapleyGradModulator | None = None
        if self.rule == "pase":
            if groups is None:
                raise ModbalanceError(
                    "rule='pase' scales each encoder's update: pass `groups` {modality: encoder}."
                )
            self.modulator = ShapleyGradModulator(groups, momentum=self.momentum)
        self.needs_game = self.rule == "pase" or self.beta > 0
        m = len(names)
        self.register_buffer("shares", torch.full((m,), 1.0 / m))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("unimodal_loss", torch.zeros(m))
        self.register_buffer("constant_loss", torch.zeros(m))
        self.register_buffer("losses_seen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("stalled_steps", torch.zeros(m))

    @property
    def coefficients(self) -> Tensor:
        r"""``(M,)`` current unimodal loss weights :math:`w_m` (in the order of ``modalities``)."""
        return self._weights()

    @property
    def learnability(self) -> Tensor:
        r"""``(M,)`` current learnability factors :math:`\ell_m` (all 1 without the margin)."""
        if self.learnable_margin is None:
            return torch.ones_like(self.shares)
        return (2.0 - self.stalled_steps / self.patience).clamp(0.0, 1.0)

    @property
    def gain(self) -> Tensor:
        r"""``(M,)`` gains :math:`1 - \bar L_m / \bar L^{c}` of the heads over a constant."""
        gain = 1.0 - self.unimodal_loss / self.constant_loss.clamp_min(1e-8)
        return torch.where(self.losses_seen, gain, torch.zeros_like(gain))

    def summary(self) -> dict[str, float]:
        """``coefficient_<m>`` (the weights), ``share_<m>``, ``gain_<m>``, ``learnability_<m>``.

        One host synchronisation; for logging once per epoch.
        """
        rows = torch.stack([self._weights(), self.shares, self.gain, self.learnability])
        values = rows.tolist()
        return {
            f"{kind}_{m}": v
            for kind, row in zip(("coefficient", "share", "gain", "learnability"), values)
            for m, v in zip(self.modalities, row)
        }

    def _weights(self) -> Tensor:
        m = len(self.modalities)
        tilt = (1.0 + self.beta * (1.0 - m * self.shares)).clamp_min(0.0)
        return self.weight * tilt * self.learnability

    @torch.no_grad()
    def _observe_losses(self, out: StepOutput, losses: Sequence[Tensor]) -> None:
        """Moving averages of the unimodal losses and of the constant predictor's loss."""
        const = torch.stack(
            [
                _constant_loss(out.target, out.task, out.present.get(m), out.unimodal[m])
                for m in self.modalities
            ]
        ).to(self.constant_loss)
        uni = torch.stack([v.detach().float() for v in losses]).to(self.unimodal_loss)
        mu = self.learn_momentum
        seen = self.losses_seen
        self.unimodal_loss.copy_(torch.where(seen, mu * self.unimodal_loss + (1 - mu) * uni, uni))
        self.constant_loss.copy_(
            torch.where(seen, mu * self.constant_loss + (1 - mu) * const, const)
        )
        self.losses_seen.fill_(True)
        if self.learnable_margin is not None:
            reached = self.gain >= self.learnable_margin
            self.stalled_steps.copy_(torch.where(reached, 0.0, self.stalled_steps + 1.0))

    @torch.no_grad()
    def observe(self, game: Any) -> Tensor:
        """Update the smoothed shares from a game (matched by modality name); returns them."""
        names = getattr(game, "modalities", None)
        if names is None or set(names) != set(self.modalities):
            raise ModbalanceError(
                f"`game` must be a GameResult over the modalities {list(self.modalities)}, got "
                f"{names!r}."
            )
        values = dict(zip(names, game.shapley.unbind(-1)))
        x = torch.stack([values[m] for m in self.modalities]).to(self.shares)
        raw = pase_shares(x)
        smoothed = self.momentum * self.shares + (1.0 - self.momentum) * raw
        self.shares.copy_(torch.where(self.initialized, smoothed, raw))
        self.initialized.fill_(True)
        return self.shares.clone()

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Replace the read-out by Shapley-weighted unimodal losses (``rule="unimodal"``)."""
        if self.rule != "unimodal" or out.phase not in self.phases:
            return dict(losses)
        if self.beta > 0 and out.game is not None:  # without a game: the last shares
            self.observe(out.game)
        check_unimodal(out, self.modalities, type(self).__name__)
        terms = [
            unimodal_task_loss(out.unimodal[m], out.target, out.task, out.present.get(m))
            for m in self.modalities
        ]
        self._observe_losses(out, terms)
        w = self._weights()
        new = {k: v for k, v in losses.items() if k not in self.replace}
        for i, m in enumerate(self.modalities):
            new[f"unimodal_{m}"] = w[i].to(terms[i]) * terms[i]
        return new

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """``rule="pase"``: the paper's update modulation; otherwise nothing."""
        if self.modulator is None or out.phase not in self.phases:
            yield
            return
        with self.modulator.around_step(out, optimizer):
            yield

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return (
            f"modalities={self.modalities!r}, rule={self.rule!r}, weight={self.weight}, "
            f"beta={self.beta}, momentum={self.momentum}, "
            f"learnable_margin={self.learnable_margin}, patience={self.patience}"
        )


def _constant_loss(target: Tensor, task: str, present: Tensor | None, pred: Tensor) -> Tensor:
    """Loss of the best constant predictor on the samples present (no host synchronisation).

    Regression (L1): the mean absolute deviation from the median target. Classification
    (cross-entropy): the entropy of the class frequencies of the samples present.
    """
    mask = (
        torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        if present is None
        else present.to(torch.bool)
    )
    w = mask.float()
    n = w.sum().clamp_min(1.0)
    if task == "regression":
        y = target.float()
        # the (lower) median of the present targets: absent ones sorted to the end as +inf
        ordered = torch.where(mask, y, torch.full_like(y, float("inf"))).sort().values
        k = ((w.sum() - 1.0).clamp_min(0.0) / 2.0).floor().long().reshape(1)
        med = ordered.gather(0, k)
        med = torch.where(torch.isfinite(med), med, torch.zeros_like(med))
        return ((y - med).abs() * w).sum() / n
    num_classes = pred.shape[-1]
    freq = (torch.nn.functional.one_hot(target.long(), num_classes).float() * w[:, None]).sum(0) / n
    return -(freq * freq.clamp_min(1e-12).log()).sum()
