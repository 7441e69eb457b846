"""Loading a real-sized data file: read time, peak memory and one training epoch vs sample count.

Writes a synthetic MMSA pickle with MOSEI's aligned shapes (length 50; text 768, audio 74,
vision 35 float32 features per frame; MMSA's key layout: ``raw_text``, ``id``, ``text``,
``text_bert``, ``audio``, ``vision``, ``annotations``, ``classification_labels``,
``regression_labels``; pickle protocol 4 like the repository's own files) at several sizes, a
fraction of MOSEI's 16326/1871/4659 train/valid/test samples each, into a temporary folder.
Each size is then measured in a **fresh Python process** (so the memory figures start clean):

* **load**: ``examples.pase.build_datasets(path)`` — one ``pickle.load`` of the file, format
  detection, the three splits validated and indexed (the time of the ``pickle.load`` alone is
  given too);
* **peak memory**: the process's peak resident set size during the load (RSS, not
  ``tracemalloc``: it sees NumPy's, torch's and pickle's memory alike; Linux ``VmHWM``,
  restarted just before the load) minus the resident size before it, divided by the file's
  size; and the resident size kept after the load (``/proc/self/statm``) over the file size.
  The target is a peak of at most 1.5x the file;
* **epoch**: the example's own step (``examples.pase.build`` + ``train_step`` with the default
  recipe of ``examples/pase_mosi.py``: batch 64, width 32, the Shapley-based equilibrium, phase
  2) fed by the example's ``make_loader`` over the training split. ``--steps`` steps are timed
  after 3 warm-up steps and extrapolated to the epoch's ``len(loader)`` steps (a full epoch when
  it has no more steps than that); evaluation is not included.

Run: ``python -m benchmarks.loading [--quick] [--fractions 0.25,1] [--steps 200]``; writes
``benchmarks/results/loading.md`` (``--out`` elsewhere; ``--quick``: a few hundred samples and a
few steps, a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: MOSEI (MMSA, aligned_50): frames per sample, feature sizes and split sizes.
LENGTH = 50
DIMS = {"text": 768, "audio": 74, "vision": 35}
MOSEI_SPLITS = {"train": 16326, "valid": 1871, "test": 4659}
QUICK_SCALE = 0.02  # --quick: 2% of MOSEI (457 samples at fraction 1)
TARGET_PEAK = 1.5  # peak memory of a load, in file sizes


# ------------------------------------------------------------------------------------------------
# the synthetic MOSEI-shaped file
# ------------------------------------------------------------------------------------------------


def split_sizes(fraction: float, scale: float = 1.0) -> dict[str, int]:
    return {s: max(2, round(n * fraction * scale)) for s, n in MOSEI_SPLITS.items()}


def _split(rng: np.random.Generator, split: str, n: int) -> dict:
    """One split in MMSA's layout; valid frames first, zero frames after (lengths 10..50)."""
    lengths = rng.integers(10, LENGTH + 1, n)
    pad = np.arange(LENGTH)[None, :] >= lengths[:, None]  # (n, T) padding frames
    feats = {}
    for m, d in DIMS.items():
        x = rng.standard_normal((n, LENGTH, d), dtype=np.float32)
        x[pad] = 0.0
        feats[m] = x
    tok = rng.integers(1000, 30000, (n, LENGTH))
    attn = (~pad).astype(np.int64)
    y = np.clip(rng.normal(0.0, 1.5, n), -3, 3).astype(np.float32)
    cls = np.where(y < 0, 0, np.where(y > 0, 2, 1)).astype(np.int64)
    return {
        "raw_text": np.array([f"utterance {i} of {split}" for i in range(n)]),
        "id": np.array([f"video{i // 10:05d}$_${i % 10}" for i in range(n)]),
        "text": feats["text"],
        "text_bert": np.stack([tok * attn, attn, np.zeros_like(attn)], axis=1),
        "audio": feats["audio"],
        "vision": feats["vision"],
        "annotations": np.array(["Negative", "Neutral", "Positive"])[cls],
        "classification_labels": cls,
        "regression_labels": y,
    }


