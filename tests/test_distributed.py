"""DDP correctness: every rank ends with the state one process computes on the whole batch.

One 2-process gloo job (CPU, loopback) runs three stages and saves what each rank holds; the tests
then compare it, in float64, with a single-process run on the concatenated batch:

1. :class:`PrototypeCalibrator` prototypes, ``initialized`` flags and ``counts`` after several
   batches (unequal shards, a class present on one rank only, a shard lacking a class, masked
   rows holding NaN, a fully masked shard);
2. :class:`ModalityGame` tables and the coefficients of :class:`ShapleyGradModulator` (from the
   game's Shapley values) and :class:`OGMGEModulator` (from per-rank summed scores);
3. a small PaSE-style model in ``DistributedDataParallel`` trained for 3 AdamW steps with
   ``ShapleyGradModulator(apply="update")`` attached to the optimizer and a ``ModalityGame`` played
   every step: parameters and buffers equal on both ranks and equal to the single-process run;
4. :class:`OGMGEModulator` with gradient noise and no generator, global RNGs seeded differently
   per rank: the ranks still add the same noise (a generator seeded from rank 0).

Each test also checks that a rank-local (unsynchronised) computation would differ, so a missing
all-reduce cannot pass unnoticed.
"""

from __future__ import annotations

import inspect
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modbalance.fusion import PrototypeGatedFusion
from modbalance.methods.modulators import OGMGEModulator, ShapleyGradModulator
from modbalance.prototypes import PrototypeCalibrator
from modbalance.shapley import ModalityGame

pytestmark = pytest.mark.distributed

WORLD = 2
DT = torch.float64
TOL = {"atol": 1e-9, "rtol": 1e-9}

# ------------------------------------------------------------------------------------------
# stage 1: PrototypeCalibrator
# ------------------------------------------------------------------------------------------

K, D = 4, 3
CAL_SPLIT = 5  # rank 0 gets rows [0, 5), rank 1 rows [5, 12): unequal shards on purpose
CAL_KWARGS = {
    "cosine": {"metric": "cosine", "momentum": 0.7},
    "sqeuclidean": {"metric": "sqeuclidean", "momentum": 0.6},
}


def _calibrator_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Global batches of 12 rows ``(features, labels, mask)``; the comments give the shards."""
    g = torch.Generator().manual_seed(11)
    labels = [
        # class 3 only on rank 1; class 2 absent everywhere (stays uninitialised)
        [0, 0, 1, 1, 0, 1, 3, 3, 0, 1, 3, 1],
        # rank 0 lacks class 0 (rank 1 has it); class 2 first seen, on rank 0 only
        [1, 2, 2, 1, 3, 0, 0, 1, 3, 0, 1, 0],
        # every class on both ranks, a few rows masked out (their features are NaN)
        [0, 1, 2, 3, 0, 3, 2, 1, 0, 1, 2, 3],
        # rank 0's shard entirely masked out: only rank 1 contributes
        [2, 2, 1, 0, 3, 3, 0, 0, 1, 2, 1, 3],
    ]
    masks = [
        [True] * 12,
        [True] * 12,
        [True, False, True, True, True, True, True, False, True, True, True, True],
        [False] * 5 + [True] * 7,
    ]
    out = []
    for lab, mask in zip(labels, masks):
        x = torch.randn(12, D, generator=g, dtype=DT) + 0.5
        m = torch.tensor(mask)
        x[~m] = float("nan")
        out.append((x, torch.tensor(lab), m))
    return out


def _run_calibrators(batches, shard: slice | None) -> dict[str, list[dict[str, torch.Tensor]]]:
    """State of each calibrator after each batch (whole batch when ``shard`` is None)."""
    history: dict[str, list[dict[str, torch.Tensor]]] = {}
    for name, kwargs in CAL_KWARGS.items():
        calib = PrototypeCalibrator(K, D, **kwargs).to(DT).train()
        states = []
        for x, y, m in batches:
            sl = shard if shard is not None else slice(None)
            calib(x[sl], y[sl], m[sl])
            states.append({k: v.clone() for k, v in calib.state_dict().items()})
        history[name] = states
    return history


# ------------------------------------------------------------------------------------------
# stage 2: ModalityGame + ShapleyGradModulator / OGMGEModulator
# ------------------------------------------------------------------------------------------

GAME_MODS = ("text", "audio", "vision")
GAME_DIMS = {"text": 4, "audio": 3, "vision": 2}


class _AdditiveHead(nn.Module):
    """Fixed head: per-modality linear scores summed (text strong, vision weak)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(d, 1, dtype=DT) for m, d in GAME_DIMS.items()})
        with torch.no_grad():
            for m, scale in zip(GAME_MODS, (2.0, 0.7, 0.3)):
                self.proj[m].weight.zero_()
                self.proj[m].weight[0, 0] = scale
                self.proj[m].bias.zero_()

    def forward(self, features, present):
        return sum(self.proj[m](features[m])[:, 0] for m in GAME_MODS)


