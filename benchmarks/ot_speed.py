"""Speed and agreement of :func:`modbalance.ot.sinkhorn` against POT (not a test).

Usage::

    python benchmarks/ot_speed.py [--quick] [--device cuda] [--compile]

Problems: L2-normalised random prototypes X, Y (K x 128), squared-Euclidean cost divided by its
(detached) maximum, uniform marginals, float32, eps = 0.05. Every timing is forward + backward:
building C from X (requires grad), solving, and ``.backward()`` of the summed value to X. Cases:
B = 64 problems of 7 x 7 in one batch, and single problems with K in {2, 7, 32, 128}.

Methods, timed side by side (interleaved repeats, median reported):

* ``modbalance tol=1e-5``: :func:`sinkhorn` with tol 1e-5 (L1 marginal error, checked every 10
  iterations), envelope gradient of the regularised value.
* ``modbalance tol=1e-5, check_every=5``: the same, checked twice as often (checks are cheap).
* ``modbalance 50 it``: fixed 50 iterations, no host synchronisation (the training setting).
* ``modbalance 21 it (POT's count)``: fixed, as many iterations as ``solve_batch`` runs on 64x(7x7)
  (a per-iteration comparison).
* ``POT loop sinkhorn2 (defaults)``: a Python loop over ``ot.sinkhorn2(method="sinkhorn_log")``
  with POT's defaults (stopThr 1e-9, unreachable in float32, so 1000 iterations; gradient by
  unrolling). In ``--quick`` mode the loop over the 64 problems is timed on 4 and scaled by 16.
* ``POT loop sinkhorn2 stopThr=1e-5``: the same loop at a tolerance comparable to ours.
* ``POT solve_batch``: ``ot.solve_batch(method="log_sinkhorn", reg_type="kl")``, its defaults
  (tol 1e-5 on the L2 marginal error, envelope gradient).

``max rel err`` is the largest relative error of the linear cost <P, C> against float64 POT
``sinkhorn_log`` with stopThr 1e-13. On CUDA the script also runs the fixed-iteration solve under
``torch.cuda.set_sync_debug_mode("error")`` (proof of no host synchronisation), a version captured
with ``torch.cuda.make_graphed_callables`` and, with ``--compile``, a ``torch.compile`` version.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modbalance._checks import value_checks
from modbalance.ot import sinkhorn

EPS = 0.05
D = 128
RESULTS = Path(__file__).resolve().parent / "results" / "ot_speed.md"


def _prototypes(b: int, k: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, k, D, generator=gen), dim=-1)
    y = F.normalize(torch.randn(b, k, D, generator=gen), dim=-1)
    return x.to(device), y.to(device)


def _cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    c = (
        x.pow(2).sum(-1).unsqueeze(-1)
        + y.pow(2).sum(-1).unsqueeze(-2)
        - 2 * x @ y.transpose(-1, -2)
    ).clamp_min(0)
    return c / c.amax(dim=(-2, -1), keepdim=True).detach()


def _reference(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    import ot

    c = _cost(x.double(), y.double()).cpu().numpy()
    out = []
    for i in range(c.shape[0]):
        k, n = c.shape[1:]
        a, b = np.full(k, 1.0 / k), np.full(n, 1.0 / n)
        plan = ot.sinkhorn(
            a, b, c[i], EPS, method="sinkhorn_log", stopThr=1e-13, numItermax=100_000
        )
        out.append(float((plan * c[i]).sum()))
    return np.array(out)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _methods(device: str, batch: int, quick: bool) -> dict[str, Callable]:
    """Each method maps prototypes (x, y) to (linear values, iterations); it runs fwd + bwd."""
    import ot

    def ours(tol, max_iter, check_every=10):
        def run(x, y):
            x = x.clone().requires_grad_(True)
            c = _cost(x, y)
            res = sinkhorn(c, epsilon=EPS, max_iter=max_iter, tol=tol, check_every=check_every)
            res.value.sum().backward()
            return res.value_linear.detach(), res.n_iter

        return run

    def pot_loop(stop, subset):
        def run(x, y):
            x = x.clone().requires_grad_(True)
            c = _cost(x, y)
            k, n = c.shape[1:]
            a = torch.full((k,), 1.0 / k, device=c.device)
            b = torch.full((n,), 1.0 / n, device=c.device)
            vals = []
            for i in range(min(subset, c.shape[0])):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    v = ot.sinkhorn2(a, b, c[i], EPS, method="sinkhorn_log", stopThr=stop)
                v.backward(retain_graph=True)
                vals.append(v.detach())
            return torch.stack(vals), "1000" if stop < 1e-7 else "-"

        return run

    def pot_batch(x, y):
        x = x.clone().requires_grad_(True)
        res = ot.solve_batch(_cost(x, y), reg=EPS, method="log_sinkhorn", reg_type="kl")
        res.value.sum().backward()
        return res.value_linear.detach(), int(res.log["n_iter"]) + 1

    subset = 4 if (quick and batch > 4) else batch
    label = "POT loop sinkhorn2 (defaults)" + (
        f" [{subset}/{batch}, x{batch // subset}]" if subset < batch else ""
    )
    return {
        "modbalance tol=1e-5": ours(1e-5, 1000),
        "modbalance tol=1e-5, check_every=5": ours(1e-5, 1000, 5),
        "modbalance 50 it": ours(None, 50),
        "modbalance 21 it (POT's count)": ours(None, 21),
        label: pot_loop(1e-9, subset),
        "POT loop sinkhorn2 stopThr=1e-5": pot_loop(1e-5, batch),
        "POT solve_batch": pot_batch,
    }


def _bench_case(name: str, batch: int, k: int, device: str, quick: bool) -> list[dict]:
    x, y = _prototypes(batch, k, device)
    ref = _reference(x, y)
    methods = _methods(device, batch, quick)
    repeats = 5 if quick else 15
    slow_repeats = 1 if quick else 3
    times: dict[str, list[float]] = {m: [] for m in methods}
    info: dict[str, tuple] = {}
    for m, fn in methods.items():  # warm-up, values and iteration counts
        vals, iters = fn(x, y)
        n = vals.shape[0]
        err = np.abs(vals.double().cpu().numpy() - ref[:n]) / np.abs(ref[:n])
        info[m] = (iters, float(err.max()), batch / n)
    for r in range(repeats):
        for m, fn in methods.items():
            if m.startswith("POT loop sinkhorn2 (defaults)") and r >= slow_repeats:
                continue
            _sync(device)
            t0 = time.perf_counter()
            fn(x, y)
            _sync(device)
            times[m].append((time.perf_counter() - t0) * 1e3 * info[m][2])
    base = statistics.median(times["modbalance tol=1e-5"])
    rows = []
    for m in methods:
        med = statistics.median(times[m])
        rows.append(
            {
                "case": name,
                "device": device,
                "method": m,
                "fwd+bwd ms": med,
                "min ms": min(times[m]),
                "iterations": info[m][0],
                "max rel err": info[m][1],
                "time / ours(tol)": med / base,
                "repeats": len(times[m]),
            }
        )
    return rows


def _cuda_extras(device: str, quick: bool, compile_: bool) -> list[dict]:
    rows = []
    x, y = _prototypes(64, 7, device)
    repeats = 10 if quick else 30

    def step(xx):
        with value_checks(False):
            return sinkhorn(_cost(xx, y), epsilon=EPS, max_iter=50).value

    def timed(fn) -> float:
        ts = []
        for _ in range(repeats):
            xx = x.clone().requires_grad_(True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(xx).sum().backward()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    timed(step)
    # 1. No host synchronisation in the fixed-iteration path (fwd + bwd).
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xx = x.clone().requires_grad_(True)
        step(xx).sum().backward()
        no_sync = "yes (sync debug mode 'error' passed)"
    except RuntimeError as exc:  # pragma: no cover - reported, not raised
        no_sync = f"NO: {exc}"[:120]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    rows.append(_extra_row(device, "modbalance 50 it, eager", timed(step), no_sync))
    # 2. CUDA graph (forward and backward captured).
    try:
        graphed = torch.cuda.make_graphed_callables(step, (x.clone().requires_grad_(True),))
        rows.append(_extra_row(device, "modbalance 50 it, CUDA graph", timed(graphed), "captured"))
    except Exception as exc:  # pragma: no cover - reported, not raised
        rows.append(
            _extra_row(device, "modbalance 50 it, CUDA graph", float("nan"), repr(exc)[:120])
        )
    # 3. torch.compile (optional: compilation takes a while).
    if compile_:
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(step, mode="reduce-overhead", fullgraph=False)
            for _ in range(3):
                compiled(x.clone().requires_grad_(True)).sum().backward()
            note = f"compile {time.perf_counter() - t0:.0f} s"
            rows.append(
                _extra_row(device, "modbalance 50 it, torch.compile", timed(compiled), note)
            )
        except Exception as exc:  # pragma: no cover - reported, not raised
            rows.append(
                _extra_row(device, "modbalance 50 it, torch.compile", float("nan"), repr(exc)[:120])
            )
    return rows


def _extra_row(device: str, method: str, ms: float, note: str) -> dict:
    return {
        "case": "64x(7x7)",
        "device": device,
        "method": method,
        "fwd+bwd ms": ms,
        "min ms": float("nan"),
        "iterations": 50,
        "max rel err": float("nan"),
        "time / ours(tol)": float("nan"),
        "repeats": 0,
        "note": note,
    }


def run(
    quick: bool = True, device: str = "cpu", compile_: bool = False, threads: int = 1
) -> list[dict]:
    """Run every case and return one row (a dict) per case and method.

    ``threads`` sets ``torch.set_num_threads`` for every method alike. One thread is the default:
    at these sizes every op is dispatch-bound, and with two intra-op threads on a busy machine the
    OpenMP hand-off alone made a 256-element ``exp`` take milliseconds.
    """
    torch.set_num_threads(threads)
    rows = _bench_case("64x(7x7)", 64, 7, device, quick)
    for k in (2, 7, 32, 128):
        rows += _bench_case(f"1x({k}x{k})", 1, k, device, quick)
    if device.startswith("cuda"):
        rows += _cuda_extras(device, quick, compile_)
    return rows


def to_markdown(rows: list[dict]) -> str:
    """Format the rows of :func:`run` as a markdown table."""
    cols = ("case", "device", "method", "fwd+bwd ms (median)", "min ms", "iterations")
    head = "| " + " | ".join((*cols, "max rel err", "time / ours(tol)", "note")) + " |"
    lines = [head, "|" + "---|" * 9]

    def num(v: float, fmt: str) -> str:
        return "-" if v != v else format(v, fmt)

    for r in rows:
        cells = (
            r["case"],
            r["device"],
            r["method"],
            num(r["fwd+bwd ms"], ".2f"),
            num(r["min ms"], ".2f"),
            str(r["iterations"]),
            num(r["max rel err"], ".1e"),
            num(r["time / ours(tol)"], ".2f")
            + ("x" if r["time / ours(tol)"] == r["time / ours(tol)"] else ""),
            r.get("note", ""),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about 20 s on CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(quick=args.quick, device=args.device, compile_=args.compile, threads=args.threads)
    table = to_markdown(rows)
    header = (
        f"# SinkhornAligner speed ({args.device}, {args.threads} thread(s), float32, eps={EPS}, "
        f"torch {torch.__version__}, {'quick' if args.quick else 'full'} run, "
        f"{time.perf_counter() - t0:.0f} s)\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table)
    print(header + table)


if __name__ == "__main__":
    main()
