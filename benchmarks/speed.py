"""What does PaSE cost per training step? Phase 2 vs the plain late-fusion step, same backbone.

Both models are the PaSE reference model of ``examples/pase``, assembled by its ``build`` and
trained by its one ``train_step`` (AdamW, modality game, modulator), on the default backbone
(one Transformer layer per modality, width 64) and MOSI shapes (batch 64, 50 frames, text 768 /
audio 5 / vision 20, regression):

* ``plain``: ``baseline=True`` (mean late fusion), no modulator: forward, backward, AdamW step;
* ``pase``: phase 2 with every PaSE component on (the paper's configuration, an upper bound of
  the cost; the default PaSE step has no calibration, OT or gate): prototype calibration, OT
  alignment of the class prototypes of every
  modality pair, the prototype-gated fusion, the exact Shapley game of the fused head on all 2^M
  coalitions (every step) and the Shapley modulator (``apply="update"``).

The two steps are timed **interleaved** in one run (plain, pase, plain, pase, ...) on the same
batch, after warm-up (PaSE: two phase-1 steps warm its prototypes); the median per step is
reported with the ratio of medians. The per-component breakdown times each piece alone on the
same batch (median of repeats): the encoders' forward+backward, the fusion heads, the calibration
loss, the OT alignment (forward+backward through the batch class means), the Shapley game and the
optimizer step with and without the modulator's hooks; pieces downstream of the encoders run on
detached leaf features so that each timing holds only that piece.

Scaling of the extra cost (``pase - plain``) is measured with the batch size, the number of
classes K (classification with K classes; the prototypes, OT problems and gate grow with K) and
the number of modalities M = 2..8 (synthetic 20-d features, 50 frames; the game has 2^M
coalitions).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step minus the memory allocated
before it; on CPU the growth of the process's peak resident set size over the
first steps (PaSE: one phase-1 and three phase-2 steps; plain: three steps), in a fresh subprocess
per model with the kernel's high-water mark reset after set-up (``/proc/self/clear_refs``, Linux
only), so it counts activations, gradients, the AdamW state and allocator slack; skipped in
``--quick`` mode.

Run: ``python -m benchmarks.speed [--quick] [--device cpu|cuda] [--amp bf16]``; writes
``benchmarks/results/speed.md`` and ``speed.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from examples.pase import Parts, PaSEConfig, train_step
from examples.pase import build as build_parts
from modbalance.balancing import combine_losses

RESULTS = Path(__file__).resolve().parent / "results"
MOSI_DIMS = {"text": 768, "audio": 5, "vision": 20}


# ------------------------------------------------------------------------------------ set-up
def make_batch(
    batch: int,
    seq: int,
    dims: dict[str, int],
    task: str,
    num_classes: int,
    device: str,
    seed: int = 0,
) -> dict[str, Any]:
    """A synthetic collated batch: random features, per-sample valid lengths in [seq/2, seq]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=g)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    features = {
        m: torch.randn(batch, seq, d, generator=g) * mask[..., None] for m, d in dims.items()
    }
    if task == "regression":
        label = (torch.randn(batch, generator=g) * 1.5).clamp(-3, 3)
    else:
        label = torch.randint(0, num_classes, (batch,), generator=g)
    return {
        "features": {m: f.to(device) for m, f in features.items()},
        "mask": {m: mask.to(device) for m in dims},
        "label": label.to(device),
    }


def build(
    pase: bool,
    dims: dict[str, int],
    device: str,
    *,
    task: str = "regression",
    num_classes: int = 7,
    dim: int = 64,
    layers: int = 1,
) -> Parts:
    """The parts of the example: model, AdamW and (for PaSE) the modality game and SGM modulator."""
    model_config = PaSEConfig(
        modalities=tuple(dims),
        input_dims=dict(dims),
        dim=dim,
        layers=layers,
        task=task,
        num_outputs=1 if task == "regression" else num_classes,
        num_classes=num_classes,
        baseline=not pase,
    )
    parts = build_parts(model_config, methods=("sgm",) if pase else (), device=device)
    parts.model.train()
    return parts