def _game_batches():
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        feats = {m: torch.randn(12, d, generator=g, dtype=DT) for m, d in GAME_DIMS.items()}
        y = 2.0 * feats["text"][:, 0] + 0.7 * feats["audio"][:, 0] + 0.3 * feats["vision"][:, 0]
        y = y + 0.3 * torch.randn(12, generator=g, dtype=DT)
        batches.append((feats, y))
    return batches


def _ogm_scores(feats, y) -> torch.Tensor:
    """Per-modality *summed* true-class probability of a fixed unimodal classifier.

    A sum over the rank's rows: the modulator averages it over ranks, which gives the global sum
    divided by the world size, and OGM-GE's ratios are invariant to that constant.
    """
    cls = (y > 0).long()
    scores = []
    for m in GAME_MODS:
        logit = 1.5 * feats[m][:, 0]
        probs = torch.stack([torch.sigmoid(-logit), torch.sigmoid(logit)], 1)
        scores.append(probs.gather(1, cls[:, None]).sum())
    return torch.stack(scores)


def _run_modulators(batches, shard: slice | None) -> dict[str, list[torch.Tensor]]:
    game = ModalityGame(_AdditiveHead(), GAME_MODS, masking="mean", value="neg_loss")
    dummy = {m: nn.Linear(1, 1) for m in GAME_MODS}
    shap = ShapleyGradModulator(dummy, momentum=0.5).to(DT)
    ogm = OGMGEModulator(dummy, alpha=0.5, momentum=0.3).to(DT)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("table", "shapley", "k_shap", "k_ogm")}
    for feats, y in batches:
        sl = shard if shard is not None else slice(None)
        local = {m: f[sl] for m, f in feats.items()}
        res = game(local, y[sl])  # the game all-reduces value sums and counts: global table
        out["table"].append(res.table)
        out["shapley"].append(res.shapley)
        out["k_shap"].append(shap.observe(res))
        out["k_ogm"].append(ogm.observe(dict(zip(GAME_MODS, _ogm_scores(local, y[sl])))))
    return out


# ------------------------------------------------------------------------------------------
# stage 3: end to end under DistributedDataParallel
# ------------------------------------------------------------------------------------------

E2E_MODS = ("text", "audio")
E2E_IN = {"text": 6, "audio": 4}
E2E_N = 8  # global batch; two equal shards of 4 so DDP's gradient mean is the full-batch mean
E2E_STEPS = 3


