r"""PaSE's Shapley-based equilibrium as a balancing method: :class:`ShapleyEquilibrium`.

The paper's rule (``rule="pase"``) turns Shapley shares into coefficients that slow the dominant
modality's updates (:class:`~modbalance.modulation.ShapleyGradModulator`). Measured on the
competition suite, slowing a modality does not make another one learn what its gradient does not
ask for: the weak encoders stay under-trained. The default rule, ``"unimodal"``, acts on *what
each encoder learns*: every encoder keeps a gradient-carrying unimodal loss through its own head
after the warm-up, weighted from its Shapley share of the fused head,

.. math::

    w_m = \lambda\,\max\bigl(0,\; 1 + \beta\,(1 - M\,\bar\psi_m)\bigr), \qquad
    \mathcal L \leftarrow \mathcal L + \sum_m w_m \mathcal L_m,

where :math:`\bar\psi` are the shares (:func:`~modbalance.modulation.pase_shares` of the exact
Shapley values of the batch's game), smoothed with momentum :math:`\mu`. A modality with less
than its fair share :math:`1/M` gets more unimodal signal, the dominant one less; with
:math:`\beta = 0` every modality gets :math:`\lambda`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from modbalance._checks import ModbalanceError, check_choice, check_modality_names, check_real
from modbalance.balancing import BalancingMethod, StepOutput
from modbalance.methods.unimodal import unimodal_task_loss
from modbalance.modulation import ShapleyGradModulator, pase_shares

__all__ = ["ShapleyEquilibrium"]


class ShapleyEquilibrium(BalancingMethod):
    r"""Shapley-weighted unimodal losses (default) or the paper's update modulation.

    ``rule="unimodal"``: in the phases listed (phase 2 by default, after the warm-up) the method
    replaces the step's detached ``"readout"`` term by unimodal task losses that reach the
    encoders, weighted by :math:`w_m` (module docstring), and reads the shares from
    :attr:`StepOutput.game <modbalance.balancing.StepOutput.game>` (a step without a game keeps
    the last shares; before the first one they are uniform, :math:`w_m = \lambda`).
    ``rule="pase"``: the paper's coefficients :math:`k_m = \exp(\psi_{\min}/\psi_m - 1)`
    scale each encoder's update through a :class:`~modbalance.modulation.ShapleyGradModulator`
    (needs ``groups``); no loss is added.

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
        replace: Loss terms the unimodal losses replace (the detached read-out).
        phases: Phases in which the method acts.

    Example:
        >>> import torch
        >>> from modbalance.balancing import StepOutput
        >>> from modbalance.equilibrium import ShapleyEquilibrium
        >>> from modbalance.shapley import GameResult
        >>> eq = ShapleyEquilibrium(["text", "audio"], momentum=0.0)
        >>> game = GameResult(torch.tensor([0.0, 0.9, 0.1, 1.0]), torch.tensor([0.9, 0.1]),
        ...                   torch.zeros(2, 2), ("text", "audio"))
        >>> pred = {m: torch.zeros(4, requires_grad=True) for m in ("text", "audio")}
        >>> out = StepOutput({m: torch.zeros(4, 2) for m in pred}, pred, torch.zeros(4),
        ...                  {m: torch.ones(4, dtype=torch.bool) for m in pred}, torch.ones(4),
        ...                  "regression", game=game)
        >>> terms = eq.losses(out, {"task": torch.tensor(1.0), "readout": torch.tensor(2.0)})
        >>> sorted(terms), [round(w, 2) for w in eq.weights.values()]
        (['task', 'unimodal_audio', 'unimodal_text'], [0.2, 1.8])
    """

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        rule: Literal["unimodal", "pase"] = "unimodal",
        weight: float = 1.0,
        beta: float = 1.0,
        momentum: float = 0.9,
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]] | None = None,
        replace: Iterable[str] = ("readout",),
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__()
        names = check_modality_names(modalities, minimum=2)
        self.modalities = names
        self.rule = check_choice(rule, "rule", ("unimodal", "pase"))
        self.weight = check_real(weight, "weight", low=0.0)
        self.beta = check_real(beta, "beta", low=0.0)
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
        self.replace = tuple(replace)
        self.phases = tuple(phases)
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

    @property
    def weights(self) -> dict[str, float]:
        """Current unimodal loss weight of each modality (one host sync; for logging)."""
        return dict(zip(self.modalities, self._weights().tolist()))

    def _weights(self) -> Tensor:
        m = len(self.modalities)
        return self.weight * (1.0 + self.beta * (1.0 - m * self.shares)).clamp_min(0.0)

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
        w = self._weights()
        new = {k: v for k, v in losses.items() if k not in self.replace}
        for i, m in enumerate(self.modalities):
            loss = unimodal_task_loss(out.unimodal[m], out.target, out.task, out.present.get(m))
            new[f"unimodal_{m}"] = w[i].to(loss) * loss
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
            f"beta={self.beta}, momentum={self.momentum}"
        )
