"""Tests for modbalance.shapley: exact tables, sampled estimator, ModalityGame."""

from __future__ import annotations

import functools
import itertools
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------
# obviously-correct references
# ------------------------------------------------------------------------------------------
from _reference import brute_force_permutation_mean, brute_force_shapley, code_of
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from modbalance._checks import ModbalanceError
from modbalance.methods.modulators import (
    OGMGEModulator,
    ShapleyGradModulator,
    pase_coefficients,
)
from modbalance.metrics import pase_shares
from modbalance.shapley import (
    GameResult,
    ModalityGame,
    ShapleyResult,
    coalition_masks,
    interactions_from_table,
    shapley_from_table,
    shapley_values,
)


def brute_force_interactions(table: torch.Tensor) -> torch.Tensor:
    """Grabisch-Roubens Shapley interaction index by direct summation over subsets."""
    m = table.numel().bit_length() - 1
    out = torch.zeros(m, m, dtype=torch.float64)
    for i, j in itertools.permutations(range(m), 2):
        rest = [p for p in range(m) if p not in (i, j)]
        for size in range(len(rest) + 1):
            w = math.factorial(size) * math.factorial(m - size - 2) / math.factorial(m - 1)
            for subset in itertools.combinations(rest, size):
                s = list(subset)
                delta = (
                    table[code_of([*s, i, j])]
                    - table[code_of([*s, i])]
                    - table[code_of([*s, j])]
                    + table[code_of(s)]
                )
                out[i, j] += w * delta
    return out


def random_table(m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2**m, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------
# coalition masks and exact values
# ------------------------------------------------------------------------------------------


def test_coalition_masks_bit_order():
    masks = coalition_masks(3)
    assert masks.shape == (8, 3) and masks.dtype == torch.bool
    for c in range(8):
        assert masks[c].tolist() == [bool(c >> m & 1) for m in range(3)]
    assert not masks[0].any() and masks[-1].all()


@pytest.mark.parametrize("bad", [0, 25, -1])
def test_coalition_masks_rejects_bad_sizes(bad):
    with pytest.raises(ModbalanceError, match="num_players"):
        coalition_masks(bad)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6])
def test_exact_equals_brute_force(m):
    for seed in range(3):
        table = random_table(m, seed)
        torch.testing.assert_close(shapley_from_table(table), brute_force_shapley(table))


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_interactions_equal_brute_force(m):
    table = random_table(m, 7)
    got = interactions_from_table(table)
    torch.testing.assert_close(got, brute_force_interactions(table))
    torch.testing.assert_close(got, got.T)


def test_interactions_of_unanimity_game():
    # v(S) = 1 iff {0, 1} ⊆ S: pure synergy between 0 and 1, nothing else
    masks = coalition_masks(4)
    table = (masks[:, 0] & masks[:, 1]).double()
    inter = interactions_from_table(table)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[0, 1] = expected[1, 0] = 1.0
    torch.testing.assert_close(inter, expected)
    torch.testing.assert_close(shapley_from_table(table), torch.tensor([0.5, 0.5, 0, 0]).double())


def test_interactions_single_player_is_zero():
    assert interactions_from_table(torch.tensor([0.0, 2.0])).tolist() == [[0.0]]


def test_batched_tables_and_dtype_device(device, dtype):
    if dtype in (torch.float16, torch.bfloat16):
        pytest.skip("exact comparison in low precision")
    tables = torch.randn(3, 5, 16, dtype=dtype, device=device)
    phi = shapley_from_table(tables)
    assert phi.shape == (3, 5, 4) and phi.dtype == dtype and phi.device == tables.device
    torch.testing.assert_close(phi[1, 2], shapley_from_table(tables[1, 2]))
    inter = interactions_from_table(tables)
    assert inter.shape == (3, 5, 4, 4)


def test_shapley_from_table_is_differentiable():
    table = torch.randn(8, requires_grad=True)
    shapley_from_table(table).sum().backward()
    # sum of phi = v(N) - v(empty)
    expected = torch.zeros(8)
    expected[0], expected[-1] = -1.0, 1.0
    torch.testing.assert_close(table.grad, expected)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (torch.zeros(3), "power of two"),
        (torch.zeros(1), "power of two"),
        (torch.tensor(1.0), "at least 1 dimension"),
    ],
)
def test_table_errors(table, match):
    with pytest.raises(ModbalanceError, match=match):
        shapley_from_table(table)