class _TinyPase(nn.Module):
    """Per-modality encoders, a PrototypeCalibrator each, PrototypeGatedFusion, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {
                "text": nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8)),
                "audio": nn.Linear(4, 8),
            }
        )
        self.calib = nn.ModuleDict(
            {m: PrototypeCalibrator(3, 8, momentum=0.8, label_bins=3) for m in E2E_MODS}
        )
        self.fusion = PrototypeGatedFusion(E2E_MODS, 8, hidden=4)
        self.head = nn.Linear(8, 1)

    def fuse(self, feats, present=None):
        conf = {m: self.calib[m].confidence(feats[m]) for m in E2E_MODS}
        return self.head(self.fusion(feats, conf, present).fused)[:, 0]

    def forward(self, x, y):
        feats = {m: self.enc[m](x[m]) for m in E2E_MODS}
        # every loss term is a mean over this rank's rows (all rows qualify for calibration once
        # their class is initialised, which the global EMA step does before the loss is formed)
        calibration = sum(self.calib[m](feats[m], y).loss for m in E2E_MODS)
        loss = F.mse_loss(self.fuse(feats), y) + 0.1 * calibration
        return loss, {m: f.detach() for m, f in feats.items()}


def _e2e_data():
    g = torch.Generator().manual_seed(3)
    x = {m: torch.randn(E2E_N, d, generator=g, dtype=DT) for m, d in E2E_IN.items()}
    y = (1.2 * x["text"][:, 0] + 0.4 * x["audio"][:, 0]).clamp(-2.5, 2.5)
    return x, y


def _train(model: nn.Module, inner: _TinyPase, x, y) -> dict[str, object]:
    """3 AdamW steps with the game observed every step; ``model`` may be DDP-wrapped."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    mod = ShapleyGradModulator({m: inner.enc[m] for m in E2E_MODS}, momentum=0.5).to(DT)
    game = ModalityGame(inner.fuse, E2E_MODS, masking="present", value="neg_loss")
    coefs, tables = [], []
    # apply="update": the optimizer's step pre-/post-hooks rescale each group's update. They run
    # inside opt.step(), i.e. after loss.backward() has returned, and DDP's backward only returns
    # once every gradient bucket is all-reduced (averaged). So the modulation always sees the
    # synchronised gradients/updates, and since observe() gives identical coefficients on every
    # rank, each rank applies the same scaling to the same update: parameters stay in lockstep.
    with mod.attach(opt):
        for _ in range(E2E_STEPS):
            opt.zero_grad(set_to_none=True)
            loss, feats = model(x, y)  # calibrators all-reduce class sums/counts in here
            loss.backward()  # DDP: gradient all-reduce (mean over ranks) happens here
            res = game(feats, y)  # all-reduces per-coalition value sums and counts
            tables.append(res.table)
            coefs.append(mod.observe(res))  # all-reduce-mean of identical values
            opt.step()  # hooks: snapshot -> AdamW update -> rescale update by k_m
    state = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    return {"state": state, "coefs": torch.stack(coefs), "tables": torch.stack(tables)}


# ------------------------------------------------------------------------------------------
# stage 4: OGM-GE gradient noise under DDP
# ------------------------------------------------------------------------------------------


