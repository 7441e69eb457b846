r"""EBMC's two balancing terms: EMC (energy-guided coordination) and IMTD (trust distillation).

EBMC (He et al., CVPR 2026) trains, after a Stage I of unimodal experts, a fused model with two
balancing terms next to its backbone's losses:

* :class:`EMC` — *energy-guided modality coordination*: every modality gets an energy from its
  feature norm, its unimodal loss and its Stage-I teacher's uncertainty; the term pulls the
  energies together and damps the norm's gradient.
* :class:`IMTD` — *instance-aware modality trust distillation*: the fused prediction is distilled
  from every unimodal teacher, each sample weighting the teachers by how much it trusts them.

Both read the alone-trained teachers (``out.teacher``, ``needs_teacher = True``), write loss
terms of their own (``"emc"`` and ``"imtd"``) and compose under
:func:`~modbalance.balancing.balanced_step`. Transcribed from the authors' code
(``kangverse/EBMC``: ``EBMC/modules/emc.py``, ``EBMC/modules/imtd.py``, ``EBMC/ebmc.py``,
``EBMC/train_EBMC.py``); each class lists its deviations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_has_modalities,
    check_modality_names,
    check_real,
    check_target,
    check_tensor,
)
from modbalance.balancing import BalancingMethod, StepOutput, check_phases
from modbalance.methods._common import presence, require_teacher, settings_repr

__all__ = ["EMC", "IMTD", "trust_weights"]

#: ``rho = 1 / (log(1 + sigma^2) + RHO_EPS)``: the released code's guard against sigma -> 0.
RHO_EPS = 0.1
#: Added to the sum of the raw trust weights before normalising (released code).
NORM_EPS = 1e-8
#: Probabilities are clamped to this before the logarithm of an entropy (released code).
LOG_EPS = 1e-8


def trust_weights(sigma: Tensor, present: Tensor | None = None) -> Tensor:
    r"""IMTD's per-sample trust in every modality's teacher, from its uncertainty.

    .. math::

        c_{im} = e^{-\sigma_{im}}, \qquad
        \rho_{im} = \frac{1}{\log(1 + \sigma_{im}^2) + 0.1}, \qquad
        w_{im} = \frac{p_{im}\,c_{im}\rho_{im}}{\sum_k p_{ik}\,c_{ik}\rho_{ik} + 10^{-8}},

    with :math:`p_{im}` whether sample :math:`i` has modality :math:`m` (all ones when
    ``present`` is ``None``, the released form). Both factors fall as :math:`\sigma` grows, so
    the most certain teacher gets the largest weight; each row sums to one over the present
    modalities (zero for a sample without any).

    Args:
        sigma: ``(N, M)`` non-negative uncertainties :math:`\sigma_{im}`.
        present: Optional ``(N, M)`` bool presence mask.

    Returns:
        ``(N, M)`` weights :math:`w_{im}` (zero where a modality is absent).

    Raises:
        TypeError: If ``sigma`` is not a floating tensor.
        ModbalanceError: If ``sigma`` is not 2-D or ``present`` has another shape.

    Example:
        >>> import torch
        >>> from modbalance.methods.ebmc import trust_weights
        >>> w = trust_weights(torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
        >>> w.sum(1), bool(w[0, 0] > w[0, 1])
        (tensor([1., 1.]), True)
        >>> trust_weights(torch.tensor([[0.0, 1.0]]), torch.tensor([[False, True]]))
        tensor([[0., 1.]])
    """
    check_tensor(sigma, "sigma", ndim=2, dtype="floating")
    raw = torch.exp(-sigma) / (torch.log1p(sigma.square()) + RHO_EPS)
    if present is not None:
        check_tensor(present, "present")
        if present.shape != sigma.shape:
            raise ModbalanceError(
                f"`present` must have the shape of `sigma` {tuple(sigma.shape)}, got "
                f"{tuple(present.shape)}."
            )
        raw = torch.where(present.to(device=raw.device, dtype=torch.bool), raw, 0.0)
    return raw / (raw.sum(dim=-1, keepdim=True) + NORM_EPS)


def _dtype(x: Tensor) -> torch.dtype:
    """At least float32 for the arithmetic (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _prediction(x: Tensor, task: str, name: str) -> Tensor:
    """``(N,)`` (an ``(N, 1)`` output squeezed) for regression, ``(N, C)`` for classification."""
    check_tensor(x, name, ndim=(1, 2), dtype="floating")
    if task == "regression":
        if x.ndim == 2 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 1:
            raise ModbalanceError(
                f"`{name}` must be (N,) or (N, 1) for task='regression', got shape "
                f"{tuple(x.shape)}; for logits pass task='classification'."
            )
    elif x.ndim != 2:
        raise ModbalanceError(
            f"`{name}` must be (N, C) logits for task='classification', got shape {tuple(x.shape)}."
        )
    return x


def _teachers(out: StepOutput, modalities: Sequence[str], method: str) -> list[Tensor]:
    """The teachers' predictions in modality order, detached, checked against the task."""
    given = getattr(require_teacher(out, method), "unimodal", None)
    if not isinstance(given, Mapping):
        raise TypeError(
            f"{method}: `out.teacher` must be a TeacherOutput with a mapping `unimodal`, got "
            f"{type(out.teacher).__name__}."
        )
    check_has_modalities(
        given,
        modalities,
        f"{method} needs a teacher prediction for every modality: `out.teacher.unimodal` is "
        "missing",
    )
    preds = [
        _prediction(given[m], out.task, f"out.teacher.unimodal[{m!r}]").detach() for m in modalities
    ]
    if any(p.shape != preds[0].shape for p in preds):
        raise ModbalanceError(
            f"{method}: every teacher prediction must have the same shape, got "
            f"{[tuple(p.shape) for p in preds]}."
        )
    return preds


def _presence(out: StepOutput, modalities: Sequence[str], n: int, device: torch.device) -> Tensor:
    """``(N, M)`` bool presence of every modality (all present where ``out.present`` has none)."""
    return torch.stack([presence(out, m, n, device) for m in modalities], dim=1)


def _entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last axis, log clamped as in the released code."""
    prob = F.softmax(logits, dim=-1)
    return -(prob * prob.clamp_min(LOG_EPS).log()).sum(dim=-1)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (N,) over ``mask`` (N,) float; zero (with gradient) when the mask is empty."""
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def _check_weight(value: float, name: str) -> float:
    return check_real(value, name, low=0.0)


class _Term(BalancingMethod):
    """What EMC and IMTD share: a teacher, the modalities and one weighted, named loss term."""

    needs_teacher = True

    def __init__(
        self, modalities: Sequence[str], weight: float, name: str, phases: Iterable[int]
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities, minimum=2)
        self.weight = _check_weight(weight, "weight")
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty str, got {name!r}.")
        self.name = name
        self.phases = check_phases(phases)

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the step's terms with the method's term (``name``) added.

        Raises:
            ModbalanceError: When the step already has a term of this name, or as the
                method's ``_term`` says.
        """
        if out.phase not in self.phases:
            return dict(losses)
        if self.name in losses:
            method = type(self).__name__
            raise ModbalanceError(
                f"{method} adds the loss term {self.name!r}, but the step already has one of "
                f"that name: give {method} another `name`."
            )
        return {**losses, self.name: self._term(out)}

    def _term(self, out: StepOutput) -> Tensor:
        raise NotImplementedError


class EMC(_Term):
    r"""Energy-guided modality coordination: pull the modalities' energies together.

    Every modality :math:`m` gets an *energy* from its features :math:`z_m` (``out.features``),
    its unimodal prediction :math:`\hat y_m` (``out.unimodal``) and its Stage-I teacher
    :math:`t_m` (``out.teacher.unimodal``), averaged over the samples :math:`P_m` that have it:

    .. math::

        E_m = \alpha\,\underbrace{\frac{1}{|P_m|\,D}\sum_{i\in P_m}\lVert z_{im}\rVert^2}_{n_m}
            + \beta\,\ell_m + \gamma\,u_m,

    with :math:`\ell_m` the unimodal loss over :math:`P_m` (**MSE** for regression, as in the
    paper; cross-entropy for classification) and :math:`u_m` the teacher's uncertainty: the
    (unbiased) variance of :math:`t_{im}` over :math:`P_m` for regression, the mean entropy of
    :math:`\operatorname{softmax}(t_{im})` for classification. The method adds the term
    ``"emc"`` (``name``)

    .. math::

        \lambda\Bigl[\sum_{m<k} h_m h_k\,(E_m - E_k)^2
            + \delta\sum_m \operatorname{mean}_{i,d}
              \Bigl(\frac{\partial\,\alpha n_m}{\partial z_{id,m}}\Bigr)^2\Bigr],
        \qquad \frac{\partial\,\alpha n_m}{\partial z_{id,m}}
              = \frac{2\alpha\,[i\in P_m]\,z_{id,m}}{|P_m|\,D},

    with :math:`h_m = [|P_m| > 0]` (a modality absent from the whole batch leaves the gap) and
    :math:`\lambda` = ``weight``. The gradient-norm regulariser covers the norm part of the
    energy only, as the released code does ("to avoid NaN from higher-order gradients"); it is
    the mean over all :math:`N \times D` entries of that gradient, squared, which is tiny
    (order :math:`\alpha^2/(ND)^2`). The gradient of ``"emc"`` reaches the encoders (through
    :math:`z_m` and :math:`\hat y_m`) and the unimodal heads, never the teachers or the fusion
    head.

    EMC has no per-modality factor (the energies are measured, not applied): it has no
    ``coefficients``. The last batch's energies are the buffer ``energies`` and
    :meth:`summary` logs them as ``energy_<m>``.

    **Deviations from the released code.**

    * *Rows are samples.* The code's rows are conversations of utterances (``[B, L, D]``,
      averaged over the utterance mask before anything else); ours are ``(N, D)`` samples, the
      code's case :math:`L = 1`.
    * *The regulariser in closed form.* The code takes the gradient with
      ``torch.autograd.grad(..., create_graph=True)``; we write it out (the same value and
      gradient, tested, no double backward, and no error where features carry no gradient).
    * *Missing modalities.* The code zero-fills missing inputs and averages over every
      sample; we average :math:`n_m`, :math:`\ell_m` and :math:`u_m` over :math:`P_m`, and a
      modality absent from the batch leaves the gap sum. A variance over fewer than two samples
      is 0 (the code's ``var()`` gives NaN for one sample).
    * *M modalities.* The code has three (``a, t, v``); the gap sums over every pair.
    * *Not in the method.* EBMC's Stage-II loss also has its backbone's terms
      :math:`0.5\,\mathcal L_{MSD} + 0.1\,\mathcal L_{CCE}` (disentanglement and
      counterfactual enhancement, parts of its architecture, not of the balancing) and the fused
      MSE; the fused term is the step's ``"task"`` (L1 for regression in this library).

    **Adam.** EMC adds a gradient direction (towards equal energies), which Adam keeps.

    Args:
        modalities: Modality names (at least two, distinct).
        weight: :math:`\lambda`, the term's weight (released ``lambda_emc = 0.1``).
        alpha: :math:`\alpha`, weight of the feature norm (released 1).
        beta: :math:`\beta`, weight of the unimodal loss (released 1).
        gamma: :math:`\gamma`, weight of the teacher's uncertainty (released 1).
        delta: :math:`\delta`, weight of the gradient-norm regulariser (released 0.01).
        name: Name of the loss term.
        phases: Phases of the dual-phase schedule in which the method acts.

    Reference:
        K. He et al., "Enhance-then-Balance Modality Collaboration for Robust Multimodal
        Sentiment Analysis", CVPR 2026 (arXiv:2604.12518). Code:
        https://github.com/kangverse/EBMC

    Example:
        >>> import torch
        >>> from modbalance.balancing import StepOutput
        >>> from modbalance.methods.ebmc import EMC
        >>> from modbalance.teachers import TeacherOutput
        >>> names = ("text", "audio")
        >>> z = {m: torch.randn(6, 4, requires_grad=True) for m in names}
        >>> uni = {m: z[m].sum(1) for m in names}
        >>> teacher = TeacherOutput({}, {m: torch.randn(6) for m in names})
        >>> out = StepOutput(z, uni, None, {}, torch.randn(6), "regression", teacher=teacher)
        >>> emc = EMC(names)
        >>> terms = emc.losses(out, {"task": torch.tensor(0.5)})
        >>> sorted(terms), terms["emc"].requires_grad
        (['emc', 'task'], True)
        >>> sorted(emc.summary())
        ['energy_audio', 'energy_text']
    """

    energies: Tensor

    _checked_state: ClassVar[dict[str, str]] = {"energies": "nonnegative"}

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        weight: float = 0.1,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        delta: float = 0.01,
        name: str = "emc",
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__(modalities, weight, name, phases)
        self.alpha = _check_weight(alpha, "alpha")
        self.beta = _check_weight(beta, "beta")
        self.gamma = _check_weight(gamma, "gamma")
        self.delta = _check_weight(delta, "delta")
        self.register_buffer("energies", torch.zeros(len(self.modalities)))

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return settings_repr(self, "weight", "alpha", "beta", "gamma", "delta", "name")

    def _inputs(self, out: StepOutput) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Features ``(N, D)``, unimodal and teacher predictions, checked, in modality order."""
        check_choice(out.task, "out.task", ("regression", "classification"))
        for what, given in (("features", out.features), ("unimodal", out.unimodal)):
            check_has_modalities(
                given, self.modalities, f"EMC needs `out.{what}` for every modality: missing"
            )
        feats = [
            check_tensor(out.features[m], f"out.features[{m!r}]", ndim=2, dtype="floating")
            for m in self.modalities
        ]
        n = feats[0].shape[0]
        preds = [
            _prediction(out.unimodal[m], out.task, f"out.unimodal[{m!r}]") for m in self.modalities
        ]
        teachers = _teachers(out, self.modalities, "EMC")
        check_target(out.target, out.task, n)
        for m, z, p, t in zip(self.modalities, feats, preds, teachers):
            if z.shape[0] != n or p.shape[0] != n or t.shape[0] != n:
                raise ModbalanceError(
                    f"EMC: modality {m!r} has features, predictions and teacher predictions for "
                    f"{z.shape[0]}, {p.shape[0]} and {t.shape[0]} samples; the batch has {n}."
                )
        return feats, preds, teachers

    def _energy(
        self, z: Tensor, pred: Tensor, teacher: Tensor, y: Tensor, mask: Tensor, task: str
    ) -> tuple[Tensor, Tensor]:
        """``(E_m, regulariser_m)`` of one modality over the samples in ``mask`` ((N,) float).

        Absent samples' values are replaced by zeros *before* any arithmetic, so that whatever
        they hold (even NaN) reaches neither the value nor the gradient.
        """
        count = mask.sum().clamp_min(1.0)
        keep = mask > 0
        z = torch.where(keep[:, None], z, 0.0)
        norm = z.square().sum() / (count * z.shape[1])
        if task == "regression":
            loss = _masked_mean((torch.where(keep, pred, 0.0) - y).square(), mask)
            t = torch.where(keep, teacher.to(mask.dtype), 0.0)
            centred = torch.where(keep, t - t.sum() / count, 0.0)
            uncertainty = centred.square().sum() / (count - 1.0).clamp_min(1.0)
        else:
            logits = torch.where(keep[:, None], pred, 0.0)
            loss = _masked_mean(F.cross_entropy(logits, y, reduction="none"), mask)
            t = torch.where(keep[:, None], teacher.to(mask.dtype), 0.0)
            uncertainty = _masked_mean(_entropy(t), mask)
        energy = self.alpha * norm + self.beta * loss + self.gamma * uncertainty
        grad = 2.0 * self.alpha * z / (count * z.shape[1])  # d(alpha * norm) / dz, absent rows 0
        return energy, grad.square().mean()

    def _term(self, out: StepOutput) -> Tensor:
        """The term ``"emc"`` (``name``) of the step.

        Raises:
            ModbalanceError: Without ``out.teacher``, a modality's features, unimodal or
                teacher prediction, or on shapes that do not fit the task.
        """
        feats, preds, teachers = self._inputs(out)
        dtype = _dtype(feats[0])
        present = _presence(out, self.modalities, feats[0].shape[0], feats[0].device).to(dtype)
        y = out.target.to(dtype) if out.task == "regression" else out.target.long()
        energies, regs = [], []
        for i, (z, p, t) in enumerate(zip(feats, preds, teachers)):
            p = p.to(dtype)
            e, r = self._energy(z.to(dtype), p, t, y, present[:, i], out.task)
            energies.append(e)
            regs.append(r)
        energy = torch.stack(energies)
        has = (present.sum(0) > 0).to(dtype)
        pairs = torch.ones(len(energies), len(energies), dtype=dtype, device=energy.device).triu(1)
        gap = ((energy[:, None] - energy[None, :]).square() * pairs * has[:, None] * has).sum()
        with torch.no_grad():
            self.energies.copy_(energy.detach() * has)
        return self.weight * (gap + self.delta * torch.stack(regs).sum())

    def summary(self) -> dict[str, float]:
        """``{"energy_<m>": E_m}`` of the last batch (zero for a modality absent from it)."""
        return {f"energy_{m}": float(e) for m, e in zip(self.modalities, self.energies.tolist())}


class IMTD(_Term):
    r"""Instance-aware modality trust distillation: distil the fused head from trusted teachers.

    Every sample :math:`i` weights the Stage-I teachers :math:`t_{im}`
    (``out.teacher.unimodal``) of the modalities :math:`P_i` it has by the trust
    :math:`w_{im}` of :func:`trust_weights`, from an uncertainty :math:`\sigma_{im}`:

    * regression: the teacher's distance to the teachers' mean,
      :math:`\sigma_{im} = \lvert t_{im} - \frac{1}{|P_i|}\sum_{k\in P_i} t_{ik}\rvert`, and the
      squared error :math:`d_{im} = (\hat y_i - t_{im})^2` of the fused prediction
      :math:`\hat y_i` (``out.fused``, the student);
    * classification: the entropy of the teacher's tempered distribution
      :math:`q_{im} = \operatorname{softmax}(t_{im}/\tau)`, and
      :math:`d_{im} = \tau^2\,\mathrm{KL}(q_{im}\,\Vert\,s_i)` with
      :math:`s_i = \operatorname{softmax}(\hat y_i/\tau)`.

    The method adds the term ``"imtd"`` (``name``)

    .. math::

        \lambda\,\frac{1}{|I|}\sum_{i\in I}\frac{1}{|P_i|}\sum_{m\in P_i} w_{im}\,d_{im},

    with :math:`I` the samples that have at least one modality and :math:`\lambda` =
    ``weight``. Its gradient reaches the fused prediction (the fusion head and, through it, the
    encoders), never the teachers or the unimodal heads. Inference is the fusion head alone
    (:meth:`predict` is ``None``), as in the released code.

    The per-modality factor is the trust: the buffer ``coefficients`` holds the last batch's
    mean trust weight of every modality, :math:`\frac{1}{|I|}\sum_{i\in I} w_{im}` (uniform
    :math:`1/M` before the first step); :meth:`summary` logs it as ``coefficient_<m>``.

    **Deviations from the released code.**

    * *Rows are samples.* The code's rows are conversations (``[B, L, C]`` averaged over the
      utterance mask first); ours are samples, the code's case :math:`L = 1`.
    * *Missing modalities.* The code zero-fills missing inputs and weighs every teacher; we
      leave a sample's absent modalities out of its mean, its weights and its
      :math:`1/|P_i|` (the code's :math:`1/M` counts the teachers it has, dropping ``None``
      ones: a modality absent from the whole batch is the code with that teacher ``None``,
      tested), and average over the samples :math:`I` that have a modality.
    * *Teachers.* The code's teachers are the unimodal heads of its own Stage-I checkpoint
      (trained with its disentanglement losses); ours are whatever ``out.teacher`` holds (e.g.
      :class:`~modbalance.teachers.UnimodalTeachers` of alone-trained models).
    * *Not in the method.* The fused MSE and the backbone's :math:`\mathcal L_{MSD}`,
      :math:`\mathcal L_{CCE}` (see :class:`EMC`).

    **Adam.** IMTD adds a distillation target, a gradient direction that Adam keeps.

    Args:
        modalities: Modality names (at least two, distinct).
        weight: :math:`\lambda`, the term's weight (released ``lambda_imtd = 0.1``).
        tau: :math:`\tau`, the distillation temperature for classification (released 1).
        name: Name of the loss term.
        phases: Phases of the dual-phase schedule in which the method acts.

    Reference:
        The paper and the code of :class:`EMC` (K. He et al., CVPR 2026, arXiv:2604.12518).

    Example:
        >>> import torch
        >>> from modbalance.balancing import StepOutput
        >>> from modbalance.methods.ebmc import IMTD
        >>> from modbalance.teachers import TeacherOutput
        >>> fused = torch.zeros(4, 3, requires_grad=True)
        >>> names = ("text", "audio")
        >>> teacher = TeacherOutput({}, {"text": torch.eye(4, 3) * 5, "audio": torch.zeros(4, 3)})
        >>> out = StepOutput({m: torch.zeros(4, 2) for m in names}, {}, fused, {},
        ...                  torch.tensor([0, 1, 2, 0]), "classification", teacher=teacher)
        >>> imtd = IMTD(names)
        >>> sorted(imtd.losses(out, {"task": torch.tensor(1.0)}))
        ['imtd', 'task']
        >>> imtd.coefficients  # the confident text teacher is trusted more
        tensor([0.8440, 0.1560])
    """

    _checked_state: ClassVar[dict[str, str]] = {"coefficients": "nonnegative"}

    coefficients: Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        *,
        weight: float = 0.1,
        tau: float = 1.0,
        name: str = "imtd",
        phases: Iterable[int] = (2,),
    ) -> None:
        super().__init__(modalities, weight, name, phases)
        self.tau = check_real(tau, "tau", low=0.0, low_inclusive=False)
        m = len(self.modalities)
        self.register_buffer("coefficients", torch.full((m,), 1.0 / m))

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return settings_repr(self, "weight", "tau", "name")

    def _inputs(self, out: StepOutput) -> tuple[Tensor, Tensor, Tensor]:
        """Student ``(N,)``/``(N, C)``, teachers ``(N, M)``/``(N, M, C)``, presence ``(N, M)``."""
        check_choice(out.task, "out.task", ("regression", "classification"))
        if out.fused is None:
            raise ModbalanceError(
                "IMTD distils the fused prediction and `out.fused` is None: run the fusion head "
                "in the phases where IMTD acts."
            )
        student = _prediction(out.fused, out.task, "out.fused")
        teachers = torch.stack(_teachers(out, self.modalities, "IMTD"), dim=1)
        if teachers.shape[0] != student.shape[0] or teachers.shape[2:] != student.shape[1:]:
            raise ModbalanceError(
                f"IMTD: the teachers' predictions (shape {tuple(teachers[:, 0].shape)}) must have "
                f"the shape of `out.fused` {tuple(student.shape)}."
            )
        present = _presence(out, self.modalities, student.shape[0], student.device)
        dtype = _dtype(student)
        return student.to(dtype), teachers.to(device=student.device, dtype=dtype), present

    def _term(self, out: StepOutput) -> Tensor:
        """The term ``"imtd"`` (``name``) of the step; updates ``coefficients``.

        Raises:
            ModbalanceError: Without ``out.teacher`` or ``out.fused``, without a modality's
                teacher prediction, or on shapes that do not fit the task.
        """
        student, teachers, present = self._inputs(out)
        if out.task == "regression":
            t = torch.where(present, teachers, 0.0)
            count = present.sum(1, keepdim=True).clamp_min(1).to(t.dtype)
            sigma = (t - t.sum(1, keepdim=True) / count).abs()
            dist = (student[:, None] - t).square()
        else:
            t = torch.where(present[..., None], teachers, 0.0)
            prob = F.softmax(t / self.tau, dim=-1)
            sigma = -(prob * prob.clamp_min(LOG_EPS).log()).sum(-1)
            logq = F.log_softmax(student / self.tau, dim=-1)[:, None, :].expand_as(prob)
            dist = F.kl_div(logq, prob, reduction="none").sum(-1) * self.tau**2
        w = trust_weights(sigma, present)
        dist = torch.where(present, dist, 0.0)
        count = present.sum(1)
        has = (count > 0).to(w.dtype)
        per_sample = (w * dist).sum(1) / count.clamp_min(1).to(w.dtype)
        term = self.weight * (per_sample * has).sum() / has.sum().clamp_min(1.0)
        with torch.no_grad():
            trust = (w * has[:, None]).sum(0) / has.sum().clamp_min(1.0)
            self.coefficients.copy_(trust.detach())
        return term
