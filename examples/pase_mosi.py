"""Train the PaSE reference model on MOSI-style data.

Usage::

    python examples/pase_mosi.py                          # embedded synthetic competition data
    python examples/pase_mosi.py --data aligned_50.pkl    # a real MMSA (or MulT) pickle
    python examples/pase_mosi.py --baseline               # plain late fusion, same backbone/budget
    python examples/pase_mosi.py --equilibrium none       # ablation: no Shapley equilibrium
    python examples/pase_mosi.py --calibration --gate     # add prototype components back
    torchrun --nproc_per_node=2 examples/pase_mosi.py     # distributed data parallel

Pickles run code when loaded: only pass files you trust.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

if __package__:  # imported as ``examples.pase_mosi`` (tests, benchmarks)
    from .pase import CheckpointError, DataError, PaSEConfig, TrainConfig, Trainer, build_datasets
    from .pase.plots import plot_history, plot_plan
else:  # run as ``python examples/pase_mosi.py``: this folder is on sys.path
    from pase import CheckpointError, DataError, PaSEConfig, TrainConfig, Trainer, build_datasets
    from pase.plots import plot_history, plot_plan

#: Balancing methods PaSE trains with by default (phase 2): the Shapley-based equilibrium.
PASE_METHODS = ("sge",)
#: ``--equilibrium`` choices: the default rule (Shapley-weighted unimodal losses), the paper's
#: update modulation, or none.
EQUILIBRIA = {"unimodal": "sge", "pase": "sgm", "none": None}
#: What a run writes into ``--out``; the first four mark a folder that holds a run.
RUN_MARKERS = ("last.pt", "best.pt", "final_metrics.json", "summary.json")
RUN_FILES = (
    *RUN_MARKERS,
    *("last.pt.tmp", "best.pt.tmp", "history.json", "history.csv"),
    *("shapley_shares.png", "val_scores.png", "coefficients.png"),
    "ot_plan.png",
)


class OutputError(ValueError):
    """An ``--out`` folder that cannot (or must not) be written, with what to do."""


def default_threads() -> int:
    """torch intra-op threads by default: 1 on machines with few cores, at most 4 otherwise.

    On 2 cores shared with other jobs, 3 epochs took 40-88 s with 1 thread and 156-248 s with 2:
    torch's threads wait on each other when they do not have the cores to themselves (README).
    """
    cores = os.cpu_count() or 1
    return 1 if cores <= 4 else min(4, cores // 2)


def _at_least(low: int, what: str):
    """An argparse ``type``: an int >= ``low``; the error names the value and the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer ({what}), got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low} ({what}), got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def _real(what: str, *, positive: bool, high: float | None = None):
    """An argparse ``type``: a finite float, > 0 (``positive``) or >= 0, and < ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number ({what}), got {text!r}") from None
        low_ok = value > 0 if positive else value >= 0
        if not math.isfinite(value) or not low_ok or (high is not None and value >= high):
            bound = "> 0" if positive else ">= 0"
            if high is not None:
                bound += f" and < {high:g}"
            raise argparse.ArgumentTypeError(
                f"must be a finite number {bound} ({what}), got {text}"
            )
        return value

    parse.__name__ = "float"
    return parse


#: The numeric options, ``(flag, type, default, help)`` in ``--help`` order, by argument group;
#: a callable default is called when the parser is built.
_RUN_NUMBERS = (
    (
        "--threads",
        _at_least(1, "torch intra-op CPU threads, e.g. --threads 1"),
        default_threads,
        "torch intra-op CPU threads (torch.set_num_threads); 1 is fastest on a few cores "
        "shared with other processes",
    ),
    (
        "--max-steps-per-epoch",
        _at_least(1, "a cap on the steps of an epoch; omit it for whole epochs"),
        None,
        "cap steps per epoch (smoke tests)",
    ),
)
_TRAINING_NUMBERS = (
    (
        "--epochs",
        _at_least(1, "training epochs, e.g. --epochs 14"),
        14,
        "training epochs, both phases together",
    ),
    (
        "--switch-epoch",
        _at_least(0, "phase-1 epochs; 0 skips the warm-up"),
        4,
        "last epoch of phase 1 (at the latest)",
    ),
    (
        "--patience",
        _at_least(1, "phase-1 epochs without validation gain"),
        None,
        "switch to phase 2 earlier after this many phase-1 epochs without validation gain",
    ),
    (
        "--batch-size",
        _at_least(1, "samples per step, e.g. --batch-size 64"),
        64,
        "samples per step (per rank under torchrun)",
    ),
    (
        "--lr",
        _real("the AdamW learning rate, e.g. --lr 1e-3", positive=True),
        1e-3,
        "AdamW learning rate",
    ),
    (
        "--weight-decay",
        _real("the AdamW weight decay, e.g. --weight-decay 1e-4", positive=False),
        1e-4,
        "AdamW weight decay",
    ),
    (
        "--dim",
        _at_least(1, "feature width, a multiple of the attention heads, e.g. --dim 32"),
        32,
        "feature width of every encoder",
    ),
    (
        "--layers",
        _at_least(1, "Transformer layers per encoder, e.g. --layers 1"),
        1,
        "Transformer layers per encoder",
    ),
    (
        "--seed",
        _at_least(0, "a non-negative training seed below 2**32, e.g. --seed 0"),
        0,
        "training seed (the synthetic data always uses 0)",
    ),
)
_GAME_NUMBERS = (
    (
        "--game-every",
        _at_least(1, "steps between two Shapley games, e.g. --game-every 1"),
        1,
        "evaluate the Shapley game (and update the equilibrium) every N steps",
    ),
)
_SYNTHETIC_NUMBERS = (
    (
        "--n-train",
        _at_least(1, "synthetic training samples, e.g. --n-train 1284"),
        None,
        "synthetic data: training samples",
    ),
    (
        "--text-strength",
        _real("text dominance of the synthetic data", positive=True, high=1.0),
        None,
        "synthetic data: text dominance, in (0, 1)",
    ),
)
#: The PaSE components, ``(flag, help)``: ``--flag``/``--no-flag``, off by default.
_COMPONENTS = (
    (
        "--calibration",
        "prototype calibration loss (separability-safe); off by default: it added nothing "
        "beyond the warm-up on the competition suite",
    ),
    ("--alignment", "OT alignment of the prototypes (off by default, see --calibration)"),
    ("--gate", "prototype-gated fusion instead of the mean (off by default, see --calibration)"),
)


def _add_numbers(group: argparse._ActionsContainer, rows: tuple) -> None:
    """Add the ``(flag, type, default, help)`` rows of a numeric-options table to ``group``."""
    for flag, kind, default, text in rows:
        value = default() if callable(default) else default
        group.add_argument(flag, type=kind, default=value, help=text)


def build_parser() -> argparse.ArgumentParser:
    """The command line: where the data and the outputs go, then one group per concern."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=_Formatter,
    )
    add = p.add_argument
    add(
        "--data",
        default=None,
        help="MMSA or MulT pickle (format detected from its content); "
        "default: the synthetic competition data, generated in memory",
    )
    add("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    add("--amp", choices=("bf16",), default=None, help="bf16 autocast (GPU)")
    add("--out", default="runs/pase", help="output directory (checkpoints, logs, plots)")
    add(
        "--resume",
        action="store_true",
        help="continue bit-exactly from OUT/last.pt (an error if there is none)",
    )
    add(
        "--overwrite",
        action="store_true",
        help="replace the run already in OUT (its checkpoints, logs and plots); without it (or "
        "--resume) a folder that holds a run is refused",
    )
    _add_numbers(p, _RUN_NUMBERS)
    add("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    _add_numbers(p.add_argument_group("training"), _TRAINING_NUMBERS)
    _add_model_args(p.add_argument_group("model"))
    _add_method_args(p.add_argument_group("balancing"))
    _add_numbers(p.add_argument_group("synthetic data (without --data)"), _SYNTHETIC_NUMBERS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; a bad value exits with status 2 and names the flag."""
    p = build_parser()
    args = p.parse_args(argv)
    problems = _problems(args)
    if problems:
        p.error("\n".join(problems))
    return args


def _problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with a parsed command line beyond each flag's own type (nothing: [])."""
    problems = []
    if args.seed >= 2**32:
        problems.append(
            f"argument --seed: must be below 2**32 (numpy's seed range), got {args.seed}"
        )
    heads = PaSEConfig.heads
    if args.dim % heads:
        problems.append(
            f"argument --dim: the Transformer encoders split the feature width over {heads} "
            f"attention heads, so it must be a multiple of {heads}, got {args.dim}; e.g. --dim "
            f"{max(heads, args.dim - args.dim % heads)}"
        )
    if args.data is not None:
        data = Path(args.data)
        if data.is_dir():
            pickles = sorted(q.name for q in data.glob("*.pkl"))[:3]
            where = (
                f"e.g. --data {data / pickles[0]} (pickles there: {', '.join(pickles)})"
                if pickles
                else "there is no *.pkl in it"
            )
            problems.append(
                f"argument --data: {data} is a folder; pass the pickle file itself, {where}"
            )
        for flag, value in (("--n-train", args.n_train), ("--text-strength", args.text_strength)):
            if value is not None:
                problems.append(
                    f"argument {flag}: {flag} {value} only shapes the synthetic data, but --data "
                    f"{args.data} is given; drop {flag} (or --data)"
                )
    problems += _device_problems(args.device)
    if args.resume and args.overwrite:
        problems.append(
            "arguments --resume and --overwrite contradict each other: --resume continues the "
            f"run in {args.out}, --overwrite replaces it; pass one of them"
        )
    if not args.baseline and args.patience is None and args.epochs <= args.switch_epoch:
        problems.append(
            f"argument --epochs: --epochs {args.epochs} ends before phase 2 (the fusion) starts "
            f"after --switch-epoch {args.switch_epoch} epochs of warm-up; pass --epochs "
            f"{args.switch_epoch + 1} or more, or a smaller --switch-epoch"
        )
    return problems


def _device_problems(device: str) -> list[str]:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        return [f"argument --device: {device!r} is not a torch device ({err}); e.g. --device cpu"]
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda is not None
            why = "none is visible" if built else "this torch build has no CUDA"
            return [
                f"argument --device: --device {device} needs a CUDA GPU, but {why} "
                f"(torch {torch.__version__}); use --device cpu"
            ]
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return [
                f"argument --device: --device {device} asks for GPU {dev.index}, but only {count} "
                f"GPU(s) are visible (cuda:0 to cuda:{count - 1})"
            ]
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return [f"argument --device: --device {device} is not available here; use --device cpu"]
    return []


def _add_model_args(group: argparse._ArgumentGroup) -> None:
    """The PaSE components, the decision, the warm fusion head and the baseline."""
    add = group.add_argument
    for flag, text in _COMPONENTS:
        add(flag, action=argparse.BooleanOptionalAction, default=False, help=text)
    add(
        "--decision",
        choices=("auto", "residual", "stack", "ensemble", "head", "gate", "precision"),
        default="auto",
        help="the rule of modbalance.Decision after the fusion head: 'auto' (the fusion head "
        "alone for regression, chosen on validation MAE; 'residual' for classification), the "
        "fusion head averaged with the detached unimodal heads ('residual'), with gradient "
        "('ensemble'), learned convex weights ('stack'), a learned per-sample gate ('gate'), "
        "inverse running squared errors ('precision', regression), or 'head'",
    )
    add(
        "--readout",
        choices=("auto", "head", "ridge"),
        default="auto",
        help="the fused prediction: 'ridge' (modbalance.RidgeReadout on the concatenated "
        "features, re-fitted after every phase-2 epoch, strength and checkpoint chosen on "
        "validation), 'head' (the fusion head and the decision), or 'auto': 'ridge' for "
        "regression (chosen on validation MAE), 'head' for classification and --baseline",
    )
    add(
        "--warm-head",
        choices=("auto", "on", "off"),
        default="auto",
        help="also train the fusion head during the warm-up, on detached features: 'auto' is "
        "on for regression (it removes the MAE the warm-up costs) and off for classification",
    )
    add(
        "--baseline",
        action="store_true",
        help="plain late fusion (joint training from epoch 1, no PaSE component)",
    )


def _add_method_args(group: argparse._ArgumentGroup) -> None:
    """The Shapley-based equilibrium, an extra modulator and the game's cadence."""
    add = group.add_argument
    add(
        "--equilibrium",
        choices=tuple(EQUILIBRIA),
        default="unimodal",
        help="Shapley-based equilibrium: 'unimodal' (Shapley-weighted unimodal losses after the "
        "warm-up), 'pase' (the paper's update modulation) or 'none' (the ablation)",
    )
    add(
        "--modulator",
        choices=("sgm", "ogm-ge", "none"),
        default="none",
        help="an extra gradient modulator on top",
    )
    _add_numbers(group, _GAME_NUMBERS)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def methods_from(args: argparse.Namespace) -> tuple[str, ...]:
    """Balancing methods from the flags: the equilibrium (PaSE) plus an optional modulator."""
    equilibrium = None if args.baseline else EQUILIBRIA[args.equilibrium]
    methods = () if equilibrium is None else (equilibrium,)
    if args.modulator not in (None, "none") and args.modulator not in methods:
        methods += (args.modulator,)
    return methods


def configs(args: argparse.Namespace, train, device: str) -> tuple[PaSEConfig, TrainConfig]:
    """The command line as the model's and the training's configurations (their one source)."""
    classification = train.task in ("iemocap", "classification")
    classes = {"iemocap": 4, "classification": getattr(train, "num_classes", None)}.get(
        train.task, 7
    )
    model_config = PaSEConfig(
        modalities=tuple(train.modalities),
        input_dims=dict(train.dims),
        dim=args.dim,
        layers=args.layers,
        task="classification" if classification else "regression",
        num_outputs=classes if classification else 1,
        num_classes=classes,
        calibration=args.calibration,
        alignment=args.alignment,
        gate=args.gate,
        decision="head" if args.baseline else args.decision,
        readout=args.readout,
        warm_head={"auto": "auto", "on": True, "off": False}[args.warm_head],
        baseline=args.baseline,
    )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        switch_epoch=args.switch_epoch,
        patience=args.patience,
        methods=methods_from(args),
        game_every=args.game_every,
        device=device,
        amp=args.amp,
        max_steps_per_epoch=args.max_steps_per_epoch,
        progress=not args.quiet,
    )
    return model_config, config


def print_table(final: dict, modalities: tuple[str, ...]) -> None:
    keys = ["Non0_acc_2", "Non0_F1_score", "Has0_acc_2", "Mult_acc_7", "MAE", "Corr", "WA", "UA"]
    rows = ["fused", *modalities]
    print(f"\nselected epoch (validation): {final['selected_epoch']}")
    for split in ("valid", "test"):
        res = final[split]
        ks = [k for k in keys if k in res["fused"]]
        print(f"\n{split:<8}" + "".join(f"{k:>14}" for k in ks))
        for r in rows:
            print(f"{r:<8}" + "".join(f"{res[r][k]:>14.4f}" for k in ks))
        print("Shapley shares: " + ", ".join(f"{m} {v:.3f}" for m, v in res["shares"].items()))


def write_outputs(trainer: Trainer, final: dict, info: dict, args, out: Path) -> None:
    model = trainer.model
    print_table(final, model.modalities)
    plot_history(trainer.history, model.modalities, out)
    if model.aligner is not None and len(model.modalities) >= 2:
        a, b = model.modalities[0], model.modalities[1]
        with torch.no_grad():
            res = model.aligner(model.calibrators[a].prototypes, model.calibrators[b].prototypes)
        plot_plan(res.plan, (a, b), out)
    # what ran: the flags, the training options, the optimiser's own values and, on resume,
    # the checkpoint's options and what this session changed
    groups = trainer.parts.optimizer.param_groups
    summary = {
        "wall_time_s": trainer.elapsed_s,
        "info": info,
        "final": final,
        "args": vars(args),
        "train_config": asdict(trainer.config),
        "optimizer": {k: groups[0][k] for k in ("lr", "weight_decay") if k in groups[0]},
        "threads": torch.get_num_threads(),
        "resumed": trainer.resumed,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\ntraining time {trainer.elapsed_s:.1f}s; outputs in {out}/")


def prepare_out(args: argparse.Namespace, *, remove_old: bool = True) -> Path:
    """Check ``--out`` before anything is trained; with ``--overwrite``, remove the old run.

    Raises:
        OutputError: ``--out`` is a file, cannot be created or written, or holds a run and
            neither ``--resume`` nor ``--overwrite`` is given.
        CheckpointError: ``--resume`` without ``OUT/last.pt``.
    """
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"--out {out} is a file, not a folder; pass a folder for the run's checkpoints, logs "
            f"and plots, e.g. --out {out.with_suffix('')}_run"
        )
    if args.resume:
        if not (out / "last.pt").is_file():
            raise CheckpointError(
                f"--resume: {out / 'last.pt'} does not exist; drop --resume to start a new run."
            )
    elif out.is_dir():
        found = [name for name in RUN_MARKERS if (out / name).exists()]
        suffix = "_baseline" if args.baseline else "_2"
        if found and not args.overwrite:
            raise OutputError(
                f"--out {out} already holds a run ({', '.join(found)}{_run_label(out)}); a new "
                f"run would overwrite it. Pass --resume to continue that run, --overwrite to "
                f"replace it, or another --out, e.g. --out {out.parent / (out.name + suffix)}."
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(
            f"--out {out} cannot be written ({type(err).__name__}: {err}); pass "
            "a folder you can write to."
        ) from None
    if args.overwrite and remove_old:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return out


def _run_label(out: Path) -> str:
    """``'; a finished --baseline run, seed 0'`` from the run's summary.json ('' if unreadable)."""
    try:
        old = json.loads((out / "summary.json").read_text()).get("args", {})
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(old, dict):
        return ""
    kind = "--baseline" if old.get("baseline") else f"--equilibrium {old.get('equilibrium')}"
    return f"; a finished {kind} run, seed {old.get('seed')}"


def _init_distributed(device: str) -> tuple[bool, str]:
    distributed = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    return distributed, device


def main(argv: list[str] | None = None) -> dict:
    """Run the example; Ctrl-C stops it with one line and exit status 130."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        return _main(args)
    except KeyboardInterrupt:
        if (out / "last.pt").is_file():
            instead = " instead of --overwrite" if args.overwrite else ""
            hint = (
                f"rerun the same command with --resume{instead} (same --out {out}) to continue "
                f"from {out / 'last.pt'}, the last finished epoch."
            )
        else:
            hint = f"no epoch finished, so there is no {out / 'last.pt'} to resume from."
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun interrupts every rank
            print(f"\ninterrupted (Ctrl-C): the run stopped; {hint}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (benchmarks)


def _main(args: argparse.Namespace) -> dict:
    # every rank checks --out (so that all of them stop on a bad one); rank 0 alone removes
    # an old run for --overwrite
    out = prepare_out(args, remove_old=int(os.environ.get("RANK", "0")) == 0)
    distributed, device = _init_distributed(args.device)
    synthetic = {
        k: v
        for k, v in (("n_train", args.n_train), ("text_strength", args.text_strength))
        if v is not None
    }
    train, valid, test, info = build_datasets(args.data, seed=0, synthetic=synthetic)
    model_config, config = configs(args, train, device)
    trainer = Trainer(model_config, config, train, valid, test, out_dir=out)
    if args.resume:
        if not trainer.resume():
            raise CheckpointError(
                f"--resume: {out / 'last.pt'} does not exist; drop --resume to start a new run."
            )
        if trainer.is_main:
            print(f"resumed from {out / 'last.pt'} at epoch {trainer.epoch}")
    if trainer.is_main:
        methods = ", ".join(config.methods) or "none"
        print(
            f"data: {info['source']} | train {len(train)} valid {len(valid)} | methods {methods}"
            + (" | baseline" if args.baseline else "")
        )
    final = trainer.run()
    if trainer.is_main:
        write_outputs(trainer, final, info, args, out)
    if distributed:
        # every rank waits for rank 0's outputs before the group goes: a rank that tore down
        # gloo while rank 0 was still writing aborted now and then ("terminate called without
        # an active exception", about 1 run in 10 of the two-rank test)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, OutputError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
