"""The main job against its baseline: ``examples/pase_mosi.py`` vs ``--baseline``, paired seeds.

Runs the example's command-line entry point exactly as a user does (default data, default
flags) for each seed, once as PaSE and once with ``--baseline`` (plain late fusion, same backbone
and budget), and reports the test metrics of the validation-selected checkpoints, the paired
differences and the wall time of each run.

Run from the repository root::

    python -m benchmarks.main_job                  # seeds 0, 1, 2 -> benchmarks/results/main_job.md
    python -m benchmarks.main_job --quick          # two tiny epochs (smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from examples import pase_mosi

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("Non0_acc_2", "MAE", "Corr", "Mult_acc_7")


def run(seeds: tuple[int, ...], quick: bool = False) -> dict[str, Any]:
    """One PaSE and one baseline run per seed; returns the test metrics and wall times."""
    extra = ["--epochs", "2", "--switch-epoch", "1", "--n-train", "128"] if quick else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, flags in (("pase", []), ("baseline", ["--baseline"])):
                out = Path(tmp) / f"{name}_{seed}"
                start = time.perf_counter()
                final = pase_mosi.main(
                    ["--seed", str(seed), "--out", str(out), "--quiet", *flags, *extra]
                )
                wall = time.perf_counter() - start
                fused = final["test"]["fused"]
                rows.append(
                    {
                        "method": name,
                        "seed": seed,
                        "wall_s": wall,
                        **{k: float(fused[k]) for k in METRICS},
                    }
                )
    return {"seeds": list(seeds), "quick": quick, "runs": rows}


def to_markdown(result: dict[str, Any]) -> str:
    """Mean ± std per method and the paired PaSE − baseline differences."""
    by = {(r["method"], r["seed"]): r for r in result["runs"]}
    seeds = result["seeds"]
    lines = ["| method | " + " | ".join(METRICS) + " | wall s |", "|" + "---|" * (len(METRICS) + 2)]
    for name in ("pase", "baseline"):
        cells = []
        for k in (*METRICS, "wall_s"):
            v = [by[(name, s)][k] for s in seeds]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(
                f"{statistics.mean(v):.4f} ± {sd:.4f}"
                if k != "wall_s"
                else f"{statistics.mean(v):.1f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for k in METRICS:
        d = [by[("pase", s)][k] - by[("baseline", s)][k] for s in seeds]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        cells.append(f"{statistics.mean(d):+.4f} ± {sd:.4f}")
    lines.append("| PaSE − baseline (paired) | " + " | ".join(cells) + " | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    result = run(tuple(int(s) for s in args.seeds.split(",")), quick=args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "main_job_quick" if args.quick else "main_job"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    text = (
        "# The main job: `python examples/pase_mosi.py` vs `--baseline`\n\n"
        f"Default data and flags, seeds {args.seeds}, test split of the validation-selected "
        "checkpoint.\n\n" + to_markdown(result)
    )
    (out / f"{name}.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
