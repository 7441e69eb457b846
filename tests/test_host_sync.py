"""Whole training steps never synchronise the host with the device — checked on the CPU.

``benchmarks/cuda_sync_check.py`` needs a GPU; this test runs in CI. A
:class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op that the step
dispatches and counts the ones that would make a GPU wait for the host:

* ``aten._local_scalar_dense`` — ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``,
  ``if tensor:``, ``.tolist()``;
* ops whose output shape depends on the data — ``nonzero``, ``masked_select``, ``unique*``,
  ``repeat_interleave`` without ``output_size``, ``bincount``, ``x[mask]`` (``aten.index`` with a
  bool index) and ``x[mask] = v`` (``aten.index_put`` with a bool index);
* ops that compare or check on the host — ``equal``, ``is_nonzero``, ``_linalg_check_errors``.

The backward pass is counted too (on a CPU, autograd runs in the calling thread). Host reads
that ATen does on a CPU only are not counted (``F.one_hot`` with ``num_classes`` checks the class
range with ``.item()`` on a CPU, with a device-side assert on CUDA). A device-to-host copy
(``.cpu()``) cannot be seen on a CPU-only run (every tensor is already there); the CUDA check
covers it.

One phase-1 and a few phase-2 ``train_step`` calls run for every registered method (and for the
example's default recipe), counting from the very first step (so first-call initialisation is
covered too). ``optimizer.step()`` is not counted: PyTorch's optimizers are allowed to read their
step counters. Value checks (:func:`modbalance.value_checks`) read tensor data by design and are
off, as in the CUDA check.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import modbalance
from examples import pase_mosi
from examples.pase import METHODS, PAPER_SWITCHES, PaSEConfig, build, train_step
from modbalance.teachers import UnimodalTeachers

ROOT = Path(__file__).resolve().parents[1]

#: Ops that synchronise whatever their arguments.
ALWAYS_SYNC = {
    "_local_scalar_dense",
    "is_nonzero",
    "item",
    "nonzero",
    "nonzero_numpy",
    "argwhere",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "equal",
    "bincount",
    "_linalg_check_errors",
}

DIMS = {"text": 12, "audio": 5, "vision": 6}
BATCH, LENGTH = 16, 8


def _has_bool_index(indices: Any) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
        for i in (indices or ())
    )


def _sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)`` would synchronise a GPU with the host, or ``None``."""
    name = func._schema.name.split("::")[-1]
    if name in ALWAYS_SYNC:
        return name
    if name == "repeat_interleave" and kwargs.get("output_size", None) is None:
        # the int-repeats overload has a static shape; only tensor repeats need their sum
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) or len(args) == 1:
            return "repeat_interleave (no output_size)"
    if name in ("index", "_unsafe_index") and _has_bool_index(args[1]):
        return f"{name} with a bool mask (x[mask])"
    if name in ("index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put") and (
        _has_bool_index(args[1])
    ):
        return f"{name} with a bool mask (x[mask] = v)"
    return None


def _stack_hint(depth: int = 3) -> str:
    """The innermost ``depth`` frames of the repository's own code (library, example, test)."""
    own_machinery = {"_stack_hint", "__torch_dispatch__", "__torch_function__"}
    stack = [
        f
        for f in traceback.extract_stack()
        if not (f.filename == __file__ and f.name in own_machinery)
    ]
    own = [f for f in stack if f.filename.startswith(f"{ROOT}/") and "-packages" not in f.filename]
    frames = own or [f for f in stack if "-packages" not in f.filename] or stack

    def where(f: traceback.FrameSummary) -> str:
        path = Path(f.filename)
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        return f"{name}:{f.lineno} ({f.name})"

    return " <- ".join(where(f) for f in reversed(frames[-depth:]))


