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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pase.model import PaSEConfig
from pase.train import TrainConfig, Trainer, build_datasets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=None, help="MMSA or MulT pickle; default: synthetic competition data"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("bf16",), default=None, help="autocast dtype on GPU")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument(
        "--switch-epoch", type=int, default=6, help="last epoch of phase 1 (at the latest)"
    )
    p.add_argument(
        "--patience", type=int, default=None, help="switch earlier on a validation plateau"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/pase", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-calibration", action="store_true")
    p.add_argument("--no-alignment", action="store_true")
    p.add_argument("--no-gate", action="store_true")
    p.add_argument("--no-sgm", action="store_true")
    p.add_argument("--baseline", action="store_true", help="plain late fusion (joint training)")
    p.add_argument("--modulator", choices=("sgm", "ogm-ge", "none"), default=None)
    p.add_argument("--sgm-every", type=int, default=1)
    p.add_argument("--n-train", type=int, default=None, help="synthetic data: training samples")
    p.add_argument(
        "--text-strength", type=float, default=None, help="synthetic data: text dominance"
    )
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = args.device
    if distributed:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    t0 = time.perf_counter()
    synthetic = {}
    if args.n_train is not None:
        synthetic["n_train"] = args.n_train
    if args.text_strength is not None:
        synthetic["text_strength"] = args.text_strength
    train, valid, test, info = build_datasets(args.data, seed=0, synthetic=synthetic)
    iemocap = getattr(train, "task", "regression") == "iemocap"
    model_config = PaSEConfig(
        modalities=tuple(train.modalities),
        input_dims=dict(train.dims),
        dim=args.dim,
        layers=args.layers,
        task="classification" if iemocap else "regression",
        num_outputs=4 if iemocap else 1,  # IEMOCAP: 4-class single-label view
        num_classes=4 if iemocap else 7,
        calibration=not args.no_calibration,
        alignment=not args.no_alignment,
        gate=not args.no_gate,
        baseline=args.baseline,
    )
    modulator = args.modulator or ("none" if (args.baseline or args.no_sgm) else "sgm")
    if args.no_sgm and modulator == "sgm":
        modulator = "none"
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        switch_epoch=args.switch_epoch,
        patience=args.patience,
        modulator=modulator,
        sgm_every=args.sgm_every,
        device=device,
        amp=args.amp,
        max_steps_per_epoch=args.max_steps_per_epoch,
        progress=not args.quiet,
    )
    out = Path(args.out)
    trainer = Trainer(model_config, config, train, valid, test, out_dir=out)
    if args.resume and trainer.resume() and trainer.is_main:
        print(f"resumed from {out / 'last.pt'} at epoch {trainer.epoch}")
    if trainer.is_main:
        print(
            f"data: {info['source']} | train {len(train)} valid {len(valid)} "
            f"| modulator {modulator}" + (" | baseline" if args.baseline else "")
        )
    final = trainer.run()
    if trainer.is_main:
        print_table(final, model_config.modalities)
        from pase.plots import plot_history, plot_plan

        plot_history(trainer.history, model_config.modalities, out)
        model = trainer.model
        if model.aligner is not None and len(model.modalities) >= 2:
            a, b = model.modalities[0], model.modalities[1]
            with torch.no_grad():
                res = model.aligner(
                    model.calibrators[a].prototypes, model.calibrators[b].prototypes
                )
            plot_plan(res.plan, (a, b), out)
        summary = {
            "wall_time_s": time.perf_counter() - t0,
            "info": info,
            "final": final,
            "args": vars(args),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"\nwall time {summary['wall_time_s']:.1f}s; outputs in {out}/")
    if distributed:
        torch.distributed.destroy_process_group()
    return final


if __name__ == "__main__":
    main()