def write_file(path: Path, sizes: dict[str, int], seed: int = 0) -> int:
    """Write the MOSEI-shaped pickle; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    data = {s: _split(rng, s, n) for s, n in sizes.items()}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    del data
    return path.stat().st_size


# ------------------------------------------------------------------------------------------------
# the measurement (in a fresh process)
# ------------------------------------------------------------------------------------------------


def _peak_rss() -> int:
    """Peak resident set size of this process's memory so far, in bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``. Not ``getrusage``'s ``ru_maxrss``: that one
    keeps the peak of the parent process when it was started by ``vfork`` + ``exec`` (as
    ``subprocess`` does), which here is the writer of the file. Elsewhere ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> None:
    """Restart the peak at the current resident size (Linux ``clear_refs``; else a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss() -> int | None:
    """Current resident set size in bytes (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _load_counted(path: Path) -> tuple:
    """``build_datasets(path)`` with every ``pickle.load`` timed and counted, and the RSS after."""
    import warnings

    from examples.pase import build_datasets

    loads: list[float] = []
    real_load = pickle.load

    def timed_load(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_load(*args, **kwargs)
        finally:
            loads.append(time.perf_counter() - start)

    pickle.load = timed_load
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            train, valid, test, _ = build_datasets(path)
        load_s = time.perf_counter() - start
    finally:
        pickle.load = real_load
    peak = _peak_rss()
    kept = _rss()

    return train, valid, test, loads, load_s, peak, kept


def _time_steps(train, steps: int) -> tuple[list[float], int]:
    """Seconds of ``steps`` phase-2 training steps of the main job's model (after a warm-up)."""
    import torch

    from examples import pase_mosi
    from examples.pase import build, make_loader, train_step

    args = pase_mosi.parse_args([])
    model_config, config = pase_mosi.configs(args, train, "cpu")
    torch.manual_seed(0)
    parts = build(model_config, methods=list(config.methods), lr=config.lr, seed=0)
    parts.model.train()
    loader = make_loader(train, config.batch_size, train=True, seed=0, epoch=0)
    warmup, times = min(3, len(loader) - 1), []
    it = iter(loader)
    for i in range(min(len(loader), warmup + steps)):
        start = time.perf_counter()
        batch = next(it)
        train_step(parts, batch, 2)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if not times:  # an epoch shorter than the warm-up: time what there is
        times = [float("nan")]
    return times, len(loader)


def measure(path: Path, steps: int, threads: int | None) -> dict:
    """Load ``path`` with the example's ``build_datasets`` and time its training step."""

    import torch

    from modbalance.data import load_mmsa

    if threads:
        torch.set_num_threads(threads)
    # warm up the loader's code (first torch/NumPy calls map libraries and thread pools in),
    # so that the resident size below is the baseline of the data, not of the code
    tiny = _split(np.random.default_rng(1), "train", 8)
    load_mmsa({"train": tiny}, split="train")
    del tiny
    _reset_peak_rss()
    base_rss = _rss() or _peak_rss()
    train, valid, test, loads, load_s, peak, kept = _load_counted(path)
    times, steps_per_epoch = _time_steps(train, steps)
    step_s = float(np.median(times))
    mean_s = float(np.mean(times))
    return {
        "n": {"train": len(train), "valid": len(valid), "test": len(test._dataset)},
        "pickle_loads": len(loads),
        "pickle_load_s": sum(loads),
        "load_s": load_s,
        "base_rss": base_rss,
        "peak_rss": peak,
        "peak_increase": max(peak - base_rss, 0),
        "kept_increase": None if kept is None else kept - base_rss,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps_timed": len(times),
        "steps_per_epoch": steps_per_epoch,
        "step_median_s": step_s,
        "step_mean_s": mean_s,
        "epoch_s": mean_s * steps_per_epoch,
    }


def warm_cache(path: Path) -> None:
    """Read the file once, so that every run reads it from the page cache (not the disk)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 24):
            pass


def run_child(path: Path, steps: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.loading", "--measure", str(path)]
    cmd += ["--steps", str(steps)] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def _mb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _best(runs: list[dict]) -> dict:
    """One row from repeated runs of a size: fastest times, largest memory figures."""
    row = dict(runs[0])
    for key in ("pickle_load_s", "load_s", "step_median_s", "step_mean_s", "epoch_s"):
        row[key] = min(r[key] for r in runs)
    for key in ("peak_increase", "kept_increase"):
        row[key] = max(r[key] or 0 for r in runs)
    row["loadavgs"] = [r["loadavg"] for r in runs]
    return row


def _rest(row: dict) -> float:
    """Load time after ``pickle.load``: the loaders' validation and indexing."""
    return max(row["load_s"] - row["pickle_load_s"], 1e-9)


def _table(rows: list[dict]) -> str:
    """The markdown table: one row per size."""
    head = (
        "| fraction of MOSEI | samples (train/valid/test) | file MB | pickle.load s | "
        "load s (build_datasets) | load ms / 1k samples | peak RSS increase MB | peak / file | "
        "kept RSS / file | step ms (median) | steps / epoch | epoch s | epoch ms / train sample "
        "|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        n = r["n"]
        total = sum(n.values())
        body += (
            f"| {r['fraction']:g} | {n['train']}/{n['valid']}/{n['test']} "
            f"| {_mb(r['file_bytes'])} | {r['pickle_load_s']:.2f} | {r['load_s']:.2f} "
            f"| {1e6 * r['load_s'] / total:.0f} | {_mb(r['peak_increase'])} "
            f"| {r['peak_increase'] / r['file_bytes']:.2f}x "
            f"| {(r['kept_increase'] or 0) / r['file_bytes']:.2f}x "
            f"| {1e3 * r['step_median_s']:.1f} | {r['steps_per_epoch']} | {r['epoch_s']:.1f} "
            f"| {1e3 * r['epoch_s'] / n['train']:.2f} |\n"
        )
    return head + body


def _findings(rows: list[dict], quick: bool) -> list[str]:
    """Growth from the smallest to the largest size, and the peak-memory verdict."""
    lines = []
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        lines.append(
            f"From fraction {a['fraction']:g} to {b['fraction']:g} the samples grow "
            f"{sum(b['n'].values()) / sum(a['n'].values()):.2f}x and the file "
            f"{b['file_bytes'] / a['file_bytes']:.2f}x; the load time grows "
            f"{b['load_s'] / a['load_s']:.2f}x (`pickle.load` alone "
            f"{b['pickle_load_s'] / a['pickle_load_s']:.2f}x, the loaders' validation and "
            f"indexing {_rest(b) / _rest(a):.2f}x), the peak memory increase "
            f"{b['peak_increase'] / max(a['peak_increase'], 1):.2f}x and the epoch time "
            f"{b['epoch_s'] / a['epoch_s']:.2f}x for "
            f"{b['steps_per_epoch'] / a['steps_per_epoch']:.2f}x the steps (median step "
            f"{1e3 * a['step_median_s']:.0f} vs {1e3 * b['step_median_s']:.0f} ms)."
        )
    worst = max(r["peak_increase"] / r["file_bytes"] for r in rows)
    verdict = "met" if worst <= TARGET_PEAK else "NOT met"
    small = " Quick mode: files this small say nothing about memory ratios." if quick else ""
    lines.append(
        f"Peak memory target (at most {TARGET_PEAK}x the file size): {verdict} "
        f"(worst {worst:.2f}x).{small}"
    )
    return lines


def load_note(loads: list[float]) -> str:
    """The host's load averages after the runs, and whether other jobs shared the cores.

    The measured process keeps about one core busy itself, so a load above 1.5 means other work.

    Example:
        >>> load_note([0.7, 1.0])
        '0.7, 1.0 (about 1 is the measured process itself: no other job ran)'
    """
    values = ", ".join(f"{x:.1f}" for x in loads)
    if max(loads, default=0.0) > 1.5:
        return (
            f"{values} (other jobs shared the cores: times are upper bounds; the memory figures "
            "do not depend on it)"
        )
    return f"{values} (about 1 is the measured process itself: no other job ran)"


def to_markdown(rows: list[dict], quick: bool, steps: int, repeats: int, elapsed: float) -> str:
    r0 = rows[0]
    head, body = _table(rows), ""
    lines = _findings(rows, quick)
    reads = {r["pickle_loads"] for r in rows}
    lines.append(f"`pickle.load` calls per `build_datasets`: {', '.join(map(str, sorted(reads)))}.")
    extrap = [r for r in rows if r["steps_timed"] < r["steps_per_epoch"]]
    epoch_note = (
        f"epoch time = mean step time over at most {steps} steps (after up to 3 warm-up steps, "
        "not counted) times the epoch's steps — extrapolated where the epoch is longer"
        if extrap
        else "every epoch was timed in full (after up to 3 warm-up steps)"
    )
    loads = load_note([x for r in rows for x in r["loadavgs"]])
    return (
        "# Loading a MOSEI-sized data file: time, memory, one epoch\n\n"
        f"Synthetic MMSA pickle with MOSEI's aligned shapes (T = {LENGTH}; text {DIMS['text']}, "
        f"audio {DIMS['audio']}, vision {DIMS['vision']} float32 features; MMSA's keys; "
        "protocol 4), at fractions of MOSEI's 16326/1871/4659 samples. Each size is measured "
        f"{repeats} time(s), each in a fresh process, sizes interleaved; the table shows the "
        "fastest times and the largest memory figures. Measured: `build_datasets` of "
        "`examples/pase` (one `pickle.load`, format detection, three splits validated and "
        "indexed); the peak resident set size during it (RSS, which sees NumPy, torch and "
        "pickle memory alike, unlike `tracemalloc`: Linux `VmHWM`, restarted by `clear_refs` "
        "after the imports and a warm-up) minus the resident size before it; the resident size "
        "kept after the load (`/proc/self/statm`); and the example's own training step (default "
        "recipe of `examples/pase_mosi.py`: batch 64, width 32, Shapley-based equilibrium, "
        f"phase 2, batches from `make_loader`); {epoch_note}; no evaluation.\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {r0['torch']}, "
        f"{r0['threads']} torch thread(s), Python {platform.python_version()}, NumPy "
        f"{np.__version__}. Files in a temporary folder, read once just before each run (so "
        "`pickle.load` reads from the page cache, not the disk). Load average of the host "
        f"(1 min) after each run: {loads}.\n\n"
        f"{head}{body}\n" + "\n".join(f"* {line}" for line in lines) + "\n\n"
        f"Generated by `python -m benchmarks.loading{' --quick' if quick else ''}` in "
        f"{elapsed:.0f} s.\n"
    )


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2%% of the sizes, a few steps (smoke)")
    p.add_argument("--fractions", default="0.25,1", help="sizes, as fractions of MOSEI")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 200; quick 3)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable timings on a busy host)"
    )
    p.add_argument("--repeats", type=int, default=None, help="runs per size (default 3; quick 1)")
    p.add_argument("--tmp", default=None, help="folder for the data files (default: a temp dir)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for loading.md")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    steps = args.steps if args.steps is not None else (3 if args.quick else 200)
    if args.measure:
        print(json.dumps(measure(Path(args.measure), steps, args.threads)))
        return Path(args.measure)
    start = time.perf_counter()
    fractions = [float(f) for f in args.fractions.split(",") if f]
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    runs: dict[float, list[dict]] = {f: [] for f in fractions}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        files = {}
        for fraction in fractions:
            path = Path(tmp) / f"mosei_like_{fraction:g}.pkl"
            t0 = time.perf_counter()
            size = write_file(path, split_sizes(fraction, QUICK_SCALE if args.quick else 1.0))
            print(f"wrote {path.name}: {size / 2**20:,.0f} MB in {time.perf_counter() - t0:.0f} s")
            files[fraction] = (path, size)
        for rep in range(repeats):  # interleaved, so that a busy period hits every size
            for fraction in fractions if rep % 2 == 0 else fractions[::-1]:
                path, size = files[fraction]
                warm_cache(path)
                run = run_child(path, steps, args.threads)
                run.update(fraction=fraction, file_bytes=size, loadavg=os.getloadavg()[0])
                runs[fraction].append(run)
                print(json.dumps(run), flush=True)
    rows = [_best(runs[f]) for f in fractions]
    text = to_markdown(rows, args.quick, steps, repeats, time.perf_counter() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "loading.md"
    target.write_text(text)
    print(text)
    return target


if __name__ == "__main__":
    main()