def test_table_must_be_floating():
    with pytest.raises(TypeError, match="floating"):
        shapley_from_table(torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------------------------------
# axioms (hypothesis)
# ------------------------------------------------------------------------------------------

floats = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@st.composite
def tables(draw, min_players=1, max_players=6):
    m = draw(st.integers(min_players, max_players))
    values = draw(st.lists(floats, min_size=2**m, max_size=2**m))
    return torch.tensor(values, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(tables())
def test_efficiency(table):
    phi = shapley_from_table(table)
    torch.testing.assert_close(phi.sum(), table[-1] - table[0])


@settings(max_examples=40, deadline=None)
@given(tables(min_players=2), st.data())
def test_symmetry(table, data):
    m = table.numel().bit_length() - 1
    i, j = data.draw(st.permutations(range(m)))[:2]
    masks = coalition_masks(m)
    swapped = masks.clone()
    swapped[:, [i, j]] = masks[:, [j, i]]
    codes = (swapped.long() << torch.arange(m)).sum(1)
    sym = 0.5 * (table + table[codes])  # v(S) = v(swap_ij(S)): i and j are interchangeable
    phi = shapley_from_table(sym)
    torch.testing.assert_close(phi[i], phi[j])


@settings(max_examples=40, deadline=None)
@given(tables(min_players=1), st.data())
def test_null_player(table, data):
    m = table.numel().bit_length() - 1
    i = data.draw(st.integers(0, m - 1))
    codes = torch.arange(2**m) & ~(1 << i)  # v(S) = v(S without i)
    phi = shapley_from_table(table[codes])
    torch.testing.assert_close(phi[i], torch.tensor(0.0, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.data(), floats, floats)
def test_linearity(m, data, a, b):
    v = torch.tensor(data.draw(st.lists(floats, min_size=2**m, max_size=2**m))).double()
    w = torch.tensor(data.draw(st.lists(floats, min_size=2**m, max_size=2**m))).double()
    torch.testing.assert_close(
        shapley_from_table(a * v + b * w),
        a * shapley_from_table(v) + b * shapley_from_table(w),
        atol=1e-9,
        rtol=1e-9,
    )


# ------------------------------------------------------------------------------------------
# shapley_values
# ------------------------------------------------------------------------------------------


class CountingGame:
    def __init__(self, table: torch.Tensor):
        self.table = table
        self.calls = 0
        self.rows = 0

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        assert coalitions.dtype == torch.bool
        self.calls += 1
        self.rows += coalitions.shape[0]
        m = coalitions.shape[1]
        codes = (coalitions.long() << torch.arange(m, device=coalitions.device)).sum(1)
        return self.table[codes]


def test_exact_method_uses_one_call():
    table = random_table(5)
    game = CountingGame(table)
    res = shapley_values(game, 5, method="exact")
    assert isinstance(res, ShapleyResult)
    assert game.calls == 1 and game.rows == 32 and res.num_evaluations == 32
    torch.testing.assert_close(res.shapley, brute_force_shapley(table))
    assert torch.equal(res.stderr, torch.zeros(5, dtype=torch.float64))


def test_auto_switches_to_sampling_above_max_exact_players():
    table = random_table(6)
    game = CountingGame(table)
    res = shapley_values(game, 6, max_exact_players=5, num_permutations=4)
    assert game.calls == 1
    assert res.num_evaluations == game.rows < 64
    assert torch.isfinite(res.stderr).all() and (res.stderr > 0).any()
    exact = shapley_values(CountingGame(table), 6, max_exact_players=6)
    assert exact.num_evaluations == 64


@pytest.mark.parametrize("antithetic", [True, False])
def test_permutation_estimator_is_efficient_and_seeded(antithetic):
    table = random_table(7, 3)
    kwargs = dict(method="permutation", num_permutations=6, antithetic=antithetic)
    a = shapley_values(CountingGame(table), 7, generator=torch.Generator().manual_seed(5), **kwargs)
    b = shapley_values(CountingGame(table), 7, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(a.shapley, b.shapley) and torch.equal(a.stderr, b.stderr)
    torch.testing.assert_close(a.shapley.sum(), table[-1] - table[0])


def test_antithetic_pairs_are_exact_for_two_players():
    # with M = 2 a permutation and its reverse enumerate every ordering
    table = random_table(2, 1)
    res = shapley_values(CountingGame(table), 2, method="permutation", num_permutations=2)
    torch.testing.assert_close(res.shapley, brute_force_shapley(table))


@pytest.mark.parametrize("antithetic", [True, False])
def test_permutation_error_shrinks_and_stderr_covers(antithetic):
    m = 7
    table = random_table(m, 11)
    exact = shapley_from_table(table)

    def run(n, seed):
        return shapley_values(
            CountingGame(table),
            m,
            method="permutation",
            num_permutations=n,
            antithetic=antithetic,
            generator=torch.Generator().manual_seed(seed),
        )

    def rmse(n):
        errs = torch.stack([run(n, s).shapley - exact for s in range(20)])
        return errs.square().mean().sqrt()

    assert rmse(128) < 0.5 * rmse(8)
    covered = []
    for seed in range(40):
        res = run(32, 100 + seed)
        covered.append((res.shapley - exact).abs() <= 2.576 * res.stderr)
    frac = torch.cat(covered).double().mean()
    assert frac >= 0.85, frac


def test_permutation_estimator_is_unbiased():
    table = random_table(5, 2)
    exact = shapley_from_table(table)
    means = torch.stack(
        [
            shapley_values(
                CountingGame(table),
                5,
                method="permutation",
                num_permutations=8,
                generator=torch.Generator().manual_seed(s),
            ).shapley
            for s in range(400)
        ]
    ).mean(0)
    torch.testing.assert_close(means, exact, atol=0.05, rtol=0)


def test_single_permutation_stderr_is_nan():
    res = shapley_values(
        CountingGame(random_table(3)),
        3,
        method="permutation",
        num_permutations=1,
        antithetic=False,
    )
    assert torch.isnan(res.stderr).all()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(method="kernel"), ModbalanceError, "method"),
        (dict(method="permutation", num_permutations=3), ModbalanceError, "even"),
        (dict(method="permutation", num_permutations=0), ModbalanceError, "num_permutations"),
        (dict(method="permutation", generator=0), TypeError, "generator"),
        (dict(max_exact_players=0), ModbalanceError, "max_exact_players"),
    ],
)
def test_shapley_values_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        shapley_values(CountingGame(random_table(3)), 3, **kwargs)


def test_value_fn_output_is_checked():
    with pytest.raises(ModbalanceError, match=r"one value per coalition, shape \(8,\)"):
        shapley_values(lambda c: torch.zeros(8, 1), 3)
    with pytest.raises(TypeError, match="floating"):
        shapley_values(lambda c: c.sum(1), 3)
    with pytest.raises(TypeError, match="callable"):
        shapley_values(None, 3)


# ------------------------------------------------------------------------------------------
# ModalityGame
# ------------------------------------------------------------------------------------------

NAMES = ("text", "audio", "vision")
DIMS = {"text": 5, "audio": 3, "vision": 4}


class FusionHead(nn.Module):
    """Small MLP fusion head with batch norm and dropout; uses the presence flags."""

    def __init__(self, out_dim: int = 1, honour_flags: bool = False):
        super().__init__()
        self.proj = nn.ModuleDict({n: nn.Linear(d, 8) for n, d in DIMS.items()})
        self.mlp = nn.Sequential(
            nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, out_dim)
        )
        self.honour_flags = honour_flags
        self.out_dim = out_dim
        self.calls = 0
        self.seen_training: list[bool] = []

    def forward(self, features, present):
        self.calls += 1
        self.seen_training.append(self.training)
        h = 0.0
        for n in NAMES:
            z = self.proj[n](features[n])
            flag = present[n].to(z.dtype).unsqueeze(1)
            if self.honour_flags:
                z = z * flag
            h = h + z + 0.1 * flag  # the flags always matter, so wrong flags are caught
        out = self.mlp(h)
        return out[:, 0] if self.out_dim == 1 else out