def _autocast(device: str, amp: str | None):
    if amp == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(parts: Parts, batch: dict[str, Any], amp: str | None) -> Callable[[], None]:
    """The example's one ``train_step`` on a fixed batch (phase 2 by default)."""
    parts.amp = amp

    def step(phase: int = 2) -> None:
        train_step(parts, batch, phase)

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _median_ms(fn: Callable[[], Any], repeats: int, device: str) -> float:
    fn()
    return statistics.median(_time_ms(fn, device) for _ in range(repeats))


def _prepare(
    pase: bool,
    dims,
    batch_size: int,
    seq: int,
    device: str,
    amp,
    task="regression",
    num_classes: int = 7,
    warmup: int = 3,
):
    parts = build(pase, dims, device, task=task, num_classes=num_classes)
    batch = make_batch(batch_size, seq, dims, task, num_classes, device)
    step = make_step(parts, batch, amp)
    if pase:
        for _ in range(2):
            step(phase=1)  # warm the prototypes, as phase 1 does
    for _ in range(warmup):
        step()
    return parts, batch, step


def compare(
    dims: dict[str, int],
    batch_size: int,
    seq: int,
    device: str,
    amp: str | None,
    steps: int,
    task: str = "regression",
    num_classes: int = 7,
) -> dict[str, float]:
    """Interleaved median step times of plain and PaSE phase 2 on the same batch shape."""
    _, _, plain = _prepare(False, dims, batch_size, seq, device, amp, task, num_classes)
    _, _, pase = _prepare(True, dims, batch_size, seq, device, amp, task, num_classes)
    t_plain, t_pase = [], []
    for _ in range(steps):
        t_plain.append(_time_ms(plain, device))
        t_pase.append(_time_ms(pase, device))
    p, q = statistics.median(t_plain), statistics.median(t_pase)
    return {"plain_ms": p, "pase_ms": q, "ratio": q / p, "extra_ms": q - p}


# ------------------------------------------------------------------------------------ breakdown
def breakdown(
    dims: dict[str, int], batch_size: int, seq: int, device: str, amp: str | None, repeats: int
) -> list[dict[str, Any]]:
    """Median time of each piece of the PaSE phase-2 step, alone, on one batch."""
    plain_tr, batch, _ = _prepare(False, dims, batch_size, seq, device, amp)
    tr, _, _ = _prepare(True, dims, batch_size, seq, device, amp)
    model, pmodel = tr.model, plain_tr.model
    feats_m = batch["features"]
    masks = batch["mask"]
    label = batch["label"]
    with torch.no_grad():
        base_feats, present = model.encode(feats_m, masks)

    def leaves():
        return {m: f.detach().clone().requires_grad_(True) for m, f in base_feats.items()}

    def encoders():
        with _autocast(device, amp):
            feats, _ = model.encode(feats_m, masks)
            loss = sum(f.float().square().mean() for f in feats.values())
        loss.backward()

    def mean_fusion_head():
        with _autocast(device, amp):
            loss = pmodel.task_loss(pmodel.fuse(leaves(), present), label)
        loss.backward()

    def gated_fusion_head():
        with _autocast(device, amp):
            loss = model.task_loss(model.fuse(leaves(), present), label)
        loss.backward()

    labels_c = model.class_labels(label)

    def calibration():
        f = leaves()
        with _autocast(device, amp):
            loss = sum(
                model.calibrators[m](f[m], labels_c, present[m]).loss for m in model.modalities
            )
        loss.backward()

    with torch.no_grad():
        cal = {
            m: model.calibrators[m](base_feats[m], labels_c, present[m]) for m in model.modalities
        }
    means = {m: o.class_means.detach() for m, o in cal.items()}
    masses = {m: o.class_counts.detach() for m, o in cal.items()}

    def alignment():
        x = {m: v.clone().requires_grad_(True) for m, v in means.items()}
        with _autocast(device, amp):
            loss = model.aligner.pairwise(x, masses).loss
        loss.backward()

    def game():
        return tr.game({m: f.float() for m, f in base_feats.items()}, label)

    result = game()
    (modulator,) = tr.methods

    def observe():
        modulator.observe(result)

    # optimizer step with and without the modulator (gradients left in place: AdamW updates do
    # not depend on whether they are the "real" ones)
    tr.optimizer.zero_grad(set_to_none=True)
    combine_losses(model(batch, 2)[1]).backward()
    plain_tr.optimizer.zero_grad(set_to_none=True)
    combine_losses(pmodel(batch, 2)[1]).backward()

    rows = []
    pieces = [
        ("encoders fwd+bwd (both)", encoders),
        ("mean fusion + head fwd+bwd (plain)", mean_fusion_head),
        ("gated fusion + head fwd+bwd (PaSE)", gated_fusion_head),
        ("calibration fwd+bwd (PaSE)", calibration),
        ("OT alignment fwd+bwd (PaSE)", alignment),
        ("Shapley game, 2^M coalitions (PaSE)", game),
        ("modulator observe (PaSE)", observe),
        ("AdamW step (plain model)", plain_tr.optimizer.step),
        ("AdamW step + modulator (PaSE model)", lambda: modulator.step(tr.optimizer)),
    ]
    for name, fn in pieces:
        rows.append({"component": name, "ms": _median_ms(fn, repeats, device)})
    tr.optimizer.zero_grad(set_to_none=True)
    return rows


