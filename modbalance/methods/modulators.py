r"""Per-modality modulation of gradients or updates: :class:`ShapleyGradModulator`, OGM-GE.

A modulator holds explicit parameter *groups*, one per modality, turns per-modality signals into
coefficients :math:`k_m \in [0, 1]` (:meth:`~ShapleyGradModulator.observe`) and slows each
group's learning by its coefficient on every optimizer step. Two ways to apply :math:`k_m`:

* ``apply="update"`` (default) rescales the parameter **update** of the optimizer,
  :math:`\theta \leftarrow \theta_\text{old} + k_m (\theta_\text{new} - \theta_\text{old})`.
  This works with every optimizer, Adam/AdamW included.
* ``apply="grad"`` multiplies the **gradients**, :math:`g \leftarrow k_m g`, before
  ``optimizer.step()``. Under SGD this equals scaling that branch's loss; under Adam, AdamW,
  RMSprop or Adagrad it has almost **no effect**, because these optimizers divide the gradient
  by a running estimate of its own magnitude, so a constant factor cancels (the official PaSE
  code measured exactly zero change). A warning says so when such an optimizer is used.

Both modes work through one plain call that replaces ``optimizer.step()``::

    loss.backward()
    modulator.observe(game_result)      # any time before the step: GameResult or {name: value}
    modulator.step(optimizer)           # = optimizer.step() with the modulation applied

``attach(optimizer)`` registers optimizer hooks instead (then keep calling ``optimizer.step()``),
and as a :class:`~modbalance.balancing.BalancingMethod` a modulator derives its own signal from
the training step's :class:`~modbalance.balancing.StepOutput` in
:meth:`~ShapleyGradModulator.around_step`. Signals are matched to groups by modality **name**:
``observe`` takes a :class:`~modbalance.shapley.GameResult`, a
:class:`~modbalance.shapley.ShapleyResult` with player names, or a ``{name: value}`` mapping,
never a bare tensor whose order could silently disagree with the groups.

Under ``torch.distributed`` (DDP) the modulation runs after ``backward()`` has averaged the
gradients over ranks, and ``observe`` averages the signals over ranks, so every rank scales
identical gradients or updates by identical coefficients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_finite,
    check_int,
    check_modality_keys,
    check_real,
    check_signal,
    check_tensor,
    value_checks_enabled,
)
from modbalance._groups import ADAPTIVE_OPTIMIZERS, GroupScaler, parse_groups, warn_adaptive
from modbalance.balancing import BalancingMethod, StepOutput
from modbalance.distributed import all_reduce_mean, all_reduce_sum, rank, world_size
from modbalance.metrics import pase_shares
from modbalance.shapley import GameResult, ShapleyResult

__all__ = [
    "ModulatorHandle",
    "OGMGEModulator",
    "ShapleyGradModulator",
    "ogmge_coefficients",
    "pase_coefficients",
]


# --------------------------------------------------------------------------------------------
# coefficient rules (functional)
# --------------------------------------------------------------------------------------------


def pase_coefficients(contributions: Tensor) -> Tensor:
    r"""PaSE modulation coefficients from contributions.

    With the shares :math:`\psi` of :func:`~modbalance.metrics.pase_shares`,

    .. math::

        k_m = \exp\!\Bigl(\frac{\min_j \psi_j}{\psi_m} - 1\Bigr) \in (e^{-1}, 1],

    so the weakest modality keeps :math:`k = 1` and the dominant one is slowed the most. A
    modality with :math:`\psi_m = 0` is the weakest and gets :math:`k_m = 1`; when some
    :math:`\psi_m = 0`, every modality with a positive share gets :math:`e^{-1}` (the limit).
    No host synchronisation.

    Args:
        contributions: ``(..., M)`` floating contributions.

    Returns:
        ``(..., M)`` coefficients.

    Example:
        >>> import torch
        >>> from modbalance.methods.modulators import pase_coefficients
        >>> pase_coefficients(torch.tensor([0.6, 0.2, 0.2])).round(decimals=4)
        tensor([0.5134, 1.0000, 1.0000])
    """
    return _coefficients_of_shares(pase_shares(contributions))


def _coefficients_of_shares(shares: Tensor) -> Tensor:
    r""":func:`pase_coefficients` from the shares :math:`\psi` themselves."""
    tiny = torch.finfo(shares.dtype).tiny
    psi_min = shares.amin(-1, keepdim=True)
    ratio = torch.where(shares > 0, psi_min / shares.clamp_min(tiny), torch.ones_like(shares))
    return torch.exp(ratio - 1.0)


def ogmge_coefficients(scores: Tensor, alpha: float = 0.1, *, continuous: bool = True) -> Tensor:
    r"""OGM-GE modulation coefficients for :math:`M` modalities.

    OGM-GE (Peng et al., CVPR 2022) compares the two modalities' scores
    :math:`s_m` (the summed softmax probability of the true class, or any *positive*,
    higher-is-better unimodal score such as :math:`\exp(-\text{MAE}_m)`) and damps the dominant
    one. For :math:`M` modalities we compare each one with the mean of the others,

    .. math::

        \rho_m = \frac{s_m}{\frac{1}{M-1}\sum_{j \ne m} s_j}, \qquad
        k_m = 1 - \tanh\bigl(\alpha\,\operatorname{relu}(\rho_m - 1)\bigr),

    which reduces to the pairwise ratio :math:`s_a / s_v` for :math:`M = 2`. Only modalities
    ahead of the others (:math:`\rho_m > 1`) are damped, and :math:`k` is continuous at
    :math:`\rho_m = 1`. With ``continuous=False`` the released code's form is used instead:
    :math:`k_m = 1 - \tanh(\alpha \rho_m)` if :math:`\rho_m > 1`, else 1 (it jumps from 1 to
    :math:`1 - \tanh(\alpha)` at :math:`\rho_m = 1`), which reproduces the original exactly for
    two modalities, ties included: the released code computes :math:`\rho_2 = s_2/s_1` and
    :math:`\rho_1 = 1/\rho_2` and damps the second modality if :math:`\rho_2 > 1`, otherwise
    (equal scores too) the first. For :math:`M > 2` the modalities with :math:`\rho_m > 1`
    are damped, and when all scores are equal the first one is, as in the two-modality rule.
    The sum of the other scores is formed directly, not as ``sum - s_m``, so nearly equal
    scores do not cancel.

    Args:
        scores: ``(..., M)`` positive, finite scores, :math:`M \ge 2`.
        alpha: Modulation strength :math:`\alpha \ge 0` (0.1 in the paper's CREMA-D setting).
        continuous: Use :math:`\rho_m - 1` (default) or the original :math:`\rho_m`.

    Returns:
        ``(..., M)`` coefficients in :math:`(0, 1]`.

    Example:
        >>> import torch
        >>> from modbalance.methods.modulators import ogmge_coefficients
        >>> ogmge_coefficients(torch.tensor([30.0, 10.0]), alpha=0.5).round(decimals=4)
        tensor([0.2384, 1.0000])
    """
    check_signal(scores, "scores", positive=True)
    alpha = check_real(alpha, "alpha", low=0.0)
    m = scores.shape[-1]
    if m < 2:
        raise ModbalanceError(
            f"`scores` must hold at least 2 modalities in its last dimension, got shape "
            f"{tuple(scores.shape)}."
        )
    ratio = _ratio_to_others(scores)
    if continuous:
        return 1.0 - torch.tanh(alpha * torch.relu(ratio - 1.0))
    if m == 2:
        # The released code: ratio_v = s_v / s_a, ratio_a = 1 / ratio_v; if ratio_v > 1 damp
        # the second modality, else (ties included) damp the first.
        r2 = scores[..., 1] / scores[..., 0]
        r1 = 1.0 / r2
        second = r2 > 1
        one = torch.ones_like(r2)
        k1 = torch.where(second, one, 1.0 - torch.tanh(alpha * r1))
        k2 = torch.where(second, 1.0 - torch.tanh(alpha * r2), one)
        return torch.stack([k1, k2], -1)
    ahead = ratio > 1
    # all tied (no modality ahead): damp the first one, as the released two-modality code does
    first = torch.zeros_like(ahead)
    first[..., 0] = True
    ahead = torch.where(ahead.any(-1, keepdim=True), ahead, first)
    return torch.where(ahead, 1.0 - torch.tanh(alpha * ratio), torch.ones_like(ratio))


def _ratio_to_others(scores: Tensor) -> Tensor:
    """``s_m`` over the mean of the other entries, the others summed directly (no cancellation)."""
    m = scores.shape[-1]
    eye = torch.eye(m, dtype=torch.bool, device=scores.device)
    others = torch.where(eye, torch.zeros_like(scores).unsqueeze(-2), scores.unsqueeze(-2))
    return scores * (m - 1) / others.sum(-1)


# --------------------------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------------------------


class ModulatorHandle:
    """Removable handle returned by ``attach``; also a context manager.

    ``remove()`` unregisters the optimizer hooks (idempotent). Leaving a ``with`` block removes
    them too, also when the block raises.
    """

    def __init__(self, modulator: _GroupModulator, hooks: list[Any]) -> None:
        self._modulator = modulator
        self._hooks = hooks

    def remove(self) -> None:
        """Unregister the optimizer hooks."""
        while self._hooks:
            self._hooks.pop().remove()
        if self._modulator._handle is self:
            self._modulator._handle = None
            self._modulator._snapshots = None
            self._modulator._last_signature = None

    def __enter__(self) -> ModulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _GroupModulator(BalancingMethod):
    """Groups, EMA coefficients in buffers, and the grad/update application machinery."""

    _checked_state: ClassVar[dict[str, str]] = {"coefficients": "nonnegative"}

    def __init__(
        self,
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]],
        momentum: float,
        apply: str,
        min_coefficient: float,
        game_every: int = 1,
    ) -> None:
        super().__init__()
        names, params = parse_groups(groups)
        self.modalities: tuple[str, ...] = names
        self._group_params: list[list[nn.Parameter]] = params  # plain list: not registered
        self._scaler = GroupScaler(names, params, type(self).__name__)
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
        self.apply_mode: str = check_choice(apply, "apply", ("update", "grad"))
        self.min_coefficient = check_real(min_coefficient, "min_coefficient", low=0.0, high=1.0)
        self.game_every = check_int(game_every, "game_every", low=1)
        m = len(names)
        self.register_buffer("coefficients", torch.ones(m))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._handle: ModulatorHandle | None = None
        self._snapshots: list[tuple[list[Tensor], list[Tensor]]] | None = None
        self._last_signature: tuple[Any, ...] | None = None
        self._noise = False
        self._generator: torch.Generator | None = None
        self._rank_generator: torch.Generator | None = None

    # ---- observation ---------------------------------------------------------------------

    def _as_vector(self, values: Any, name: str) -> Tensor:
        """Per-group vector from a name-keyed signal; every rank gets the rank mean."""
        coef = self.coefficients
        if isinstance(values, Tensor):
            raise TypeError(
                f"`{name}` must carry modality names: pass a GameResult, a ShapleyResult with "
                f"`modalities`, or a mapping {{modality: value}} for {list(self.modalities)}; a "
                "bare tensor is refused because its order could silently differ from the groups' "
                f"(wrap it as dict(zip(names, tensor)))."
            )
        if isinstance(values, (GameResult, ShapleyResult)):  # the same field names
            if values.modalities is None:
                raise TypeError(
                    f"`{name}` is a {type(values).__name__} without modality names; compute it "
                    "with `shapley_values(..., modalities=names)` or pass a mapping "
                    "{modality: value}."
                )
            values = dict(zip(values.modalities, values.shapley.unbind(-1)))
        if not isinstance(values, Mapping):
            raise TypeError(
                f"`{name}` must be a GameResult, a ShapleyResult with `modalities`, or a mapping "
                f"{{modality: value}} for {list(self.modalities)}; got {type(values).__name__}."
            )
        check_modality_keys(values, name, self.modalities)
        items = []
        for key in self.modalities:
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, (Tensor, int, float)):
                raise TypeError(
                    f"`{name}[{key!r}]` must be a float or a 1-element tensor, got "
                    f"{type(v).__name__}."
                )
            t = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
            if t.numel() != 1:
                raise ModbalanceError(
                    f"`{name}[{key!r}]` must hold one value, got shape {tuple(t.shape)}."
                )
            items.append(t.reshape(()).to(device=coef.device, dtype=coef.dtype))
        x = torch.stack(items)
        check_finite(x, name)
        return all_reduce_mean(x)

    @torch.no_grad()
    def _update_ema(self, raw: Tensor) -> Tensor:
        raw = raw.to(self.coefficients).clamp_min(self.min_coefficient)
        smoothed = self.momentum * self.coefficients + (1.0 - self.momentum) * raw
        self.coefficients.copy_(torch.where(self.initialized, smoothed, raw))
        self.initialized.fill_(True)
        return self.coefficients.clone()

    def reset(self) -> None:
        """Forget every observation: coefficients back to 1, the next ``observe`` initialises."""
        with torch.no_grad():
            self.coefficients.fill_(1.0)
            self.initialized.fill_(False)

    # ---- application -----------------------------------------------------------------------

    def _signature(self) -> tuple[Any, ...]:
        sig: list[Any] = []
        for params in self._group_params:
            for p in params:
                g = p.grad
                sig.append((p._version, None if g is None else (id(g), g._version)))
        return tuple(sig)

    @torch.no_grad()
    def _modify_grads(self, scale: bool) -> bool:
        """Scale (and optionally add noise to) the groups' gradients. False if none had a grad."""
        params = self._group_params
        stds = None
        if self._noise:  # the noise's scale is the std of the unscaled gradient
            self._sync_noise_generator()
            stds = [
                [
                    p.grad.std() if p.grad.numel() > 1 else p.grad.new_zeros(())
                    for p in ps
                    if p.grad is not None
                ]
                for ps in params
            ]
        any_grad = any(p.grad is not None for ps in params for p in ps)
        if scale:
            self._scaler.scale_grads(self.coefficients)
        if stds is not None:
            for ps, group_stds in zip(params, stds):
                live = [p for p in ps if p.grad is not None]
                for p, std in zip(live, group_stds):
                    p.grad.add_(self._draw_noise(p.grad) * std)
        return any_grad

    def _sync_noise_generator(self) -> None:
        """Under torch.distributed without a user generator, seed one identically on every rank.

        Every rank draws the same noise only from identically seeded generators; the global RNGs
        usually differ between ranks. The seed comes from rank 0, once (one collective and one
        host sync on the first noisy step); every rank reaches this point on every step.
        """
        if self._generator is not None or self._rank_generator is not None or world_size() == 1:
            return
        device = self._group_params[0][0].device  # a device the backend supports
        seed = torch.zeros((), dtype=torch.long, device=device)
        if rank() == 0:
            seed.random_(0, 2**62)
        all_reduce_sum(seed)
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed))
        self._rank_generator = gen

    def _draw_noise(self, like: Tensor) -> Tensor:
        gen = self._generator if self._generator is not None else self._rank_generator
        if gen is None:
            return torch.randn_like(like)
        noise = torch.randn(like.shape, generator=gen, device=gen.device, dtype=like.dtype)
        return noise.to(like.device)

    def step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None
    ) -> Any:
        r"""Run ``optimizer.step()`` with the modulation applied; use it instead of that call.

        Call it after ``loss.backward()`` (after DDP's gradient all-reduce and after
        ``scaler.unscale_(optimizer)`` with AMP); :meth:`observe` may come before it, at any time
        after the previous step. With ``apply="grad"`` the groups' gradients are multiplied by
        their coefficients first (``torch._foreach_mul_`` per device and dtype, coefficients as
        tensors, no host synchronisation); with ``apply="update"`` the group parameters that have
        a gradient are snapshotted and their update is rescaled afterwards,
        :math:`\theta \leftarrow \theta_\text{old} + k_m(\theta_\text{new} -
        \theta_\text{old})` (one copy of those parameters during the step). Parameters without a
        gradient and parameters outside the groups are untouched.

        Args:
            optimizer: The optimizer that updates (at least) the group parameters.
            closure: Passed on to ``optimizer.step``.

        Returns:
            Whatever ``optimizer.step`` returns.

        Raises:
            ModbalanceError: If the modulator is attached to an optimizer (its hooks already
                modulate every ``optimizer.step()``; call that instead).
        """
        with self._applied(optimizer):
            return optimizer.step() if closure is None else optimizer.step(closure)

    @contextlib.contextmanager
    def _applied(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        self._check_unattached(
            optimizer,
            "this modulator is attached to an optimizer, whose hooks already apply the "
            "modulation on every optimizer.step(); call optimizer.step() or remove the handle.",
        )
        self._pre_step_hook(optimizer, (), {})
        try:
            yield
        except BaseException:
            self._snapshots = None
            self._last_signature = None
            raise
        self._post_step_hook(optimizer, (), {})

    def _check_unattached(self, optimizer: torch.optim.Optimizer, attached: str) -> None:
        """An optimizer over every group, while no handle is attached (``attached``: the error)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        if self._handle is not None:
            raise ModbalanceError(attached)
        self._warn_adaptive(optimizer)
        self._scaler.check_optimizer(optimizer)

    def _warn_adaptive(self, optimizer: torch.optim.Optimizer) -> None:
        if self.apply_mode != "grad" or not isinstance(optimizer, ADAPTIVE_OPTIMIZERS):
            return
        if getattr(self, "_warned_adaptive", False):
            return
        self._warned_adaptive = True
        warn_adaptive(optimizer, type(self).__name__, "the modulation has ~no effect.")

    def signal(self, out: StepOutput) -> Any:
        """The signal this modulator observes from one training step (see :meth:`observe`)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def around_step(self, out: StepOutput, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        """:class:`~modbalance.balancing.BalancingMethod` hook: observe, then modulate the step.

        In the method's ``phases`` (phase 2, after the warm-up), every ``game_every`` steps
        (``out.step % game_every == 0``) the coefficients are updated from :meth:`signal` of
        ``out`` (a step without a game, when the training step evaluates it less often, keeps the
        last coefficients), and the ``optimizer.step()`` inside the block is modulated as in
        :meth:`step` (or by the hooks, when the modulator is attached). Warm-up steps are left
        alone.
        """
        if out.phase not in self.phases:  # the warm-up phase is not modulated
            yield
            return
        if out.step % self.game_every == 0 and not (self.needs_game and out.game is None):
            self.observe(self.signal(out))
        if self._handle is not None:
            yield
            return
        with self._applied(optimizer):
            yield

    def _apply_grad_mode(self) -> None:
        if self._last_signature is not None and self._signature() == self._last_signature:
            raise ModbalanceError(
                "the modulation was already applied to these gradients: the optimizer step was "
                "modulated twice without a new backward() (attach() and step() together?)."
            )
        if self._modify_grads(scale=True):
            self._last_signature = self._signature()

    @torch.no_grad()
    def _pre_step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.apply_mode == "grad":
            self._apply_grad_mode()
            return
        if self._noise:
            self._modify_grads(scale=False)
        self._snapshots = self._scaler.snapshot()

    @torch.no_grad()
    def _post_step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.apply_mode == "grad":
            self._last_signature = None
            return
        snaps, self._snapshots = self._snapshots, None
        if snaps is None:
            return
        self._scaler.rescale_updates(snaps, self.coefficients)

    def attach(self, optimizer: torch.optim.Optimizer) -> ModulatorHandle:
        r"""Apply the modulation automatically on every ``optimizer.step()``.

        Registers an optimizer step pre-hook and post-hook. With ``apply="grad"`` the pre-hook
        scales the gradients (as :meth:`step`); with ``apply="update"`` the pre-hook snapshots the
        group parameters that have a gradient and the post-hook rescales their update,
        :math:`\theta \leftarrow \theta_\text{old} + k_m(\theta_\text{new} -
        \theta_\text{old})` (this costs one copy of those parameters during the step). The
        training loop stays ``loss.backward(); optimizer.step()``, plus ``observe(...)`` whenever
        new contributions arrive. With a ``GradScaler``, skipped steps skip the hooks too.

        Args:
            optimizer: The optimizer that updates (at least) the group parameters.

        Returns:
            A :class:`ModulatorHandle`; ``handle.remove()`` or leaving ``with handle:`` removes
            both hooks.

        Raises:
            ModbalanceError: If the modulator is already attached.
        """
        self._check_unattached(
            optimizer,
            "this modulator is already attached to an optimizer; call `handle.remove()` first.",
        )
        pre = optimizer.register_step_pre_hook(self._pre_step_hook)
        try:
            post = optimizer.register_step_post_hook(self._post_step_hook)
        except BaseException:
            pre.remove()
            raise
        self._handle = ModulatorHandle(self, [pre, post])
        self._last_signature = None
        return self._handle

    def extra_repr(self) -> str:
        return (
            f"modalities={self.modalities!r}, momentum={self.momentum}, "
            f"apply={self.apply_mode!r}, min_coefficient={self.min_coefficient}"
        )


# --------------------------------------------------------------------------------------------
# public modulators
# --------------------------------------------------------------------------------------------


class ShapleyGradModulator(_GroupModulator):
    r"""Slow the dominant modality's learning in proportion to its Shapley contribution (PaSE).

    :meth:`observe` turns contributions :math:`\phi` (e.g. the Shapley values of
    :class:`~modbalance.shapley.ModalityGame`) into raw coefficients with the PaSE rule
    (:func:`pase_coefficients`)

    .. math::

        \psi_m = \frac{\max(\phi_m, 0)}{\sum_j \max(\phi_j, 0)}, \qquad
        \tilde k_m = \exp\!\Bigl(\frac{\min_j \psi_j}{\psi_m} - 1\Bigr),

    (uniform shares when no contribution is positive), clamps them below at ``min_coefficient``
    and smooths them with an exponential moving average,
    :math:`k \leftarrow \mu k + (1 - \mu)\tilde k`; the **first** observation initialises
    :math:`k = \tilde k` (before any observation :math:`k = 1`, no modulation). Any other rule can
    be passed as a callable ``(M,) contributions -> (M,) coefficients``.

    The coefficients are then applied to each group on every optimizer step, to the update
    (``apply="update"``, works under Adam) or to the gradient (``apply="grad"``, SGD), see the
    module documentation and :meth:`attach`. Groups are explicit: ``{"text": model.text_encoder,
    "audio": model.audio_encoder.parameters(), ...}``; shared layers (the fusion head) stay out and
    are never modulated. Overlapping groups, empty groups and fewer than two groups are errors.

    The state (``coefficients``, ``initialized``, ``shares``) lives in buffers: ``state_dict()``,
    ``load_state_dict()`` and ``.to(device)`` work; the groups' parameters are *not* part of the
    state dict. Move the modulator to the parameters' device so that no copies are needed.

    Args:
        groups: ``{modality: nn.Module or iterable of parameters}``, at least two, disjoint.
        rule: ``"pase"`` or a callable mapping ``(M,)`` contributions to ``(M,)`` non-negative
            coefficients.
        momentum: EMA momentum :math:`\mu \in [0, 1)`; 0 uses the latest observation only.
        apply: ``"update"`` (default) or ``"grad"``.
        min_coefficient: Lower bound for every raw coefficient, in :math:`[0, 1]`.
        game_every: As a balancing method (:meth:`around_step`), observe the step's game every
            ``game_every`` steps (the coefficients persist in between); the same cadence as
            :func:`~modbalance.balancing.balanced_step`'s ``game_every``.

    Reference:
        K. He et al., "PaSE: Prototype-aligned Calibration and Shapley-based Equilibrium for
        Multimodal Sentiment Analysis", AAAI 2026 (arXiv:2511.17585).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.methods.modulators import ShapleyGradModulator
        >>> text, audio = nn.Linear(4, 2), nn.Linear(3, 2)
        >>> opt = torch.optim.Adam([*text.parameters(), *audio.parameters()], lr=1e-2)
        >>> mod = ShapleyGradModulator({"text": text, "audio": audio})
        >>> loss = text(torch.randn(8, 4)).sum() + audio(torch.randn(8, 3)).sum()
        >>> loss.backward()
        >>> mod.observe({"text": 0.6, "audio": 0.2}).round(decimals=4)
        tensor([0.5134, 1.0000])
        >>> mod.step(opt)  # text's update is scaled by 0.5134, audio's by 1
    """

    def __init__(
        self,
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]],
        *,
        rule: Literal["pase"] | Callable[[Tensor], Tensor] = "pase",
        momentum: float = 0.9,
        apply: Literal["update", "grad"] = "update",
        min_coefficient: float = 0.0,
        game_every: int = 1,
    ) -> None:
        super().__init__(groups, momentum, apply, min_coefficient, game_every)
        if not callable(rule):
            check_choice(rule, "rule", ("pase",))
        self.rule = rule
        self.register_buffer("shares", torch.full((len(self.modalities),), math.nan))

    needs_game = True

    def signal(self, out: StepOutput) -> Any:
        """The step's :class:`~modbalance.shapley.GameResult` (``out.game``)."""
        if out.game is None:
            raise ModbalanceError(
                "ShapleyGradModulator needs the batch's Shapley game: the training step must "
                "evaluate it when a method has `needs_game = True` (StepOutput.game is None)."
            )
        return out.game

    @torch.no_grad()
    def observe(self, contributions: Any) -> Tensor:
        """Update the coefficients from new per-modality contributions, matched by name.

        Call it after ``backward()`` and before the (modulated) optimizer step whose update the
        new coefficients should scale; between two steps, the last observation counts.

        Args:
            contributions: A :class:`~modbalance.shapley.GameResult` (its ``shapley`` values
                with its ``modalities``), a :class:`~modbalance.shapley.ShapleyResult` with
                ``modalities``, or ``{modality: value}`` for every group. Averaged over ranks under
                ``torch.distributed``.

        Returns:
            ``(M,)`` smoothed coefficients, in group order (:attr:`modalities`).

        Raises:
            TypeError: A bare tensor (no names) or another type.
            ModbalanceError: Unknown or missing modality, wrong shape, non-finite values (a value
                check), or a custom rule returning a wrong shape or negative values.
        """
        x = self._as_vector(contributions, "contributions")
        shares = pase_shares(x)
        self.shares.copy_(shares)
        if isinstance(self.rule, str):
            raw = _coefficients_of_shares(shares)  # pase_coefficients(x), shares computed once
        else:
            raw = self.rule(x)  # type: ignore[operator]
            check_tensor(raw, "rule(contributions)", dtype="floating")
            if raw.shape != x.shape:
                raise ModbalanceError(
                    f"`rule` must return one coefficient per modality, shape {tuple(x.shape)}; "
                    f"got shape {tuple(raw.shape)}."
                )
            check_finite(raw, "rule(contributions)")
            if value_checks_enabled() and bool((raw < 0).any()):
                raise ModbalanceError(
                    f"`rule` must return non-negative coefficients, got {raw.tolist()}."
                )
        return self._update_ema(raw)

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        rule = self.rule if isinstance(self.rule, str) else getattr(self.rule, "__name__", "custom")
        return f"{super().extra_repr()}, rule={rule!r}"