def make_inputs(device, n=12, task="regression", seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(n, d, generator=g).to(device) for k, d in DIMS.items()}
    if task == "regression":
        y = torch.randn(n, generator=g)
        y[:2] = 0.0  # zero targets exercise the "Non0" accuracy
    else:
        y = torch.randint(0, 3, (n,), generator=g)
    return feats, y.to(device)


def reference_table(head, feats, y, masking, value, task, absent=None):
    """Evaluate each coalition separately with a plain loop (head in eval mode)."""
    was = head.training
    head.eval()
    n = y.shape[0]
    rows = []
    with torch.no_grad():
        for mask in coalition_masks(len(NAMES)).tolist():
            f, p = {}, {}
            for j, name in enumerate(NAMES):
                x = feats[name]
                present = mask[j]
                if present or masking == "present":
                    f[name] = x
                elif masking == "zero":
                    f[name] = torch.zeros_like(x)
                elif masking == "mean":
                    f[name] = x.mean(0, keepdim=True).expand_as(x)
                else:
                    f[name] = absent[name].expand_as(x)
                p[name] = torch.full((n,), present, dtype=torch.bool, device=x.device)
            out = head(f, p)
            if task == "regression":
                out = out.reshape(n)
                if value == "neg_loss":
                    v = -((out - y) ** 2).mean()
                elif value == "neg_mae":
                    v = -(out - y).abs().mean()
                else:
                    nz = y != 0
                    v = ((out[nz] > 0) == (y[nz] > 0)).double().mean()
            elif value == "neg_loss":
                v = -F.cross_entropy(out, y)
            else:
                v = (out.argmax(1) == y).double().mean()
            rows.append(float(v))
    head.train(was)
    return torch.tensor(rows, dtype=torch.float64)


CASES = [
    ("regression", "neg_loss"),
    ("regression", "neg_mae"),
    ("regression", "accuracy"),
    ("classification", "neg_loss"),
    ("classification", "accuracy"),
]


@pytest.mark.parametrize("masking", ["zero", "mean", "learned", "present"])
@pytest.mark.parametrize(("task", "value"), CASES)
def test_game_batched_equals_per_coalition_loop(device, masking, task, value):
    head = FusionHead(out_dim=1 if task == "regression" else 3, honour_flags=masking == "present")
    head.to(device).train()
    head.mlp[0].running_mean.normal_()  # non-trivial running statistics
    feats, y = make_inputs(device, task=task)
    absent = (
        {k: torch.randn(d, device=device) for k, d in DIMS.items()}
        if masking == "learned"
        else None
    )
    game = ModalityGame(
        head, NAMES, masking=masking, value=value, task=task, absent_embeddings=absent
    )
    res = game(feats, y)
    assert isinstance(res, GameResult) and res.modalities == NAMES
    assert head.calls == 1  # one head call for all 8 coalitions
    assert (
        res.table.shape == (8,) and res.shapley.shape == (3,) and res.interactions.shape == (3, 3)
    )
    ref = reference_table(head, feats, y, masking, value, task, absent)
    torch.testing.assert_close(res.table.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.shapley, shapley_from_table(res.table))
    torch.testing.assert_close(res.interactions, interactions_from_table(res.table))
    assert head.training and all(m.training for m in head.modules())


def test_game_masking_modes_differ(device):
    head = FusionHead().to(device)
    feats, y = make_inputs(device)
    tables = {
        m: ModalityGame(head, NAMES, masking=m)(feats, y).table for m in ("zero", "mean", "present")
    }
    assert not torch.allclose(tables["zero"], tables["mean"])
    assert not torch.allclose(tables["zero"], tables["present"])
    torch.testing.assert_close(tables["zero"][-1], tables["mean"][-1])  # all present: same


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 100])
def test_chunk_size_gives_same_table(device, chunk_size):
    head = FusionHead().to(device)
    feats, y = make_inputs(device)
    full = ModalityGame(head, NAMES, masking="mean")(feats, y).table
    head.calls = 0
    chunked = ModalityGame(head, NAMES, masking="mean", chunk_size=chunk_size)(feats, y).table
    assert head.calls == math.ceil(8 / chunk_size)
    torch.testing.assert_close(chunked, full)


def test_game_restores_modes_and_requires_grad_and_has_no_graph(device):
    head = FusionHead().to(device).train()
    head.mlp[1].eval()  # a submodule already in eval mode must stay so
    frozen = head.proj["audio"].weight
    frozen.requires_grad_(False)
    feats, y = make_inputs(device)
    feats = {k: v.requires_grad_() for k, v in feats.items()}
    res = ModalityGame(head, NAMES)(feats, y)
    assert head.seen_training == [False]
    assert head.training and head.mlp.training and head.mlp[0].training
    assert not head.mlp[1].training
    assert not frozen.requires_grad and head.proj["text"].weight.requires_grad
    assert not res.table.requires_grad and head.proj["text"].weight.grad is None


