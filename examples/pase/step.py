"""The one training step of the repository, and :func:`build`, which assembles its parts.

``train_step(parts, batch, phase)`` is used by the example's loop, every benchmark and the CUDA
checks: the model's forward pass, then the library's
:func:`~modbalance.balancing.balanced_step` (the methods' losses, one backward pass,
the methods' step contexts, ``optimizer.step()``)::

    out, losses = model(batch, phase)                      # one encoder pass
    balanced_step(out, losses, methods, optimizer, game=game)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from modbalance import distributed as mbdist
from modbalance.balancing import BalancingMethod, balanced_step
from modbalance.modulation import OGMGEModulator, ShapleyGradModulator
from modbalance.schedule import DualPhaseSchedule
from modbalance.shapley import ModalityGame

from .data import to_device
from .model import PaSEConfig, PaSEModel


@dataclass
class Parts:
    """Everything one training step needs (see :func:`build`)."""

    model: PaSEModel
    train_model: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    schedule: DualPhaseSchedule
    game: ModalityGame
    methods: list[BalancingMethod] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str | None = None  # None or "bf16"
    step: int = 0  # global step counter, part of the checkpoint
    game_every: int = 1  # evaluate the Shapley game every this many steps (if a method needs it)


#: Balancing methods by name: ``factory(model, seed, device) -> BalancingMethod``.
METHODS: dict[str, Callable[[PaSEModel, int, torch.device], BalancingMethod]] = {}


def register_method(name: str):
    """Register a method factory under ``name`` (used by the CLI and the benchmarks)."""

    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


@register_method("sgm")
def _sgm(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    return ShapleyGradModulator(model.modality_groups(), momentum=0.9, apply="update")


@register_method("ogm-ge")
def _ogm(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    gen = torch.Generator(device=device).manual_seed(seed + 17)
    return OGMGEModulator(
        model.modality_groups(), alpha=0.5, momentum=0.9, noise=True, generator=gen
    )


@register_method("unimodal")
def _unimodal(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    from modbalance.methods import UnimodalLoss

    return UnimodalLoss(model.modalities)


@register_method("gblending")
def _gblending(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    from modbalance.methods import GBlending

    return GBlending(model.modalities, every=2)


@register_method("mmpareto")
def _mmpareto(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    from modbalance.methods import MMPareto

    return MMPareto(model.modality_groups())


@register_method("agm")
def _agm(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    from modbalance.methods import AGM

    return AGM(model.modalities, modules=[model])


@register_method("pmr")
def _pmr(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    from modbalance.methods import PMR

    c = model.config
    dims = {m: c.dim for m in model.modalities}
    if c.task == "regression":
        return PMR(dims, c.num_classes, label_bins=c.num_classes)
    return PMR(dims, c.num_outputs)


@register_method("mla")
def _mla(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    from modbalance.methods import MLA

    return MLA(model.modalities, model.config.dim, model.config.num_outputs)


@register_method("cggm")
def _cggm(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    from modbalance.methods import CGGM

    c = model.config
    heads = {m: nn.Linear(c.dim, c.num_outputs) for m in model.modalities}
    # AdamW cancels a gradient scale: the suite scales the update, and bounds the coefficient
    return CGGM(model.modality_groups(), heads, apply="update", max_abs_coefficient=10.0)


@register_method("inforeg")
def _inforeg(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
    from modbalance.methods import InfoReg

    return InfoReg(model.modality_groups())


def _sge(**kw):
    def factory(model: PaSEModel, seed: int, device: torch.device) -> BalancingMethod:
        from modbalance.equilibrium import ShapleyEquilibrium

        return ShapleyEquilibrium(
            model.modalities, groups=model.modality_groups(), replace=("readout",), **kw
        )

    return factory


#: PaSE's Shapley-based equilibrium: the default rule, and variants measured on the suite.
METHODS["sge"] = _sge()
METHODS["sge-beta0"] = _sge(beta=0.0)
METHODS["sge-beta1"] = _sge(beta=1.0)
METHODS["sge-w0.5"] = _sge(weight=0.5)
METHODS["sge-paper"] = _sge(rule="pase")
METHODS["sge-nolearn"] = _sge(learnable_margin=None)  # without the learnability factor


def make_methods(
    names: Sequence[str | BalancingMethod], model: PaSEModel, seed: int, device: torch.device
) -> list[BalancingMethod]:
    """Methods from registered names (or ready instances), moved to ``device``."""
    methods = []
    for spec in names:
        if isinstance(spec, BalancingMethod):
            method = spec
        elif spec in METHODS:
            method = METHODS[spec](model, seed, device)
        else:
            raise ValueError(f"unknown balancing method {spec!r}; known: {sorted(METHODS)}")
        methods.append(method.to(device))
    return methods


def build(
    model_config: PaSEConfig,
    *,
    methods: Sequence[str | BalancingMethod] = ("sge",),
    encoders: Mapping[str, nn.Module] | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    switch_epoch: int | None = 8,
    patience: int | None = None,
    device: str | torch.device = "cpu",
    amp: str | None = None,
    seed: int = 0,
    game_every: int = 1,
    model: nn.Module | None = None,
) -> Parts:
    """Model (optionally with your own encoders), DDP wrapper, optimizer, schedule, game, methods.

    The baseline (``model_config.baseline``) starts in phase 2; otherwise phase 1 lasts up to
    ``switch_epoch`` epochs (or until the validation plateau of ``patience`` epochs). ``model``
    replaces :class:`PaSEModel` by another backbone with the same interface (a subclass that
    overrides :meth:`PaSEModel.head_output`, as the suite's ``tfn``/``lmf``/``mult`` backbones do).
    """
    device = torch.device(device)
    if model is None:
        model = PaSEModel(model_config, encoders)
    elif encoders is not None:
        raise ValueError("pass `encoders` or a ready `model`, not both")
    model = model.to(device)
    balancing = make_methods(methods, model, seed, device)
    # methods with parameters of their own (CGGM's classifiers, MLA's shared head) train too
    params = [*model.parameters(), *(p for m in balancing for p in m.parameters())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = DualPhaseSchedule(
        switch_epoch=0 if model_config.baseline else switch_epoch,
        patience=None if model_config.baseline else patience,
        mode="min",
        warm_head=bool(model_config.warm_head),
    )
    game = ModalityGame(
        model.fuse,
        model_config.modalities,
        masking="present",
        value="neg_mae" if model_config.task == "regression" else "neg_loss",
        task=model_config.task,
        modules=[model],
    )
    return Parts(
        model=model,
        train_model=_maybe_ddp(model, device),
        optimizer=optimizer,
        schedule=schedule,
        game=game,
        methods=balancing,
        device=device,
        amp=amp,
        game_every=game_every,
    )


def _maybe_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not mbdist.is_distributed():
        return model
    # Calibrator buffers are synchronised by their own all-reduce, so DDP must not overwrite
    # them from rank 0 (the keyword was renamed in PyTorch 2.13).
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return nn.parallel.DistributedDataParallel(
        model,
        find_unused_parameters=True,
        **{no_sync: False},
        device_ids=[device.index] if device.type == "cuda" else None,
    )


def autocast(parts: Parts):
    """bf16 autocast when ``parts.amp == "bf16"``, else a disabled autocast."""
    if parts.amp == "bf16":
        return torch.autocast(parts.device.type, dtype=torch.bfloat16)
    return torch.autocast(parts.device.type, enabled=False)


def train_step(parts: Parts, batch: Mapping[str, Any], phase: int) -> dict[str, Tensor]:
    """One optimisation step on ``batch`` in ``phase``; returns the detached loss terms.

    No host synchronisation: the returned scalars stay on the device.
    """
    batch = to_device(batch, parts.device)
    with autocast(parts):
        out, losses = parts.train_model(batch, phase)
    out = out._replace(step=parts.step)
    terms = balanced_step(
        out, losses, parts.methods, parts.optimizer, game=parts.game, game_every=parts.game_every
    )
    parts.step += 1
    return terms
