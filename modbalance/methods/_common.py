"""What several balancing methods share: presence masks, masked means, teachers, heads.

Private helpers of :mod:`modbalance.methods`; every one is structural (names and shapes, no
tensor values read) or plain arithmetic without host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modbalance._checks import (
    ModbalanceError,
    check_choice,
    check_has_modalities,
    check_modality_keys,
    check_modality_names,
    check_real,
    check_replace,
    check_tensor,
)
from modbalance.balancing import BalancingMethod, StepOutput, check_phases
from modbalance.teachers import TeacherOutput


def per_modality(value: Any, name: str, modalities: Sequence[str], **bounds: Any) -> list[float]:
    """One checked float per modality from a scalar or a ``{modality: value}`` mapping."""
    if isinstance(value, Mapping):
        check_modality_keys(value, name, modalities)
        return [check_real(value[m], f"{name}[{m!r}]", **bounds) for m in modalities]
    return [check_real(value, name, **bounds)] * len(modalities)


def settings_repr(method: Any, *names: str) -> str:
    """``"modalities=..., name=value, ..."``: the method's ``extra_repr`` (values by ``repr``)."""
    return ", ".join(f"{k}={getattr(method, k)!r}" for k in ("modalities", *names))


def check_mask(present: Tensor | None, n: int, device: torch.device, name: str) -> Tensor:
    """A ``(n,)`` bool mask on ``device`` (all ``True`` when ``present`` is ``None``)."""
    if present is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    mask = check_tensor(present, name)
    if mask.shape != (n,):
        raise ModbalanceError(
            f"`{name}` must have shape ({n},), one flag per sample, got {tuple(mask.shape)}."
        )
    return mask.to(device=device, dtype=torch.bool)


def presence(out: StepOutput, m: str, n: int, device: torch.device) -> Tensor:
    """``(n,)`` bool mask of the samples that have modality ``m`` (all when it has no mask)."""
    mask = out.present.get(m) if out.present is not None else None
    return check_mask(mask, n, device, f"out.present[{m!r}]")


