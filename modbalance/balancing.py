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

The training step calls them in this order (``examples/pase``'s ``train_step`` is the reference)::

    out = model_forward(batch)                     # StepOutput, one encoder pass
    losses = base_losses(out)                      # {"task": ..., "unimodal": ...}
    for m in methods: losses = m.losses(out, losses)
    if not any(m.backward(out, losses) for m in methods):   # at most one may take over
        sum(losses.values()).backward()
    with ExitStack() as stack:
        for m in methods: stack.enter_context(m.around_step(out, optimizer))
        optimizer.step()

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
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["BalancingMethod", "StepOutput", "combine_losses", "task_loss"]


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

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names, in the order of :attr:`features`."""
        return tuple(self.features)


class BalancingMethod(nn.Module):
    """Base class of balancing methods: three optional hooks, all no-ops by default.

    Subclasses override what they need. State (coefficients, weights, counters) lives in
    registered buffers so that ``state_dict()``, ``.to()`` and checkpoints work.

    Attributes:
        needs_game: Set to ``True`` when :meth:`around_step` or :meth:`losses` reads
            :attr:`StepOutput.game`; the training step then evaluates the Shapley game of the
            batch (one batched, no-grad head pass) and passes it in.
    """

    needs_game: bool = False

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

        The default returns ``False`` and the step calls ``sum(losses).backward()``. At most one
        method of a step may return ``True``.
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

    Args:
        pred: ``(N,)`` (or ``(N, 1)``) predictions, or ``(N, C)`` logits.
        target: ``(N,)`` float targets or int64 class indices.
        task: ``"regression"`` or ``"classification"``.
        reduction: ``"mean"`` or ``"none"`` (per-sample losses).

    Example:
        >>> import torch
        >>> from modbalance.balancing import task_loss
        >>> task_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), "regression")
        tensor(1.)
    """
    if task == "regression":
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        return nn.functional.l1_loss(pred.float(), target.float(), reduction=reduction)
    if task == "classification":
        return nn.functional.cross_entropy(pred.float(), target.long(), reduction=reduction)
    raise ValueError(f"`task` must be 'regression' or 'classification', got {task!r}.")
