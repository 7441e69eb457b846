"""One tuning budget for every method, joint included, on the validation split of cls-synthetic.

Each method gets the same budget: the learning rate (:data:`LRS`) crossed with two values of its
main coefficient (:data:`COEFFICIENTS`: the default first), at most 6 configurations, each
trained with 2 seeds on ``cls-synthetic``. The configuration with the best mean *validation*
accuracy is kept (the test split is never read for the choice) and then held fixed on every
task: ``python -m benchmarks.competition --tuned`` runs the kept names. Methods without a scalar
coefficient (joint training, the unimodal loss, UME, MLA) tune the weight decay instead; the
warm-up control tunes the length of its warm-up.

Run from the repository root::

    python -m benchmarks.tuning --jobs 2              # writes benchmarks/results/tuning.{json,md}
    python -m benchmarks.tuning --quick --methods joint,ogm-ge   # the CI smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.competition import DEFAULT_CACHE, RESULTS, run_task

#: Learning rates every method is tried with (the suite's default, 1e-3, in the middle).
LRS = (5e-4, 1e-3, 2e-3)
#: Per method: the token that sets its main coefficient, and two values (its default first).
#: ``@key`` is an option of the method's constructor; a bare key a training option.
COEFFICIENTS: dict[str, tuple[str, tuple[Any, ...]]] = {
    # controls and PaSE
    "joint": ("weight_decay", (1e-4, 1e-2)),
    "warmup": ("switch_epoch", (8, 4)),
    "pase": ("@weight", (1.0, 2.0)),
    # gradient and update modulation
    "ogm-ge": ("@alpha", (0.5, 1.0)),
    "sgm": ("@momentum", (0.9, 0.5)),
    "agm": ("@alpha", (1.0, 2.0)),
    "cggm": ("@lam", (0.2, 0.4)),
    "inforeg": ("@scale", (0.95, 1.9)),
    # added losses and schedules
    "unimodal": ("weight_decay", (1e-4, 1e-2)),
    "gblending": ("@every", (2, 1)),
    "mmpareto": ("@gamma", (1.5, 3.0)),
    "pmr": ("@alpha", (1.0, 2.0)),
    "mla": ("weight_decay", (1e-4, 1e-2)),
    # routing, alone-trained models and teachers
    "dgl": ("@alpha", (4.0, 1.0)),
    "ume": ("weight_decay", (1e-4, 1e-2)),
    "umt": ("@weight", (10.0, 1.0)),
    "g2d": ("@feature_weight", (1.0, 0.1)),
    "ebmc": ("@weight", (0.1, 0.5)),
    # boosting and re-sampling
    "reconboost": ("@alpha", (0.5, 1.0)),
    "aug": ("@gamma", (0.5, 1.0)),
    "valuation": ("@level", ("sample", "modality")),
}
TASK = "cls-synthetic"
TUNING_SEEDS = (0, 1)


def grid(method: str) -> list[str]:
    """The suite names of ``method``'s configurations (at most 6)."""
    if method not in COEFFICIENTS:
        raise SystemExit(f"no tuning grid for {method!r}; known: {', '.join(COEFFICIENTS)}")
    key, values = COEFFICIENTS[method]
    return [f"{method}+lr={lr:g}+{key}={v!r}" for lr in LRS for v in values]


def choose(result: dict[str, Any], method: str) -> dict[str, Any]:
    """The configuration of ``method`` with the best mean validation accuracy in ``result``."""
    rows = []
    for name in grid(method):
        valid = [r["valid_fused"]["accuracy"] for r in result["runs"] if r["method"] == name]
        rows.append({"name": name, "valid": statistics.fmean(valid), "seeds": len(valid)})
    best = max(rows, key=lambda r: r["valid"])
    return {"chosen": best["name"], "valid": best["valid"], "configs": rows}


def tune(
    methods: Sequence[str], *, quick: bool, jobs: int, cache: Path | None, device: str = "cpu"
) -> dict[str, Any]:
    """Train every configuration of every method; the chosen name per method."""
    names = [n for m in methods for n in grid(m)]
    result = run_task(TASK, names, TUNING_SEEDS, quick=quick, jobs=jobs, cache=cache, device=device)
    seconds = sum(r["time_s"] for r in result["runs"])
    chosen = {m: choose(result, m) for m in methods}
    return {"task": TASK, "seeds": list(TUNING_SEEDS), "lrs": list(LRS), "quick": quick,
            "train_seconds": seconds, "methods": chosen}  # fmt: skip


def to_markdown(tuning: dict[str, Any]) -> str:
    lines = [
        f"# Tuning on {tuning['task']} (validation accuracy, {len(tuning['seeds'])} seeds)",
        "",
        f"Budget per method: learning rate {', '.join(f'{x:g}' for x in tuning['lrs'])} x two "
        "values of the main coefficient (default first) = 6 configurations x 2 seeds, chosen "
        "on the validation split; the test split is not read. Training time of all "
        f"configurations: {tuning['train_seconds'] / 60:.1f} CPU-minutes.",
        "",
        "| method | chosen configuration | valid acc % | default's valid acc % |",
        "|---|---|---|---|",
    ]
    for method, t in tuning["methods"].items():
        default = next(r for r in t["configs"] if r["name"] == default_name(method))
        first_value = default["name"]  # the default coefficient comes first in the grid
        lines.append(
            f"| {method} | `{t['chosen']}` | {t['valid'] * 100:.1f} | "
            f"{default['valid'] * 100:.1f} (`{first_value}`) |"
        )
    return "\n".join(lines) + "\n"


def default_name(method: str) -> str:
    """The grid's name of ``method``'s defaults (learning rate 1e-3, the first coefficient)."""
    key, values = COEFFICIENTS[method]
    return f"{method}+lr={1e-3:g}+{key}={values[0]!r}"


def load(path: Path = RESULTS / "tuning.json") -> dict[str, str]:
    """``{method: chosen suite name}`` from a saved tuning (empty if there is none).

    A method whose defaults won is given by its plain name: it then runs with each task's own
    defaults (the same runs as the defaults table).
    """
    if not path.exists():
        return {}
    chosen = {m: t["chosen"] for m, t in json.loads(path.read_text())["methods"].items()}
    return {m: m if name == default_name(m) else name for m, name in chosen.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(COEFFICIENTS), help="comma-separated")
    p.add_argument("--quick", action="store_true", help="tiny task, 2 epochs (CI smoke test)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="run cache folder ('' disables)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    cache = Path(args.cache) if args.cache else None
    tuning = tune(methods, quick=args.quick, jobs=args.jobs, cache=cache, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"tuning{suffix}.json").write_text(json.dumps(tuning, indent=1))
    (out / f"tuning{suffix}.md").write_text(to_markdown(tuning))
    print(to_markdown(tuning))
    return tuning


if __name__ == "__main__":
    main()
