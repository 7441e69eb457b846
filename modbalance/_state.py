"""State that knows its modalities: names stored with every per-modality module's state.

Per-modality buffers (coefficients, weights, running losses) are stored by *position*. A state
saved with modalities ``("text", "audio")`` would load into a module built with ``("audio",
"text")`` or with other names and silently swap every value. :class:`ModalityState` stores the
module's modality names with its state (PyTorch's ``_extra_state`` entry) and refuses a state
saved with other names or in another order; it also refuses loaded values that would poison the
next step (NaN or infinite parameters and control buffers, negative coefficients).
"""

from __future__ import annotations

import base64
import json
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._checks import ModbalanceError

__all__ = ["ModalityState"]


class ModalityState:
    """Mixin for ``nn.Module`` subclasses that have a ``modalities`` tuple.

    * ``state_dict()`` gains an ``_extra_state`` entry: ``{"modalities": [...]}`` (with
      ``"generator"``, the state of the module's own random generator, when it has one, so a
      resumed run draws the same random numbers), stored as a ``uint8`` tensor of its JSON text.
      A tensor, so that every entry of a ``state_dict`` stays a tensor (``{k: v.clone() for k, v
      in model.state_dict().items()}`` keeps working) and ``torch.load(weights_only=True)``
      reads it.
    * ``load_state_dict`` refuses a state whose stored names differ from ``self.modalities``
      (other names or another order) *before* copying anything into this module. A state saved
      without names (before they were stored) loads as before.
    * It also refuses, before copying, non-finite values in the module's own floating-point
      parameters and in the buffers named in :attr:`_checked_state`, and values below zero (or
      at zero for ``"positive"``) where the rule says so.

    Subclasses set ``_checked_state = {"coefficients": "nonnegative", ...}``. Buffers that use
    NaN as "not observed yet" are left out of it.
    """

    _checked_state: ClassVar[dict[str, str]] = {}

    def get_extra_state(self) -> Tensor:
        names = getattr(self, "modalities", None)
        extra: dict[str, Any] = {} if names is None else {"modalities": list(names)}
        generator = getattr(self, "_generator", None)
        if isinstance(generator, torch.Generator):  # a user's generator (OGM-GE's noise)
            state = generator.get_state().numpy().tobytes()
            extra["generator"] = base64.b64encode(state).decode("ascii")
        return _encode(extra)

    def set_extra_state(self, state: Any) -> None:
        # the names were validated in _load_from_state_dict, before any tensor was copied
        extra = _decode(state, "_extra_state", type(self).__name__)
        generator = getattr(self, "_generator", None)
        if isinstance(generator, torch.Generator) and "generator" in extra:
            raw = base64.b64decode(extra["generator"])
            generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "_extra_state"
        where = f"{type(self).__name__}{f' ({prefix[:-1]!r})' if prefix else ''}"
        extra = None if key not in state_dict else _decode(state_dict[key], key, where)
        if extra is not None:
            saved = extra.get("modalities")
            ours = getattr(self, "modalities", None)
            if saved is not None and ours is not None and tuple(saved) != tuple(ours):
                same = sorted(saved) == sorted(ours)
                raise ModbalanceError(
                    f"{where}: the state was saved with modalities {list(saved)} but this module "
                    f"has {list(ours)}; per-modality values are stored by position, so loading "
                    "it would "
                    + ("swap them between modalities" if same else "give them to other names")
                    + f". Build the module with modalities={list(saved)} (same names, same "
                    "order)."
                )
        self._check_loaded_values(state_dict, prefix, where)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if extra is None and key in missing_keys:
            missing_keys.remove(key)  # a state saved before names were stored

    def _check_loaded_values(self, state_dict: dict[str, Any], prefix: str, where: str) -> None:
        rules = {name: "finite" for name, _ in self.named_parameters(recurse=False)}  # type: ignore[attr-defined]
        rules.update(self._checked_state)
        for name, rule in rules.items():
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or not value.is_floating_point():
                continue
            if value.numel() == 0 or value.device.type == "meta":
                continue
            v = value.detach()
            if not bool(torch.isfinite(v).all()):
                raise ModbalanceError(
                    f"{where}: the loaded `{name}` holds NaN or infinite values; the next step "
                    "would write them into the model. Load a state saved before training "
                    "diverged, or build the module afresh."
                )
            if rule == "nonnegative" and bool((v < 0).any()):
                raise ModbalanceError(
                    f"{where}: the loaded `{name}` must be >= 0 (it scales losses or updates), "
                    f"got min {float(v.min()):.4g}."
                )
            if rule == "positive" and bool((v <= 0).any()):
                raise ModbalanceError(
                    f"{where}: the loaded `{name}` must be > 0, got min {float(v.min()):.4g}."
                )


def _encode(extra: dict[str, Any]) -> Tensor:
    return torch.tensor(list(json.dumps(extra).encode("utf-8")), dtype=torch.uint8)


def _decode(value: Any, key: str, where: str) -> dict[str, Any]:
    """The dict :func:`_encode` stored (a ``uint8`` tensor of JSON), or a clear error."""
    try:
        if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.ndim != 1:
            raise TypeError
        extra = json.loads(bytes(value.cpu().tolist()).decode("utf-8"))
        if not isinstance(extra, dict):
            raise TypeError
    except (TypeError, ValueError, UnicodeDecodeError):
        raise ModbalanceError(
            f"{where}: the state's `{key}` is not what this module saved (a uint8 tensor of "
            f"JSON text), got {type(value).__name__}; load a state_dict() of the same class."
        ) from None
    return extra
