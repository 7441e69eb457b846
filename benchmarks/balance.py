"""Does balancing work? Plain joint training vs OGM-GE vs PaSE and its ablations, same budget.

On the synthetic competition data (:func:`modbalance.data.make_competition_data`, whose ground
truth says how much label variance each modality subset can explain), every method trains the
same backbone (``examples/pase``: one Transformer encoder per modality, masked mean pooling, an
MLP fusion head) for the same number of epochs with the same optimiser, and is selected on the
validation split. Methods:

* ``joint``: plain late fusion (mean of the modality features), no modulation;
* ``ogm-ge``: the same late fusion with OGM-GE (update-scaled, with its Gaussian noise);
* ``pase``: prototype calibration + OT alignment + prototype-gated fusion + Shapley modulation,
  dual phase (phase 1: unimodal heads train the encoders);
* ``pase-no-calibration`` / ``-no-alignment`` / ``-no-gate`` / ``-no-sgm``: PaSE with that
  one component removed.

Reported per method (mean ± std over seeds), on the test split after validation selection:

* the fused MMSA metrics (Non0 Acc-2, Non0 F1, MAE, Corr, Acc-7);
* each modality's **linear-probe** R² (:func:`modbalance.metrics.probe_score`, ridge on the frozen
  pooled encoder features of the training split, scored on the test split), next to the same
  probe on an encoder of that modality trained **alone** (the same backbone with only that
  modality, its own head, the same epochs): ``probe / alone`` is the fraction of the modality's
  achievable signal that joint training recovered;
* the final validation Shapley shares of the fused head;
* the fraction of the generator's explainable variance recovered: fused test R² divided by
  ``ground_truth["text+audio+vision"]``.

All of it at two dominance levels of text (``text_strength``). The training seed varies; the data
set (seed 0) does not.

Run: ``python benchmarks/balance.py [--quick] [--seeds 3] [--device cpu]``; writes
``benchmarks/results/balance.md`` (and ``balance.json``, ``balance.png``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))

from pase.model import PaSEConfig  # noqa: E402
from pase.train import GuardedDataset, TrainConfig, Trainer, build_datasets  # noqa: E402

from modbalance.data import collate_multimodal  # noqa: E402
from modbalance.metrics import probe_score  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODALITIES = ("text", "audio", "vision")
DEFAULT_RUN_CACHE = Path(tempfile.gettempdir()) / "modbalance_bench_runs"
METRICS = ("Non0_acc_2", "Non0_F1_score", "MAE", "Corr", "Mult_acc_7")

#: method name -> (PaSEConfig switches, TrainConfig.modulator)
METHODS: dict[str, tuple[dict[str, bool], str]] = {
    "joint": ({"baseline": True}, "none"),
    "ogm-ge": ({"baseline": True}, "ogm-ge"),
    "pase": ({}, "sgm"),
    "pase-no-calibration": ({"calibration": False}, "sgm"),
    "pase-no-alignment": ({"alignment": False}, "sgm"),
    "pase-no-gate": ({"gate": False}, "sgm"),
    "pase-no-sgm": ({}, "none"),
}

#: Benchmark configuration (identical for every method). Chosen so that the full benchmark
#: (7 methods x 3 seeds x 2 dominance levels + 3 x 3 x 2 unimodal runs) fits in ~45 min on a
#: shared 2-core CPU: MOSI's split sizes and sequence length, but a 128-d text feature (the
#: generator's text signal lives in a rank-16 subspace either way), a 32-d backbone and 16 epochs
#: (the example's CLI default: 768-d text, 64-d backbone, 24 epochs).
FULL = {
    "data": {
        "n_train": 1284,
        "n_valid": 229,
        "n_test": 686,
        "seq_len": 50,
        "dims": {"text": 128, "audio": 5, "vision": 20},
    },
    "model": {"dim": 32, "layers": 1},
    "train": {"epochs": 16, "switch_epoch": 4, "batch_size": 64, "lr": 1e-3},
    "strengths": (0.5, 0.8),
    "seeds": 3,
    "methods": tuple(METHODS),
}
QUICK = {
    "data": {
        "n_train": 64,
        "n_valid": 24,
        "n_test": 32,
        "seq_len": 8,
        "dims": {"text": 12, "audio": 5, "vision": 6},
    },
    "model": {"dim": 16, "layers": 1},
    "train": {"epochs": 2, "switch_epoch": 1, "batch_size": 16, "lr": 1e-3},
    "strengths": (0.5,),
    "seeds": 1,
    "methods": ("joint", "pase"),
}


@torch.no_grad()
def _features(
    trainer: Trainer, dataset
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Frozen pooled encoder features (eval mode), fused predictions and labels of a split."""
    model = trainer.model
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=collate_multimodal)
    feats: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
    preds, labels = [], []
    for batch in loader:
        batch = {
            k: ({m: t.to(trainer.device) for m, t in v.items()} if isinstance(v, dict) else v)
            for k, v in batch.items()
        }
        out = model.predict(batch)
        for m in model.modalities:
            feats[m].append(out["feats"][m].float().cpu())
        preds.append(out["fused"].float().cpu())
        labels.append(batch["label"].float().cpu())
    return {m: torch.cat(f) for m, f in feats.items()}, torch.cat(preds), torch.cat(labels)


