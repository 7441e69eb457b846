"""What does PaSE cost per training step? Phase 2 vs the plain late-fusion step, same backbone.

Every model is the PaSE reference model of ``examples/pase``, assembled by its ``build`` and
trained by its one ``train_step`` (AdamW, modality game, balancing methods). Two PaSE
configurations, each against the plain step of the same backbone:

* the **default recipe**: what ``python examples/pase_mosi.py`` trains, read from the example's
  own parser and ``configs`` (when written: width 32, phase 2 with the Shapley equilibrium
  ``sge`` and its modality game every step, no calibration, OT alignment or gate; the results
  record what was measured), against ``pase_mosi.py --baseline`` (the same width, mean late
  fusion, no method);
* the **paper's configuration**: width 64, every PaSE component on (prototype calibration, OT
  alignment of the class prototypes of every modality pair, the prototype-gated fusion, the
  Shapley game of the fused head every step and the Shapley modulator, ``apply="update"``), an
  upper bound of the cost, against the plain step of width 64 (``baseline=True``).

The steps of a comparison are timed **interleaved** in one run (plain, PaSE, plain, PaSE, ...) on
the same batch, after warm-up (PaSE: two phase-1 steps warm its prototypes); the median per step
is reported with the ratio of medians. On a CPU with one torch thread (the default) a step is
timed by the process's **CPU time** (``time.process_time``), which is what the step costs and is
not inflated when other jobs share the cores; otherwise (CUDA, several threads) by wall time.
The main table uses MOSI shapes (batch 64, 50 frames, text 768 / audio 5 / vision 20,
regression). The per-component breakdown times each piece of the paper's step alone on the same
batch (median of repeats): the encoders' forward+backward, the fusion heads, the calibration
loss, the OT alignment (forward+backward through the batch class means), the Shapley game and
the optimizer step with and without the modulator's hooks; pieces downstream of the encoders run
on detached leaf features so that each timing holds only that piece.

Scaling: the paper's configuration against the batch size and the number of classes K
(classification with K classes; the prototypes, OT problems and gate grow with K), and a
**grid** over the number of modalities M = 2..8 and the batch sizes 16..256 for both
configurations, measured side by side (the four steps of a grid cell interleaved; synthetic
20-d modalities, 50 frames). Up to 6 modalities the modality game is exact (2^M coalitions), above
it samples random cyclic orders (``ModalityGame(estimator="auto", max_exact_players=6,
num_cycles=1)``: 44 coalitions at M = 7, 58 at M = 8).

Accuracy of the sampled game: on models of both configurations trained for a few steps on
synthetic batches whose label depends on every modality, the sampled Shapley values of fresh
batches against the exact ones (max abs error of the shares psi, relative error of phi), next
to the batch-to-batch spread of the *exact* shares and the resolution at which the equilibrium
uses the shares (its weights ``w = 1 + beta (1 - M psi)`` move by ``beta M`` per unit of share).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step minus the memory allocated
before it; on CPU the growth of the process's peak resident set size over the
first steps (PaSE: one phase-1 and three phase-2 steps; plain: three steps), in a fresh subprocess
per model with the kernel's high-water mark reset after set-up (``/proc/self/clear_refs``, Linux
only), so it counts activations, gradients, the AdamW state and allocator slack; skipped in
``--quick`` mode.

Run: ``python -m benchmarks.speed [--quick] [--device cpu|cuda] [--amp bf16]``; writes
``benchmarks/results/speed.md``, ``speed.json`` and ``speed.png``. A quick check of some cells of
the grid, printed and not written: ``python -m benchmarks.speed --grid-only --ms 2 4 --batches
16 32``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from examples import pase_mosi
from examples.pase import PAPER_SWITCHES, Parts, PaSEConfig, train_step
from examples.pase import build as build_parts
from modbalance.balancing import combine_losses
from modbalance.metrics import pase_shares
from modbalance.prototypes import calibrate

RESULTS = Path(__file__).resolve().parent / "results"
MOSI_DIMS = {"text": 768, "audio": 5, "vision": 20}
#: The PaSE configurations, each with its plain step: (PaSE key, plain key, label).
RECIPES = (
    ("default", "plain_default", "default recipe (`pase_mosi.py`)"),
    ("paper", "plain_paper", "paper's configuration"),
)
#: Ratio to the plain step that the extra cost of PaSE should stay under ("cost at scale").
TARGET = 1.2


# ------------------------------------------------------------------------------------ set-up
def make_batch(
    batch: int,
    seq: int,
    dims: dict[str, int],
    task: str,
    num_classes: int,
    device: str,
    seed: int = 0,
) -> dict[str, Any]:
    """A synthetic collated batch: random features, per-sample valid lengths in [seq/2, seq]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=g)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    features = {
        m: torch.randn(batch, seq, d, generator=g) * mask[..., None] for m, d in dims.items()
    }
    if task == "regression":
        label = (torch.randn(batch, generator=g) * 1.5).clamp(-3, 3)
    else:
        label = torch.randint(0, num_classes, (batch,), generator=g)
    return {
        "features": {m: f.to(device) for m, f in features.items()},
        "mask": {m: mask.to(device) for m in dims},
        "label": label.to(device),
    }


def example_recipe(
    dims: dict[str, int],
    *,
    task: str = "regression",
    num_classes: int = 7,
    baseline: bool = False,
) -> tuple[PaSEConfig, tuple[str, ...], int]:
    """``(model config, methods, game cadence)`` of ``python examples/pase_mosi.py``.

    Read from the example's own parser and ``configs`` (``--baseline`` for the plain step), so
    that the benchmark follows the command's defaults when they change.
    """
    args = pase_mosi.parse_args(["--baseline"] if baseline else [])
    data = SimpleNamespace(
        task=task, modalities=tuple(dims), dims=dict(dims), num_classes=num_classes
    )
    model_config, train_config = pase_mosi.configs(args, data, "cpu")
    return model_config, tuple(train_config.methods), train_config.game_every