class _TwoBranch(nn.Module):
    """Two linear branches whose outputs interact, so both get gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.v = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return (self.a(x) * self.v(x)).sum(1)


def _noisy_ogm_steps(rank: int) -> dict[str, torch.Tensor]:
    """Two DDP steps with OGM-GE's gradient noise, the global RNG seeded differently per rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = _TwoBranch().to(DT)
    torch.manual_seed(100 + rank)  # e.g. per-rank augmentation seeds: the global RNGs differ
    ddp = DDP(model, **_no_buffer_sync())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ogm = OGMGEModulator({"a": model.a, "v": model.v}, alpha=0.5, noise=True, apply="grad")
    with ogm.attach(opt):
        for _ in range(2):
            x = torch.randn(4, 3, dtype=DT)  # rank-local data
            opt.zero_grad()
            ddp(x).square().mean().backward()
            ogm.observe({"a": 3.0, "v": 1.0 + rank})
            opt.step()  # pre-hook: k_m * g + noise, on the all-reduced gradients
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------
# the spawned job and the single-process references
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_buffer_sync() -> dict[str, bool]:
    """DDP keyword that turns off the per-forward buffer broadcast (renamed in PyTorch 2.13)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _worker(rank: int, world: int, port: int, init_state: dict, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result: dict[str, object] = {}
        cal_shard = slice(0, CAL_SPLIT) if rank == 0 else slice(CAL_SPLIT, None)
        result["calib"] = _run_calibrators(_calibrator_batches(), cal_shard)
        result["mod"] = _run_modulators(_game_batches(), cal_shard)

        inner = _TinyPase().to(DT)
        inner.load_state_dict(init_state)
        # broadcast_buffers=False (forward_sync_buffers=False from PyTorch 2.13): the calibrators'
        # buffers are already identical on every rank (updated from all-reduced statistics), so
        # broadcasting rank 0's copy before each forward would only cost a collective. Every
        # parameter is used in forward, so find_unused_parameters stays False.
        ddp = DDP(inner, **_no_buffer_sync())
        half = E2E_N // world
        rows = slice(rank * half, (rank + 1) * half)
        x, y = _e2e_data()
        result["e2e"] = _train(ddp, inner, {m: v[rows] for m, v in x.items()}, y[rows])
        result["noise"] = _noisy_ogm_steps(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _initial_state() -> dict:
    torch.manual_seed(0)
    return _TinyPase().to(DT).state_dict()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run the 2-rank job once for the whole module and load what each rank saved."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(
        _worker,
        args=(WORLD, _free_port(), _initial_state(), str(out)),
        nprocs=WORLD,
        join=True,
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_tree_close(a, b, **tol) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree_close(a[k], b[k], **tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_tree_close(u, v, **tol)
    else:
        torch.testing.assert_close(a, b, **tol, equal_nan=True)


def _differs(a, b) -> bool:
    try:
        _assert_tree_close(a, b, **TOL)
    except AssertionError:
        return True
    return False


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------


def test_calibrator_prototypes_match_full_batch(ranks):
    batches = _calibrator_batches()
    expected = _run_calibrators(batches, None)
    for rank in range(WORLD):
        _assert_tree_close(ranks[rank]["calib"], expected, **TOL)
    # identical on both ranks (exactly the same reduced statistics went into the EMA)
    _assert_tree_close(ranks[0]["calib"], ranks[1]["calib"], atol=0.0, rtol=0.0)

    last = expected["cosine"][-1]
    assert last["initialized"].tolist() == [True, True, True, True]
    assert last["counts"].tolist() == [13, 12, 6, 10]  # summed over both shards and batches
    first = expected["cosine"][0]
    assert first["initialized"].tolist() == [True, True, False, True]  # class 3: rank 1 only
    norms = torch.linalg.vector_norm(last["prototypes"], dim=1)
    torch.testing.assert_close(norms, torch.ones(K, dtype=DT))
    # the check can fail: rank 0's shard alone gives other prototypes, flags and counts
    local = _run_calibrators(batches, slice(0, CAL_SPLIT))
    for name in CAL_KWARGS:
        assert _differs(local[name][0]["prototypes"], expected[name][0]["prototypes"])
        assert not local[name][0]["initialized"][3]


def test_game_and_modulator_coefficients_match_full_batch(ranks):
    batches = _game_batches()
    expected = _run_modulators(batches, None)
    for rank in range(WORLD):
        _assert_tree_close(ranks[rank]["mod"], expected, **TOL)
    for key in ("k_shap", "k_ogm"):
        torch.testing.assert_close(ranks[0]["mod"][key], ranks[1]["mod"][key], atol=0.0, rtol=0.0)
    # the coefficients are not trivial: text is slowed by both rules, the weakest keeps 1
    k_shap, k_ogm = expected["k_shap"][-1], expected["k_ogm"][-1]
    assert k_shap[0] < 0.9 and k_shap.max() == 1.0
    assert k_ogm[0] < 0.99 and k_ogm[2] == 1.0
    # the check can fail: the game on rank 0's shard alone, without the all-reduce, differs
    local = _run_modulators(batches, slice(0, CAL_SPLIT))
    assert _differs(local["table"], expected["table"])
    assert _differs(local["k_shap"], expected["k_shap"])
    assert _differs(local["k_ogm"], expected["k_ogm"])


def test_ddp_training_matches_single_process_full_batch(ranks):
    init = _initial_state()
    model = _TinyPase().to(DT)
    model.load_state_dict(init)
    x, y = _e2e_data()
    expected = _train(model, model, x, y)

    for rank in range(WORLD):
        _assert_tree_close(ranks[rank]["e2e"], expected, atol=1e-8, rtol=1e-8)
    _assert_tree_close(ranks[0]["e2e"], ranks[1]["e2e"], atol=1e-12, rtol=1e-12)

    # the run is not vacuous: every parameter moved, the prototypes were filled, the modulation
    # slowed one encoder, and a rank that trained on its shard alone would end elsewhere
    state = expected["state"]
    for key, value in state.items():
        if key.startswith(("enc.", "fusion.", "head.")) and not key.endswith("_extra_state"):
            assert not torch.allclose(value, init[key]), key
    assert all(bool(state[f"calib.{m}.initialized"].any()) for m in E2E_MODS)
    assert float(expected["coefs"].min()) < 0.95
    alone = _TinyPase().to(DT)
    alone.load_state_dict(init)
    local = _train(alone, alone, {m: v[:4] for m, v in x.items()}, y[:4])
    assert _differs(local["state"], state)


def test_ogmge_gradient_noise_is_identical_on_every_rank(ranks):
    # without a generator the modulator draws from one seeded identically on all ranks (the seed
    # comes from rank 0), so the noisy updates agree although the global RNGs differ
    _assert_tree_close(ranks[0]["noise"], ranks[1]["noise"], atol=0.0, rtol=0.0)
    torch.manual_seed(0)
    init = _TwoBranch().to(DT).state_dict()
    assert _differs(ranks[0]["noise"], init)
