r"""The one interface every balancing method implements: :class:`BalancingMethod`.

A balancing method plugs into the training step of a late-fusion model. The step encodes every
modality once and hands the method a :class:`StepOutput` (per-modality features and unimodal
predictions, the fused prediction, presence masks, the target). A method may act in three places,
each a method of :class:`BalancingMethod` with a do-nothing default:

1. **loss** — :meth:`BalancingMethod.losses` returns the step's named loss terms with its own
   terms added or the existing ones re-weighted (calibration, alignment, unimodal auxiliary losses,
   G-Blending weights, PMR's prototype loss). It sees the phase of the dual-phase schedule and may
   switch terms on or off with it (a schedule: MLA's alternation, the warm-up).
2. **between** ``backward()`` **and** ``optimizer.step()`` — :meth:`BalancingMethod.backward`
   may take over the backward pass (to integrate per-loss gradients, as MMPareto does) and
   :meth:`BalancingMethod.around_step` is a context manager wrapped around ``optimizer.step()``:
   code before its ``yield`` changes gradients, code after it changes the update (OGM-GE, the
   Shapley modulator, AGM, CGGM).
3. **epoch end** — :meth:`BalancingMethod.epoch_end` lets a method re-measure itself once an
   epoch (G-Blending's overfitting-to-generalisation ratios).

Every method declares the phases of the dual-phase schedule it acts in
(:attr:`~BalancingMethod.phases`, phase 2 by default: after the warm-up).
:func:`balanced_step` is the one step a training loop calls; it checks the phases once
and runs, for the methods active in ``out.phase``::

    losses = m.losses(out, losses) for every method, in order   # conflicts refused
    the one method that takes over the backward, else sum(losses).backward()
    with m.around_step(out, optimizer) for every method: optimizer.step()

Two methods that write the same loss term, or two that take over the backward pass, are an
error naming both (:class:`~modbalance.ModbalanceError`): their effects would silently overwrite
each other.

Inputs are always matched by modality **name**: features, predictions and masks are
``{name: tensor}`` mappings and methods hold their own tuple of names.

Example:
    >>> import torch
    >>> from modbalance.balancing import BalancingMethod, StepOutput
    >>> class DoubleText(BalancingMethod):
    ...     def losses(self, out, losses):
    ...         return {**losses, "text_extra": out.unimodal["text"].abs().mean()}
    >>> out = StepOutput(
    ...     features={"text": torch.ones(2, 3)}, unimodal={"text": torch.ones(2)},
    ...     fused=torch.zeros(2), present={"text": torch.ones(2, dtype=torch.bool)},
    ...     target=torch.zeros(2), task="regression")
    >>> sorted(DoubleText().losses(out, {"task": torch.tensor(0.5)}))
    ['task', 'text_extra']
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from modbalance._checks import ModbalanceError, check_choice, check_int
from modbalance._state import ModalityState

__all__ = [
    "BalancingMethod",
    "StepOutput",
    "balanced_step",
    "check_phases",
    "combine_losses",
    "task_loss",
    "unimodal_task_loss",
    "unimodal_terms",
]

PHASES = (1, 2)


def check_phases(phases: Any, name: str = "phases") -> tuple[int, ...]:
    """Check a collection of dual-phase schedule phases (``1`` warm-up, ``2`` joint).

    An int is one phase; strings are refused (``"2"`` would be the character ``'2'``).

    Example:
        >>> from modbalance.balancing import check_phases
        >>> check_phases(2), check_phases([1, 2])
        ((2,), (1, 2))
    """
    if isinstance(phases, bool) or isinstance(phases, (str, bytes)):
        raise TypeError(
            f"`{name}` must be phase numbers such as (2,) or (1, 2), got {phases!r} "
            f"({type(phases).__name__})."
        )
    if isinstance(phases, int):
        phases = (phases,)
    if not isinstance(phases, Iterable):
        raise TypeError(f"`{name}` must be phase numbers such as (2,) or (1, 2), got {phases!r}.")
    out = tuple(check_int(p, name) for p in phases)
    if not out:
        raise ModbalanceError(f"`{name}` must list at least one phase of the schedule, got none.")
    bad = [p for p in out if p not in PHASES]
    if bad:
        raise ModbalanceError(
            f"`{name}` must contain phases of the dual-phase schedule {PHASES}, got {bad[0]!r}."
        )
    return out


class StepOutput(NamedTuple):
    """What one training step of a late-fusion model provides to balancing methods.

    Every mapping is keyed by modality name. Tensors carry gradient exactly as the model produced
    them (features and unimodal predictions reach the encoders).
    """

    #: ``{m: (N, D)}`` per-modality features (encoder outputs).
    features: Mapping[str, Tensor]
    #: ``{m: (N,)}`` regression predictions or ``{m: (N, C)}`` logits of each unimodal head.
    unimodal: Mapping[str, Tensor]
    #: ``(N,)`` or ``(N, C)`` fused prediction; ``None`` when the fusion head is not run.
    fused: Tensor | None
    #: ``{m: (N,) bool}`` which samples have modality ``m``.
    present: Mapping[str, Tensor]
    #: ``(N,)`` float regression target or int64 class indices.
    target: Tensor
    #: ``"regression"`` or ``"classification"``.
    task: str
    #: Phase of the dual-phase schedule (1 warm-up, 2 joint).
    phase: int = 2
    #: The fusion head as ``fuse(features, present) -> prediction`` (for methods that query it
    #: with other coalitions or other features, such as AGM or MLA); ``None`` if not available.
    fuse: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Tensor] | None = None
    #: :class:`~modbalance.shapley.GameResult` of this batch when a method asked for it
    #: (``needs_game = True``), else ``None``.
    game: Any = None
    #: Global step counter of the training loop (0-based).
    step: int = 0
    #: :class:`~modbalance.teachers.TeacherOutput` of frozen alone-trained unimodal models on
    #: this batch, for methods that distil from them (``needs_teacher = True``), else ``None``.
    teacher: Any = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names, in the order of :attr:`features`."""
        return tuple(self.features)