class OGMGEModulator(_GroupModulator):
    r"""On-the-fly gradient modulation with generalisation enhancement (OGM-GE), for M modalities.

    :meth:`observe` takes one *positive*, higher-is-better score per modality (OGM-GE uses the
    summed softmax probability of the true class under each modality's unimodal logits; for
    regression pass e.g. :math:`\exp(-\text{MAE}_m)`) and computes (:func:`ogmge_coefficients`)

    .. math::

        \rho_m = \frac{s_m}{\frac{1}{M-1}\sum_{j \ne m} s_j}, \qquad
        k_m = 1 - \tanh\bigl(\alpha\,\operatorname{relu}(\rho_m - 1)\bigr),

    so only the modalities ahead of the mean of the others are damped. For two modalities
    :math:`\rho` is the paper's ratio; ``continuous=False`` uses the released code's
    :math:`1 - \tanh(\alpha\rho_m)` for :math:`\rho_m > 1` exactly. With ``noise=True`` the
    generalisation enhancement adds Gaussian noise to each gradient tensor of the groups,
    :math:`g \leftarrow k_m g + \mathcal N(0, \operatorname{std}(g)^2)`, with the standard
    deviation of the unmodulated gradient, drawn from ``generator``. (The original adds it to
    convolution weights only; put only those parameters in the groups to reproduce that.) With
    ``apply="update"`` the noise is added to the gradient and the whole update is scaled by
    :math:`k_m`; under plain SGD without noise both modes equal the original. Under
    ``torch.distributed`` every rank must add the same noise: without ``generator`` the modulator
    seeds its own generator from a seed broadcast by rank 0 on the first noisy step; a
    ``generator`` you pass must be seeded identically on every rank.

    The interface (groups, ``apply``, ``momentum``, :meth:`attach`, :meth:`step`,
    :meth:`observe`, ``state_dict``) is the one of :class:`ShapleyGradModulator`; ``momentum``
    defaults to 0 here (the original uses the current batch's ratio).

    Args:
        groups: ``{modality: nn.Module or iterable of parameters}``, at least two, disjoint.
        alpha: Modulation strength :math:`\alpha \ge 0`.
        momentum: EMA momentum in :math:`[0, 1)`.
        apply: ``"update"`` (default) or ``"grad"`` (the original, with SGD).
        min_coefficient: Lower bound for every raw coefficient.
        continuous: ``True`` for :math:`\rho - 1` (continuous), ``False`` for the original.
        noise: Add the generalisation-enhancement noise.
        generator: Random generator for the noise (its device is used for drawing).
        source: What :meth:`signal` reads from a training step: ``"unimodal"`` (default, as
            the original: each modality's own prediction — the summed softmax probability of
            the true class, or :math:`\exp(-\text{MAE}_m)` for regression) or ``"game"``
            (the fused head with only modality :math:`m` present, relative to none:
            :math:`\exp(v(\{m\}) - v(\emptyset))`).
        game_every: Observe the step's signal every ``game_every`` steps in
            :meth:`around_step`.

    Reference:
        X. Peng, Y. Wei, A. Deng, D. Wang, D. Hu, "Balanced Multimodal Learning via On-the-fly
        Gradient Modulation", CVPR 2022.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.methods.modulators import OGMGEModulator
        >>> audio, video = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> mod = OGMGEModulator({"audio": audio, "video": video}, alpha=0.5)
        >>> loss = (audio(torch.randn(8, 4)) + video(torch.randn(8, 4))).sum()
        >>> loss.backward()
        >>> mod.observe({"audio": 30.0, "video": 10.0}).round(decimals=4)
        tensor([0.2384, 1.0000])
        >>> opt = torch.optim.SGD([*audio.parameters(), *video.parameters()], lr=0.1)
        >>> mod.step(opt)  # audio's update is scaled by 0.2384, video's by 1
    """

    def __init__(
        self,
        groups: Mapping[str, nn.Module | Iterable[nn.Parameter]],
        *,
        alpha: float = 0.1,
        momentum: float = 0.0,
        apply: Literal["update", "grad"] = "update",
        min_coefficient: float = 0.0,
        continuous: bool = True,
        noise: bool = False,
        generator: torch.Generator | None = None,
        source: Literal["unimodal", "game"] = "unimodal",
        game_every: int = 1,
    ) -> None:
        super().__init__(groups, momentum, apply, min_coefficient, game_every)
        self.source = check_choice(source, "source", ("unimodal", "game"))
        self.needs_game = self.source == "game"
        self.alpha = check_real(alpha, "alpha", low=0.0)
        self.continuous = bool(continuous)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator, got {type(generator).__name__}."
            )
        self._noise = bool(noise)
        self._generator = generator
        self.register_buffer("ratio", torch.full((len(self.modalities),), math.nan))

    def signal(self, out: StepOutput) -> dict[str, Tensor]:
        """Positive per-modality scores of one step (see ``source``), keyed by modality."""
        if self.source == "game":
            if out.game is None:
                raise ModbalanceError(
                    "OGMGEModulator(source='game') needs StepOutput.game; the training step "
                    "evaluates it when `needs_game` is True."
                )
            return self.game_scores(out.game)
        with torch.no_grad():
            scores = {}
            for m in self.modalities:
                pred = out.unimodal[m].detach()
                if out.task == "classification":
                    prob = pred.float().softmax(-1)
                    scores[m] = prob.gather(1, out.target.long().view(-1, 1)).sum()
                else:
                    pred = pred.reshape(out.target.shape).float()
                    scores[m] = torch.exp(-(pred - out.target.float()).abs().mean())
            return scores

    @staticmethod
    def game_scores(game: Any) -> dict[str, Tensor]:
        r"""Scores :math:`\exp(v(\{m\}) - v(\emptyset))` from a game's coalition table."""
        table = game.table
        return {m: torch.exp(table[1 << i] - table[0]) for i, m in enumerate(game.modalities)}

    @torch.no_grad()
    def observe(self, scores: Any) -> Tensor:
        r"""Update the coefficients from per-modality scores, matched by name.

        Call it after ``backward()`` and before the modulated optimizer step.

        Args:
            scores: ``{modality: score}`` (positive, higher is better), or a
                :class:`~modbalance.shapley.GameResult`, whose single-modality coalition values
                give the scores :math:`\exp(v(\{m\}) - v(\emptyset))`. Averaged over ranks
                under ``torch.distributed``.

        Returns:
            ``(M,)`` smoothed coefficients, in group order.

        Raises:
            TypeError: A bare tensor (no names) or another type.
            ModbalanceError: Unknown or missing modality, non-finite or non-positive scores.
        """
        if hasattr(scores, "table") and hasattr(scores, "modalities"):
            scores = self.game_scores(scores)
        x = self._as_vector(scores, "scores")
        if value_checks_enabled() and bool((x <= 0).any()):
            raise ModbalanceError(
                f"`scores` must be positive (e.g. summed true-class probabilities or "
                f"exp(-loss)), got {x.tolist()}."
            )
        self.ratio.copy_(_ratio_to_others(x))
        return self._update_ema(ogmge_coefficients(x, self.alpha, continuous=self.continuous))

    def extra_repr(self) -> str:
        """Summarise the configuration for ``repr``."""
        return (
            f"{super().extra_repr()}, alpha={self.alpha}, continuous={self.continuous}, "
            f"noise={self._noise}"
        )