def build(
    pase: bool,
    dims: dict[str, int],
    device: str,
    *,
    recipe: str = "paper",
    task: str = "regression",
    num_classes: int = 7,
    dim: int | None = None,
    layers: int = 1,
    switches: dict[str, Any] | None = None,
    methods: tuple[str, ...] | None = None,
) -> Parts:
    """The parts of the example: model, AdamW, the modality game and the methods.

    ``recipe="paper"``: width 64 (or ``dim``), every PaSE component and the Shapley modulator
    (``pase``), or the plain late-fusion step; ``switches`` overrides the paper's model switches
    and ``methods`` its methods (:func:`marginal_costs`). ``recipe="default"``: the example
    command's model and methods (:func:`example_recipe`), or its ``--baseline``.
    """
    if recipe == "default":
        model_config, methods, game_every = example_recipe(
            dims, task=task, num_classes=num_classes, baseline=not pase
        )
        if dim is not None:
            model_config.dim = dim
        model_config.layers = layers
        parts = build_parts(model_config, methods=methods, device=device, game_every=game_every)
        parts.model.train()
        return parts
    if recipe != "paper":
        raise ValueError(f"unknown recipe {recipe!r}; use 'paper' or 'default'")
    model_config = PaSEConfig(
        modalities=tuple(dims),
        input_dims=dict(dims),
        dim=64 if dim is None else dim,
        layers=layers,
        task=task,
        num_outputs=1 if task == "regression" else num_classes,
        num_classes=num_classes,
        baseline=not pase,
        **{**PAPER_SWITCHES, **(switches or {})},
    )
    if methods is None:
        methods = ("sgm",) if pase else ()
    parts = build_parts(model_config, methods=methods, device=device)
    parts.model.train()
    return parts


def _autocast(device: str, amp: str | None):
    if amp == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(parts: Parts, batch: dict[str, Any], amp: str | None) -> Callable[[], None]:
    """The example's one ``train_step`` on a fixed batch (phase 2 by default)."""
    parts.amp = amp

    def step(phase: int = 2) -> None:
        train_step(parts, batch, phase)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock_name(device: str) -> str:
    """``"cpu time"`` on a CPU with one torch thread, else ``"wall"`` (see the module docstring)."""
    single = torch.device(device).type == "cpu" and torch.get_num_threads() == 1
    return "cpu time" if single else "wall"


def _time_ms(fn: Callable[[], Any], device: str) -> float:
    clock = time.process_time if clock_name(device) == "cpu time" else time.perf_counter
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return (clock() - start) * 1e3


