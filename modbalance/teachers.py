r"""Alone-trained unimodal teachers, for the methods that distil from them (UMT, G2D, EBMC).

Several balancing methods build on *alone-trained* unimodal models: each modality's encoder and
head trained by themselves, then frozen. The fused model learns from their features (UMT, G2D),
their outputs (G2D's logit distillation, EBMC's trust-weighted distillation) or their confidence
(G2D's prioritisation, EBMC's energy). :class:`UnimodalTeachers` holds such frozen models and
produces a :class:`TeacherOutput` for a batch; the training step passes it to the methods as
:attr:`StepOutput.teacher <modbalance.balancing.StepOutput.teacher>`. A method that reads it sets
``needs_teacher = True``, and :func:`~modbalance.balancing.balanced_step` refuses a step that
has none.

How the teachers are trained is the user's loop's business: train each modality alone (for
example with :class:`~modbalance.methods.UME`, which trains every encoder/head pair on its own
loss in one model), then wrap the trained encoders and heads. The example's
``examples/pase/teachers.py`` does this once per task and seed and caches the result.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from modbalance._checks import ModbalanceError, check_modality_keys, check_modality_names

__all__ = ["TeacherOutput", "UnimodalTeachers"]


class TeacherOutput(NamedTuple):
    """What frozen unimodal teachers give for one batch (no gradient anywhere).

    Both mappings are keyed by modality name, like :class:`~modbalance.balancing.StepOutput`.
    """

    #: ``{m: (N, D)}`` the teacher encoders' features.
    features: Mapping[str, Tensor]
    #: ``{m: (N,)}`` regression outputs or ``{m: (N, C)}`` logits of the teachers' heads.
    unimodal: Mapping[str, Tensor]


class UnimodalTeachers(nn.Module):
    r"""Frozen alone-trained unimodal models: one encoder and one head per modality.

    The modules are deep-copied, switched to evaluation mode and frozen
    (``requires_grad=False``) on construction; :meth:`train` keeps them in evaluation mode, so
    the teachers never change, whatever the surrounding model does. They are registered
    submodules: ``.to(device)`` moves them and ``state_dict()`` saves them.

    .. math::

        z^{T}_{m} = E^{T}_m(x_m), \qquad \hat y^{T}_m = h^{T}_m(z^{T}_m),

    computed under ``torch.no_grad()``; an ``(N, 1)`` head output is returned as ``(N,)``.

    Args:
        encoders: ``{modality: encoder}``; ``encoder(*inputs[m])`` gives ``(N, D)`` features.
        heads: ``{modality: head}`` from ``(N, D)`` to ``(N,)``/``(N, 1)`` or ``(N, C)``, for
            the same modalities.

    Raises:
        ModbalanceError: Fewer than one modality, different modality sets, or a value that is
            not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from modbalance.teachers import UnimodalTeachers
        >>> enc = {"text": nn.Linear(5, 4), "audio": nn.Linear(3, 4)}
        >>> heads = {"text": nn.Linear(4, 1), "audio": nn.Linear(4, 1)}
        >>> teachers = UnimodalTeachers(enc, heads)
        >>> out = teachers({"text": torch.randn(6, 5), "audio": (torch.randn(6, 3),)})
        >>> out.features["text"].shape, out.unimodal["audio"].shape
        (torch.Size([6, 4]), torch.Size([6]))
        >>> out.features["text"].requires_grad
        False
    """

    def __init__(self, encoders: Mapping[str, nn.Module], heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for what, mods in (("encoders", encoders), ("heads", heads)):
            if not isinstance(mods, (Mapping, nn.ModuleDict)) or not len(mods):
                raise ModbalanceError(
                    f"`{what}` must be a non-empty mapping {{modality: nn.Module}}, got "
                    f"{type(mods).__name__}."
                )
            for m, mod in mods.items():
                if not isinstance(mod, nn.Module):
                    raise ModbalanceError(
                        f"`{what}[{m!r}]` must be an nn.Module, got {type(mod).__name__}."
                    )
        self.modalities = check_modality_names(tuple(encoders.keys()), "encoders")
        if set(heads.keys()) != set(self.modalities):
            raise ModbalanceError(
                f"`heads` must have the modalities of `encoders` {list(self.modalities)}, got "
                f"{sorted(heads.keys())}."
            )
        self.encoders = nn.ModuleDict({m: copy.deepcopy(encoders[m]) for m in self.modalities})
        self.heads = nn.ModuleDict({m: copy.deepcopy(heads[m]) for m in self.modalities})
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> UnimodalTeachers:
        """Teachers stay in evaluation mode (dropout off, statistics frozen) whatever ``mode``."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: Mapping[str, Any]) -> TeacherOutput:
        """The teachers' features and outputs for one batch.

        Args:
            inputs: ``{modality: x}`` or ``{modality: (x, *more)}``: what each encoder takes
                (a tuple is unpacked as positional arguments, e.g. a sequence and its mask).

        Returns:
            :class:`TeacherOutput`, every tensor without gradient.
        """
        check_modality_keys(inputs, "inputs", self.modalities)
        feats, outs = {}, {}
        for m in self.modalities:
            args = inputs[m] if isinstance(inputs[m], tuple) else (inputs[m],)
            feats[m] = self.encoders[m](*args)
            y = self.heads[m](feats[m])
            outs[m] = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
        return TeacherOutput(feats, outs)