def _r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    pred, y = pred.double(), y.double()
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def train_one(
    splits,
    modalities: tuple[str, ...],
    switches: dict[str, bool],
    modulator: str,
    seed: int,
    cfg: dict[str, Any],
    device: str,
) -> dict[str, Any]:
    """Train one model, then probe its encoders and score its fused prediction on test."""
    train, valid, test, _ = splits
    test = GuardedDataset(test._dataset)  # a fresh lock for every run
    model_config = PaSEConfig(
        modalities=modalities,
        input_dims={m: train.dims[m] for m in modalities},
        **cfg["model"],
        **switches,
    )
    train_config = TrainConfig(
        **cfg["train"], seed=seed, modulator=modulator, device=device, progress=False
    )
    trainer = Trainer(model_config, train_config, train, valid, test, out_dir=None)
    start = time.perf_counter()
    final = trainer.run()
    elapsed = time.perf_counter() - start
    ftr, _, ytr = _features(trainer, train)
    fte, pte, yte = _features(trainer, test)  # unlocked by Trainer.finish()
    return {
        "time_s": elapsed,
        "selected_epoch": final["selected_epoch"],
        "fused": {k: final["test"]["fused"][k] for k in METRICS},
        "fused_r2": _r2(pte, yte),
        "probe": {m: probe_score(ftr[m], ytr, fte[m], yte) for m in modalities},
        "shares": final["valid"]["shares"],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN if any value is NaN; std 0 for one value)."""
    if any(math.isnan(v) for v in values):
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fingerprint(cfg: dict[str, Any], device: str) -> str:
    """Short hash of everything that determines a run's result except method, level and seed."""
    key = json.dumps([cfg["data"], cfg["model"], cfg["train"], device], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def run(
    quick: bool = False,
    device: str = "cpu",
    seeds: int | None = None,
    methods: tuple[str, ...] | None = None,
    strengths: tuple[float, ...] | None = None,
    cache_dir: Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the benchmark; returns ``{"config", "levels", "wall_s"}`` (see :func:`to_markdown`).

    With ``cache_dir``, every finished training run is stored there as one JSON file (keyed by
    the configuration's :func:`fingerprint`, the level, the method and the seed) and reused on
    the next call: an interrupted benchmark resumes, and several processes (e.g. one per
    ``strengths`` value) can share the work.
    """
    cfg = dict(QUICK if quick else FULL)
    n_seeds = seeds if seeds is not None else cfg["seeds"]
    methods = methods or cfg["methods"]
    strengths = strengths or cfg["strengths"]
    fp = fingerprint(cfg, device)
    start = time.perf_counter()
    data_cache = Path(tempfile.gettempdir()) / "modbalance_bench_cache"
    levels = []
    for strength in strengths:
        splits = build_datasets(
            None, seed=0, synthetic={**cfg["data"], "text_strength": strength}, cache_dir=data_cache
        )
        gt = splits[3]["ground_truth"]
        runs: dict[str, list[dict[str, Any]]] = {}
        # each modality trained alone (same backbone, head and epochs): the achievable probe
        # score; then every method
        jobs = [(f"alone:{m}", (m,), {"baseline": True}, "none") for m in MODALITIES]
        jobs += [(name, MODALITIES, *METHODS[name]) for name in methods]
        for name, mods, switches, modulator in jobs:
            runs[name] = []
            for seed in range(n_seeds):
                path = None
                if cache_dir is not None:
                    tag = name.replace(":", "-")
                    path = Path(cache_dir) / f"{fp}_ts{strength}_{tag}_s{seed}.json"
                if path is not None and path.exists():
                    r = json.loads(path.read_text())
                else:
                    r = train_one(splits, mods, switches, modulator, seed, cfg, device)
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = path.with_suffix(".tmp")
                        tmp.write_text(json.dumps(r))
                        os.replace(tmp, path)
                runs[name].append(r)
                log(
                    f"text_strength {strength} {name} seed {seed}: MAE {r['fused']['MAE']:.3f} "
                    f"Non0 {r['fused']['Non0_acc_2']:.3f} probes "
                    + " ".join(f"{m} {v:.3f}" for m, v in r["probe"].items())
                    + f" ({r['time_s']:.0f}s)"
                )
        levels.append(
            {
                "text_strength": strength,
                "ground_truth": gt,
                "summary": summarize(runs, gt, methods),
                "runs": runs,
            }
        )
    compute_s = sum(r["time_s"] for lv in levels for rs in lv["runs"].values() for r in rs)
    return {
        "config": {
            **cfg,
            "seeds": n_seeds,
            "methods": tuple(methods),
            "device": device,
            "threads": torch.get_num_threads(),
        },
        "levels": levels,
        "wall_s": time.perf_counter() - start,
        "compute_s": compute_s,
    }


def summarize(runs: dict[str, list[dict]], gt: dict[str, float], methods) -> dict[str, Any]:
    """Mean ± std per method of every reported quantity, and the targets against ``joint``."""
    alone = {m: [r["probe"][m] for r in runs[f"alone:{m}"]] for m in MODALITIES}
    alone_mean = {m: statistics.mean(v) for m, v in alone.items()}
    out: dict[str, Any] = {"alone": {m: _mean_std(v) for m, v in alone.items()}, "methods": {}}
    for name in methods:
        rs = runs[name]
        row = {k: _mean_std([r["fused"][k] for r in rs]) for k in METRICS}
        row["fused_r2"] = _mean_std([r["fused_r2"] for r in rs])
        row["gt_fraction"] = _mean_std([r["fused_r2"] / gt["text+audio+vision"] for r in rs])
        for m in MODALITIES:
            row[f"probe_{m}"] = _mean_std([r["probe"][m] for r in rs])
            row[f"recovered_{m}"] = _mean_std(
                [r["probe"][m] / alone_mean[m] if alone_mean[m] > 0 else float("nan") for r in rs]
            )
            row[f"share_{m}"] = _mean_std([r["shares"][m] for r in rs])
        row["time_s"] = statistics.mean(r["time_s"] for r in rs)
        out["methods"][name] = row
    if "joint" in out["methods"] and "pase" in out["methods"]:
        j, p = out["methods"]["joint"], out["methods"]["pase"]
        out["targets"] = {
            "Non0_acc_2": p["Non0_acc_2"][0] > j["Non0_acc_2"][0],
            "MAE": p["MAE"][0] < j["MAE"][0],
            **{
                f"probe_{m}+5pts": p[f"probe_{m}"][0] - j[f"probe_{m}"][0] >= 0.05
                for m in ("audio", "vision")
            },
        }
    return out


def _ratio(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def _fmt(ms: tuple[float, float], scale: float = 1.0, digits: int = 3) -> str:
    return f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"


def to_markdown(result: dict[str, Any]) -> str:
    """Render :func:`run`'s result: per dominance level, the metric, probe and share tables."""
    lines = []
    for level in result["levels"]:
        s, gt = level["summary"], level["ground_truth"]
        lines.append(f"### text_strength = {level['text_strength']}\n")
        lines.append(
            "Ground truth (explainable fraction of label variance): "
            + ", ".join(
                f"{k} {gt[k]:.3f}" for k in ("text", "audio", "vision", "text+audio+vision")
            )
            + ".\n"
        )
        lines.append("| method | Non0 Acc-2 | Non0 F1 | MAE | Corr | Acc-7 | fused R² | R² / GT |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, row in s["methods"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(_fmt(row[k]) for k in METRICS)
                + f" | {_fmt(row['fused_r2'])} | {_fmt(row['gt_fraction'])} |"
            )
        lines.append("")
        lines.append(
            "Linear-probe R² of each encoder's frozen features (train → test), and in "
            "parentheses the fraction of the same modality's encoder trained alone "
            "(alone: " + ", ".join(f"{m} {_fmt(v)}" for m, v in s["alone"].items()) + ").\n"
        )
        lines.append(
            "| method | text probe | audio probe | vision probe | val. Shapley shares "
            "t / a / v | s / run (shared CPU) |"
        )
        lines.append("|---|---|---|---|---|---|")
        for name, row in s["methods"].items():
            probes = " | ".join(
                f"{_fmt(row[f'probe_{m}'])} ({_ratio(row[f'recovered_{m}'][0])})"
                for m in MODALITIES
            )
            shares = " / ".join(f"{row[f'share_{m}'][0]:.2f}" for m in MODALITIES)
            lines.append(f"| {name} | {probes} | {shares} | {row['time_s']:.0f} |")
        lines.append("")
        if "targets" in s:
            lines.append(
                "Targets (PaSE vs joint, on means): "
                + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in s["targets"].items())
                + ".\n"
            )
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> str:
    """Compact table (joint / OGM-GE / PaSE at every dominance level) for the README."""
    lines = [
        "| text strength | method | Non0 Acc-2 | MAE | Corr | audio probe R² | "
        "vision probe R² | R² / GT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in result["levels"]:
        for name in ("joint", "ogm-ge", "pase"):
            row = level["summary"]["methods"].get(name)
            if row is None:
                continue
            lines.append(
                f"| {level['text_strength']} | {name} | {_fmt(row['Non0_acc_2'])} | "
                f"{_fmt(row['MAE'])} | {_fmt(row['Corr'])} | {_fmt(row['probe_audio'])} | "
                f"{_fmt(row['probe_vision'])} | {_fmt(row['gt_fraction'], digits=2)} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Bar charts: fused MAE and per-modality probe R² (with the trained-alone level) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    fig, axes = plt.subplots(len(levels), 2, figsize=(12, 3.6 * len(levels)), squeeze=False)
    for row_axes, level in zip(axes, levels):
        s = level["summary"]
        names = list(s["methods"])
        x = range(len(names))
        ax = row_axes[0]
        mae = [s["methods"][n]["MAE"] for n in names]
        ax.bar(x, [v[0] for v in mae], yerr=[v[1] for v in mae], color="tab:gray", capsize=3)
        ax.set_ylim(min(v[0] for v in mae) * 0.9, max(v[0] for v in mae) * 1.05)
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_ylabel("fused test MAE (lower is better)")
        ax.set_title(f"text_strength {level['text_strength']}")
        ax = row_axes[1]
        width = 0.8 / len(MODALITIES)
        colors = {"text": "tab:blue", "audio": "tab:orange", "vision": "tab:green"}
        for i, m in enumerate(MODALITIES):
            vals = [s["methods"][n][f"probe_{m}"] for n in names]
            xs = [j + (i - 1) * width for j in x]
            ax.bar(
                xs,
                [v[0] for v in vals],
                width,
                yerr=[v[1] for v in vals],
                capsize=2,
                color=colors[m],
                label=m,
            )
            ax.axhline(s["alone"][m][0], color=colors[m], ls="--", lw=1)
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_ylabel("linear-probe R² (dashed: trained alone)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe(result: dict[str, Any]) -> str:
    c = result["config"]
    return (
        f"Configuration (same for every method): data {json.dumps(c['data'])}; model "
        f"{json.dumps(c['model'])} (examples/pase backbone); training {json.dumps(c['train'])}, "
        f"AdamW, validation-selected checkpoint; {c['seeds']} training seed(s) (data seed 0); "
        f"device {c['device']}, {c['threads']} CPU thread(s). Unimodal 'alone' runs: the same "
        f"backbone with one modality, trained on the task through the fusion head for the same "
        f"epochs. Training time {result['compute_s'] / 60:.1f} min (sum over all runs, 1 "
        f"thread per process); wall time of the final invocation {result['wall_s'] / 60:.1f} "
        "min (runs found in the cache are not re-run)."
    )


def write(result: dict[str, Any], out_dir: Path = RESULTS, quick: bool = False) -> Path:
    """Write ``balance.md``, ``balance.json`` and ``balance.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "balance.json").write_text(json.dumps(result, indent=1, default=list))
    png = plot(result, out_dir / "balance.png")
    text = (
        "# Balancing quality: joint training vs OGM-GE vs PaSE and ablations\n\n"
        + describe(result)
        + "\n\n## Headline\n\n"
        + headline(result)
        + "\n## Full results\n\n"
        + to_markdown(result)
        + f"\n![balance]({png.name})\n\nGenerated by `python benchmarks/balance.py"
        + (" --quick" if quick else "")
        + "`.\n"
    )
    md = out_dir / "balance.md"
    md.write_text(text)
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny data, 2 epochs, 1 seed, 2 methods"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=None)
    parser.add_argument(
        "--strengths", type=float, nargs="+", default=None, help="text_strength levels"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder of finished runs to reuse/resume (default: <tmp>/modbalance_bench_runs; "
        "none with --quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(
        quick=args.quick,
        device=args.device,
        seeds=args.seeds,
        methods=tuple(args.methods) if args.methods else None,
        strengths=tuple(args.strengths) if args.strengths else None,
        cache_dir=args.cache or (None if args.quick else DEFAULT_RUN_CACHE),
    )
    md = write(result, args.out, quick=args.quick)
    print(md.read_text())


if __name__ == "__main__":
    main()