def _median_ms(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()
    return statistics.median(_time_ms(fn, device) for _ in range(repeats))


def _prepare(
    pase: bool,
    dims,
    batch_size: int,
    seq: int,
    device: str,
    amp,
    task="regression",
    num_classes: int = 7,
    warmup: int = 3,
    recipe: str = "paper",
    **variant: Any,
):
    parts = build(pase, dims, device, recipe=recipe, task=task, num_classes=num_classes, **variant)
    batch = make_batch(batch_size, seq, dims, task, num_classes, device)
    step = make_step(parts, batch, amp)
    if pase:
        for _ in range(2):
            step(phase=1)  # warm the prototypes, as phase 1 does
    for _ in range(warmup):
        step()
    return parts, batch, step


def _game_call(parts: Parts, batch: dict[str, Any]) -> Callable[[], Any]:
    """The step's Shapley game alone, on the step's (detached) features of ``batch``."""
    with torch.no_grad():
        feats, _ = parts.model.encode(batch["features"], batch["mask"])
    feats = {m: f.detach().float() for m, f in feats.items()}
    target = parts.model.target(batch["label"])
    return lambda: parts.game(feats, target)


def compare_recipes(
    dims: dict[str, int],
    batch_size: int,
    seq: int,
    device: str,
    amp: str | None,
    steps: int,
    recipes: Sequence[str] = ("default", "paper"),
    task: str = "regression",
    num_classes: int = 7,
    warmup: int = 3,
    game: bool = False,
    budget_s: float = 0.0,
    max_steps: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Each recipe's PaSE phase-2 step against its plain step, all interleaved, one batch shape.

    One round times every step once, in an order that rotates from round to round: at least
    ``steps`` rounds, more (up to ``max_steps``) until the timed steps add up to ``budget_s``
    seconds, so that short steps get more rounds. Reports the medians over the rounds, their
    ratio (``ratio``, ``extra_ms``) and the medians of the per-round ratios and differences of
    the PaSE step to the plain step timed in the same round (``ratio_paired``,
    ``extra_paired_ms``: they cancel load that changes between rounds). With ``game``, each
    round also times the PaSE step's Shapley game alone.
    """
    calls: dict[str, Callable[[], Any]] = {}
    games: dict[str, Any] = {}
    for recipe in recipes:
        for pase in (False, True):
            parts, batch, step = _prepare(
                pase, dims, batch_size, seq, device, amp, task, num_classes, warmup, recipe
            )
            calls[f"{recipe}" if pase else f"plain_{recipe}"] = step
            if pase and game:
                calls[f"game_{recipe}"] = _game_call(parts, batch)
                games[recipe] = parts.game
    times, i = _interleaved(calls, device, steps, budget_s, max_steps)
    med = {key: statistics.median(v) for key, v in times.items()}
    out = {}
    for recipe in recipes:
        plain, pase = times[f"plain_{recipe}"], times[recipe]
        p, q = med[f"plain_{recipe}"], med[recipe]
        row: dict[str, Any] = {
            "plain_ms": p,
            "pase_ms": q,
            "ratio": q / p,
            "extra_ms": q - p,
            "ratio_paired": statistics.median(b / a for a, b in zip(plain, pase)),
            "extra_paired_ms": statistics.median(b - a for a, b in zip(plain, pase)),
            "rounds": i,
        }
        if game:
            row.update(
                game_ms=med[f"game_{recipe}"],
                game_exact=games[recipe].exact,
                coalitions=games[recipe].num_coalitions,
            )
        out[recipe] = row
    return out


def _interleaved(
    calls: dict[str, Callable[[], Any]],
    device: str,
    steps: int,
    budget_s: float = 0.0,
    max_steps: int | None = None,
) -> tuple[dict[str, list[float]], int]:
    """Time every call once per round, the order rotating; ``(times per call, rounds)``.

    At least ``steps`` rounds, more (up to ``max_steps``) until the timed calls add up to
    ``budget_s`` seconds.
    """
    times: dict[str, list[float]] = {key: [] for key in calls}
    order = list(calls)
    limit = steps if max_steps is None else max(steps, max_steps)
    spent, i = 0.0, 0
    while i < steps or (i < limit and spent < budget_s * 1e3):
        shift = i % len(order)
        for key in order[shift:] + order[:shift]:
            times[key].append(_time_ms(calls[key], device))
            spent += times[key][-1]
        i += 1
    return times, i


#: The paper's step with one part switched off, for :func:`marginal_costs`: (label, model
#: switches, methods; ``None`` keeps the paper's ``("sgm",)``).
MARGINALS: tuple[tuple[str, dict[str, Any], tuple[str, ...] | None], ...] = (
    ("OT alignment", {"alignment": False}, None),
    ("prototype-gated fusion", {"gate": False}, None),
    ("calibration loss (the calibrators still run for the others)", {"calibration": False}, None),
    ("Shapley game + modulator (observe, update rescaling)", {}, ()),
)


def marginal_costs(
    dims: dict[str, int],
    batch_size: int,
    seq: int,
    device: str,
    amp: str | None,
    steps: int,
    budget_s: float = 0.0,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """What each part of the paper's step costs: the step without it, all steps interleaved.

    Returns the paired medians of the full step's extra cost over the plain step and, per part
    of :data:`MARGINALS`, of the full step's time minus the step without that part.
    """
    calls = {
        "plain": _prepare(False, dims, batch_size, seq, device, amp, warmup=1)[2],
        "paper": _prepare(True, dims, batch_size, seq, device, amp, warmup=1)[2],
    }
    for label, switches, methods in MARGINALS:
        variant = {"switches": switches, "methods": methods}
        calls[label] = _prepare(True, dims, batch_size, seq, device, amp, warmup=1, **variant)[2]
    times, rounds = _interleaved(calls, device, steps, budget_s, max_steps)
    full, plain = times["paper"], times["plain"]
    rows = [
        {
            "part": label,
            "without_ms": statistics.median(times[label]),
            "saved_ms": statistics.median(f - w for f, w in zip(full, times[label])),
        }
        for label, _, _ in MARGINALS
    ]
    return {
        "M": len(dims),
        "batch": batch_size,
        "plain_ms": statistics.median(plain),
        "pase_ms": statistics.median(full),
        "extra_ms": statistics.median(f - p for p, f in zip(plain, full)),
        "rounds": rounds,
        "rows": rows,
    }


def scaling_grid(
    ms: Sequence[int],
    batches: Sequence[int],
    seq: int,
    device: str,
    amp: str | None,
    steps: int,
    warmup: int = 1,
    budget_s: float = 0.0,
    max_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Both recipes against their plain steps for every M and batch size (synthetic 20-d)."""
    rows = []
    for m in ms:
        dims = {f"m{i}": 20 for i in range(m)}
        for b in batches:
            cell = compare_recipes(
                dims,
                b,
                seq,
                device,
                amp,
                steps,
                warmup=warmup,
                game=True,
                budget_s=budget_s,
                max_steps=max_steps,
            )
            for recipe, row in cell.items():
                rows.append({"recipe": recipe, "M": m, "batch": b, **row})
    return rows


# ------------------------------------------------------------------------------------ accuracy
def _informative_batch(dims: dict[str, int], batch: int, seq: int, seed: int) -> dict[str, Any]:
    """:func:`make_batch` with a label that every modality explains, the first ones most."""
    out = make_batch(batch, seq, dims, "regression", 7, "cpu", seed=seed)
    feats = out["features"]
    label = sum(0.8**i * 10.0 * feats[m].mean((1, 2)) for i, m in enumerate(dims))
    out["label"] = label.clamp(-3, 3)
    return out


def _accuracy_of_model(
    recipe, dims, k, cycles, share_err, phi_err, spread, coalitions, *, batch_size, seq,
    train_steps, batches, draws,
):  # fmt: skip
    """Train model ``k`` of ``recipe``, then append its exact/sampled errors to the lists."""
    beta = momentum = None
    torch.manual_seed(k)
    parts = build(True, dims, "cpu", recipe=recipe)
    for i in range(train_steps):
        batch = _informative_batch(dims, batch_size, seq, 100 + i)
        train_step(parts, batch, 1 if i < 3 else 2)
    if recipe == "default":
        beta, momentum = parts.methods[0].beta, parts.methods[0].momentum
    game = parts.game
    exact_shares = []
    for j in range(batches):
        batch = _informative_batch(dims, batch_size, seq, 10_000 + 100 * k + j)
        call = _game_call(parts, batch)
        game.estimator = "exact"
        phi = call().shapley.double()
        psi = pase_shares(phi)
        exact_shares.append(psi)
        game.estimator = "sampled"
        for c in cycles:
            game.num_cycles = c
            coalitions[c] = game.num_coalitions
            for _ in range(draws):
                est = call().shapley.double()
                share_err[c].append(float((pase_shares(est) - psi).abs().max()))
                phi_err[c].append(float((est - phi).norm() / phi.norm()))
    spread.append(float(torch.stack(exact_shares).std(0).max()))
    return beta, momentum


def sampled_accuracy(
    ms: Sequence[int],
    *,
    models: int = 3,
    batches: int = 6,
    draws: int = 20,
    cycles: Sequence[int] = (1, 2),
    batch_size: int = 64,
    seq: int = 10,
    train_steps: int = 30,
) -> list[dict[str, Any]]:
    """Error of the sampled game against the exact one, per recipe, M and number of cycles.

    ``models`` models per (recipe, M), trained for ``train_steps`` steps (3 in phase 1) on
    informative synthetic batches; on ``batches`` fresh batches each, the exact game once and
    the sampled game ``draws`` times per number of cycles (its generator advancing). Reports
    the max abs error of the shares psi (:func:`~modbalance.metrics.pase_shares`, max over
    modalities) and the relative error of phi (mean and 95th percentile over all draws), the
    batch-to-batch standard deviation of the exact shares (max over modalities, mean over
    models), and ``beta * M`` times the share error: what it moves the default recipe's
    equilibrium weights ``w = 1 + beta (1 - M psi)`` by.
    """
    rows = []
    for recipe in ("default", "paper"):
        for m in ms:
            dims = {f"m{i}": 20 for i in range(m)}
            share_err: dict[int, list[float]] = {c: [] for c in cycles}
            phi_err: dict[int, list[float]] = {c: [] for c in cycles}
            spread, coalitions, beta, momentum = [], {}, None, None
            for k in range(models):
                beta, momentum = _accuracy_of_model(
                    recipe, dims, k, cycles, share_err, phi_err, spread, coalitions,
                    batch_size=batch_size, seq=seq, train_steps=train_steps, batches=batches,
                    draws=draws,
                )  # fmt: skip
            for c in cycles:
                rows.append(
                    {
                        "recipe": recipe,
                        "M": m,
                        "cycles": c,
                        "coalitions": coalitions[c],
                        "share_err_mean": statistics.mean(share_err[c]),
                        "share_err_p95": _quantile(share_err[c], 0.95),
                        "phi_rel_err_mean": statistics.mean(phi_err[c]),
                        "phi_rel_err_p95": _quantile(phi_err[c], 0.95),
                        "exact_share_spread": statistics.mean(spread),
                        "weight_err_mean": (
                            beta * m * statistics.mean(share_err[c]) if beta is not None else None
                        ),
                        "draws": len(share_err[c]),
                        "batch": batch_size,
                        "momentum": momentum,
                    }
                )
    return rows


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# ------------------------------------------------------------------------------------ breakdown
def _paper_pieces(tr, base_feats, present, label, leaves, device, amp):
    """The paper's own pieces (calibration, OT, game, modulator), timed by :func:`breakdown`."""
    model = tr.model
    labels_c = model.class_labels(label)

    def calibration():
        f = leaves()
        with _autocast(device, amp):
            loss = sum(o.loss for o in calibrate(model.calibrators, f, labels_c, present).values())
        loss.backward()

    with torch.no_grad():
        cal = calibrate(model.calibrators, base_feats, labels_c, present)
    means = {m: o.class_means.detach() for m, o in cal.items()}
    masses = {m: o.class_counts.detach() for m, o in cal.items()}

    def alignment():
        x = {m: v.clone().requires_grad_(True) for m, v in means.items()}
        with _autocast(device, amp):
            loss = model.aligner.pairwise(x, masses).loss
        loss.backward()

    def game():
        return tr.game({m: f.float() for m, f in base_feats.items()}, label)

    result = game()
    (modulator,) = tr.methods

    def observe():
        modulator.observe(result)

    pieces = [
        ("calibration fwd+bwd (PaSE)", calibration),
        ("OT alignment fwd+bwd (PaSE)", alignment),
        ("Shapley game, 2^M coalitions (PaSE)", game),
        ("modulator observe (PaSE)", observe),
    ]
    return pieces, modulator


def breakdown(
    dims: dict[str, int], batch_size: int, seq: int, device: str, amp: str | None, repeats: int
) -> list[dict[str, Any]]:
    """Median time of each piece of the PaSE phase-2 step, alone, on one batch."""
    plain_tr, batch, _ = _prepare(False, dims, batch_size, seq, device, amp)
    tr, _, _ = _prepare(True, dims, batch_size, seq, device, amp)
    model, pmodel = tr.model, plain_tr.model
    feats_m = batch["features"]
    masks = batch["mask"]
    label = batch["label"]
    with torch.no_grad():
        base_feats, present = model.encode(feats_m, masks)

    def leaves():
        return {m: f.detach().clone().requires_grad_(True) for m, f in base_feats.items()}

    def encoders():
        with _autocast(device, amp):
            feats, _ = model.encode(feats_m, masks)
            loss = sum(f.float().square().mean() for f in feats.values())
        loss.backward()

    def mean_fusion_head():
        with _autocast(device, amp):
            loss = pmodel.task_loss(pmodel.fuse(leaves(), present), label)
        loss.backward()

    with torch.no_grad():
        cal_out = calibrate(model.calibrators, base_feats, model.class_labels(label), present)

    def gated_fusion_head():  # as in the training step: the confidence from the logits
        with _autocast(device, amp):
            cal = {  # the logits as leaves: their backward is the calibration's, timed there
                m: o._replace(logits=o.logits.clone().requires_grad_()) for m, o in cal_out.items()
            }
            conf = {m: o.confidence() for m, o in cal.items()}
            head = model.head_output(leaves(), present, confidence=conf)
            loss = model.task_loss(model._decide(head, base_feats, present), label)
        loss.backward()

    extra, modulator = _paper_pieces(tr, base_feats, present, label, leaves, device, amp)

    # optimizer step with and without the modulator (gradients left in place: AdamW updates do
    # not depend on whether they are the "real" ones)
    tr.optimizer.zero_grad(set_to_none=True)
    combine_losses(model(batch, 2)[1]).backward()
    plain_tr.optimizer.zero_grad(set_to_none=True)
    combine_losses(pmodel(batch, 2)[1]).backward()

    rows = []
    pieces = [
        ("encoders fwd+bwd (both)", encoders),
        ("mean fusion + head fwd+bwd (plain)", mean_fusion_head),
        ("gated fusion + head fwd+bwd (PaSE)", gated_fusion_head),
        *extra,
        ("AdamW step (plain model)", plain_tr.optimizer.step),
        ("AdamW step + modulator (PaSE model)", lambda: modulator.step(tr.optimizer)),
    ]
    for name, fn in pieces:
        rows.append({"component": name, "ms": _median_ms(fn, repeats, device)})
    tr.optimizer.zero_grad(set_to_none=True)
    return rows


# ------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_child(pase: bool, dims, batch_size, seq, queue) -> None:  # pragma: no cover - subprocess
    """In a fresh process: peak RSS growth (MiB) over the first training steps of one model."""
    import gc

    torch.set_num_threads(1)
    parts = build(pase, dims, "cpu")
    batch = make_batch(batch_size, seq, dims, "regression", 7, "cpu")
    step = make_step(parts, batch, None)
    gc.collect()
    # reset the kernel's high-water mark (VmHWM) so that earlier transients (imports, set-up)
    # cannot hide the step's peak (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    if pase:
        step(phase=1)
    for _ in range(3):
        step()
    queue.put((_status_kib("VmHWM") - before) / 1024)


def peak_memory(
    dims: dict[str, int], batch_size: int, seq: int, device: str, amp, quick: bool
) -> dict[str, float]:
    """Peak memory (MiB) of one training step, plain vs PaSE; see the module docstring."""
    out = {}
    if device.startswith("cuda"):
        for name, pase in (("plain", False), ("pase", True)):
            _, _, step = _prepare(pase, dims, batch_size, seq, device, amp, warmup=1)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            out[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["method"] = "torch.cuda.max_memory_allocated over one step minus allocated before"
        return out
    if quick or not Path("/proc/self/clear_refs").exists():
        return {"plain": float("nan"), "pase": float("nan"), "method": "skipped"}
    ctx = multiprocessing.get_context("spawn")
    for name, pase in (("plain", False), ("pase", True)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_rss_child, args=(pase, dims, batch_size, seq, queue))
        proc.start()
        proc.join(timeout=600)
        if proc.exitcode != 0 or queue.empty():
            raise RuntimeError(f"the memory subprocess for {name!r} failed ({proc.exitcode})")
        out[name] = queue.get()
    out["method"] = (
        "growth of the peak resident set size (VmHWM, reset after set-up) over the first steps, "
        "fresh subprocess per model"
    )
    return out


# ------------------------------------------------------------------------------------ run
def _sweep(
    measure: Callable[..., dict[str, Any]],
    batch_size: int,
    batches: Sequence[int],
    classes: Sequence[int],
) -> list[dict[str, Any]]:
    """The paper's step against the batch size and (classification) the number of classes.

    ``measure(batch, **task)`` times the paper's step against its plain step (one row of
    :func:`compare_recipes`).
    """
    sweep = [{"axis": "batch", "value": b, **measure(b)} for b in batches]
    for k in classes:
        row = measure(batch_size, task="classification", num_classes=k)
        sweep.append({"axis": "K", "value": k, **row})
    return sweep


def run(quick: bool = False, device: str = "cpu", amp: str | None = None) -> dict[str, Any]:
    """Measure everything; returns a dict of row lists (see :func:`to_markdown`)."""
    start = time.perf_counter()
    if quick:
        dims, batch_size, seq = {"text": 16, "audio": 5, "vision": 8}, 16, 8
        steps, repeats, sweep_steps, grid_steps = 3, 2, 2, 2
        grid_budget = dict(budget_s=0.0, max_steps=None)
        batches, classes = (8, 16), (2, 3)
        grid_ms, grid_batches, acc_ms = (2, 7), (16,), (7,)
        accuracy_kw = dict(models=1, batches=2, draws=2, cycles=(1,), batch_size=16, seq=4)
        accuracy_kw["train_steps"] = 4
    else:
        dims, batch_size, seq = dict(MOSI_DIMS), 64, 50
        steps, repeats, sweep_steps, grid_steps = 60, 15, 20, 5
        grid_budget = dict(budget_s=8.0, max_steps=41)
        batches, classes = (16, 32, 64, 128, 256), (2, 7, 16, 32, 64)
        grid_ms, grid_batches, acc_ms = tuple(range(2, 9)), (16, 32, 64, 128, 256), (6, 7, 8)
        accuracy_kw = {}
    both = compare_recipes(dims, batch_size, seq, device, amp, steps)
    main = {**both["paper"], "batch": batch_size, "seq": seq, "steps": steps}
    main_default = {**both["default"], "batch": batch_size, "seq": seq, "steps": steps}
    parts = breakdown(dims, batch_size, seq, device, amp, repeats)

    def paper(b: int, **task: Any) -> dict[str, Any]:
        return compare_recipes(dims, b, seq, device, amp, sweep_steps, ("paper",), **task)["paper"]

    sweep = _sweep(paper, batch_size, batches, classes)
    grid = scaling_grid(
        grid_ms, grid_batches, 50 if not quick else seq, device, amp, grid_steps, **grid_budget
    )
    near = min(grid_batches, key=lambda b: abs(b - batch_size))
    sweep += m_axis(grid, near)
    # the grid's smallest cell, with more rounds than a grid cell
    small = {f"m{i}": 20 for i in range(min(grid_ms))}
    budget = dict(budget_s=12.0, max_steps=61) if not quick else grid_budget
    marginal = marginal_costs(small, min(grid_batches), 50 if not quick else seq, device, amp,
                              grid_steps, **budget)  # fmt: skip
    accuracy = sampled_accuracy(acc_ms, **accuracy_kw)
    memory = peak_memory(dims, batch_size, seq, device, amp, quick)
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
        "amp": amp or "fp32",
        "threads": torch.get_num_threads(),
        "clock": clock_name(device),
        "torch": torch.__version__,
        "quick": quick,
        "dims": dims,
        "main": main,
        "main_default": main_default,
        "default_recipe": _recipe_summary(dims),
        "breakdown": parts,
        "sweep": sweep,
        "sweep_batch": near,
        "grid": grid,
        "grid_steps": grid_steps,
        "grid_budget_s": grid_budget["budget_s"],
        "marginal": marginal,
        "accuracy": accuracy,
        "memory": memory,
        "sweep_steps": sweep_steps,
        "repeats": repeats,
        "wall_s": time.perf_counter() - start,
    }


def m_axis(grid: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """The M axis of the paper's sweep: the grid's cells at ``batch``, with their paired ratios."""
    return [
        {
            "axis": "M",
            "value": r["M"],
            "plain_ms": r["plain_ms"],
            "pase_ms": r["pase_ms"],
            "ratio": r["ratio_paired"],
            "extra_ms": r["extra_paired_ms"],
        }
        for r in grid
        if r["recipe"] == "paper" and r["batch"] == batch
    ]


def _recipe_summary(dims: dict[str, int]) -> dict[str, Any]:
    """What the default recipe is made of (recorded with the numbers)."""
    config, methods, game_every = example_recipe(dims)
    keys = ("dim", "decision", "calibration", "alignment", "gate", "warm_head")
    return {**{k: getattr(config, k) for k in keys}, "methods": methods, "game_every": game_every}


def _grid_table(rows: list[dict[str, Any]], recipe: str) -> list[str]:
    """Ratio to the plain step for every M (rows) and batch size (columns) of one recipe."""
    mine = [r for r in rows if r["recipe"] == recipe]
    batches = sorted({r["batch"] for r in mine})
    lines = [
        "| M | game | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "|---|---|" + "---|" * len(batches),
    ]
    for m in sorted({r["M"] for r in mine}):
        cells = {r["batch"]: r for r in mine if r["M"] == m}
        any_row = next(iter(cells.values()))
        game = f"{'exact' if any_row['game_exact'] else 'sampled'}, {any_row['coalitions']}"
        out = []
        for b in batches:
            r = cells[b]
            ratio = r["ratio_paired"]
            mark = "**" if ratio > TARGET else ""
            out.append(f"{mark}{ratio:.2f}{mark} ({r['game_ms']:.1f} / {r['extra_paired_ms']:.1f})")
        lines.append(f"| {m} | {game} | " + " | ".join(out) + " |")
    return lines


def _misses(rows: list[dict[str, Any]]) -> list[str]:
    """One line per recipe: where the ratio exceeds the target, with the game's share."""
    lines = []
    for recipe, _, label in RECIPES:
        mine = [r for r in rows if r["recipe"] == recipe]
        bad = [r for r in mine if r["ratio_paired"] > TARGET]
        if not bad:
            worst = max(mine, key=lambda r: r["ratio_paired"])
            lines.append(
                f"* {label}: met in all {len(mine)} cells (highest {worst['ratio_paired']:.2f}x, "
                f"M={worst['M']}/batch {worst['batch']})."
            )
            continue
        cells = ", ".join(
            f"M={r['M']}/batch {r['batch']}: {r['ratio_paired']:.2f}x (plain "
            f"{r['plain_ms']:.1f} ms, extra {r['extra_paired_ms']:.1f} ms, of which the game "
            f"{r['game_ms']:.1f} ms)"
            for r in bad
        )
        # what the ratio would be if the game cost nothing: the rest of the recipe's extra
        rest = [
            r for r in bad if (r["extra_paired_ms"] - r["game_ms"]) / r["plain_ms"] > TARGET - 1
        ]
        where = ", ".join(f"M={r['M']}/batch {r['batch']}" for r in rest) or "none"
        lines.append(
            f"* {label}: above {TARGET:.2f}x in {len(bad)} of {len(mine)} cells: {cells}. "
            f"Without the game's own cost, {len(rest)} of them would still be above: {where}."
        )
    return lines


def _main_lines(result: dict[str, Any]) -> list[str]:
    """The main table (default recipe, paper's configuration), the breakdown and the sweep."""
    m = result["main"]
    d = result.get("main_default")
    clock = result.get("clock", "wall")
    lines = [
        f"Device: {result['device']} ({result['device_name']}), {result['amp']}, torch "
        f"{result['torch']}, {result['threads']} CPU thread(s), step times by {clock}. Shapes: "
        f"batch {m['batch']}, {m['seq']} frames, dims {json.dumps(result['dims'])}; backbone: 1 "
        "Transformer layer per modality.\n",
        f"| step | median ms ({m['steps']} interleaved steps) | ratio to plain |",
        "|---|---|---|",
    ]
    if d is not None:
        rec = result["default_recipe"]
        w = rec["dim"]
        parts = [f"methods {', '.join(rec['methods']) or 'none'}", f"decision {rec['decision']}"]
        parts += [k for k in ("calibration", "alignment", "gate") if rec[k]]
        lines += [
            f"| plain late fusion, width {w} (`pase_mosi.py --baseline`) | {d['plain_ms']:.2f} "
            "| 1.00 |",
            f"| PaSE default recipe, width {w} (`pase_mosi.py`, phase 2: {'; '.join(parts)}) | "
            f"{d['pase_ms']:.2f} | **{d['ratio']:.2f}x** |",
        ]
    lines += [
        f"| plain late fusion, width 64 | {m['plain_ms']:.2f} | 1.00 |",
        f"| PaSE phase 2, paper's configuration, width 64 | {m['pase_ms']:.2f} | "
        f"**{m['ratio']:.2f}x** |",
        "",
        f"Breakdown of the paper's step (each piece alone on the same batch, median of "
        f"{result['repeats']}):\n",
        "| component | ms |",
        "|---|---|",
    ]
    lines += [f"| {r['component']} | {r['ms']:.2f} |" for r in result["breakdown"]]
    lines += [
        "",
        f"Scaling of the paper's extra cost (median of {result['sweep_steps']} interleaved "
        f"steps; batch {m['batch']} unless varied; K: classification with K classes; M: "
        f"synthetic 20-d modalities, batch {result.get('sweep_batch', m['batch'])}, from the "
        "grid below, with its paired ratios and extra costs):\n",
        "| varied | value | plain ms | PaSE ms | ratio | extra ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['axis']} | {r['value']} | {r['plain_ms']:.2f} | {r['pase_ms']:.2f} | "
        f"{r['ratio']:.2f} | {r['extra_ms']:.2f} |"
        for r in result["sweep"]
    ]
    return lines


def _grid_lines(result: dict[str, Any]) -> list[str]:
    """The M x batch grid of both recipes, with the target's misses and the notes."""
    lines: list[str] = []
    grid = result.get("grid")
    if grid:
        counts = sorted({r["rounds"] for r in grid})
        rounds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        seconds = result.get("grid_budget_s", 0)
        budget = f", more for short steps: about {seconds:.0f} s of timed steps" if seconds else ""
        lines += [
            "",
            "## Scaling with the number of modalities and the batch size",
            "",
            "Ratio of the PaSE step to the plain step of the same width, for every M and batch "
            "size (synthetic 20-d modalities, 50 frames). The four steps of a cell (two plain, "
            "two PaSE) and the game run interleaved in rounds; a cell's ratio is the median over "
            "the rounds of the PaSE step's time over the plain step's time in the same round "
            f"({rounds} rounds per cell{budget}). In parentheses: the "
            "Shapley game alone on the step's features (median) / the whole extra cost of the "
            "step (median of the per-round differences), in ms. The column *game* says whether "
            "the game is exact or sampled and how many coalitions it evaluates per step. "
            f"**Bold**: above the {TARGET:.1f}x target.",
        ]
        for recipe, _, label in RECIPES:
            lines += ["", f"{label[0].upper() + label[1:]}:", "", *_grid_table(grid, recipe)]
        lines += ["", f"Target <= {TARGET:.2f}x:", "", *_misses(grid)]
        lines += ["", NOTES.strip()]
    return lines


def _accuracy_lines(result: dict[str, Any]) -> list[str]:
    """The sampled game's error against the exact game."""
    lines: list[str] = []
    acc = result.get("accuracy")
    if acc:
        lines += [
            "",
            "## Accuracy of the sampled game",
            "",
            "Sampled (`num_cycles` random cyclic orders) against exact Shapley values, on models "
            "of both configurations trained for a few steps on synthetic batches whose label "
            "every modality explains (the first ones most), on fresh batches of "
            f"{acc[0]['batch']} (see `sampled_accuracy`). *share error*: max over modalities of "
            "|psi_sampled - psi_exact|, psi the normalised positive shares; *phi error*: "
            "||phi_sampled - phi_exact|| / ||phi_exact||; mean and 95th percentile over all "
            "draws. *exact spread*: the standard deviation of the exact shares from batch to "
            "batch (same model), the noise the equilibrium's moving average already smooths. "
            "*weight error*: beta M times the mean share error, what it moves the default "
            "recipe's weights w = 1 + beta (1 - M psi) by in one step (before the moving average "
            f"of the shares, momentum {acc[0]['momentum']}).\n",
            "| configuration | M | cycles | coalitions | share error mean / p95 | phi error "
            "mean / p95 | exact spread | weight error |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in acc:
            w = r["weight_err_mean"]
            lines.append(
                f"| {r['recipe']} | {r['M']} | {r['cycles']} | {r['coalitions']} of "
                f"{2 ** r['M']} | {r['share_err_mean']:.4f} / {r['share_err_p95']:.4f} | "
                f"{r['phi_rel_err_mean']:.3f} / {r['phi_rel_err_p95']:.3f} | "
                f"{r['exact_share_spread']:.3f} | {'-' if w is None else f'{w:.3f}'} |"
            )
    return lines


def _marginal_lines(result: dict[str, Any]) -> list[str]:
    """What each part of the paper's step costs in the grid's smallest cell."""
    mc = result.get("marginal")
    if not mc:
        return []
    lines = [
        "",
        f"## What each part of the paper's step costs (M = {mc['M']}, batch {mc['batch']})",
        "",
        f"The paper's step with one part switched off, interleaved with the full step and the "
        f"plain step ({mc['rounds']} rounds): plain {mc['plain_ms']:.2f} ms, paper's "
        f"configuration {mc['pase_ms']:.2f} ms, extra {mc['extra_ms']:.2f} ms (paired medians); "
        "*saved*: the median paired difference between the full step and the step without the "
        "part (parts interact, so the savings need not add up to the extra cost).\n",
        "| part switched off | step without it, ms | saved ms | share of the extra |",
        "|---|---|---|---|",
    ]
    extra = mc["extra_ms"]
    for r in mc["rows"]:
        share = f"{r['saved_ms'] / extra:.0%}" if extra > 0 else "-"
        lines.append(f"| {r['part']} | {r['without_ms']:.2f} | {r['saved_ms']:.2f} | {share} |")
    return lines


def to_markdown(result: dict[str, Any]) -> str:
    """Render :func:`run`'s result as Markdown tables."""
    lines = [*_main_lines(result), *_grid_lines(result), *_marginal_lines(result)]
    lines += _accuracy_lines(result)
    mem = result["memory"]
    lines += [
        "",
        f"Peak memory of one step, paper's configuration ({mem['method']}): plain "
        f"{mem['plain']:.1f} MiB, PaSE {mem['pase']:.1f} MiB.",
        "",
    ]
    return "\n".join(lines)


#: What the grid shows, and why a cell misses the target (kept next to the numbers).
NOTES = """
How to read the grid: the game's own cost is the first number in parentheses; the rest of the
extra cost is the recipe's other per-step work (default recipe: the equilibrium's
Shapley-weighted unimodal losses; paper's configuration: prototype calibration, OT alignment of
every modality pair, the gated fusion and the modulator), which the game's options cannot change.

Why the paper's configuration costs more at small batches, and what was done about it (issue
23). Its other components cost a roughly fixed amount per step, dozens of small operations each
(calibration of every modality, 50 Sinkhorn iterations over every modality pair, the gated
fusion, the modulator's observe and update hooks; see the breakdown above), which weigh most
against the short plain steps of the smallest batches. They run in few operations, with the same
results up to float rounding (``tests/test_speed_paths.py``, ``tests/test_calibrate.py``): the
calibration of all the modalities as one batched pass (``modbalance.calibrate``: one autograd
node, one prototype update, one host read for the value checks, whatever the number of
modalities), the gate's confidences read from the calibration's logits instead of a second
similarity pass, the graph-free Sinkhorn iterations of all pairs in the scaling domain, the last
iteration, the envelope value and the structure term as one autograd node, value checks with one
reduction and one host read each, and in the game each sample's prototype confidence and gate
scores computed once for all its coalition rows. What is left above the target is the smallest
cell (M = 2, batch 16, a plain step of about 25 ms): the table of what each part costs there
shows no single part to remove; the alignment, the gate and the game with the modulator's hooks
each cost about two milliseconds of small operations. On the game's side,
``game_every=2`` (``--game-every 2``) halves its share. The default recipe, whose fusion head is
the plain MLP, stays within the target everywhere.
"""


def _plot_accuracy(ax: Any, acc: list[dict[str, Any]]) -> None:
    """The sampled game's share error against M, with the exact shares' batch-to-batch spread."""
    for recipe, _, _label in RECIPES:
        for c in sorted({r["cycles"] for r in acc}):
            rows = sorted(
                (r for r in acc if r["recipe"] == recipe and r["cycles"] == c),
                key=lambda r: r["M"],
            )
            ax.plot(
                [r["M"] for r in rows],
                [r["share_err_mean"] for r in rows],
                "o-",
                label=f"{recipe}, {c} cycle(s)",
            )
        rows = sorted((r for r in acc if r["recipe"] == recipe), key=lambda r: r["M"])
        ax.plot(
            [r["M"] for r in rows],
            [r["exact_share_spread"] for r in rows],
            "kx:" if recipe == "default" else "k+--",
            label=f"{recipe}: exact shares, batch-to-batch sd",
        )
    ax.set_yscale("log")
    ax.set_xlabel("modalities M")
    ax.set_ylabel("share error (mean max abs)")
    ax.set_title("sampled game vs exact", fontsize=9)
    ax.legend(fontsize=6)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Step time of plain vs PaSE against batch size, K and M; ratio grids; sampled accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [("batch", "batch size"), ("K", "classes K"), ("M", "modalities M")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.4))
    for ax, (axis, label) in zip(axes[0], axes_names):
        rows = [r for r in result["sweep"] if r["axis"] == axis]
        xs = [r["value"] for r in rows]
        ax.plot(xs, [r["plain_ms"] for r in rows], "o-", label="plain late fusion")
        ax.plot(xs, [r["pase_ms"] for r in rows], "s-", label="PaSE phase 2 (paper)")
        for r in rows:
            ax.annotate(
                f"{r['ratio']:.2f}x",
                (r["value"], r["pase_ms"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(0, 5),
                ha="center",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("median step time (ms)")
        if axis == "batch":
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    grid = result.get("grid", [])
    for ax, (recipe, _, label) in zip(axes[1], RECIPES):
        mine = [r for r in grid if r["recipe"] == recipe]
        for b in sorted({r["batch"] for r in mine}):
            rows = sorted((r for r in mine if r["batch"] == b), key=lambda r: r["M"])
            ratios = [r["ratio_paired"] for r in rows]
            ax.plot([r["M"] for r in rows], ratios, "o-", label=f"batch {b}")
        ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("modalities M")
        ax.set_ylabel("PaSE step / plain step")
        ax.set_title(label.replace("`", ""), fontsize=9)
        ax.legend(fontsize=7)
    _plot_accuracy(axes[1][2], result.get("accuracy", []))
    fig.suptitle(f"training step time, {result['device_name']} {result['amp']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict[str, Any], out_dir: Path = RESULTS, name: str = "speed") -> Path:
    """Write ``<name>.md``, ``<name>.json`` and ``<name>.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    png = plot(result, out_dir / f"{name}.png")
    flags = (
        (" --quick" if result["quick"] else "")
        + (f" --device {result['device']}" if result["device"] != "cpu" else "")
        + (f" --amp {result['amp']}" if result["amp"] != "fp32" else "")
    )
    text = (
        "# Training-step cost: PaSE phase 2 vs plain late fusion\n\n"
        + to_markdown(result)
        + f"\n![speed]({png.name})\n\nGenerated by `python benchmarks/speed.py{flags}` in "
        f"{result['wall_s']:.0f} s.\n"
    )
    md = out_dir / f"{name}.md"
    md.write_text(text)
    return md


def grid_report(
    ms: Sequence[int] | None = None,
    batches: Sequence[int] | None = None,
    device: str = "cpu",
    amp: str | None = None,
) -> str:
    """The grid of :func:`run` (same settings) for some M and batch sizes, as Markdown."""
    ms = tuple(ms or range(2, 9))
    batches = tuple(batches or (16, 32, 64, 128, 256))
    rows = scaling_grid(ms, batches, 50, device, amp, 5, budget_s=8.0, max_steps=41)
    lines = []
    for recipe, _, label in RECIPES:
        lines += [f"{label[0].upper() + label[1:]}:", "", *_grid_table(rows, recipe), ""]
    lines += [f"Target <= {TARGET:.2f}x:", "", *_misses(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("bf16",), default=None, help="autocast to bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--grid-only",
        action="store_true",
        help="only the M x batch grid of both recipes, printed (nothing written): a quick check",
    )
    parser.add_argument(
        "--ms", type=int, nargs="+", default=None, help="--grid-only: modalities (default 2..8)"
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="--grid-only: batch sizes (default 16 32 64 128 256)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.grid_only:
        print(grid_report(args.ms, args.batches, args.device, args.amp))
        return
    result = run(quick=args.quick, device=args.device, amp=args.amp)
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    suffix += "_bf16" if args.amp else ""
    md = write(result, args.out, name="speed" + suffix)
    print(md.read_text())


if __name__ == "__main__":
    main()