def test_game_restores_modes_after_exception(device):
    head = FusionHead().to(device).train()
    head.mlp[1].eval()

    def failing(features, present):
        head(features, present)
        raise RuntimeError("boom")

    game = ModalityGame(failing, NAMES, modules=[head])
    with pytest.raises(RuntimeError, match="boom"):
        game(*make_inputs(device))
    assert head.seen_training == [False]
    assert head.training and head.mlp[0].training and not head.mlp[1].training


def test_bound_method_head_gets_eval_mode(device):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = FusionHead()

        def fuse(self, features, present):
            return self.head(features, present)

    model = Model().to(device).train()
    ModalityGame(model.fuse, NAMES)(*make_inputs(device))
    assert model.head.seen_training == [False] and model.training and model.head.training


def test_head_returning_column_is_accepted(device):
    head = FusionHead().to(device)
    feats, y = make_inputs(device)
    flat = ModalityGame(head, NAMES)(feats, y).table
    col = ModalityGame(lambda f, p: head(f, p).unsqueeze(1), NAMES, modules=[head])(feats, y).table
    torch.testing.assert_close(flat, col)


def test_coalition_values_feed_shapley_values(device):
    head = FusionHead().to(device)
    feats, y = make_inputs(device)
    game = ModalityGame(head, NAMES)
    exact = game(feats, y)
    value_fn = functools.partial(game.coalition_values, feats, y)
    sub = coalition_masks(3)[[5, 2, 7]]
    torch.testing.assert_close(value_fn(sub), exact.table[[5, 2, 7]])
    res = shapley_values(value_fn, 3, method="exact", device=device)
    torch.testing.assert_close(res.shapley, exact.shapley)


def test_regression_accuracy_all_zero_targets_is_zero(device):
    head = FusionHead().to(device)
    feats, _ = make_inputs(device)
    res = ModalityGame(head, NAMES, value="accuracy")(feats, torch.zeros(12, device=device))
    assert torch.equal(res.table, torch.zeros(8, device=device))


def test_game_constructor_errors():
    head = FusionHead()
    with pytest.raises(ModbalanceError, match="masking"):
        ModalityGame(head, NAMES, masking="drop")
    with pytest.raises(ModbalanceError, match="neg_mae"):
        ModalityGame(head, NAMES, value="neg_mae", task="classification")
    with pytest.raises(ModbalanceError, match="absent_embeddings"):
        ModalityGame(head, NAMES, masking="learned")
    with pytest.raises(ModbalanceError, match="exactly the modalities"):
        ModalityGame(head, NAMES, masking="learned", absent_embeddings={"text": torch.zeros(5)})
    with pytest.raises(ModbalanceError, match="only used with masking='learned'"):
        ModalityGame(head, NAMES, absent_embeddings={k: torch.zeros(d) for k, d in DIMS.items()})
    with pytest.raises(ModbalanceError, match="distinct"):
        ModalityGame(head, ["a", "a"])
    with pytest.raises(ModbalanceError, match="at least one"):
        ModalityGame(head, [])
    with pytest.raises(TypeError, match="sequence"):
        ModalityGame(head, "text")
    with pytest.raises(ModbalanceError, match="chunk_size"):
        ModalityGame(head, NAMES, chunk_size=0)
    with pytest.raises(TypeError, match="callable"):
        ModalityGame(3, NAMES)


def test_game_call_errors():
    head = FusionHead()
    feats, y = make_inputs("cpu")
    game = ModalityGame(head, NAMES)
    with pytest.raises(ModbalanceError, match="exactly the keys"):
        game({"text": feats["text"]}, y)
    bad = dict(feats, audio=feats["audio"][:5])
    with pytest.raises(ModbalanceError, match="size 5 in dimension 0"):
        game(bad, y)
    with pytest.raises(ModbalanceError, match=r"`target` must have shape \(N,\)"):
        game(feats, y.view(3, 4))
    with pytest.raises(ModbalanceError, match="`target` has size 11"):
        game(feats, y[:11])
    with pytest.raises(TypeError, match="integer"):
        ModalityGame(FusionHead(out_dim=3), NAMES, task="classification")(feats, y)
    with pytest.raises(ModbalanceError, match=r"shape \(B,\) or \(B, 1\)"):
        ModalityGame(lambda f, p: torch.zeros(5), NAMES)(feats, y)
    with pytest.raises(ModbalanceError, match=r"logits of shape \(B, C\)"):
        ModalityGame(lambda f, p: torch.zeros(96), NAMES, task="classification")(
            feats, torch.zeros(12, dtype=torch.long)
        )
    emb = {k: torch.zeros(d + 1) for k, d in DIMS.items()}
    with pytest.raises(ModbalanceError, match=r"absent_embeddings\['text'\]` must have shape"):
        ModalityGame(head, NAMES, masking="learned", absent_embeddings=emb)(feats, y)


