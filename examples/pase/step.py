"""The one training step of the repository, and :func:`build`, which assembles its parts.

``train_step(parts, batch, phase)`` is used by the example's loop, every benchmark and the CUDA
checks: the model's forward pass, then the library's
:func:`~modbalance.balancing.balanced_step` (the methods' losses, one backward pass,
the methods' step contexts, ``optimizer.step()``)::

    out, losses = model(batch, phase)                      # one encoder pass
    balanced_step(out, losses, methods, optimizer, game=game)
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from modbalance import distributed as mbdist
from modbalance import methods as mb
from modbalance.balancing import BalancingMethod, balanced_step, check_phases
from modbalance.schedule import DualPhaseSchedule
from modbalance.shapley import ModalityGame
from modbalance.teachers import UnimodalTeachers

from .data import to_device
from .model import PaSEConfig, PaSEModel
from .teachers import teacher_inputs


@dataclass
class TrainConfig:
    """Training options: what :func:`build` assembles and how :class:`~.loop.Trainer` loops.

    ``methods`` are names of :data:`METHODS` (or, for :func:`build`, ready instances);
    ``game_every`` evaluates the Shapley game every this many steps (when a method needs it);
    ``epoch_shares`` plays the game on the validation split after every epoch (the shares of the
    log line and ``shapley_shares.png``); ``False`` plays it only in the final evaluation, which
    is all the benchmarks read (the game costs M forward passes' worth per epoch, 2^M head
    evaluations of every validation sample; skipping it changes no result).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    switch_epoch: int | None = 8
    patience: int | None = None
    methods: tuple[str, ...] = ("sge",)
    game_every: int = 1
    device: str = "cpu"
    amp: str | None = None  # None or "bf16"
    max_steps_per_epoch: int | None = None
    progress: bool = True
    epoch_shares: bool = True
    #: Folder where alone-trained teachers are cached (methods that distil from them); None:
    #: trained in every run that needs them.
    teacher_cache: str | None = None

    def __post_init__(self) -> None:
        steps = self.max_steps_per_epoch
        bad = isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        if steps is not None and bad:
            raise ValueError(
                f"`max_steps_per_epoch` must be None (whole epochs) or an integer >= 1, got "
                f"{steps!r}: a cap of 0 would train nothing (--max-steps-per-epoch)."
            )


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
    #: Frozen alone-trained unimodal models for the methods that distil from them (UMT, G2D,
    #: EBMC); the loop trains them (``examples/pase/teachers.py``) when such a method is used.
    teachers: UnimodalTeachers | None = None


def _sgm(model: PaSEModel, seed: int, device: torch.device, **options: Any) -> BalancingMethod:
    return mb.ShapleyGradModulator(model.modality_groups(), **{"momentum": 0.9} | options)


def _ogm(model: PaSEModel, seed: int, device: torch.device, **options: Any) -> BalancingMethod:
    gen = torch.Generator(device=device).manual_seed(seed + 17)
    defaults = {"alpha": 0.5, "momentum": 0.9, "noise": True, "generator": gen}
    return mb.OGMGEModulator(model.modality_groups(), **defaults | options)


def _pmr(model: PaSEModel, seed: int, device: torch.device, **options: Any) -> BalancingMethod:
    c = model.config
    dims = {m: c.dim for m in model.modalities}
    if c.task == "regression":
        return mb.PMR(dims, c.num_classes, **{"label_bins": c.num_classes} | options)
    return mb.PMR(dims, c.num_outputs, **options)


def _cggm(model: PaSEModel, seed: int, device: torch.device, **options: Any) -> BalancingMethod:
    c = model.config
    heads = {m: nn.Linear(c.dim, c.num_outputs) for m in model.modalities}
    # AdamW cancels a gradient scale: the suite scales the update, and bounds the coefficient
    defaults = {"apply": "update", "max_abs_coefficient": 10.0}
    return mb.CGGM(model.modality_groups(), heads, **defaults | options)


def _sge(model: PaSEModel, seed: int, device: torch.device, **options: Any) -> BalancingMethod:
    """PaSE's Shapley-based equilibrium in place of the example's detached read-out."""
    groups = model.modality_groups()
    return mb.ShapleyEquilibrium(model.modalities, groups=groups, replace=("readout",), **options)


def _on_modalities(cls: type) -> Callable[..., BalancingMethod]:
    """A factory for a method built from the model's modality names (plus options)."""
    return lambda model, seed, device, **options: cls(model.modalities, **options)


def _on_groups(cls: type) -> Callable[..., BalancingMethod]:
    """A factory for a method built from the model's encoder groups (plus options)."""
    return lambda model, seed, device, **options: cls(model.modality_groups(), **options)


