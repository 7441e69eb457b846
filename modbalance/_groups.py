"""Explicit per-modality parameter groups, shared by every method that acts on gradients."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from modbalance._checks import ModbalanceError


def parse_groups(
    groups: Mapping[str, nn.Module | Iterable[nn.Parameter]],
) -> tuple[tuple[str, ...], list[list[nn.Parameter]]]:
    if isinstance(groups, nn.ModuleDict):  # a ModuleDict is not a collections.abc.Mapping
        groups = dict(groups.items())
    if not isinstance(groups, Mapping):
        raise TypeError(
            "`groups` must be a mapping {modality: nn.Module or iterable of parameters}, got "
            f"{type(groups).__name__}."
        )
    if len(groups) < 2:
        raise ModbalanceError(
            f"`groups` must hold at least 2 modalities to balance, got {len(groups)} "
            f"({list(groups)})."
        )
    names: list[str] = []
    params: list[list[nn.Parameter]] = []
    owner: dict[int, str] = {}
    for name, group in groups.items():
        if not isinstance(name, str):
            raise TypeError(f"`groups` keys must be modality names (str), got {name!r}.")
        if isinstance(group, nn.Module):
            plist = list(group.parameters())
        elif isinstance(group, Tensor):
            plist = [group]
        elif isinstance(group, Iterable):
            plist = list(group)
        else:
            raise TypeError(
                f"`groups[{name!r}]` must be an nn.Module or an iterable of parameters, got "
                f"{type(group).__name__}."
            )
        unique: list[nn.Parameter] = []
        seen: set[int] = set()
        for p in plist:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"`groups[{name!r}]` must contain tensors (parameters), got {type(p).__name__}."
                )
            if id(p) in seen:
                continue
            if id(p) in owner:
                raise ModbalanceError(
                    f"`groups` overlap: a parameter of shape {tuple(p.shape)} is in both "
                    f"{owner[id(p)]!r} and {name!r}; every parameter may belong to one modality "
                    "only (leave shared layers such as the fusion head out of the groups)."
                )
            seen.add(id(p))
            owner[id(p)] = name
            unique.append(p)
        if not unique:
            raise ModbalanceError(
                f"`groups[{name!r}]` is empty; pass a module with parameters or a non-empty list "
                "(a generator that was already consumed is empty too)."
            )
        names.append(name)
        params.append(unique)
    return tuple(names), params


def by_device_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


#: Optimizers that divide each gradient by a running estimate of its own magnitude.
ADAPTIVE_OPTIMIZERS: tuple[type, ...] = tuple(
    getattr(torch.optim, name)
    for name in (
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Adagrad",
        "Adadelta",
        "SparseAdam",
        "Adafactor",
    )
    if hasattr(torch.optim, name)
)


def warn_adaptive(optimizer: torch.optim.Optimizer, who: str, effect: str) -> None:
    """Warn that scaling gradients under an adaptive optimizer mostly cancels (once per call)."""
    warnings.warn(
        f"{who} apply='grad' with {type(optimizer).__name__}: adaptive optimizers divide each "
        "gradient by a running estimate of its own magnitude, so multiplying a group's "
        f"gradients by a constant k leaves its updates (almost) unchanged; {effect} Use "
        "apply='update', which rescales the parameter update itself.",
        UserWarning,
        stacklevel=4,
    )


class GroupScaler:
    r"""Per-group gradient or update scaling, shared by the modulators, CGGM and InfoReg.

    * :meth:`scale_grads`: ``g <- k_m g`` for every parameter of group ``m`` that has a gradient
      (``torch._foreach_mul_`` per device and dtype; ``k`` stays a tensor, no host sync).
    * :meth:`snapshot` before ``optimizer.step()`` and :meth:`rescale_updates` after it:
      :math:`\theta \leftarrow \theta_\text{old} + k_m(\theta_\text{new} - \theta_\text{old})`
      (one copy of the parameters that have a gradient, during the step).
    * :meth:`check_optimizer`: refuses an optimizer that updates no parameter of a group, whose
      modulation would otherwise silently do nothing (checked once per optimizer and size).
    """

    def __init__(self, names: Sequence[str], params: list[list[nn.Parameter]], who: str) -> None:
        self.names = tuple(names)
        self.params = params
        self.who = who
        self._checked: tuple[int, int, int] | None = None

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise unless ``optimizer`` holds at least one trainable parameter of every group."""
        groups = optimizer.param_groups
        key = (id(optimizer), len(groups), sum(len(g["params"]) for g in groups))
        if key == self._checked:
            return
        held = {id(p) for g in groups for p in g["params"]}
        for name, ps in zip(self.names, self.params):
            trainable = [p for p in ps if p.requires_grad]
            if trainable and not any(id(p) in held for p in trainable):
                raise ModbalanceError(
                    f"{self.who}: the optimizer updates no parameter of the {name!r} group, so "
                    "scaling that group's gradients or updates would do nothing. Build the "
                    "optimizer over the parameters the groups were given (e.g. "
                    "model.parameters()), or give the method the groups this optimizer trains."
                )
        self._checked = key

    @torch.no_grad()
    def scale_grads(self, coefficients: Tensor) -> bool:
        """Multiply every group's gradients by its coefficient; ``False`` if none had one."""
        any_grad = False
        for m, ps in enumerate(self.params):
            grads = [p.grad for p in ps if p.grad is not None]
            any_grad = any_grad or bool(grads)
            for (device, dtype), idx in by_device_dtype(grads).items():
                k = coefficients[m].to(device=device, dtype=dtype)
                torch._foreach_mul_([grads[i] for i in idx], k)
        return any_grad

    @torch.no_grad()
    def snapshot(self) -> list[tuple[list[nn.Parameter], list[Tensor]]]:
        """Copies of the parameters that have a gradient, per group (before the step).

        One ``torch._foreach_mul(..., 1.0)`` per device and dtype (an exact copy: multiplying by
        one changes no bit, NaN and signed zeros included) instead of one clone per parameter.
        """
        snaps = []
        for ps in self.params:
            live = [p for p in ps if p.grad is not None]
            copies = list(live)  # each entry replaced by its copy below
            for idx in by_device_dtype(live).values():
                for i, c in zip(idx, torch._foreach_mul([live[i] for i in idx], 1.0)):
                    copies[i] = c
            snaps.append((live, copies))
        return snaps

    @torch.no_grad()
    def rescale_updates(
        self, snaps: list[tuple[list[nn.Parameter], list[Tensor]]], coefficients: Tensor
    ) -> None:
        """After the step: ``theta <- theta_old + k_m (theta_new - theta_old)`` per group."""
        for m, (live, old) in enumerate(snaps):
            for (device, dtype), idx in by_device_dtype(live).items():
                ps = [live[i] for i in idx]
                olds = [old[i] for i in idx]
                k = coefficients[m].to(device=device, dtype=dtype)
                # three ops, not one _foreach_lerp_: its tensor-weight form reads the weight on
                # the host once per parameter (a device sync each, tests/test_host_sync.py)
                torch._foreach_sub_(olds, ps)  # old - new
                torch._foreach_mul_(olds, 1.0 - k)  # (1 - k)(old - new)
                torch._foreach_add_(ps, olds)  # k new + (1 - k) old