# ------------------------------------------------------------------------------------------
# torch.distributed: every rank gets the table of the global batch
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, feats, y, state, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        head = FusionHead()
        head.load_state_dict(state)
        shard = slice(rank * 6, (rank + 1) * 6)
        local = {k: v[shard] for k, v in feats.items()}
        for masking in ("mean", "zero"):
            res = ModalityGame(head, NAMES, masking=masking, value="neg_mae")(local, y[shard])
            torch.save(res.table, os.path.join(out_dir, f"{masking}_{rank}.pt"))
        # the modulator averages contributions over ranks: identical coefficients everywhere
        mod = ShapleyGradModulator({"a": nn.Linear(1, 1), "b": nn.Linear(1, 1)}, momentum=0.0)
        k = mod.observe(dict(zip(("a", "b"), torch.tensor([1.0 + 2.0 * rank, 1.0]))))
        torch.save(k, os.path.join(out_dir, f"coef_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_game_and_modulator_agree_with_global_batch(tmp_path):
    import torch.multiprocessing as mp

    head = FusionHead()
    feats, y = make_inputs("cpu")
    args = (2, _free_port(), feats, y, head.state_dict(), str(tmp_path))
    mp.spawn(_dist_worker, args=args, nprocs=2, join=True)
    for masking in ("mean", "zero"):
        expected = ModalityGame(head, NAMES, masking=masking, value="neg_mae")(feats, y).table
        for rank in range(2):
            table = torch.load(tmp_path / f"{masking}_{rank}.pt")
            torch.testing.assert_close(table, expected, atol=1e-5, rtol=1e-5)
    expected_k = pase_coefficients(torch.tensor([2.0, 1.0]))  # mean of [1, 1] and [3, 1]
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"coef_{rank}.pt"), expected_k)


# ------------------------------------------------------------------------------------------
# player names, confidence intervals, bad values (issues 12 and 16)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "permutation"])
def test_players_are_returned(method):
    table = random_table(3, 4)
    res = shapley_values(
        CountingGame(table), 3, method=method, num_permutations=4, modalities=["t", "a", "v"]
    )
    assert res.modalities == ("t", "a", "v")
    assert (
        shapley_values(CountingGame(table), 3, method=method, num_permutations=4).modalities is None
    )
    # the fourth field keeps positional unpacking of the first three readable
    values, stderr, n_eval, players, _ = res
    assert players == ("t", "a", "v") and values.shape == stderr.shape == (3,) and n_eval > 0


@pytest.mark.parametrize(
    ("players", "exc", "match"),
    [
        (["t", "a"], ModbalanceError, r"`modalities` must name each of the num_players=3"),
        (["t", "a", "a"], ModbalanceError, r"`modalities` must be distinct"),
        ("tav", TypeError, r"`modalities` must be a sequence"),
        ([0, 1, 2], TypeError, r"`modalities` must hold strings"),
    ],
)
def test_players_errors(players, exc, match):
    with pytest.raises(exc, match=match):
        shapley_values(CountingGame(random_table(3)), 3, modalities=players)


def test_t_quantile_matches_tabulated_values():
    from modbalance.shapley import _t_quantile

    # Student-t quantiles from standard tables (and scipy.stats.t.ppf)
    table = {(0.975, 1): 12.7062047, (0.975, 3): 3.1824463, (0.975, 7): 2.3646243,
             (0.995, 3): 5.8409093, (0.95, 30): 1.6972609, (0.975, 1000): 1.9623391}  # fmt: skip
    for (p, df), q in table.items():
        assert _t_quantile(p, df) == pytest.approx(q, rel=1e-7)


def test_interval_covers_better_than_two_stderr_with_few_permutations():
    m = 7
    table = random_table(m, 11)
    exact = shapley_from_table(table)
    naive, student = [], []
    for seed in range(200):
        res = shapley_values(
            CountingGame(table),
            m,
            method="permutation",
            num_permutations=8,  # 4 antithetic units, 3 degrees of freedom
            generator=torch.Generator().manual_seed(1000 + seed),
        )
        assert res.num_units == 4
        low, high = res.interval(0.95)
        student.append((low <= exact) & (exact <= high))
        naive.append((res.shapley - exact).abs() <= 2 * res.stderr)
    naive_cov = torch.cat(naive).double().mean().item()
    t_cov = torch.cat(student).double().mean().item()
    assert naive_cov < 0.86  # the issue: ~80% for a "95%" interval
    assert t_cov >= 0.89 and t_cov > naive_cov + 0.06, (naive_cov, t_cov)


def test_interval_exact_and_errors():
    table = random_table(3, 2)
    res = shapley_values(CountingGame(table), 3, method="exact")
    low, high = res.interval()
    assert (
        res.num_units is None and torch.equal(low, res.shapley) and torch.equal(high, res.shapley)
    )
    one = shapley_values(
        CountingGame(table), 3, method="permutation", num_permutations=1, antithetic=False
    )
    assert one.num_units == 1 and torch.isnan(one.stderr).all()
    with pytest.raises(ModbalanceError, match=r"at least two independent.*num_permutations >= 2"):
        one.interval()
    with pytest.raises(ModbalanceError, match=r"`level` must be < 1"):
        res.interval(1.0)
    with pytest.raises(ModbalanceError, match=r"`level` must be > 0"):
        res.interval(0.0)