#: Balancing methods by name: ``factory(model, seed, device, **options) -> BalancingMethod``
#: (``options`` replace the constructor's defaults; :func:`make_methods` reads them from names
#: such as ``"ogm-ge@alpha=1.0"``). Add your own by assigning a new name; :func:`make_methods`
#: also takes ready instances.
METHODS: dict[str, Callable[..., BalancingMethod]] = {
    "sgm": _sgm,  # the paper's update modulation (also ``--equilibrium pase``)
    "ogm-ge": _ogm,
    "unimodal": _on_modalities(mb.UnimodalLoss),
    "gblending": lambda model, seed, device, **options: mb.GBlending(
        model.modalities, **{"every": 2} | options
    ),
    "mmpareto": _on_groups(mb.MMPareto),
    "agm": lambda model, seed, device, **options: mb.AGM(
        model.modalities, modules=[model], **options
    ),
    "pmr": _pmr,
    "mla": lambda model, seed, device, **options: mb.MLA(
        model.modalities, model.config.dim, model.config.num_outputs, **options
    ),
    "cggm": _cggm,
    "inforeg": _on_groups(mb.InfoReg),
    "dgl": _on_modalities(mb.DGL),
    "ume": lambda model, seed, device, **options: mb.UME(
        model.modalities, model.unimodal_heads, **options
    ),
    # distillation from alone-trained teachers (the loop trains them: examples/pase/teachers.py)
    "umt": _on_modalities(mb.UMT),
    "g2d": lambda model, seed, device, **options: mb.G2D(
        model.modalities, model.modality_groups(), **options
    ),
    "emc": _on_modalities(mb.EMC),  # EBMC's two terms: use both, methods=("emc", "imtd")
    "imtd": _on_modalities(mb.IMTD),
    "reconboost": lambda model, seed, device, **options: mb.ReconBoost(
        model.modalities, model.unimodal_heads, **{"stage_steps": 20} | options
    ),
    "aug": lambda model, seed, device, **options: mb.AUG(
        model.modalities, model.config.dim, model.config.num_outputs, **{"seed": seed} | options
    ),
    "valuation": lambda model, seed, device, **options: mb.ModalityValuation(
        model.modalities, modules=[model], **{"seed": seed} | options
    ),
    # PaSE's Shapley-based equilibrium: the default rule, and the variants measured on the suite
    "sge": _sge,
    "sge-beta0": partial(_sge, beta=0.0),
    "sge-w0.5": partial(_sge, weight=0.5),
    "sge-nolearn": partial(_sge, learnable_margin=None),  # without the learnability factor
}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ogm-ge@alpha=1.0,noise=False"`` -> ``("ogm-ge", {"alpha": 1.0, "noise": False})``.

    Values are Python literals (numbers, booleans, strings in quotes, ``None``, tuples).
    """
    name, _, rest = spec.partition("@")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(
                f"method option {item!r} of {spec!r} must be key=literal (e.g. alpha=0.5)"
            ) from None
        if not eq or not key.strip():
            raise ValueError(f"method option {item!r} of {spec!r} must be key=literal")
    return name, options


def make_methods(
    names: Sequence[str | BalancingMethod], model: PaSEModel, seed: int, device: torch.device
) -> list[BalancingMethod]:
    """Methods from registered names (options after ``@``) or ready instances, on ``device``."""
    methods = []
    for spec in names:
        if isinstance(spec, BalancingMethod):
            method = spec
        else:
            name, options = parse_method(spec)
            if name not in METHODS:
                raise ValueError(f"unknown balancing method {name!r}; known: {sorted(METHODS)}")
            method = METHODS[name](model, seed, device, **options)
        methods.append(method.to(device))
    return methods


def build(
    model_config: PaSEConfig,
    config: TrainConfig | None = None,
    *,
    encoders: Mapping[str, nn.Module] | None = None,
    model: nn.Module | None = None,
    teachers: UnimodalTeachers | None = None,
    **options: Any,
) -> Parts:
    """Model (optionally with your own encoders), DDP wrapper, optimizer, schedule, game, methods.

    ``config`` (a :class:`TrainConfig`, its defaults if ``None``) holds the training options;
    keyword ``options`` replace single fields of it (``build(model_config, methods=("sge",),
    switch_epoch=2)``); ``methods`` may also hold ready :class:`BalancingMethod` instances. Of the
    options, ``build`` reads ``methods``, ``lr``, ``weight_decay``, ``switch_epoch``,
    ``patience``, ``device``, ``amp``, ``seed`` and ``game_every``; the rest are the loop's.

    The baseline (``model_config.baseline``) starts in phase 2; otherwise phase 1 lasts up to
    ``switch_epoch`` epochs (or until the validation plateau of ``patience`` epochs). ``model``
    replaces :class:`PaSEModel` by another backbone with the same interface (a subclass that
    overrides :meth:`PaSEModel.head_output`, as the suite's ``tfn``/``lmf``/``mult`` backbones do).
    ``teachers``: frozen alone-trained unimodal models for methods that distil from them (the
    :class:`~.loop.Trainer` trains them when ``None`` and such a method is used).
    """
    c = replace(config or TrainConfig(), **options)
    device = torch.device(c.device)
    if model is None:
        model = PaSEModel(model_config, encoders)
    elif encoders is not None:
        raise ValueError("pass `encoders` or a ready `model`, not both")
    model = model.to(device)
    balancing = make_methods(c.methods, model, c.seed, device)
    # methods with parameters of their own (CGGM's classifiers, MLA's shared head) train too
    params = [*model.parameters(), *(p for m in balancing for p in m.parameters())]
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    schedule = DualPhaseSchedule(
        switch_epoch=0 if model_config.baseline else c.switch_epoch,
        patience=None if model_config.baseline else c.patience,
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
        amp=c.amp,
        game_every=c.game_every,
        teachers=None if teachers is None else teachers.to(device),
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
    if parts.teachers is not None and any(
        m.needs_teacher and phase in check_phases(m.phases) for m in parts.methods
    ):
        out = out._replace(teacher=parts.teachers(teacher_inputs(batch)))
    terms = balanced_step(
        out, losses, parts.methods, parts.optimizer, game=parts.game, game_every=parts.game_every
    )
    parts.step += 1
    return terms