class BalancingMethod(ModalityState, nn.Module):
    """Base class of balancing methods: three optional hooks, all no-ops by default.

    Subclasses override what they need. State (coefficients, weights, counters) lives in
    registered buffers so that ``state_dict()``, ``.to()`` and checkpoints work.

    Attributes:
        needs_game: Set to ``True`` when :meth:`around_step` or :meth:`losses` reads
            :attr:`StepOutput.game`; the training step then evaluates the Shapley game of the
            batch (one batched, no-grad head pass) and passes it in.
        takes_backward: Set to ``True`` when :meth:`backward` runs the backward pass itself
            (MMPareto); :func:`balanced_step` refuses two such methods before running either.
        phases: The phases of the dual-phase schedule in which the method acts (``(2,)``: after
            the warm-up). :func:`balanced_step` skips the method in other phases.
        needs_holdout: Set to ``True`` when :meth:`epoch_end` evaluates on a held-out part of
            the training data (G-Blending); a training loop then splits one off.
        needs_teacher: Set to ``True`` when the method reads :attr:`StepOutput.teacher`, the
            outputs of frozen alone-trained unimodal models (UMT, G2D, EBMC);
            :func:`balanced_step` refuses a step without them.

    What a method may offer, and a loop calls without probing for it: :meth:`predict` (its own
    inference rule; ``None`` by default), :meth:`summary` (scalars to log once per epoch) and the
    per-modality factor it applies as ``coefficients``, a ``(M,)`` tensor in the order of
    ``modalities``. Random generators a method owns are part of its ``state_dict()``.
    """

    needs_game: bool = False
    takes_backward: bool = False
    needs_holdout: bool = False
    needs_teacher: bool = False
    phases: tuple[int, ...] = (2,)

    def losses(self, out: StepOutput, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the step's loss terms, with this method's terms added or re-weighted.

        Args:
            out: The step's outputs.
            losses: The named loss terms so far (scalars with gradient).

        Returns:
            The new mapping of named terms; the step minimises their sum. The default returns
            ``losses`` unchanged.
        """
        return dict(losses)

    def backward(self, out: StepOutput, losses: Mapping[str, Tensor]) -> bool:
        """Optionally run the backward pass yourself; return ``True`` if you did.

        The default returns ``False`` and the step calls ``sum(losses).backward()``. A method
        that overrides this sets :attr:`takes_backward`; at most one such method may be active.
        """
        return False

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """Context manager around ``optimizer.step()``: gradients before, updates after.

        Code before ``yield`` runs after ``backward()`` (and after DDP's gradient all-reduce),
        code after ``yield`` runs after ``optimizer.step()``. The default does nothing.
        """
        yield

    def epoch_end(self, epoch: int, evaluate: Callable[..., Any] | None = None) -> None:
        """Called once at the end of every training epoch (default: nothing)."""
        return None

    def predict(
        self, features: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor | None:
        """The method's own inference rule from ``{modality: (N, D)}`` features, or ``None``.

        ``None`` (the default) means: use the model's fused prediction. MLA overrides it.
        """
        return None

    def summary(self) -> dict[str, float]:
        """Scalars worth logging once per epoch (one host sync; never call it in a step).

        The default: ``{"coefficient_<m>": k_m}`` from :attr:`coefficients` when the method has
        them, else ``{}``. Methods add their own entries.
        """
        coefficients = getattr(self, "coefficients", None)
        names = getattr(self, "modalities", ())
        if not isinstance(coefficients, Tensor) or coefficients.shape != (len(names),):
            return {}
        return {f"coefficient_{m}": float(k) for m, k in zip(names, coefficients.tolist())}


def combine_losses(losses: Mapping[str, Tensor]) -> Tensor:
    """Sum named loss terms into one scalar (an empty mapping is an error).

    Example:
        >>> import torch
        >>> from modbalance.balancing import combine_losses
        >>> combine_losses({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
        tensor(3.)
    """
    if not losses:
        raise ValueError("`losses` is empty: the step has nothing to minimise.")
    terms = list(losses.values())
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def task_loss(pred: Tensor, target: Tensor, task: str, reduction: str = "mean") -> Tensor:
    """The task loss every method and the step use: L1 for regression, cross-entropy otherwise.

    MMSA trains sentiment regression with the L1 loss (MAE), classification with cross-entropy.

    Only structural checks run here (shapes and dtypes, no host synchronisation: this is the
    training hot path). A regression target must have shape ``(N,)`` even where the prediction
    is ``(N, 1)``: the methods compare ``out.target`` element-wise with ``(N,)`` predictions, so
    an ``(N, 1)`` target would broadcast to ``(N, N)`` there; it is refused rather than squeezed.
    Class indices outside ``[0, C - 1]`` are not checked here (that needs the values): torch's
    cross-entropy raises on them.

    Args:
        pred: ``(N,)`` (or ``(N, 1)``) predictions, or ``(N, C)`` logits.
        target: ``(N,)`` float targets or integer class indices (int64, or any integer or bool
            dtype; a floating target is refused for classification, it is never truncated).
        task: ``"regression"`` or ``"classification"``.
        reduction: ``"mean"`` or ``"none"`` (per-sample losses).

    Raises:
        TypeError: If ``pred`` or ``target`` is not a tensor, or ``target`` is floating (or
            complex) with ``task="classification"``.
        ModbalanceError: If the shapes do not fit the task: a regression ``pred`` that is not
            ``(N,)``/``(N, 1)``, a classification ``pred`` that is not ``(N, C)`` logits, a
            ``target`` that is not ``(N,)`` (e.g. ``(N, 1)``) or has another length than ``pred``.
        ValueError: If ``task`` is unknown.

    Example:
        >>> import torch
        >>> from modbalance.balancing import task_loss
        >>> task_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), "regression")
        tensor(1.)
        >>> task_loss(torch.zeros(2, 3), torch.tensor([0.0, 2.0]), "classification")
        Traceback (most recent call last):
            ...
        TypeError: `target` must hold integer class indices for task='classification', ...
    """
    if task not in ("regression", "classification"):
        raise ValueError(f"`task` must be 'regression' or 'classification', got {task!r}.")
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, Tensor):
            raise TypeError(
                f"`{name}` of task_loss must be a torch.Tensor, got {type(x).__name__}."
            )
    if task == "regression":
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.shape != target.shape:
            shape_p, shape_t = tuple(pred.shape), tuple(target.shape)
            if pred.ndim == 2:
                raise ModbalanceError(
                    f"a regression `pred` must have shape (N,) or (N, 1), got {shape_p}; for "
                    f"{shape_p[1]}-class logits pass task='classification' (with integer class "
                    "indices as `target`)."
                )
            if target.ndim == 2 and target.shape[1] == 1 and target.shape[0] == pred.shape[0]:
                raise ModbalanceError(
                    f"a regression `target` must have shape (N,) = {shape_p}, got {shape_t}: pass "
                    "`target.view(-1)` (one value per sample; an (N, 1) target would broadcast "
                    "against the (N,) predictions)."
                )
            raise ModbalanceError(
                f"a regression `target` must have shape (N,) with one value per prediction, "
                f"got `target` of shape {shape_t} for `pred` of shape {shape_p}."
            )
        return nn.functional.l1_loss(pred.float(), target.float(), reduction=reduction)
    if target.is_floating_point() or target.is_complex():
        raise TypeError(
            "`target` must hold integer class indices for task='classification', got dtype "
            f"{target.dtype}: task_loss does not truncate fractional labels. Pass class indices "
            "(`target.long()` after checking the values are whole), or task='regression' for "
            "continuous targets."
        )
    if pred.ndim != 2:
        raise ModbalanceError(
            f"a classification `pred` must be (N, C) logits, got shape {tuple(pred.shape)}; for "
            "one output per sample pass task='regression'."
        )
    if target.shape != pred.shape[:1]:
        n, shape_t = pred.shape[0], tuple(target.shape)
        if target.ndim == 2 and target.shape[0] == n:
            fix = (
                "pass `target.view(-1)`"
                if target.shape[1] == 1
                else "for one-hot labels pass `target.argmax(-1)`"
            )
            raise ModbalanceError(
                f"a classification `target` must have shape (N,) = ({n},) of class indices, got "
                f"{shape_t}; {fix}."
            )
        raise ModbalanceError(
            f"a classification `target` must have shape (N,) with one class index per row of "
            f"`pred`, got `target` of shape {shape_t} for `pred` of shape {tuple(pred.shape)}."
        )
    return nn.functional.cross_entropy(pred.float(), target.long(), reduction=reduction)


def unimodal_task_loss(
    pred: Tensor, target: Tensor, task: str, present: Tensor | None = None
) -> Tensor:
    r"""Task loss of one modality's prediction, averaged over the samples that have the modality.

    .. math::

        \mathcal L_m = \frac{\sum_i [\text{present}_{im}]\;\ell(\hat y_{im}, y_i)}
                            {\max\bigl(1, \sum_i [\text{present}_{im}]\bigr)},

    with :math:`\ell` the L1 loss (regression) or the cross-entropy (classification) of
    :func:`~modbalance.balancing.task_loss`. A batch without the modality gives a zero that still
    belongs to the autograd graph (its gradient is zero), so callers never need a special case.

    Args:
        pred: ``(N,)``/``(N, 1)`` predictions or ``(N, C)`` logits of the unimodal head.
        target: ``(N,)`` targets.
        task: ``"regression"`` or ``"classification"``.
        present: ``(N,)`` boolean presence mask, or ``None`` (every sample present).

    Returns:
        A scalar loss.

    Raises:
        TypeError: A floating ``target`` with ``task="classification"`` (see
            :func:`~modbalance.balancing.task_loss`).
        ModbalanceError: A ``target`` that is not ``(N,)`` (e.g. ``(N, 1)``), shapes of ``pred``
            and ``target`` that do not fit the task, or a presence mask that is not ``(N,)``.

    Example:
        >>> import torch
        >>> from modbalance.balancing import unimodal_task_loss
        >>> pred, y = torch.tensor([0.0, 3.0]), torch.tensor([1.0, 1.0])
        >>> unimodal_task_loss(pred, y, "regression", torch.tensor([True, False]))
        tensor(1.)
    """
    per = task_loss(pred, target, task, reduction="none")
    if present is None:
        return per.mean()
    if present.shape != per.shape:
        raise ModbalanceError(
            f"the presence mask must have shape {tuple(per.shape)} (one flag per sample), got "
            f"shape {tuple(present.shape)}."
        )
    mask = present.to(device=per.device, dtype=per.dtype)
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


def check_unimodal(out: StepOutput, modalities: Sequence[str], method: str) -> None:
    """A known task and a unimodal prediction in ``out`` for every modality, or a clear error."""
    check_choice(out.task, "out.task", ("regression", "classification"))
    missing = [m for m in modalities if m not in out.unimodal]
    if missing:
        raise ModbalanceError(
            f"{method} needs a unimodal prediction for every modality: `out.unimodal` is missing "
            f"{missing[0]!r} (has {sorted(out.unimodal)}); give the model one head per modality."
        )


def unimodal_terms(
    out: StepOutput, modalities: Sequence[str], weights: Tensor | None, method: str
) -> dict[str, Tensor]:
    r"""``{"unimodal_<m>": w_m * L_m}`` for every modality (gradient-carrying).

    :math:`L_m` is :func:`unimodal_task_loss` of ``out.unimodal[m]`` over the samples that have
    the modality (``out.present``).

    Args:
        out: The step's outputs; ``out.unimodal`` needs every modality.
        modalities: The modality names, in the order of ``weights``.
        weights: ``(M,)`` weights :math:`w_m`, or ``None`` (every :math:`w_m = 1`).
        method: The calling method's name, for the error message.

    Returns:
        One scalar loss term per modality.

    Raises:
        ModbalanceError: If ``out.unimodal`` lacks a modality or ``out.task`` is unknown.

    Example:
        >>> import torch
        >>> from modbalance.balancing import StepOutput, unimodal_terms
        >>> pred = {"text": torch.tensor([1.0, 2.0]), "audio": torch.tensor([0.0, 0.0])}
        >>> out = StepOutput(features={}, unimodal=pred, fused=None, present={},
        ...                  target=torch.tensor([1.0, 1.0]), task="regression")
        >>> terms = unimodal_terms(out, ["text", "audio"], torch.tensor([1.0, 2.0]), "demo")
        >>> {k: float(v) for k, v in terms.items()}
        {'unimodal_text': 0.5, 'unimodal_audio': 2.0}
    """
    check_unimodal(out, modalities, method)
    terms: dict[str, Tensor] = {}
    for i, m in enumerate(modalities):
        loss = unimodal_task_loss(out.unimodal[m], out.target, out.task, out.present.get(m))
        if weights is not None:
            loss = weights[i].to(device=loss.device, dtype=loss.dtype) * loss
        terms[f"unimodal_{m}"] = loss
    return terms


def _label(method: BalancingMethod, index: int) -> str:
    return f"{type(method).__name__} (methods[{index}])"


def _apply_losses(
    out: StepOutput, losses: Mapping[str, Tensor], methods: Sequence[tuple[int, BalancingMethod]]
) -> dict[str, Tensor]:
    """Run every method's :meth:`~BalancingMethod.losses`, refusing two writers of one term.

    A term *written* by a method is one it adds, replaces or removes. The model's own terms
    (``losses`` as passed in) may be replaced or removed by one method; a term another method has
    already written may not.
    """
    current = dict(losses)
    owner: dict[str, str] = {}
    for i, method in methods:
        new = method.losses(out, current)
        if not isinstance(new, Mapping):
            raise TypeError(
                f"{_label(method, i)}.losses must return a mapping of named loss terms, got "
                f"{type(new).__name__}."
            )
        for key in [*current, *(k for k in new if k not in current)]:
            if key in current and key in new and new[key] is current[key]:
                continue
            if key in owner:
                verb = "removes" if key not in new else "writes"
                raise ModbalanceError(
                    f"{_label(method, i)} {verb} the loss term {key!r} that {owner[key]} already "
                    "wrote: one would silently overwrite the other. Use one of them, or give one "
                    "different term names (e.g. its `replace`/`weight` options)."
                )
            owner[key] = _label(method, i)
        current = dict(new)
    return current


def balanced_step(
    out: StepOutput,
    losses: Mapping[str, Tensor],
    methods: Sequence[BalancingMethod],
    optimizer: torch.optim.Optimizer,
    *,
    game: Callable[[Mapping[str, Tensor], Tensor], Any] | None = None,
    game_every: int = 1,
    zero_grad: bool = True,
) -> dict[str, Tensor]:
    r"""The one training step: methods' losses, one backward, ``around_step``, ``optimizer.step()``.

    Call it after your model's forward pass with the step's outputs and your own loss terms
    (:meth:`DualPhaseSchedule.base_losses <modbalance.schedule.DualPhaseSchedule.base_losses>`
    gives the warm-up's and the joint phase's). For the methods whose
    :attr:`~BalancingMethod.phases` contain ``out.phase``, in order:

    1. the Shapley game of the batch, when one of them ``needs_game`` and ``out.game`` is
       ``None``: ``game(detached features, target)`` every ``game_every`` steps
       (:class:`~modbalance.shapley.ModalityGame` or
       :class:`~modbalance.shapley.InputMaskingGame` bound to your model);
    2. ``losses = method.losses(out, losses)``; two methods writing one term is an error;
    3. ``optimizer.zero_grad()`` (unless ``zero_grad=False``), then the backward pass of
       :math:`\sum_k \mathcal L_k`, or of the one method with ``takes_backward``;
    4. ``optimizer.step()`` inside every method's :meth:`~BalancingMethod.around_step`.

    No host synchronisation happens here: the returned loss terms stay on the device.

    Args:
        out: The step's outputs (``out.phase`` selects the active methods).
        losses: Your model's named loss terms (scalars with gradient).
        methods: Balancing methods, applied in this order.
        optimizer: The optimizer over the model's (and the methods') parameters.
        game: Callable ``(features, target) -> GameResult`` for methods that need a game.
        game_every: Evaluate the game every this many steps (``out.step % game_every == 0``).
        zero_grad: Zero the gradients before the backward pass.

    Returns:
        The final named loss terms, detached.

    Raises:
        ModbalanceError: Two methods write the same loss term or both take over the backward
            pass; a method needs a game and neither ``out.game`` nor ``game`` is given.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance import StepOutput, UnimodalLoss, balanced_step
        >>> enc = nn.ModuleDict({"text": nn.Linear(4, 2), "audio": nn.Linear(3, 2)})
        >>> heads = nn.ModuleDict({m: nn.Linear(2, 1) for m in enc})
        >>> opt = torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1)
        >>> x = {"text": torch.randn(8, 4), "audio": torch.randn(8, 3)}
        >>> feats = {m: enc[m](x[m]) for m in enc}
        >>> uni = {m: heads[m](feats[m]).squeeze(-1) for m in enc}
        >>> fused = (uni["text"] + uni["audio"]) / 2
        >>> out = StepOutput(feats, uni, fused, {m: torch.ones(8, dtype=torch.bool) for m in enc},
        ...                  torch.randn(8), "regression", phase=2)
        >>> terms = balanced_step(out, {"task": (fused - out.target).abs().mean()},
        ...                       [UnimodalLoss(["text", "audio"])], opt)
        >>> sorted(terms)
        ['task', 'unimodal_audio', 'unimodal_text']
    """
    game_every = check_int(game_every, "game_every", low=1)
    active = _active(out, methods)
    takers = [(i, m) for i, m in active if m.takes_backward]
    if len(takers) > 1:
        names = " and ".join(_label(m, i) for i, m in takers)
        raise ModbalanceError(
            f"{names} both take over the backward pass; only one gradient-combining method can "
            "be active in a phase (give them disjoint `phases`, or use one)."
        )
    out = _with_inputs(out, active, game, game_every)
    losses = _apply_losses(out, losses, active)
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    if not (takers and takers[0][1].backward(out, losses)):
        combine_losses(losses).backward()
    with contextlib.ExitStack() as stack:
        for _, method in active:
            stack.enter_context(method.around_step(out, optimizer))
        optimizer.step()
    return {k: v.detach() for k, v in losses.items()}


def _active(
    out: StepOutput, methods: Sequence[BalancingMethod]
) -> list[tuple[int, BalancingMethod]]:
    """Check ``out`` and ``methods``; the ``(index, method)`` pairs active in ``out.phase``."""
    if not isinstance(out, StepOutput):
        raise TypeError(f"`out` must be a StepOutput, got {type(out).__name__}.")
    if isinstance(out.phase, bool) or not isinstance(out.phase, int) or out.phase not in PHASES:
        raise ModbalanceError(
            f"`out.phase` must be the int 1 (warm-up) or 2 (joint), got {out.phase!r}."
        )
    if isinstance(methods, BalancingMethod) or not isinstance(methods, Sequence):
        raise TypeError(
            "`methods` must be a list of BalancingMethod instances (possibly empty), got "
            f"{type(methods).__name__}."
        )
    for i, method in enumerate(methods):
        if not isinstance(method, BalancingMethod):
            raise TypeError(
                f"`methods[{i}]` must be a BalancingMethod, got {type(method).__name__}."
            )
    return [(i, m) for i, m in enumerate(methods) if out.phase in check_phases(m.phases)]


def _with_inputs(
    out: StepOutput, active: Sequence[tuple[int, BalancingMethod]], game: Any, game_every: int
) -> StepOutput:
    """``out`` with the batch's game when an active method needs it; teachers checked."""
    wanting = [(i, m) for i, m in active if m.needs_game]
    if wanting and out.game is None and out.step % game_every == 0:
        if game is None:
            raise ModbalanceError(
                f"{_label(wanting[0][1], wanting[0][0])} needs the batch's Shapley game: pass "
                "`game=` (a ModalityGame or InputMaskingGame bound to your model) or set "
                "`out.game`."
            )
        feats = {m: f.detach().float() for m, f in out.features.items()}
        out = out._replace(game=game(feats, out.target))
    needing = [(i, m) for i, m in active if m.needs_teacher]
    if needing and out.teacher is None:
        raise ModbalanceError(
            f"{_label(needing[0][1], needing[0][0])} distils from alone-trained unimodal "
            "teachers and `out.teacher` is None: wrap your trained unimodal models in "
            "modbalance.teachers.UnimodalTeachers and pass "
            "`out._replace(teacher=teachers(inputs))`."
        )
    return out
