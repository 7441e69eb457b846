"""MultimodalDataset.batch and multimodal_loader: collate_multimodal's batches, fetched at once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from examples.pase import GuardedDataset, make_loader
from modbalance._checks import ModbalanceError
from modbalance.data import MultimodalDataset, collate_multimodal, multimodal_loader


def _dataset(seed: int, n: int, t: int, *, classes: bool, unimodal: bool) -> MultimodalDataset:
    """Two sequence modalities padded before, after or on both sides (some empty), a vector."""
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for m, d in (("text", 3), ("audio", 2)):
        x = torch.randn(n, t, d, generator=g)
        start = torch.randint(0, t + 1, (n,), generator=g)
        length = torch.minimum(torch.randint(0, t + 1, (n,), generator=g), t - start)
        frames = torch.arange(t)
        valid = (frames[None] >= start[:, None]) & (frames[None] < (start + length)[:, None])
        feats[m] = torch.where(valid[..., None], x, 0.0)  # the spans: the non-zero frames
    feats["vision"] = torch.randn(n, 4, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g) if classes else torch.randn(n, generator=g)
    uni = {m: torch.randn(n, generator=g) for m in ("text", "audio")} if unimodal else None
    return MultimodalDataset(feats, labels, unimodal_labels=uni)


def _assert_same_batch(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert got["id"] == want["id"]
    for key in ("features", "mask", "lengths"):
        assert set(got[key]) == set(want[key])
        for m in want[key]:
            a, b = got[key][m], want[key][m]
            assert a.dtype == b.dtype and a.shape == b.shape, (key, m)
            assert torch.equal(a, b), (key, m)
    assert got["label"].dtype == want["label"].dtype and torch.equal(got["label"], want["label"])
    for m in want.get("unimodal_labels", {}):
        assert torch.equal(got["unimodal_labels"][m], want["unimodal_labels"][m])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 12),
    t=st.integers(1, 6),
    classes=st.booleans(),
    unimodal=st.booleans(),
    picks=st.lists(st.integers(-50, 50), min_size=1, max_size=10),
)
def test_batch_equals_collate_of_items(seed, n, t, classes, unimodal, picks):
    ds = _dataset(seed, n, t, classes=classes, unimodal=unimodal)
    idx = [p % (2 * n) - n for p in picks]  # in [-n, n): negative ones count from the end
    want = collate_multimodal([ds[i] for i in idx])
    _assert_same_batch(ds.batch(idx), want)
    _assert_same_batch(ds.batch(torch.tensor(idx)), want)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_yields_the_dataloader_batches_and_draws_the_same_numbers(shuffle, drop_last):
    ds = _dataset(3, 23, 5, classes=False, unimodal=True)
    seen = []
    for make in (
        lambda g: DataLoader(
            ds, 4, shuffle=shuffle, generator=g, drop_last=drop_last, collate_fn=collate_multimodal
        ),
        lambda g: multimodal_loader(ds, 4, shuffle=shuffle, generator=g, drop_last=drop_last),
    ):
        torch.manual_seed(7)
        g = torch.Generator().manual_seed(11)
        loader = make(g)
        epochs = [list(loader) for _ in range(3)]  # reshuffled every epoch
        # the same random numbers were drawn from both generators
        seen.append((epochs, torch.rand(3), torch.rand(3, generator=g)))
    (ref, ref_global, ref_gen), (got, got_global, got_gen) = seen
    assert torch.equal(ref_global, got_global) and torch.equal(ref_gen, got_gen)
    assert [len(e) for e in got] == [len(e) for e in ref] == [5 if drop_last else 6] * 3
    for e_ref, e_got in zip(ref, got):
        for want, batch in zip(e_ref, e_got):
            _assert_same_batch(batch, want)
    if shuffle:
        assert ref[0][0]["id"] != ref[1][0]["id"]  # the epochs were shuffled


def test_loader_global_generator_and_sampler():
    ds = _dataset(5, 10, 3, classes=True, unimodal=False)
    torch.manual_seed(0)
    ref = list(DataLoader(ds, 3, shuffle=True, collate_fn=collate_multimodal))
    torch.manual_seed(0)
    got = list(multimodal_loader(ds, 3, shuffle=True))
    for want, batch in zip(ref, got, strict=True):
        _assert_same_batch(batch, want)
    order = [9, 0, 4, 4, 1]
    got = list(multimodal_loader(ds, 2, sampler=order))
    assert [b["id"] for b in got] == [[ds.ids[i] for i in order[k : k + 2]] for k in (0, 2, 4)]


def test_loader_reads_other_datasets_item_by_item():
    ds = _dataset(1, 7, 4, classes=False, unimodal=False)
    items = [ds[i] for i in range(len(ds))]  # a plain list of items has no batch()
    for want, batch in zip(multimodal_loader(ds, 3), multimodal_loader(items, 3), strict=True):
        _assert_same_batch(batch, want)


def test_example_loader_fetches_whole_batches(monkeypatch):
    ds = _dataset(2, 20, 4, classes=False, unimodal=False)
    calls = {"batch": 0, "item": 0}
    batch, item = MultimodalDataset.batch, MultimodalDataset.__getitem__

    def counted_batch(self, indices):
        calls["batch"] += 1
        return batch(self, indices)

    def counted_item(self, i):
        calls["item"] += 1
        return item(self, i)

    monkeypatch.setattr(MultimodalDataset, "batch", counted_batch)
    monkeypatch.setattr(MultimodalDataset, "__getitem__", counted_item)
    assert len(list(make_loader(ds, 8, train=True, seed=1))) == 2  # the last partial batch dropped
    assert len(list(make_loader(ds, 8, train=False))) == 3
    assert calls == {"batch": 5, "item": 0}


def test_guarded_split_refuses_batches_until_unlocked():
    ds = _dataset(4, 6, 3, classes=False, unimodal=False)
    guarded = GuardedDataset(ds)
    with pytest.raises(RuntimeError, match="test split was accessed"):
        guarded.batch([0, 1])
    with pytest.raises(RuntimeError, match="test split was accessed"):
        next(iter(make_loader(guarded, 4, train=False)))
    guarded.unlock()
    _assert_same_batch(next(iter(make_loader(guarded, 4, train=False))), ds.batch([0, 1, 2, 3]))


@pytest.mark.parametrize(
    "indices, exc, match",
    [
        ([], ModbalanceError, "at least one sample index"),
        (torch.zeros(0, dtype=torch.long), ModbalanceError, "at least one sample index"),
        ([0.5], ModbalanceError, "integer sample indices"),
        ([True], ModbalanceError, "integer sample indices"),
        ([0, True], ModbalanceError, "integer sample indices"),
        (torch.tensor([True, False, True]), ModbalanceError, "integer sample indices"),
        ([0, 2**70], IndexError, f"index {2**70} is out of range for a dataset of 3"),
        ("01", ModbalanceError, "integer sample indices"),
        (torch.tensor([0.0]), ModbalanceError, "integer sample indices"),
        (torch.tensor([[0]]), ModbalanceError, "1-D"),
        ([3], IndexError, "index 3 is out of range for a dataset of 3 samples"),
        ([0, -4], IndexError, "index -4 is out of range"),
    ],
)
def test_batch_errors(indices, exc, match):
    ds = _dataset(0, 3, 2, classes=False, unimodal=False)
    with pytest.raises(exc, match=match):
        ds.batch(indices)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "`batch_size` must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, "`batch_size` must be an integer"),
        ({"batch_size": True}, "`batch_size` must be an integer"),
        ({"batch_size": 2, "shuffle": True, "sampler": [0, 1]}, "not both"),
    ],
)
def test_loader_errors(kwargs, match):
    ds = _dataset(0, 3, 2, classes=False, unimodal=False)
    with pytest.raises(ModbalanceError, match=match):
        multimodal_loader(ds, **kwargs)


def test_an_index_error_beyond_int64_is_raised_only_for_an_overflow(monkeypatch):
    ds = _dataset(0, 3, 2, classes=False, unimodal=False)

    def refuse(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(torch, "tensor", refuse)
    with pytest.raises(RuntimeError, match="some other failure"):
        ds._int64([0, 1])
