"""Train the PaSE reference model on MOSI-style data.

Usage::

    python examples/pase_mosi.py                          # embedded synthetic competition data
    python examples/pase_mosi.py --data aligned_50.pkl    # a real MMSA (or MulT) pickle
    python examples/pase_mosi.py --baseline               # plain late fusion, same backbone/budget
    python examples/pase_mosi.py --no-sgm --no-gate       # ablations
    torchrun --nproc_per_node=2 examples/pase_mosi.py     # distributed data parallel

Pickles run code when loaded: only pass files you trust.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    add("--epochs", type=int, default=14, help="training epochs, both phases together")
    add("--switch-epoch", type=int, default=4, help="last epoch of phase 1 (at the latest)")
    add(
        "--patience",
        type=int,
        default=None,
        help="switch to phase 2 earlier after this many phase-1 epochs without validation gain",
    )
    add("--batch-size", type=int, default=64, help="samples per step (per rank under torchrun)")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate")
    add("--dim", type=int, default=32, help="feature width of every encoder")
    add("--layers", type=int, default=1, help="Transformer layers per encoder")
    add("--seed", type=int, default=0, help="training seed (the synthetic data always uses 0)")
    add("--out", default="runs/pase", help="output directory (checkpoints, logs, plots)")
    add(
        "--resume",
        action="store_true",
        help="continue bit-exactly from OUT/last.pt (an error if there is none)",
    )
    _add_method_args(p)
    return p.parse_args(argv)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    """The PaSE components, the equilibrium, the decision and the synthetic data's options."""
    add = p.add_argument
    onoff = argparse.BooleanOptionalAction
    add(
        "--calibration",
        action=onoff,
        default=False,
        help="prototype calibration loss (separability-safe); off by default: it added nothing "
        "beyond the warm-up on the competition suite",
    )
    add(
        "--alignment",
        action=onoff,
        default=False,
        help="OT alignment of the prototypes (off by default, see --calibration)",
    )
    add(
        "--gate",
        action=onoff,
        default=False,
        help="prototype-gated fusion instead of the mean (off by default, see --calibration)",
    )
    add(
        "--equilibrium",
        choices=tuple(EQUILIBRIA),
        default="unimodal",
        help="Shapley-based equilibrium: 'unimodal' (Shapley-weighted unimodal losses after the "
        "warm-up), 'pase' (the paper's update modulation) or 'none'",
    )
    add("--no-sgm", action="store_true", help="ablation: no Shapley equilibrium (= none)")
    add(
        "--decision",
        choices=("residual", "stack", "ensemble", "head"),
        default="residual",
        help="fused output: the fusion head averaged with the detached unimodal heads "
        "('residual'), with the unimodal heads trained by the fused loss too ('ensemble'), or "
        "the fusion head alone ('head', the paper's and the baseline's)",
    )
    add(
        "--baseline",
        action="store_true",
        help="plain late fusion (joint training from epoch 1, no PaSE component)",
    )
    add(
        "--modulator",
        choices=("sgm", "ogm-ge", "none"),
        default=None,
        help="an extra gradient modulator on top (default: none)",
    )
    add(
        "--sgm-every",
        type=int,
        default=1,
        help="evaluate the Shapley game (and update the equilibrium) every N steps",
    )
    add("--n-train", type=int, default=None, help="synthetic data: training samples")
    add("--text-strength", type=float, default=None, help="synthetic data: text dominance")
    add("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke tests)")
    add("--quiet", action="store_true", help="no progress bars or per-epoch lines")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def methods_from(args: argparse.Namespace) -> tuple[str, ...]:
    """Balancing methods from the flags: the equilibrium (PaSE) plus an optional modulator."""
    equilibrium = None if (args.baseline or args.no_sgm) else EQUILIBRIA[args.equilibrium]
    methods = () if equilibrium is None else (equilibrium,)
    if args.modulator not in (None, "none") and args.modulator not in methods:
        methods += (args.modulator,)
    return methods


def configs(args: argparse.Namespace, train, device: str) -> tuple[PaSEConfig, TrainConfig]:
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
        safe_calibration=True,
        decision="head" if args.baseline else args.decision,
        baseline=args.baseline,
    )
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        switch_epoch=args.switch_epoch,
        patience=args.patience,
        methods=methods_from(args),
        game_every=args.sgm_every,
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
    summary = {"wall_time_s": trainer.elapsed_s, "info": info, "final": final, "args": vars(args)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ntraining time {trainer.elapsed_s:.1f}s; outputs in {out}/")


def _init_distributed(device: str) -> tuple[bool, str]:
    distributed = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    return distributed, device


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed, device = _init_distributed(args.device)
    synthetic = {
        k: v
        for k, v in (("n_train", args.n_train), ("text_strength", args.text_strength))
        if v is not None
    }
    train, valid, test, info = build_datasets(args.data, seed=0, synthetic=synthetic)
    model_config, config = configs(args, train, device)
    out = Path(args.out)
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
        torch.distributed.destroy_process_group()
    return final


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