def _cpu_only_check(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` reads tensor values on the host only on a CPU (ATen skips it on CUDA).

    ``F.one_hot(t, num_classes)`` with an explicit ``num_classes`` checks ``t.min()``/``t.max()``
    with ``.item()`` on a CPU; on CUDA it relies on the device-side assert of ``scatter`` instead.
    Without ``num_classes`` it needs ``t.max()`` on the host everywhere, and is counted.
    """
    if func is not torch.nn.functional.one_hot:
        return False
    num_classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
    return isinstance(num_classes, int) and num_classes > 0


class _CpuOnlyChecks(TorchFunctionMode):
    """Marks the calls of :func:`_cpu_only_check` ops for :class:`SyncCounter`."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _cpu_only_check(func, args, kwargs):
            return func(*args, **kwargs)
        self.counter._cpu_only += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter._cpu_only -= 1


class SyncCounter(TorchDispatchMode):
    """Count the dispatched aten ops that would synchronise a GPU with the host.

    ``paused()`` (a context manager) suspends counting, e.g. around ``optimizer.step()``. Host
    reads that ATen does on a CPU only (see :func:`_cpu_only_check`) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[tuple[str, str]] = []
        self._paused = 0
        self._cpu_only = 0
        self._function_mode = _CpuOnlyChecks(self)

    def __enter__(self):
        self._function_mode.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._function_mode.__exit__(None, None, None)
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._function_mode.__exit__(*exc)

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            reason = _sync_reason(func, args, kwargs)
            if reason == "_local_scalar_dense" and self._cpu_only:
                reason = None
            if reason is not None:
                self.hits.append((reason, _stack_hint()))
        return func(*args, **kwargs)

    def report(self) -> str:
        """One line per distinct (op, place), with its count."""
        counts = Counter(self.hits)
        return "\n".join(f"  {n}x {op}  at {where}" for (op, where), n in counts.items())


def make_batch(task: str = "regression", classes: int = 7) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    feats = {m: torch.randn(BATCH, LENGTH, d, generator=g) for m, d in DIMS.items()}
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=g)
    mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    if task == "regression":
        label = torch.rand(BATCH, generator=g) * 6 - 3
    else:
        label = torch.randint(0, classes, (BATCH,), generator=g)
    return {
        "features": feats,
        "mask": {m: mask.clone() for m in DIMS},
        "lengths": {m: lengths.clone() for m in DIMS},
        "label": label,
        "id": [str(i) for i in range(BATCH)],
    }


def count_syncs(parts, batch, phases=(1, 2, 2, 2)) -> SyncCounter:
    """Run ``train_step`` once per phase under a :class:`SyncCounter` (optimizer step excluded)."""
    counter = SyncCounter()
    step: Callable = parts.optimizer.step

    def uncounted_step(*args, **kwargs):
        with counter.paused():
            return step(*args, **kwargs)

    parts.optimizer.step = uncounted_step  # instance attribute: train_step calls this one
    parts.model.train()
    try:
        with modbalance.value_checks(False), counter:
            for phase in phases:
                train_step(parts, batch, phase)
    finally:
        del parts.optimizer.step
    return counter


def _assert_no_sync(counter: SyncCounter, what: str) -> None:
    if counter.hits:
        pytest.fail(
            f"{what}: train_step would synchronise the host with the device "
            f"{len(counter.hits)} time(s) (op, then the innermost frames):\n{counter.report()}",
            pytrace=False,
        )


# ------------------------------------------------------------------------------------------------
# the counter really counts
# ------------------------------------------------------------------------------------------------


def test_counter_counts_item_and_bool_mask_indexing():
    x = torch.randn(6, 3)
    mask = x[:, 0] > 0
    with SyncCounter() as counter:
        x.sum().item()
        float(x[0, 0])
        if x.sum() > 0:  # a Python branch on a tensor
            pass
        _ = x[mask]
        y = x.clone()
        y[mask] = 0.0
        torch.nonzero(mask)
        torch.unique(mask)
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]))
        # none of these synchronise
        torch.where(mask.unsqueeze(1), x, 0.0).sum()
        torch.repeat_interleave(x, 2, dim=0)
        x[:, 1:] * x[torch.tensor([0, 2])].sum()
        mask.any()
    ops = [op for op, _ in counter.hits]
    assert ops.count("_local_scalar_dense") == 3, counter.report()
    assert "index with a bool mask (x[mask])" in ops, counter.report()
    assert any(op.startswith("index_put") and "bool mask" in op for op in ops), counter.report()
    assert "nonzero" in ops and any("unique" in op for op in ops), counter.report()
    assert "repeat_interleave (no output_size)" in ops, counter.report()
    assert len(ops) == 8, counter.report()
    # the hint points at this test's line
    assert all("test_host_sync.py" in where for _, where in counter.hits), counter.report()


def test_counter_sees_a_sync_inside_the_library_and_pausing_works():
    with SyncCounter() as counter:
        with modbalance.value_checks(True):
            modbalance._checks.check_finite(torch.ones(3), "x")  # a value check reads data
        with counter.paused():
            torch.ones(2).sum().item()
    assert [op for op, _ in counter.hits] == ["_local_scalar_dense"], counter.report()
    assert "modbalance/_checks.py" in counter.hits[0][1]


def test_one_hot_counts_only_where_a_gpu_would_sync_too():
    y = torch.tensor([0, 2, 1])
    with SyncCounter() as counter:
        torch.nn.functional.one_hot(y, 3)  # CPU-only bound checks: not counted
        torch.nn.functional.one_hot(y, num_classes=3)
    assert not counter.hits, counter.report()
    with SyncCounter() as counter:
        torch.nn.functional.one_hot(y)  # the class count comes from y.max() on the host
    assert counter.hits and {op for op, _ in counter.hits} == {"_local_scalar_dense"}


def test_counting_the_optimizer_step_would_see_a_sync():
    """AdamW reads its step counter on the host: the exclusion below is needed, and works."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, foreach=False)
    p.grad = torch.ones(3)
    with SyncCounter() as counter:
        opt.step()
    assert counter.hits, "AdamW.step no longer synchronises; the exclusion could go"


# ------------------------------------------------------------------------------------------------
# the steps
# ------------------------------------------------------------------------------------------------


def _with_teachers(parts):
    """Teachers (here the untrained model's own encoders and heads) for a distilling method."""
    if any(m.needs_teacher for m in parts.methods):
        parts.teachers = UnimodalTeachers(parts.model.encoders, parts.model.unimodal_heads)
    return parts


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_step_does_not_synchronise(method):
    torch.manual_seed(0)
    cfg = PaSEConfig(
        modalities=tuple(DIMS), input_dims=dict(DIMS), dim=8, heads=2, **PAPER_SWITCHES
    )
    parts = _with_teachers(build(cfg, methods=[method]))
    counter = count_syncs(parts, make_batch())
    _assert_no_sync(counter, f"method {method!r} (regression)")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_step_does_not_synchronise_classification(method):
    torch.manual_seed(0)
    cfg = PaSEConfig(
        modalities=tuple(DIMS),
        input_dims=dict(DIMS),
        dim=8,
        heads=2,
        task="classification",
        num_outputs=4,
        num_classes=4,
        **PAPER_SWITCHES,
    )
    parts = _with_teachers(build(cfg, methods=[method]))
    counter = count_syncs(parts, make_batch("classification", 4))
    _assert_no_sync(counter, f"method {method!r} (classification)")


class _Train:
    """What :func:`examples.pase_mosi.configs` reads of a training split."""

    task = "regression"
    modalities = tuple(DIMS)
    dims = DIMS


def test_default_recipe_does_not_synchronise():
    """``python examples/pase_mosi.py``'s model config and methods (PASE_METHODS)."""
    torch.manual_seed(0)
    args = pase_mosi.parse_args([])
    model_config, config = pase_mosi.configs(args, _Train(), "cpu")
    assert config.methods == pase_mosi.PASE_METHODS
    parts = build(model_config, methods=list(pase_mosi.PASE_METHODS))
    counter = count_syncs(parts, make_batch())
    _assert_no_sync(counter, f"default recipe {pase_mosi.PASE_METHODS}")


def test_paper_configuration_does_not_synchronise():
    """Every model-side component on (calibration, OT alignment, gate), the paper's modulator."""
    torch.manual_seed(0)
    args = pase_mosi.parse_args(
        ["--calibration", "--alignment", "--gate", "--equilibrium", "pase", "--decision", "head"]
    )
    model_config, config = pase_mosi.configs(args, _Train(), "cpu")
    model_config.dim = 16
    parts = build(model_config, methods=list(config.methods))
    counter = count_syncs(parts, make_batch())
    _assert_no_sync(counter, f"paper configuration {config.methods}")


# ------------------------------------------------------------------------------------------------
# the fixes keep their state right (host-side copies of device counters)
# ------------------------------------------------------------------------------------------------


def _step_output(features, target, task="classification", step=0):
    from modbalance.balancing import StepOutput

    n = target.shape[0]
    present = {m: torch.ones(n, dtype=torch.bool) for m in features}
    return StepOutput(features, {}, None, present, target, task, step=step)


def test_pmr_epoch_window_follows_a_loaded_checkpoint():
    from modbalance.methods import PMR

    torch.manual_seed(0)
    feats = {m: torch.randn(12, 4) for m in ("text", "audio")}
    y = torch.arange(12) % 3
    pmr = PMR(dict.fromkeys(feats, 4), 3, start_epoch=1, end_epoch=1)
    pmr.epoch_end(0)
    fresh = PMR(dict.fromkeys(feats, 4), 3, start_epoch=1, end_epoch=1)
    assert "pmr" not in fresh.losses(_step_output(feats, y), {})  # epoch 0: off
    fresh.load_state_dict(pmr.state_dict())  # epoch 1: on
    with modbalance.value_checks(False), SyncCounter() as counter:
        assert "pmr" in fresh.losses(_step_output(feats, y), {})
    assert not counter.hits, counter.report()
    fresh.epoch_end(1)
    assert "pmr" not in fresh.losses(_step_output(feats, y), {})


def test_inforeg_anchors_once_and_again_after_loading_an_unanchored_state():
    from modbalance.methods import InfoReg

    torch.manual_seed(0)
    enc = torch.nn.ModuleDict({"text": torch.nn.Linear(3, 2), "audio": torch.nn.Linear(3, 2)})
    reg = InfoReg({m: enc[m] for m in enc})
    unanchored = {k: v.clone() for k, v in reg.state_dict().items() if torch.is_tensor(v)}
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    x, y = torch.randn(4, 3), torch.randn(4)

    def step():
        unimodal = {m: enc[m](x)[:, 0] for m in enc}
        out = _step_output({m: u[:, None] for m, u in unimodal.items()}, y, "regression")
        out = out._replace(unimodal=unimodal)
        reg.losses(out, {})
        sum((u - y).abs().mean() for u in unimodal.values()).backward()
        with reg.around_step(out, opt):
            opt.step()
        opt.zero_grad()

    start = enc["text"].weight.detach().clone()
    with modbalance.value_checks(False), SyncCounter() as counter:
        step()
    assert not counter.hits, counter.report()
    assert bool(reg.anchored)
    torch.testing.assert_close(reg.anchor_0_0, start)  # anchored before the first update
    step()
    torch.testing.assert_close(reg.anchor_0_0, start)  # and kept afterwards
    moved = enc["text"].weight.detach().clone()
    reg.load_state_dict(unanchored)  # a checkpoint from before the first step
    assert not bool(reg.anchored)
    step()
    assert bool(reg.anchored)
    torch.testing.assert_close(reg.anchor_0_0, moved)


def test_mla_alpha_schedule_runs_on_the_device():
    from modbalance.methods import MLA

    torch.manual_seed(0)
    mla = MLA(["text", "audio"], 4, 3, steps_per_epoch=3).double()
    for b in range(5):
        mla.batch_in_epoch.fill_(b)
        alpha = mla._alpha()
        assert isinstance(alpha, torch.Tensor)
        assert float(alpha) == pytest.approx(0.1 ** ((b % 3) / 3 + 1), rel=1e-15)
    mla.batch_in_epoch.zero_()
    r = torch.randn(1, 4, dtype=torch.float64)
    with SyncCounter() as counter:
        mla.project_gradient(r)  # the first update only counts
        mla.project_gradient(r)
    assert not counter.hits, counter.report()
    assert int(mla.updates) == 2 and not torch.equal(mla.projector, torch.eye(4).double())