def masked_mean(per_sample: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``(N,)`` values over the samples where ``mask`` holds (0 if none); NaN-safe."""
    kept = torch.where(mask, per_sample, torch.zeros_like(per_sample))
    return kept.sum() / mask.sum().to(kept.dtype).clamp_min(1.0)


def require_teacher(out: StepOutput, method: str) -> Any:
    """``out.teacher``, or the error that says how to give one."""
    if out.teacher is None:
        raise ModbalanceError(
            f"{method} distils from alone-trained unimodal teachers and `out.teacher` is None: "
            "wrap your trained unimodal models in modbalance.teachers.UnimodalTeachers and pass "
            "`out._replace(teacher=teachers(inputs))`."
        )
    return out.teacher


def check_teacher(
    out: StepOutput, modalities: Sequence[str], method: str, *, outputs: bool = False
) -> TeacherOutput:
    """``out.teacher`` with features (and, if ``outputs``, predictions) for every modality.

    Structural checks only (names and shapes; no tensor values are read).
    """
    teacher = require_teacher(out, method)
    if not isinstance(teacher, TeacherOutput):
        raise TypeError(
            f"{method}: `out.teacher` must be a modbalance.teachers.TeacherOutput, got "
            f"{type(teacher).__name__}."
        )
    parts = [("out.features", out.features), ("out.teacher.features", teacher.features)]
    if outputs:
        parts.append(("out.teacher.unimodal", teacher.unimodal))
    for where, mapping in parts:
        check_has_modalities(
            mapping, modalities, f"{method} needs every modality in `{where}`: missing"
        )
    for m in modalities:
        s, t = out.features[m], teacher.features[m]
        if s.ndim < 2 or s.shape != t.shape:
            raise ModbalanceError(
                f"{method} distils the features of {m!r}: `out.features[{m!r}]` has shape "
                f"{tuple(s.shape)} and `out.teacher.features[{m!r}]` {tuple(t.shape)}; they must "
                "be the same (N, D) (give the teacher the student's encoder architecture)."
            )
    return teacher


def add_terms(losses: dict[str, Tensor], terms: Mapping[str, Tensor], method: str) -> None:
    """Add ``terms`` to ``losses`` in place, refusing a name the step already has."""
    for name, value in terms.items():
        if name in losses:
            raise ModbalanceError(
                f"{method} adds the loss term {name!r}, which the step already has; one would "
                f"silently overwrite the other (use one {method} per step)."
            )
        losses[name] = value


def check_fuse(out: StepOutput, modalities: Sequence[str], method: str, does: str) -> None:
    """A known task, the fusion head ``out.fuse`` and the features of every modality."""
    check_choice(out.task, "out.task", ("regression", "classification"))
    if out.fuse is None:
        raise ModbalanceError(
            f"{method} {does} and needs it as `out.fuse` (fuse(features, present) -> "
            "prediction); the StepOutput has fuse=None."
        )
    check_has_modalities(
        out.features,
        modalities,
        f"{method} needs the features of every modality: `out.features` is missing",
    )


def check_modules(modules: Iterable[nn.Module] | nn.Module | None) -> list[nn.Module]:
    """The modules a method puts in eval mode: one module, an iterable of them, or none."""
    mods: list[nn.Module] = []
    if modules is None:
        return mods
    if isinstance(modules, nn.Module):
        return [modules]
    for mod in modules:
        if not isinstance(mod, nn.Module):
            raise TypeError(f"`modules` must hold nn.Module objects, got {type(mod).__name__}.")
        mods.append(mod)
    return mods


def eval_modules_for(given: list[nn.Module], fuse: Any) -> list[nn.Module]:
    """``given`` if any, else the fusion head's module (``fuse`` itself or its bound owner)."""
    if given:
        return given
    if isinstance(fuse, nn.Module):
        return [fuse]
    owner = getattr(fuse, "__self__", None)
    return [owner] if isinstance(owner, nn.Module) else []


def check_heads(
    heads: Mapping[str, Callable[[Tensor], Tensor]], modalities: Sequence[str]
) -> dict[str, Callable[[Tensor], Tensor]]:
    """``{modality: head}`` as a plain dict (the model's heads, not registered in the method)."""
    if not isinstance(heads, Mapping) and not hasattr(heads, "keys"):
        raise TypeError(
            f"`heads` must map every modality to its unimodal head, got {type(heads).__name__}."
        )
    check_has_modalities(heads, modalities, "`heads` must have a head for every modality; missing")
    for m in modalities:
        if not callable(heads[m]):
            raise TypeError(f"`heads[{m!r}]` must be callable, got {type(heads[m]).__name__}.")
    return {m: heads[m] for m in modalities}


class HeadEnsemble(BalancingMethod):
    """A method that trains the unimodal heads and predicts with an ensemble of them.

    UME and ReconBoost: the heads are held by reference (the model's, trained and saved with
    it), the step's terms are dropped but for ``keep``, and :meth:`predict` runs every head on
    its features and combines the outputs with the method's :meth:`_ensemble`.
    """

    phases: tuple[int, ...] = (1, 2)

    def __init__(
        self,
        modalities: Sequence[str],
        heads: Mapping[str, Callable[[Tensor], Tensor]],
        keep: Iterable[str],
        phases: Iterable[int],
    ) -> None:
        super().__init__()
        self.modalities = check_modality_names(modalities, minimum=2)
        self._heads = check_heads(heads, self.modalities)
        self.keep = check_replace(keep)
        self.phases = check_phases(phases)

    def _kept(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The step's terms named in ``keep``."""
        return {k: v for k, v in losses.items() if k in self.keep}

    def _ensemble(self, preds: dict[str, Tensor], present: Mapping[str, Tensor] | None) -> Tensor:
        raise NotImplementedError

    def predict(
        self, features: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """The ensemble: every head on its features, combined over the present modalities.

        Args:
            features: ``{modality: (N, D)}`` for every modality.
            present: Optional ``{modality: (N,) bool}`` masks (all present when ``None``).

        Returns:
            ``(N,)`` regression predictions or ``(N, C)`` logits.

        Raises:
            ModbalanceError: If ``features`` lacks a modality or a mask has the wrong shape.
        """
        check_has_modalities(
            features,
            self.modalities,
            f"{type(self).__name__}.predict needs the features of every modality: `features` is "
            "missing",
        )
        preds = {m: self._heads[m](features[m]) for m in self.modalities}
        return self._ensemble(preds, present)
