"""PNG plots of a PaSE run: Shapley shares, coefficients, validation scores, an OT plan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .loop import error_of


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(
    history: Sequence[dict[str, Any]], modalities: Sequence[str], out_dir: Path
) -> list[Path]:
    """Write shapley_shares.png, coefficients.png and val_scores.png; return their paths."""
    plt = _plt()
    written = []
    panels = [
        (
            "shapley_shares.png",
            "Shapley share of the fused head (validation)",
            "Shapley share",
            lambda r, m: r["val"]["shares"][m],
        )
    ] * any("shares" in r["val"] for r in history)  # none without TrainConfig.epoch_shares
    panels += [
        (
            "val_scores.png",
            "Validation error per modality read-out",
            "error (MAE or 1 - accuracy)",
            lambda r, m: error_of(r["val"][m]),
        ),
    ]
    if history and any(k.startswith("coefficient_") for k in history[-1].get("methods", {})):
        panels.append(
            (
                "coefficients.png",
                "The balancing method's coefficient per modality",
                "coefficient (update scale or unimodal loss weight)",
                lambda r, m: r.get("methods", {}).get(f"coefficient_{m}", float("nan")),
            )
        )
    for fname, title, ylabel, get in panels:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        # the shares are those of the fused head, which the warm-up does not train: phase 2 only
        rows = [
            r
            for r in history
            if fname != "shapley_shares.png" or (r["phase"] == 2 and "shares" in r["val"])
        ]
        for m in modalities:
            ax.plot(
                [r["epoch"] for r in rows], [get(r, m) for r in rows], marker="o", ms=3, label=m
            )
        if fname == "val_scores.png":
            fused = [(r["epoch"], error_of(r["val"]["fused"])) for r in history if r["phase"] == 2]
            if fused:  # the fused head is not trained in phase 1: plot phase 2 only
                ax.plot(*zip(*fused), "k--", label="fused")
        switch = next((r["epoch"] for r in history if r["phase"] == 2), None)
        if switch is not None and any(r["phase"] == 1 for r in history):
            ax.axvline(switch - 0.5, color="grey", ls=":", lw=1, label="phase 2 starts")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(out_dir / fname)
    return written


def plot_plan(plan: torch.Tensor, names: tuple[str, str], out_dir: Path) -> Path:
    """Heat map of a transport plan between two modalities' prototypes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3.5))
    im = ax.imshow(plan.detach().cpu().float().numpy(), cmap="viridis")
    ax.set_xlabel(f"{names[1]} prototype (class)")
    ax.set_ylabel(f"{names[0]} prototype (class)")
    ax.set_title(f"OT plan {names[0]} -> {names[1]}", fontsize=10)
    fig.colorbar(im, ax=ax, label="transported mass")
    fig.tight_layout()
    path = out_dir / "ot_plan.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