# ------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_child(pase: bool, dims, batch_size, seq, queue) -> None:  # pragma: no cover - subprocess
    """In a fresh process: peak RSS growth (MiB) over the first training steps of one model."""
    import gc

    torch.set_num_threads(1)
    parts = build(pase, dims, "cpu")
    batch = make_batch(batch_size, seq, dims, "regression", 7, "cpu")
    step = make_step(parts, batch, None)
    gc.collect()
    # reset the kernel's high-water mark (VmHWM) so that earlier transients (imports, set-up)
    # cannot hide the step's peak (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    if pase:
        step(phase=1)
    for _ in range(3):
        step()
    queue.put((_status_kib("VmHWM") - before) / 1024)


def peak_memory(
    dims: dict[str, int], batch_size: int, seq: int, device: str, amp, quick: bool
) -> dict[str, float]:
    """Peak memory (MiB) of one training step, plain vs PaSE; see the module docstring."""
    out = {}
    if device.startswith("cuda"):
        for name, pase in (("plain", False), ("pase", True)):
            _, _, step = _prepare(pase, dims, batch_size, seq, device, amp, warmup=1)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            out[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out["method"] = "torch.cuda.max_memory_allocated over one step minus allocated before"
        return out
    if quick or not Path("/proc/self/clear_refs").exists():
        return {"plain": float("nan"), "pase": float("nan"), "method": "skipped"}
    ctx = multiprocessing.get_context("spawn")
    for name, pase in (("plain", False), ("pase", True)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_rss_child, args=(pase, dims, batch_size, seq, queue))
        proc.start()
        proc.join(timeout=600)
        if proc.exitcode != 0 or queue.empty():
            raise RuntimeError(f"the memory subprocess for {name!r} failed ({proc.exitcode})")
        out[name] = queue.get()
    out["method"] = (
        "growth of the peak resident set size (VmHWM, reset after set-up) over the first steps, "
        "fresh subprocess per model"
    )
    return out


# ------------------------------------------------------------------------------------ run
def run(quick: bool = False, device: str = "cpu", amp: str | None = None) -> dict[str, Any]:
    """Measure everything; returns a dict of row lists (see :func:`to_markdown`)."""
    start = time.perf_counter()
    if quick:
        dims, batch_size, seq = {"text": 16, "audio": 5, "vision": 8}, 16, 8
        steps, repeats, sweep_steps = 3, 2, 2
        batches, classes, ms = (8, 16), (2, 3), (2, 3)
    else:
        dims, batch_size, seq = dict(MOSI_DIMS), 64, 50
        steps, repeats, sweep_steps = 60, 15, 20
        batches, classes, ms = (16, 32, 64, 128, 256), (2, 7, 16, 32, 64), tuple(range(2, 9))
    main = compare(dims, batch_size, seq, device, amp, steps)
    main.update({"batch": batch_size, "seq": seq, "steps": steps})
    parts = breakdown(dims, batch_size, seq, device, amp, repeats)
    sweep: list[dict[str, Any]] = []
    for b in batches:
        sweep.append(
            {"axis": "batch", "value": b, **compare(dims, b, seq, device, amp, sweep_steps)}
        )
    for k in classes:
        sweep.append(
            {
                "axis": "K",
                "value": k,
                **compare(
                    dims,
                    batch_size,
                    seq,
                    device,
                    amp,
                    sweep_steps,
                    task="classification",
                    num_classes=k,
                ),
            }
        )
    for m in ms:
        mdims = {f"m{i}": 20 for i in range(m)}
        sweep.append(
            {"axis": "M", "value": m, **compare(mdims, batch_size, seq, device, amp, sweep_steps)}
        )
    memory = peak_memory(dims, batch_size, seq, device, amp, quick)
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU",
        "amp": amp or "fp32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": quick,
        "dims": dims,
        "main": main,
        "breakdown": parts,
        "sweep": sweep,
        "memory": memory,
        "sweep_steps": sweep_steps,
        "repeats": repeats,
        "wall_s": time.perf_counter() - start,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """Render :func:`run`'s result as Markdown tables."""
    m = result["main"]
    lines = [
        f"Device: {result['device']} ({result['device_name']}), {result['amp']}, torch "
        f"{result['torch']}, {result['threads']} CPU thread(s). Shapes: batch {m['batch']}, "
        f"{m['seq']} frames, dims {json.dumps(result['dims'])}; backbone: 1 Transformer layer "
        f"per modality, width 64.\n",
        f"| step | median ms ({m['steps']} interleaved steps) | ratio to plain |",
        "|---|---|---|",
        f"| plain late fusion | {m['plain_ms']:.2f} | 1.00 |",
        f"| PaSE phase 2 | {m['pase_ms']:.2f} | **{m['ratio']:.2f}x** |",
        "",
        f"Breakdown (each piece alone on the same batch, median of {result['repeats']}):\n",
        "| component | ms |",
        "|---|---|",
    ]
    lines += [f"| {r['component']} | {r['ms']:.2f} |" for r in result["breakdown"]]
    lines += [
        "",
        f"Scaling of the extra cost (median of {result['sweep_steps']} interleaved "
        f"steps; batch {m['batch']} unless varied; K: classification with K classes; M: "
        "synthetic 20-d modalities):\n",
        "| varied | value | plain ms | PaSE ms | ratio | extra ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['axis']} | {r['value']} | {r['plain_ms']:.2f} | {r['pase_ms']:.2f} | "
        f"{r['ratio']:.2f} | {r['extra_ms']:.2f} |"
        for r in result["sweep"]
    ]
    mem = result["memory"]
    lines += [
        "",
        f"Peak memory of one step ({mem['method']}): plain {mem['plain']:.1f} MiB, "
        f"PaSE {mem['pase']:.1f} MiB.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Step time of plain vs PaSE against batch size, K and M."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [("batch", "batch size"), ("K", "classes K"), ("M", "modalities M")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (axis, label) in zip(axes, axes_names):
        rows = [r for r in result["sweep"] if r["axis"] == axis]
        xs = [r["value"] for r in rows]
        ax.plot(xs, [r["plain_ms"] for r in rows], "o-", label="plain late fusion")
        ax.plot(xs, [r["pase_ms"] for r in rows], "s-", label="PaSE phase 2")
        for r in rows:
            ax.annotate(
                f"{r['ratio']:.2f}x",
                (r["value"], r["pase_ms"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(0, 5),
                ha="center",
            )
        ax.set_xlabel(label)
        ax.set_ylabel("median step time (ms)")
        if axis == "batch":
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.suptitle(f"training step time, {result['device_name']} {result['amp']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict[str, Any], out_dir: Path = RESULTS, name: str = "speed") -> Path:
    """Write ``<name>.md``, ``<name>.json`` and ``<name>.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    png = plot(result, out_dir / f"{name}.png")
    flags = (
        (" --quick" if result["quick"] else "")
        + (f" --device {result['device']}" if result["device"] != "cpu" else "")
        + (f" --amp {result['amp']}" if result["amp"] != "fp32" else "")
    )
    text = (
        "# Training-step cost: PaSE phase 2 vs plain late fusion\n\n"
        + to_markdown(result)
        + f"\n![speed]({png.name})\n\nGenerated by `python benchmarks/speed.py{flags}` in "
        f"{result['wall_s']:.0f} s.\n"
    )
    md = out_dir / f"{name}.md"
    md.write_text(text)
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps (seconds)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("bf16",), default=None, help="autocast to bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(quick=args.quick, device=args.device, amp=args.amp)
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    suffix += "_bf16" if args.amp else ""
    md = write(result, args.out, name="speed" + suffix)
    print(md.read_text())


if __name__ == "__main__":
    main()
