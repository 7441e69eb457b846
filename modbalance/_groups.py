"""Explicit per-modality parameter groups, shared by every method that acts on gradients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
