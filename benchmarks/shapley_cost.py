"""Cost and error of exact Shapley values of M modalities: one batched pass vs a loop vs sampling.

For M = 2..10 modalities, a small MLP fusion head over random per-modality features (batch 64)
defines the game v(S) = -MSE of the head with the modalities outside S zero-masked. Three ways to
get the Shapley values are timed side by side (median of repeats):

* ``batched``: :class:`modbalance.shapley.ModalityGame`, all 2^M coalitions in ONE head call;
* ``loop``: the same game with ``chunk_size=1``, i.e. one head call per coalition (what a
  per-coalition forward, as in AGM, costs at best: here the encoders are not even re-run);
* ``permutation``: antithetic permutation sampling with about the same number of coalition
  evaluations as the exact table (2^M), evaluated batched.

Errors are measured against the exact values computed in float64: max |error| for the two exact
methods (float32 rounding) and, for sampling, the RMSE over seeds relative to the mean |phi|.

Run: ``python benchmarks/shapley_cost.py [--quick] [--device cpu|cuda]``; writes
``benchmarks/results/shapley_cost.md``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from modbalance.shapley import ModalityGame, shapley_values

BATCH = 64
DIM = 32
HIDDEN = 64


class MLPFusionHead(nn.Module):
    """Project each modality, sum the present ones, then a 2-layer MLP to one output."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names
        self.proj = nn.ModuleDict({n: nn.Linear(DIM, HIDDEN) for n in names})
        self.mlp = nn.Sequential(
            nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)
        )

    def forward(self, features, present):
        h = sum(
            self.proj[n](features[n]) * present[n].unsqueeze(1).to(features[n].dtype)
            for n in self.names
        )
        return self.mlp(h)[:, 0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _setup(m: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    names = [f"m{i}" for i in range(m)]
    head = MLPFusionHead(names).to(device).eval()
    feats = {n: torch.randn(BATCH, DIM, device=device) for n in names}
    target = torch.randn(BATCH, device=device)
    return names, head, feats, target


def _num_permutations(m: int) -> int:
    """Even number of permutations whose prefix coalitions number about 2^M."""
    n = round((2**m - 2) / max(m - 1, 1))
    return max(2, n + (n % 2))


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    """Time and score the three estimators for M = 2..10 (even M only when quick); one row per M."""
    repeats = 3 if quick else 9
    seeds = 5 if quick else 20
    rows = []
    for m in range(2, 11, 2 if quick else 1):
        names, head, feats, target = _setup(m, device)
        batched = ModalityGame(head, names, masking="zero", value="neg_loss")
        loop = ModalityGame(head, names, masking="zero", value="neg_loss", chunk_size=1)

        # exact reference in float64
        head64 = copy.deepcopy(head).double()
        game64 = ModalityGame(head64, names, masking="zero", value="neg_loss")
        exact = game64({n: f.double() for n, f in feats.items()}, target.double()).shapley
        scale = exact.abs().mean().item()

        phi_b = batched(feats, target).shapley.double()
        phi_l = loop(feats, target).shapley.double()
        t_batched = _median_ms(functools.partial(batched, feats, target), repeats, device)
        t_loop = _median_ms(functools.partial(loop, feats, target), repeats, device)

        value_fn = functools.partial(batched.coalition_values, feats, target)
        n_perm = _num_permutations(m)

        def sample(seed: int, n_perm=n_perm, value_fn=value_fn, m=m):
            gen = torch.Generator().manual_seed(seed)
            return shapley_values(
                value_fn,
                m,
                method="permutation",
                num_permutations=n_perm,
                generator=gen,
                device=device,
            )

        t_perm = _median_ms(lambda: sample(0), repeats, device)
        results = [sample(s) for s in range(seeds)]
        errs = torch.stack([r.shapley.double() - exact for r in results])
        evals = statistics.mean(r.num_evaluations for r in results)
        rows.append(
            {
                "M": m,
                "coalitions": 2**m,
                "batched_ms": t_batched,
                "loop_ms": t_loop,
                "speedup": t_loop / t_batched,
                "batched_max_err": (phi_b - exact).abs().max().item(),
                "loop_max_err": (phi_l - exact).abs().max().item(),
                "perm_ms": t_perm,
                "perm_permutations": n_perm,
                "perm_evaluations": evals,
                "perm_rel_rmse": errs.square().mean().sqrt().item() / scale,
                "mean_abs_phi": scale,
            }
        )
    return rows


def to_markdown(rows: list[dict]) -> str:
    """Render the rows of :func:`run` as a Markdown table."""
    header = (
        "| M | coalitions | batched ms | loop ms | loop / batched | batched max err | "
        "loop max err | perm. ms | perms (evals) | perm. RMSE / mean abs phi |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['M']} | {r['coalitions']} | {r['batched_ms']:.2f} | {r['loop_ms']:.2f} | "
        f"{r['speedup']:.1f}x | {r['batched_max_err']:.1e} | {r['loop_max_err']:.1e} | "
        f"{r['perm_ms']:.2f} | {r['perm_permutations']} ({r['perm_evaluations']:.0f}) | "
        f"{r['perm_rel_rmse']:.3f} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and seeds (~10 s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (1 gives stable timings)"
    )
    parser.add_argument(
        "--output",
        default=str(Path(__file__).resolve().parent / "results" / "shapley_cost.md"),
        help="where to write the Markdown table",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = run(quick=args.quick, device=args.device)
    table = to_markdown(rows)
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    )
    text = (
        "# Exact Shapley cost: one batched head pass vs one call per coalition vs sampling\n\n"
        f"Device: {args.device} ({device_name}), torch {torch.__version__}, "
        f"CPU threads: {torch.get_num_threads()}, float32. Fusion head: per-modality "
        f"Linear({DIM}->{HIDDEN}), sum of present modalities, MLP {HIDDEN}-{HIDDEN}-1; batch "
        f"{BATCH}; v(S) = -MSE with absent modalities zero-masked. Times are medians of "
        f"{3 if args.quick else 9} runs (after one warm-up). Errors against exact float64 "
        f"values; sampling: antithetic permutations with about 2^M coalition evaluations, "
        f"RMSE over {5 if args.quick else 20} seeds divided by the mean |phi|.\n\n"
        f"{table}\n"
        f"Generated by `python benchmarks/shapley_cost.py{' --quick' if args.quick else ''}` "
        f"in {time.perf_counter() - start:.1f} s.\n"
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