@pytest.mark.parametrize("method", ["exact", "permutation"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_value_fn_returning_nan_is_an_error(method, bad):
    table = random_table(3, 1)
    table[5] = bad
    with pytest.raises(ModbalanceError, match=r"`value_fn\(coalitions\)` must contain only finite"):
        shapley_values(CountingGame(table), 3, method=method, num_permutations=8)
    import modbalance

    with modbalance.value_checks(False):  # the check reads the values: it can be switched off
        res = shapley_values(CountingGame(table), 3, method="exact")
    assert not torch.isfinite(res.shapley).all()


@pytest.mark.parametrize("where", ["features", "target", "head"])
def test_game_rejects_non_finite_values(where):
    feats, y = make_inputs("cpu")
    head = FusionHead()
    if where == "features":
        feats["audio"] = feats["audio"].clone()
        feats["audio"][3, 1] = float("nan")
        match = r"`features\['audio'\]` must contain only finite values, got 1 NaN"
    elif where == "target":
        y = y.clone()
        y[0] = float("inf")
        match = r"`target` must contain only finite values"
    else:
        head = lambda f, p: torch.full((f["text"].shape[0],), float("nan"))  # noqa: E731
        match = r"`head\(features, present\)` must contain only finite values"
    with pytest.raises(ModbalanceError, match=match):
        ModalityGame(head, NAMES)(feats, y)


@pytest.mark.parametrize("label", [3, 7, -1])
@pytest.mark.parametrize("value", ["neg_loss", "accuracy"])
def test_game_out_of_range_class_label(label, value):
    feats, y = make_inputs("cpu", task="classification")
    y[4] = label
    game = ModalityGame(FusionHead(out_dim=3), NAMES, task="classification", value=value)
    with pytest.raises(
        ModbalanceError, match=rf"`target` must hold class indices in \[0, 2\].*{label}"
    ):
        game(feats, y)


def test_game_integer_target_for_regression_names_the_fix():
    feats, _ = make_inputs("cpu")
    with pytest.raises(TypeError, match=r"`target`.*task='classification'.*float target"):
        ModalityGame(FusionHead(), NAMES)(feats, torch.zeros(12, dtype=torch.long))


@pytest.mark.parametrize("fn", [shapley_from_table, interactions_from_table])
def test_tables_with_nan_are_rejected(fn):
    table = random_table(3)
    table[2] = float("nan")
    with pytest.raises(
        ModbalanceError, match=r"`values` must contain only finite values, got 1 NaN"
    ):
        fn(table)


def test_game_value_checks_can_be_switched_off():
    import modbalance

    feats, y = make_inputs("cpu", task="classification")
    feats["text"] = feats["text"].clone()
    feats["text"][0, 0] = float("nan")
    game = ModalityGame(FusionHead(out_dim=3), NAMES, task="classification")
    with modbalance.value_checks(False):  # no NaN scan, no label-range scan: no host sync
        res = game(feats, y)
    assert torch.isnan(res.table).any()


# ------------------------------------------------------------------------------------------
# the sampled game: random cyclic orders ("cost at scale")
# ------------------------------------------------------------------------------------------


class TableHead:
    """A head whose game is a given table: with ``value="neg_mae"`` and the target 10, every
    sample predicts ``table[S]`` for its coalition ``S``, so ``v(S) = table[S] - 10``."""

    def __init__(self, table: torch.Tensor, names):
        self.table = table.float()
        self.names = tuple(names)
        self.calls = 0
        self.rows = 0

    def __call__(self, features, present):
        self.calls += 1
        codes = sum(present[n].long() << j for j, n in enumerate(self.names))
        self.rows += codes.numel()
        return self.table.to(codes.device)[codes]


def table_game(table: torch.Tensor, n: int = 3, **kwargs):
    """``(game, features, target)`` of :class:`TableHead` over ``table``'s players."""
    m = table.numel().bit_length() - 1
    names = [f"m{i}" for i in range(m)]
    head = TableHead(table, names)
    game = ModalityGame(head, names, masking="present", value="neg_mae", **kwargs)
    feats = {k: torch.zeros(n, 2) for k in names}
    return game, feats, torch.full((n,), 10.0)


def cycle_permutations(cycle):
    """The 2M permutations of a cyclic order: its rotations, read in both directions."""
    cycle = list(cycle)
    rotations = [cycle[k:] + cycle[:k] for k in range(len(cycle))]
    return rotations + [r[::-1] for r in rotations]


def all_cycles(m: int):
    """Every cyclic order of ``m`` players (player 0 first; both directions listed)."""
    return [(0, *rest) for rest in itertools.permutations(range(1, m))]


def test_sampled_estimate_is_the_permutation_mean_of_one_drawn_cycle():
    table = random_table(5, 11)
    candidates = torch.stack(
        [brute_force_permutation_mean(table, cycle_permutations(c)) for c in all_cycles(5)]
    )
    for seed in range(4):
        game, feats, y = table_game(table, estimator="sampled", seed=seed)
        res = game(feats, y)
        assert game.num_coalitions == 2 * 5 + 2 + 5 * 2 == 22 and game.head.rows == 22 * 3
        gap = (candidates - res.shapley.double()).abs().amax(1).min()
        assert gap < 1e-5, gap
    # two cycles: the mean of two of them
    game, feats, y = table_game(table, estimator="sampled", num_cycles=2, seed=3)
    est = game(feats, y).shapley.double()
    pairs = (candidates.unsqueeze(0) + candidates.unsqueeze(1)) / 2
    assert (pairs - est).abs().amax(-1).min() < 1e-5


@pytest.mark.parametrize("m", [4, 5, 6])
def test_cycle_estimator_is_unbiased_exactly(m):
    # the expectation over a uniformly random cyclic order is the Shapley value
    table = random_table(m, m)
    means = [brute_force_permutation_mean(table, cycle_permutations(c)) for c in all_cycles(m)]
    torch.testing.assert_close(torch.stack(means).mean(0), shapley_from_table(table))


def test_sampled_game_is_unbiased_over_seeds():
    table = random_table(6, 2)
    exact = shapley_from_table(table)
    game, feats, y = table_game(table, estimator="sampled", seed=0)
    est = torch.stack([game(feats, y).shapley.double() for _ in range(300)])  # generator advances
    se = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - exact).abs() <= 4 * se + 1e-6).all(), (est.mean(0) - exact, se)


@pytest.mark.parametrize("m", [5, 7, 8])
def test_sampled_game_is_efficient(m):
    table = random_table(m, 4)
    game, feats, y = table_game(table, estimator="sampled", num_cycles=2)
    for _ in range(3):
        res = game(feats, y)
        torch.testing.assert_close(
            res.shapley.sum().double(), table[-1] - table[0], atol=1e-5, rtol=1e-5
        )


def test_sampled_game_is_exact_without_higher_order_interactions():
    # v(S) = sum_i a_i [i in S] + sum_{i<j} b_ij [i, j in S]: the two directions of a cycle
    # cancel every pairwise term, so one cycle gives the exact values
    m = 7
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, generator=g, dtype=torch.float64)
    b = torch.randn(m, m, generator=g, dtype=torch.float64).triu(1)
    z = coalition_masks(m).double()
    table = z @ a + ((z @ b) * z).sum(1)
    exact = shapley_from_table(table)
    for seed in range(3):
        game, feats, y = table_game(table, seed=seed)
        assert not game.exact
        torch.testing.assert_close(game(feats, y).shapley.double(), exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_sampled_game_with_at_most_three_players_is_the_exact_game(m):
    table = random_table(m, 5)
    game, feats, y = table_game(table, estimator="sampled")
    exact, _, _ = table_game(table, estimator="exact")
    assert game.exact and game.num_coalitions == 2**m
    a, b = game(feats, y), exact(feats, y)
    assert torch.equal(a.table, b.table) and torch.equal(a.interactions, b.interactions)
    assert torch.equal(a.shapley, b.shapley)


def test_sampled_game_is_accurate_at_a_fixed_seed():
    """A random MLP fusion head at M = 8: one cycle (58 of 256 coalitions) at seed 0."""
    m, n, d = 8, 32, 4
    names = [f"m{i}" for i in range(m)]
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(n, d, generator=g) for k in names}
    scale = 0.7 ** torch.arange(m, dtype=torch.float32)  # unequal modalities
    y = sum(scale[i] * feats[k][:, 0] for i, k in enumerate(names))
    head = nn.Sequential(nn.Linear(m * d, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        head[0].weight.normal_(generator=g).mul_(0.5)

    def fuse(f, present):
        return head(torch.cat([f[k] * present[k][:, None] for k in names], 1))[:, 0]

    exact = ModalityGame(fuse, names, estimator="exact", modules=[head])(feats, y)
    res = ModalityGame(fuse, names, modules=[head], seed=0)(feats, y)
    rel = float((res.shapley - exact.shapley).norm() / exact.shapley.norm())
    assert rel < 0.15, rel  # documented: a few % to ~15% relative error of phi per call
    shares = pase_shares(res.shapley) - pase_shares(exact.shapley)
    assert float(shares.abs().max()) < 0.05


def test_sampled_game_is_reproducible_from_its_generator():
    table = random_table(7, 8)
    game, feats, y = table_game(table, seed=3)
    state = game.state_dict()
    first, second = game(feats, y).shapley, game(feats, y).shapley
    assert not torch.equal(first, second)  # the generator advances
    game.load_state_dict(state)
    assert torch.equal(game(feats, y).shapley, first)
    assert torch.equal(game(feats, y).shapley, second)
    again, _, _ = table_game(table, seed=3)
    assert torch.equal(again(feats, y).shapley, first)
    other, _, _ = table_game(table, seed=4)
    assert not torch.equal(other(feats, y).shapley, first)
    gen = torch.Generator().manual_seed(3)
    own, _, _ = table_game(table, generator=gen)
    assert own.generator is gen and torch.equal(own(feats, y).shapley, first)


@pytest.mark.parametrize(
    ("m", "kwargs", "exact", "coalitions"),
    [
        (6, {}, True, 64),  # default: exact up to 6 modalities
        (7, {}, False, 2 * 7 + 2 + 7 * 4),
        (8, {}, False, 58),
        (8, {"num_cycles": 2}, False, 98),
        (7, {"estimator": "exact"}, True, 128),
        (5, {"max_exact_players": 4}, False, 12 + 10),
        (5, {"estimator": "sampled"}, False, 22),
        (4, {"estimator": "sampled", "num_cycles": 3}, False, 10 + 3 * 4),
        (8, {"max_exact_players": 8}, True, 256),
    ],
)
def test_threshold_switches_between_exact_and_sampled(m, kwargs, exact, coalitions):
    table = random_table(m, 1)
    game, feats, y = table_game(table, n=2, **kwargs)
    assert game.exact is exact and game.num_coalitions == coalitions
    res = game(feats, y)
    assert game.head.calls == 1 and game.head.rows == coalitions * 2
    assert res.table.shape == (2**m,) and res.interactions.shape == (m, m)
    if exact:
        torch.testing.assert_close(
            res.shapley.double(), shapley_from_table(table), atol=1e-5, rtol=1e-5
        )
        assert torch.isfinite(res.table).all() and torch.isfinite(res.interactions).all()
    else:
        assert int(torch.isfinite(res.table).sum()) <= min(coalitions, 2**m)
        assert torch.isnan(res.interactions.fill_diagonal_(float("nan"))).all()


def test_sampled_table_holds_the_evaluated_coalitions():
    m = 7
    table = random_table(m, 9)
    game, feats, y = table_game(table, num_cycles=2)
    res = game(feats, y)
    done = torch.isfinite(res.table)
    torch.testing.assert_close(res.table[done].double(), table[done] - 10.0, atol=1e-5, rtol=0)
    full = 2**m - 1
    strata = [0, full] + [1 << i for i in range(m)] + [full ^ (1 << i) for i in range(m)]
    assert done[strata].all()  # the empty, single, all-but-one and grand coalitions: always
    assert torch.equal(res.interactions.diagonal(), torch.zeros(m))
    # single-modality scores (OGM-GE's game source) need only the strata
    scores = OGMGEModulator.game_scores(res)
    assert all(bool(torch.isfinite(v)) for v in scores.values())


def test_sampled_game_chunks_give_the_same_result():
    table = random_table(7, 6)
    whole, feats, y = table_game(table, seed=1)
    chunked, _, _ = table_game(table, seed=1, chunk_size=5)
    a, b = whole(feats, y), chunked(feats, y)
    assert chunked.head.calls == math.ceil(chunked.num_coalitions / 5)
    torch.testing.assert_close(a.shapley, b.shapley)
    torch.testing.assert_close(a.table, b.table, equal_nan=True)


def test_sampled_game_options_errors():
    head = FusionHead()
    with pytest.raises(ModbalanceError, match="`estimator` must be one of"):
        ModalityGame(head, NAMES, estimator="approx")
    with pytest.raises(ModbalanceError, match="`max_exact_players` must be >= 1"):
        ModalityGame(head, NAMES, max_exact_players=0)
    with pytest.raises(ModbalanceError, match="`max_exact_players` must be <= 24"):
        ModalityGame(head, NAMES, max_exact_players=25)
    with pytest.raises(ModbalanceError, match="`num_cycles` must be >= 1"):
        ModalityGame(head, NAMES, num_cycles=0)
    with pytest.raises(ModbalanceError, match="`seed` must be >= 0"):
        ModalityGame(head, NAMES, seed=-1)
    with pytest.raises(ModbalanceError, match="`seed` or `generator`, not both"):
        ModalityGame(head, NAMES, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="`seed` must be an int"):
        ModalityGame(head, NAMES, seed=1.5)
    with pytest.raises(TypeError, match="`num_cycles` must be an int"):
        ModalityGame(head, NAMES, num_cycles=True)
    with pytest.raises(TypeError, match=r"`generator` must be a torch\.Generator"):
        ModalityGame(head, NAMES, generator=0)
    game = ModalityGame(head, NAMES)
    with pytest.raises(ModbalanceError, match="state_dict\\(\\), a mapping with the keys"):
        game.load_state_dict({"seed": 0})


def test_game_repr_and_state():
    game = ModalityGame(FusionHead(), NAMES, num_cycles=3, max_exact_players=2)
    assert repr(game) == (
        "ModalityGame(modalities=('text', 'audio', 'vision'), masking='zero', "
        "value='neg_loss', task='regression', chunk_size=None, estimator='auto', "
        "max_exact_players=2, num_cycles=3)"
    )
    assert game.exact  # three players: every coalition is a stratum
    state = game.state_dict()
    assert state["modalities"] == list(NAMES)
    assert set(state) == {"modalities", "generator"} and torch.equal(
        state["generator"], torch.Generator().manual_seed(0).get_state()
    )


def test_sampled_game_does_not_synchronise_the_host():
    from test_host_sync import SyncCounter

    import modbalance

    head = FusionHead()
    names = [f"m{i}" for i in range(7)]
    proj = nn.Linear(3, 1)

    def fuse(f, present):
        return sum(proj(f[k])[:, 0] * present[k] for k in f)

    game = ModalityGame(fuse, names, masking="mean", modules=[head, proj])
    feats = {k: torch.randn(5, 3) for k in names}
    y = torch.randn(5)
    game(feats, y)  # first call: cached designs and weights
    with modbalance.value_checks(False), SyncCounter() as counter:
        res = game(feats, y)
        ModalityGame(fuse, names[:3], modules=[proj])(
            {k: feats[k] for k in names[:3]}, y
        )  # the exact game too
    assert not counter.hits, counter.report()
    assert not game.exact and torch.isfinite(res.shapley).all()


def test_training_step_with_a_sampled_game_does_not_synchronise_the_host():
    from test_host_sync import count_syncs

    from examples.pase import PaSEConfig, build

    dims = {f"m{i}": 3 for i in range(7)}
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(4)[None, :] < torch.tensor([4, 2, 3, 4, 1, 4])[:, None]
    batch = {
        "features": {k: torch.randn(6, 4, d, generator=g) for k, d in dims.items()},
        "mask": {k: mask for k in dims},
        "label": torch.randn(6, generator=g).clamp(-3, 3),
    }
    config = PaSEConfig(modalities=tuple(dims), input_dims=dims, dim=8, heads=2)
    parts = build(config, methods=("sge",))
    assert not parts.game.exact
    counter = count_syncs(parts, batch)
    assert not counter.hits, counter.report()


def test_game_sees_submodules_added_later_and_runs_the_head_without_value_checks():
    import modbalance

    head = FusionHead().train()
    seen = []

    def fuse(f, present):
        seen.append((modbalance.value_checks_enabled(), [m.training for m in head.modules()]))
        return head(f, present)

    game = ModalityGame(fuse, NAMES, modules=[head])
    feats, y = make_inputs("cpu")
    game(feats, y)
    head.extra = nn.Dropout(0.5)  # registered after the first call
    head.mlp.append(nn.Identity())
    game(feats, y)
    assert [checks for checks, _ in seen] == [False, False]
    assert not any(any(flags) for _, flags in seen)  # every module, new ones too, in eval
    assert all(m.training for m in head.modules())  # and restored
    assert modbalance.value_checks_enabled()


def _dist_sampled_worker(rank, world, port, table, out_dir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        game, feats, y = table_game(table, n=2 + rank, seed=7)  # unequal shards
        res = game(feats, y)
        torch.save((res.table, res.shapley), os.path.join(out_dir, f"sampled_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_sampled_game_draws_the_same_cycles_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    table = random_table(7, 12)
    mp.spawn(
        _dist_sampled_worker, args=(2, _free_port(), table, str(tmp_path)), nprocs=2, join=True
    )
    game, feats, y = table_game(table, n=5, seed=7)
    expected = game(feats, y)
    for rank in range(2):
        got_table, got_shapley = torch.load(tmp_path / f"sampled_{rank}.pt")
        torch.testing.assert_close(got_table, expected.table, equal_nan=True)
        torch.testing.assert_close(got_shapley, expected.shapley)
