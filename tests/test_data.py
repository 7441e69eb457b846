"""Tests for the MMSA / MulT loaders, MultimodalDataset and collate_multimodal."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from modbalance._checks import ModbalanceError
from modbalance.data import MultimodalDataset, collate_multimodal, load_mmsa, load_mult

NEG_INF = -np.inf


def _frames(rng: np.random.Generator, n: int, t: int, d: int) -> np.ndarray:
    """Random frames bounded away from zero, so every frame is non-zero."""
    return (rng.uniform(0.5, 1.5, (n, t, d)) * rng.choice([-1, 1], (n, t, d))).astype(np.float32)


def _mmsa_split(rng: np.random.Generator, n: int = 4, t: int = 5) -> dict:
    text = _frames(rng, n, t, 8)
    text[0, 3:] = 0  # post-padded: 3 valid frames
    text[1, :1] = 0  # pre-padded: 4 valid frames
    audio = _frames(rng, n, t, 3)
    audio[2, :2] = 0  # pre-padded
    audio[3, 4:] = 0  # post-padded
    audio[0, 1, 0] = NEG_INF
    audio[1, 2, 1] = NEG_INF
    audio[2, 3, 2] = np.nan
    vision = _frames(rng, n, t, 2)
    vision[3, 0, 1] = np.nan
    vision[1, 2] = 0  # an interior all-zero frame (e.g. no face found) stays a valid frame
    ids = np.zeros((n, 3, t), dtype=np.int64)
    for i, length in enumerate((3, 4, 5, 2)):
        ids[i, 0, :length] = rng.integers(1000, 2000, length)
        ids[i, 0, 0] = 101
        ids[i, 1, :length] = 1
    return {
        "raw_text": [f"utterance {i}" for i in range(n)],
        "id": np.array([f"vid{i}$_${i + 1}" for i in range(n)]),
        "text": text,
        "text_bert": ids,
        "audio": audio,
        "vision": vision,
        "annotations": np.array(["Neutral", "Positive", "Negative", "Positive"]),
        "classification_labels": np.array([1, 2, 0, 2]),
        "regression_labels": np.array([0.0, 1.5, -2.5, 3.0], dtype=np.float32),
    }


@pytest.fixture
def mmsa_aligned(tmp_path):
    rng = np.random.default_rng(0)
    data = {s: _mmsa_split(rng) for s in ("train", "valid", "test")}
    data["config"] = {"note": "MMSA-FET adds a top-level config"}
    path = tmp_path / "aligned_50.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path, data


def _unaligned_split(rng: np.random.Generator) -> dict:
    d = _mmsa_split(rng)
    audio = _frames(rng, 4, 7, 3)
    audio_lengths = [3, 5, 7, 2]
    audio[0, 3:] = 0  # post-padded
    audio[1, :2] = 0  # pre-padded (5 valid frames at the end)
    audio[3, :] = _frames(rng, 1, 7, 3)[0]  # padding not zero: ambiguous -> first 2 frames
    vision = _frames(rng, 4, 6, 2)
    vision_lengths = np.array([6, 4, 1, 0])
    vision[1, :2] = 0
    vision[2, :5] = 0
    vision[3, :] = 0
    d.update(audio=audio, audio_lengths=audio_lengths, vision=vision, vision_lengths=vision_lengths)
    return d


@pytest.fixture
def mmsa_unaligned(tmp_path):
    rng = np.random.default_rng(1)
    data = {s: _unaligned_split(rng) for s in ("train", "valid", "test")}
    path = tmp_path / "unaligned_50.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path, data


def _write(tmp_path, obj, name="f.pkl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def _load_quiet(loader, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return loader(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# MMSA
# ----------------------------------------------------------------------------------------------


def test_load_mmsa_aligned_values(mmsa_aligned):
    path, data = mmsa_aligned
    ds = _load_quiet(load_mmsa, path, split="train")
    src = data["train"]
    assert isinstance(ds, MultimodalDataset) and len(ds) == 4 and ds.split == "train"
    assert ds.modalities == ("text", "audio", "vision") and ds.task == "regression"
    assert ds.dims == {"text": 8, "audio": 3, "vision": 2}
    torch.testing.assert_close(ds.labels, torch.tensor([0.0, 1.5, -2.5, 3.0]))
    assert ds.labels.dtype == torch.float32
    # valid spans from the non-zero frames, whichever side the padding is on
    assert ds.lengths("text").tolist() == [3, 4, 5, 5]
    assert ds.lengths("audio").tolist() == [5, 5, 3, 4]
    assert ds.lengths("vision").tolist() == [5, 5, 5, 5]
    repaired_audio = np.where(np.isfinite(src["audio"]), src["audio"], 0.0)
    repaired_vision = np.where(np.isfinite(src["vision"]), src["vision"], 0.0)
    spans = {"text": [(0, 3), (1, 5), (0, 5), (0, 5)], "audio": [(0, 5), (0, 5), (2, 5), (0, 4)]}
    for i in range(4):
        item = ds[i]
        assert item["id"] == f"vid{i}$_${i + 1}"
        assert item["label"].shape == () and item["label"].dtype == torch.float32
        assert float(item["label"]) == src["regression_labels"][i]
        s, e = spans["text"][i]
        np.testing.assert_array_equal(item["features"]["text"].numpy(), src["text"][i, s:e])
        s, e = spans["audio"][i]
        np.testing.assert_array_equal(item["features"]["audio"].numpy(), repaired_audio[i, s:e])
        np.testing.assert_array_equal(item["features"]["vision"].numpy(), repaired_vision[i])
        for m in ds.modalities:
            assert item["features"][m].dtype == torch.float32
            assert item["mask"][m].dtype == torch.bool and item["mask"][m].all()
            assert item["mask"][m].shape == item["features"][m].shape[:1]
    assert "unimodal_labels" not in ds[0]
    # the repair leaves no non-finite value and the -inf/NaN positions are 0
    assert float(ds[0]["features"]["audio"][1, 0]) == 0.0
    assert float(ds[2]["features"]["audio"][1, 2]) == 0.0  # frame 3 of sample 2, span starts at 2


def test_load_mmsa_warns_once_with_split_key_and_counts(mmsa_aligned):
    path, _ = mmsa_aligned
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        load_mmsa(path, split="valid")
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1
    assert "split 'valid'" in msgs[0]
    assert "audio: 2 -inf, 1 NaN" in msgs[0] and "vision: 1 NaN" in msgs[0]
    assert rec[0].filename == __file__  # points at the caller


def test_load_mmsa_does_not_warn_on_clean_file(tmp_path):
    rng = np.random.default_rng(3)
    split = _mmsa_split(rng)
    split["audio"] = np.nan_to_num(split["audio"], neginf=0.0)
    split["vision"] = np.nan_to_num(split["vision"])
    path = _write(tmp_path, {"train": split})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_mmsa(path, split="train")


def test_load_mmsa_text_bert_token_ids(mmsa_aligned):
    path, data = mmsa_aligned
    ds = _load_quiet(load_mmsa, path, split="test", text_key="text_bert")
    src = data["test"]["text_bert"]
    assert ds.dims["text"] == 3
    assert ds.lengths("text").tolist() == [3, 4, 5, 2]
    item = ds[1]
    assert item["features"]["text"].dtype == torch.int64
    np.testing.assert_array_equal(item["features"]["text"].numpy(), src[1, :, :4].T)
    batch = collate_multimodal([ds[i] for i in range(4)])
    x = batch["features"]["text"]
    assert x.shape == (4, 5, 3) and x.dtype == torch.int64
    # MMSA's BERT input layout (B, 3, T) is one transpose away, padding = [PAD] id 0, mask 0
    np.testing.assert_array_equal(x.transpose(1, 2).numpy(), src)


def test_load_mmsa_auto_uses_text_bert_without_text(tmp_path):
    split = _mmsa_split(np.random.default_rng(4))
    del split["text"]
    ds = _load_quiet(load_mmsa, _write(tmp_path, {"train": split}), split="train")
    assert ds.dims["text"] == 3 and ds.padded("text").dtype == torch.int64


def test_load_mmsa_unaligned_lengths_either_side(mmsa_unaligned):
    path, data = mmsa_unaligned
    ds = _load_quiet(load_mmsa, path, split="train")
    src = data["train"]
    assert ds.lengths("audio").tolist() == [3, 5, 7, 2]
    assert ds.lengths("vision").tolist() == [6, 4, 1, 0]
    np.testing.assert_array_equal(ds[0]["features"]["audio"].numpy(), src["audio"][0, :3])
    np.testing.assert_array_equal(ds[1]["features"]["audio"].numpy(), src["audio"][1, 2:])
    np.testing.assert_array_equal(ds[3]["features"]["audio"].numpy(), src["audio"][3, :2])
    np.testing.assert_array_equal(ds[1]["features"]["vision"].numpy(), src["vision"][1, 2:])
    np.testing.assert_array_equal(ds[2]["features"]["vision"].numpy(), src["vision"][2, 5:])
    assert ds[3]["features"]["vision"].shape == (0, 2)
    mask = ds.valid_mask("audio")
    assert mask.shape == (4, 7)
    assert mask[1].tolist() == [False, False, True, True, True, True, True]


def test_load_mmsa_sims_unimodal_labels(tmp_path):
    split = _mmsa_split(np.random.default_rng(5))
    split["regression_labels"] = np.array([0.0, 0.2, -0.8, 1.0], dtype=np.float32)
    for k, v in (("T", 0.1), ("A", -0.1), ("V", 0.3)):
        split[f"regression_labels_{k}"] = np.full(4, v, dtype=np.float32)
    ds = _load_quiet(load_mmsa, _write(tmp_path, {"train": split}), split="train")
    assert set(ds.unimodal_labels) == {"text", "audio", "vision"}
    item = ds[2]
    assert float(item["unimodal_labels"]["audio"]) == pytest.approx(-0.1)
    batch = collate_multimodal([ds[0], ds[1]])
    assert batch["unimodal_labels"]["vision"].shape == (2,)


# ----------------------------------------------------------------------------------------------
# MulT
# ----------------------------------------------------------------------------------------------


def _mult_split(rng, labels, with_id=True):
    n = labels.shape[0]
    text = _frames(rng, n, 6, 7)
    text[:, :2] = 0  # MulT files are pre-padded
    audio = _frames(rng, n, 6, 3)
    audio[:, :1] = 0
    audio[0, 3, 1] = NEG_INF
    vision = _frames(rng, n, 6, 2)
    d = {"text": text, "audio": audio, "vision": vision, "labels": labels}
    if with_id:
        d["id"] = np.array([[f"v{i}_{i}".encode(), b"0.0", b"1.0"] for i in range(n)])
    return d


def test_load_mult_sentiment(tmp_path):
    rng = np.random.default_rng(6)
    labels = np.array([0.0, -1.5, 2.5], dtype=np.float32).reshape(3, 1, 1)
    data = {s: _mult_split(rng, labels) for s in ("train", "valid", "test")}
    with pytest.warns(RuntimeWarning, match=r"split 'test'.*audio: 1 -inf"):
        ds = load_mult(_write(tmp_path, data), split="test")
    assert ds.task == "regression" and ds.dims == {"text": 7, "audio": 3, "vision": 2}
    torch.testing.assert_close(ds.labels, torch.tensor([0.0, -1.5, 2.5]))
    assert ds.ids == ["v0_0", "v1_1", "v2_2"]
    assert ds.lengths("text").tolist() == [4, 4, 4]
    np.testing.assert_array_equal(ds[1]["features"]["text"].numpy(), data["test"]["text"][1, 2:])
    expected = np.where(np.isfinite(data["test"]["audio"][0, 1:]), data["test"]["audio"][0, 1:], 0)
    np.testing.assert_array_equal(ds[0]["features"]["audio"].numpy(), expected)


def test_load_mult_ids_not_unique_are_joined(tmp_path):
    rng = np.random.default_rng(7)
    d = _mult_split(rng, np.zeros((2, 1, 1), dtype=np.float32))
    d["id"] = np.array([[b"vid", b"0.0", b"1.5"], [b"vid", b"1.5", b"3.0"]])
    ds = _load_quiet(load_mult, _write(tmp_path, {"train": d}), split="train")
    assert ds.ids == ["vid_0.0_1.5", "vid_1.5_3.0"]


def test_load_mult_iemocap(tmp_path):
    rng = np.random.default_rng(8)
    present = np.array([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    onehot = np.stack([1 - present, present], -1).astype(np.float32)  # (N, 4, 2)
    data = {"train": _mult_split(rng, onehot, with_id=False)}
    ds = _load_quiet(load_mult, _write(tmp_path, data), split="train")
    assert ds.task == "iemocap"
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == present.tolist()
    assert ds.ids == ["train_0", "train_1", "train_2"]
    item = ds[1]
    assert item["label"].tolist() == [0, 1, 0, 1]
    batch = collate_multimodal([ds[0], ds[1], ds[2]])
    assert batch["label"].shape == (3, 4)


# ----------------------------------------------------------------------------------------------
# collate / dataset
# ----------------------------------------------------------------------------------------------


def test_collate_pads_and_masks(mmsa_unaligned):
    path, _ = mmsa_unaligned
    ds = _load_quiet(load_mmsa, path, split="train")
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_multimodal)
    batch = next(iter(loader))
    assert batch["id"] == ds.ids
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.float32
    for m in ds.modalities:
        lengths = ds.lengths(m)
        x, mask = batch["features"][m], batch["mask"][m]
        assert batch["lengths"][m].tolist() == lengths.tolist()
        assert x.shape == (4, int(lengths.max()), ds.dims[m])
        assert mask.dtype == torch.bool
        assert mask.tolist() == (torch.arange(x.shape[1])[None] < lengths[:, None]).tolist()
        for b in range(4):
            L = int(lengths[b])
            torch.testing.assert_close(x[b, :L], ds[b]["features"][m], rtol=0, atol=0)
            assert not x[b, L:].any()
    assert ds.collate([ds[2]])["features"]["vision"].shape == (1, 1, 2)


def test_collate_errors():
    with pytest.raises(ModbalanceError, match="at least one item"):
        collate_multimodal([])
    a = {"features": {"x": torch.ones(1, 2)}, "mask": {}, "label": torch.tensor(0.0), "id": "a"}
    b = {"features": {"y": torch.ones(1, 2)}, "mask": {}, "label": torch.tensor(0.0), "id": "b"}
    with pytest.raises(ModbalanceError, match="modality 'x'"):
        collate_multimodal([a, b])


def test_dataset_constructor_and_indexing():
    x = torch.zeros(3, 4, 2)
    x[:, 1:3] = 1.0
    ds = MultimodalDataset({"a": x}, torch.tensor([1.0, 2.0, 3.0]), split="valid")
    assert ds.ids == ["valid_0", "valid_1", "valid_2"]
    assert ds.lengths("a").tolist() == [2, 2, 2]  # interior span, both sides padded
    assert ds[-1]["id"] == "valid_2"
    assert "MultimodalDataset(split='valid', n=3" in repr(ds)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]
    ds2 = MultimodalDataset({"a": x}, torch.tensor([1.0, 2.0, 3.0]), lengths={"a": [4, 1, 0]})
    assert ds2.lengths("a").tolist() == [4, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"features": {}}, ModbalanceError, "non-empty dict"),
        (
            {"features": {"a": torch.zeros(3, 4, 2, 1)}},
            ModbalanceError,
            r"features\['a'\].*\(N, T, D\)",
        ),
        (
            {"features": {"a": torch.zeros(2, 4, 2)}},
            ModbalanceError,
            "2 samples but `labels` has 3",
        ),
        ({"features": {"a": np.zeros((3, 4, 2))}}, TypeError, "torch.Tensor"),
        ({"labels": torch.zeros(3, 2)}, ModbalanceError, "labels"),
        ({"labels": [1.0, 2.0, 3.0]}, TypeError, "labels"),
        ({"ids": ["a"]}, ModbalanceError, "`ids` has 1"),
        ({"lengths": {"a": [5, 1, 1]}}, ModbalanceError, r"lengths\['a'\].*\[0, 4\]"),
        ({"lengths": {"b": [1, 1, 1]}}, ModbalanceError, "not in `features`"),
        ({"unimodal_labels": {"a": [1.0]}}, ModbalanceError, "unimodal_labels"),
    ],
)
def test_dataset_constructor_errors(kwargs, exc, match):
    args = {"features": {"a": torch.ones(3, 4, 2)}, "labels": torch.zeros(3)}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        MultimodalDataset(args.pop("features"), args.pop("labels"), **args)


# ----------------------------------------------------------------------------------------------
# malformed files
# ----------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.pkl"
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl"):
        load_mmsa(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl"):
        load_mult(missing)
    with pytest.raises(ModbalanceError, match="is a directory"):
        load_mmsa(tmp_path)


def test_not_a_pickle(tmp_path):
    path = tmp_path / "features.pkl"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(ModbalanceError, match="not a readable pickle"):
        load_mmsa(path)
    path.write_bytes(b"")
    with pytest.raises(ModbalanceError, match="not a readable pickle"):
        load_mult(path)


def _good_split() -> dict:
    return _mmsa_split(np.random.default_rng(9))


def _mutate(fn):
    d = _good_split()
    fn(d)
    return {"train": d}


_MMSA_BAD = [
    (lambda: [1, 2, 3], "must hold a dict"),
    (lambda: {"valid": _good_split()}, "no split 'train'"),
    (lambda: {"train": [1, 2]}, "must be a dict of arrays"),
    (lambda: _mutate(lambda d: d.pop("audio")), "split 'train' has no key 'audio'"),
    (lambda: _mutate(lambda d: d.pop("regression_labels")), "no key 'regression_labels'"),
    (
        lambda: _mutate(lambda d: (d.pop("text"), d.pop("text_bert"))),
        "neither key 'text'.*nor 'text_bert'",
    ),
    (
        lambda: _mutate(lambda d: d.update(vision=d["vision"][:3])),
        "inconsistent lengths in split 'train': key 'vision' has 3",
    ),
    (
        lambda: _mutate(lambda d: d.update(regression_labels=np.zeros(5))),
        "inconsistent lengths in split 'train'.*regression_labels",
    ),
    (
        lambda: _mutate(lambda d: d.update(id=np.array(["a", "b"]))),
        "inconsistent lengths in split 'train': key 'id'",
    ),
    (
        lambda: _mutate(lambda d: d.update(audio=d["audio"][:, :, 0])),
        "key 'audio' of split 'train' must have 3 dimensions",
    ),
    (
        lambda: _mutate(lambda d: d.update(audio=np.array([[["x"]]] * 4))),
        "key 'audio' of split 'train' must be numeric",
    ),
    (
        lambda: _mutate(lambda d: d.update(audio_lengths=[1, 2, 9, 1])),
        "key 'audio_lengths' of split 'train' must lie in \\[0, 5\\]",
    ),
    (
        lambda: _mutate(lambda d: d.update(vision_lengths=[1.5, 2, 1, 1])),
        "key 'vision_lengths' of split 'train' must hold integers",
    ),
    (
        lambda: _mutate(lambda d: d.update(audio_lengths=[1, 2, 3])),
        "inconsistent lengths in split 'train': key 'audio_lengths'",
    ),
    (
        lambda: _mutate(lambda d: d["regression_labels"].__setitem__(1, np.nan)),
        "regression_labels' of split 'train' holds 1 non-finite",
    ),
    (
        lambda: _mutate(lambda d: d.update(regression_labels=np.zeros((4, 2)))),
        "one value per sample",
    ),
]


@pytest.mark.parametrize(("make", "match"), _MMSA_BAD)
def test_mmsa_malformed_files(tmp_path, make, match):
    path = _write(tmp_path, make())
    with pytest.raises(ModbalanceError, match=match):
        _load_quiet(load_mmsa, path, split="train")


def test_mmsa_text_bert_errors(tmp_path):
    d = _good_split()
    d["text_bert"] = d["text_bert"][:, :2]
    path = _write(tmp_path, {"train": d})
    with pytest.raises(ModbalanceError, match=r"'text_bert' of split 'train'.*\(N, 3, T\)"):
        _load_quiet(load_mmsa, path, text_key="text_bert")
    d = _good_split()
    d["text_bert"] = d["text_bert"].astype(np.float32) + 0.5
    path = _write(tmp_path, {"train": d})
    with pytest.raises(ModbalanceError, match="integer token ids"):
        _load_quiet(load_mmsa, path, text_key="text_bert")


def test_bad_arguments(mmsa_aligned):
    path, _ = mmsa_aligned
    with pytest.raises(ModbalanceError, match="`split` must be one of"):
        load_mmsa(path, split="dev")
    with pytest.raises(ModbalanceError, match="`text_key` must be one of"):
        load_mmsa(path, text_key="glove")
    with pytest.raises(ModbalanceError, match="`split` must be one of"):
        load_mult(path, split="val")


_MULT_BAD = [
    (lambda d: d.pop("labels"), "split 'train' has no key 'labels'"),
    (lambda d: d.update(labels=np.zeros((3, 2))), r"must have shape \(N, 1, 1\)"),
    (lambda d: d.update(labels=np.ones((3, 4, 2))), "not one-hot"),
    (lambda d: d.update(labels=np.full((3, 1, 1), np.inf)), "non-finite"),
    (lambda d: d.update(text=d["text"][:2]), "inconsistent lengths in split 'train': key 'text'"),
    (lambda d: d.pop("vision"), "no key 'vision'"),
]


@pytest.mark.parametrize(("fn", "match"), _MULT_BAD)
def test_mult_malformed_files(tmp_path, fn, match):
    d = _mult_split(np.random.default_rng(10), np.zeros((3, 1, 1), dtype=np.float32))
    fn(d)
    path = _write(tmp_path, {"train": d})
    with pytest.raises(ModbalanceError, match=match):
        _load_quiet(load_mult, path, split="train")


def test_loading_leaves_source_arrays_untouched(mmsa_aligned):
    path, data = mmsa_aligned
    with open(path, "rb") as f:
        raw = pickle.load(f)
    ds = _load_quiet(load_mmsa, path, split="train")
    assert ds is not None
    np.testing.assert_array_equal(raw["train"]["audio"], data["train"]["audio"])
    assert np.isneginf(raw["train"]["audio"]).sum() == 2


# ----------------------------------------------------------------------------------------------
# vector modalities and integer class labels (generic multi-view classification)
# ----------------------------------------------------------------------------------------------


def test_vector_features_and_class_labels():
    g = torch.Generator().manual_seed(0)
    views = {"pix": torch.rand(5, 6, generator=g), "fou": torch.rand(5, 3, generator=g)}
    labels = torch.tensor([0, 9, 3, 3, 1], dtype=torch.int32)
    ds = MultimodalDataset(views, labels, split="test")
    assert ds.task == "classification" and ds.num_classes == 10
    assert ds.vector_modalities == ("pix", "fou") and ds.dims == {"pix": 6, "fou": 3}
    assert ds.labels.dtype == torch.int64
    item = ds[1]
    assert item["features"]["pix"].shape == (6,)
    torch.testing.assert_close(item["features"]["pix"], views["pix"][1], rtol=0, atol=0)
    assert item["mask"]["pix"].shape == () and bool(item["mask"]["pix"])
    assert item["label"].shape == () and item["label"].dtype == torch.int64
    assert int(item["label"]) == 9
    assert ds.lengths("fou").tolist() == [1] * 5
    assert ds.valid_mask("fou").tolist() == [True] * 5
    assert ds.padded("pix") is views["pix"]
    assert "pix=6" in repr(ds) and "classification" in repr(ds)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate)))
    assert batch["features"]["pix"].shape == (4, 6) and batch["features"]["fou"].shape == (4, 3)
    torch.testing.assert_close(batch["features"]["fou"], views["fou"][:4], rtol=0, atol=0)
    assert batch["mask"]["pix"].shape == (4,) and batch["mask"]["pix"].dtype == torch.bool
    assert batch["mask"]["pix"].all()
    assert batch["lengths"]["pix"].tolist() == [1, 1, 1, 1]
    assert batch["lengths"]["pix"].dtype == torch.int64
    assert batch["label"].tolist() == [0, 9, 3, 3] and batch["label"].dtype == torch.int64


def test_mixed_vector_and_sequence_modalities():
    seq = torch.zeros(3, 4, 2)
    seq[0, :1] = 1.0
    seq[1, :3] = 1.0
    seq[2] = 1.0
    ds = MultimodalDataset({"seq": seq, "vec": torch.ones(3, 5)}, torch.tensor([0.5, 0.0, -1.0]))
    assert ds.task == "regression" and ds.num_classes is None
    assert ds.vector_modalities == ("vec",)
    batch = ds.collate([ds[0], ds[1]])
    assert batch["features"]["seq"].shape == (2, 3, 2) and batch["features"]["vec"].shape == (2, 5)
    assert batch["lengths"]["seq"].tolist() == [1, 3] and batch["lengths"]["vec"].tolist() == [1, 1]
    assert batch["mask"]["seq"].shape == (2, 3) and batch["mask"]["vec"].shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": torch.tensor([0, -1, 2])}, r"`labels`.*>= 0.*-1"),
        ({"labels": torch.tensor([0.0, float("nan"), 1.0])}, r"`labels`.*1 NaN"),
        (
            {
                "features": {
                    "a": torch.ones(3, 4, 2).index_put_(
                        (torch.tensor([1]),), torch.tensor(float("inf"))
                    )
                }
            },
            r"`features\['a'\]`.*infinite",
        ),
        ({"features": {"v": torch.tensor([[0.0], [float("nan")], [1.0]])}}, r"`features\['v'\]`"),
        ({"features": {"v": torch.ones(3, 2)}, "lengths": {"v": [1, 1, 1]}}, r"vector modality"),
        ({"unimodal_labels": {"a": torch.tensor([0.0, float("nan"), 0.0])}}, "unimodal_labels"),
        ({"labels": torch.tensor([True, False, True])}, r"`labels` must be"),
    ],
)
def test_dataset_rejects_bad_values(kwargs, match):
    args = {"features": {"a": torch.ones(3, 4, 2)}, "labels": torch.zeros(3)}
    args.update(kwargs)
    with pytest.raises(ModbalanceError, match=match):
        MultimodalDataset(args.pop("features"), args.pop("labels"), **args)


def test_dataset_nan_check_honours_value_checks():
    import modbalance

    x = torch.ones(2, 3)
    x[0, 0] = float("nan")
    with modbalance.value_checks(False):
        ds = MultimodalDataset({"v": x}, torch.zeros(2))
    assert torch.isnan(ds[0]["features"]["v"][0])


def _item(x, label=0.0, **extra):
    return {"features": {"a": x}, "mask": {}, "label": torch.tensor(label), "id": "i", **extra}


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([_item(torch.ones(2, 3)), _item(torch.ones(2, 4))], r"item 1 .*features\['a'\].*\(L, 3\)"),
        ([_item(torch.ones(3)), _item(torch.ones(4))], r"item 1 .*features\['a'\].*\(3,\)"),
        ([_item(torch.ones(3)), _item(torch.ones(1, 3))], r"item 1 .*features\['a'\]"),
        (
            [_item(torch.ones(1, 2)), {"features": {"a": torch.ones(1, 2)}, "id": "x"}],
            r"item 1 .*no key 'label'",
        ),
        (
            [_item(torch.ones(1, 2)), {"label": torch.tensor(0.0), "id": "x"}],
            r"item 1 .*no key 'features'",
        ),
        (
            [{"features": {"a": torch.ones(1, 2)}, "label": torch.tensor(0.0)}],
            r"item 0 .*no key 'id'",
        ),
        ([_item(torch.ones(1, 2)), "oops"], r"item 1 .*must be a dict"),
        (
            [_item(torch.ones(1, 2)), _item(torch.ones(1, 2), label=[0.0, 1.0])],
            r"'label' of item 1 has shape \(2,\)",
        ),
        (
            [
                _item(torch.ones(1, 2), unimodal_labels={"a": torch.tensor(0.0)}),
                _item(torch.ones(1, 2)),
            ],
            r"item 1 .*no key 'unimodal_labels'",
        ),
        ("abc", r"`batch` must be a list"),
    ],
)
def test_collate_names_item_and_key(batch, match):
    with pytest.raises(ModbalanceError, match=match):
        collate_multimodal(batch)


@pytest.mark.parametrize("fmt", ["mmsa", "mult"])
def test_empty_split_is_a_clear_error(tmp_path, fmt):
    rng = np.random.default_rng(0)
    if fmt == "mmsa":
        d = {k: v[:0] for k, v in _mmsa_split(rng).items() if k != "raw_text"}
        loader = load_mmsa
    else:
        d = {m: np.zeros((0, 5, 2), np.float32) for m in ("text", "audio", "vision")}
        d["labels"] = np.zeros((0, 1, 1), np.float32)
        loader = load_mult
    path = tmp_path / "empty.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train": d, "valid": d, "test": d}, f)
    with pytest.raises(ModbalanceError, match=r"split 'valid' is empty"):
        loader(path, split="valid")


# ----------------------------------------------------------------------------------------------
# one read of a data file for every split
# ----------------------------------------------------------------------------------------------


def _count_reads(monkeypatch, path):
    """Count ``pickle.load`` calls and ``open`` calls on ``path`` (wrapping the real ones)."""
    import builtins
    import os

    calls = {"pickle.load": 0, "open": 0}
    real_load, real_open = pickle.load, builtins.open
    target = os.path.realpath(path)

    def load(*args, **kwargs):
        calls["pickle.load"] += 1
        return real_load(*args, **kwargs)

    def open_(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(file) == target:
            calls["open"] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(pickle, "load", load)
    monkeypatch.setattr(builtins, "open", open_)
    return calls


def test_build_datasets_reads_the_file_once(mmsa_aligned, monkeypatch):
    from examples.pase import build_datasets, detect_format

    path, _ = mmsa_aligned
    calls = _count_reads(monkeypatch, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train, valid, test, info = build_datasets(path)
    assert calls == {"pickle.load": 1, "open": 1}
    assert info["source"].endswith("(mmsa)")
    test.unlock()
    for ds, split in ((train, "train"), (valid, "valid"), (test._dataset, "test")):
        ref = _load_quiet(load_mmsa, path, split=split)
        assert ds.split == split and ds.ids == ref.ids
        torch.testing.assert_close(ds.labels, ref.labels)
        for m in ref.modalities:
            torch.testing.assert_close(ds.padded(m), ref.padded(m))
            torch.testing.assert_close(ds.lengths(m), ref.lengths(m))
    calls.update({"pickle.load": 0, "open": 0})
    assert detect_format(path) == "mmsa"  # the public detector still reads the file itself
    assert calls == {"pickle.load": 1, "open": 1}


@pytest.mark.parametrize("loader", [load_mmsa, load_mult])
def test_loaders_accept_the_loaded_content(tmp_path, loader):
    rng = np.random.default_rng(0)
    if loader is load_mmsa:
        data = {s: _mmsa_split(rng) for s in ("train", "valid", "test")}
    else:
        data = {s: _mult_split(rng, np.zeros((4, 1, 1), np.float32)) for s in ("train", "valid")}
        data["test"] = data["valid"]
    path = _write(tmp_path, data)
    before = {k: v.copy() for k, v in data["train"].items() if isinstance(v, np.ndarray)}
    for split in ("train", "valid", "test"):
        a = _load_quiet(loader, path, split=split)
        b = _load_quiet(loader, data, split=split)
        assert a.ids == b.ids and a.dims == b.dims
        torch.testing.assert_close(a.labels, b.labels)
        for m in a.modalities:
            torch.testing.assert_close(a.padded(m), b.padded(m))
    for k, v in before.items():  # repairs (NaN/inf -> 0) are made on copies
        np.testing.assert_array_equal(data["train"][k], v)
    with pytest.warns(RuntimeWarning, match="of the loaded data: set non-finite"):
        loader(data, split="train")
    with pytest.raises(ModbalanceError, match="the loaded data has no split 'valid'"):
        loader({"train": data["train"]}, split="valid")


def test_loaded_float32_features_are_shared_not_copied(tmp_path):
    rng = np.random.default_rng(0)
    d = _mmsa_split(rng)
    d["audio"] = np.nan_to_num(d["audio"], nan=0.0, neginf=0.0)  # clean: nothing to repair
    d["vision"] = np.nan_to_num(d["vision"], nan=0.0)
    ds = load_mmsa({"train": d}, split="train")
    for m in ("text", "audio", "vision"):
        assert ds.padded(m).data_ptr() == d[m].ctypes.data, m


def test_chunked_whole_array_passes_match_the_plain_ones(monkeypatch):
    """Frame detection and finite checks run in chunks (small temporaries): same results."""
    from modbalance.data import mmsa

    rng = np.random.default_rng(0)
    x = _frames(rng, 9, 6, 4)
    for i, (a, b) in enumerate(((0, 2), (3, 6), (1, 5), (0, 0), (2, 3), (0, 6), (4, 6), (0, 1))):
        x[i, :a] = 0
        x[i, b:] = 0
    t = torch.from_numpy(x)
    plain = (t != 0).any(-1)
    monkeypatch.setattr(mmsa, "_CHUNK_BYTES", x[0].nbytes * 2)  # 2 samples per chunk
    assert torch.equal(mmsa._frame_nonzero(t), plain)
    assert torch.equal(mmsa._frame_nonzero(t.to(torch.bfloat16)), plain)  # the torch path
    assert mmsa._frame_nonzero(t[:0]).shape == (0, 6)
    assert mmsa._all_finite(x)
    x[8, 5, 3] = np.inf  # in the last chunk
    assert not mmsa._all_finite(x)
    with pytest.raises(ModbalanceError, match=r"got 0 NaN and 1 infinite"):
        MultimodalDataset({"a": torch.from_numpy(x)}, torch.zeros(9))
    x[0, 0, 0] = np.nan
    with pytest.raises(ModbalanceError, match=r"got 1 NaN and 1 infinite"):
        MultimodalDataset({"a": torch.from_numpy(x).to(torch.bfloat16)}, torch.zeros(9))
    ds = _load_quiet(load_mmsa, {"train": {**_mmsa_split(rng), "text": x[:4, :5]}})
    assert torch.isfinite(ds.padded("text")).all()
    assert np.isnan(x[0, 0, 0])  # repaired on a copy


# ----------------------------------------------------------------------------------------------
# the private helpers the constructor, collate and the generator are built from
# ----------------------------------------------------------------------------------------------


def test_parse_labels_infers_the_task():
    from modbalance.data.mmsa import _parse_labels

    y, task, k = _parse_labels(torch.tensor([0.5, -1.0], dtype=torch.float64))
    assert (task, k, y.dtype) == ("regression", None, torch.float32)
    y, task, k = _parse_labels(torch.tensor([0, 3, 1], dtype=torch.int32))
    assert (task, k, y.dtype) == ("classification", 4, torch.int64)
    assert _parse_labels(torch.zeros(0, dtype=torch.long))[1:] == ("classification", 0)
    y, task, k = _parse_labels(torch.zeros(2, 4, dtype=torch.uint8))
    assert (task, k, y.dtype) == ("iemocap", 4, torch.int64)
    with pytest.raises(ModbalanceError, match=r"pass `labels\.view\(-1\)`"):
        _parse_labels(torch.zeros(3, 1))
    with pytest.raises(ModbalanceError, match="1 negative value"):
        _parse_labels(torch.tensor([0, -2, 1]))


def test_feature_span_matches_the_span_rules():
    from modbalance.data.mmsa import (
        _feature_span,
        _frame_nonzero,
        _spans_from_lengths,
        _spans_from_nonzero,
    )

    x = torch.zeros(3, 5, 2)
    x[0, :2], x[1, 1:], x[2, 2:4] = 1.0, 2.0, 3.0
    for got, want in zip(_feature_span("a", x, 3, None), _spans_from_nonzero(_frame_nonzero(x))):
        assert torch.equal(got, want)
    ln = torch.tensor([2, 4, 2])
    for got, want in zip(_feature_span("a", x, 3, ln), _spans_from_lengths(_frame_nonzero(x), ln)):
        assert torch.equal(got, want)
    start, end = _feature_span("v", torch.ones(3, 4), 3, None)  # a vector: one "frame"
    assert start.tolist() == [0, 0, 0] and end.tolist() == [1, 1, 1]
    with pytest.raises(ModbalanceError, match=r"`lengths\['v'\]` was given"):
        _feature_span("v", torch.ones(3, 4), 3, ln)


def test_pad_modality_and_collate_agree():
    from modbalance.data.mmsa import _pad_modality

    xs = [torch.ones(1, 2), 2 * torch.ones(3, 2)]
    feats, mask, lengths = _pad_modality(xs)
    assert feats.shape == (2, 3, 2) and lengths.tolist() == [1, 3]
    assert mask.tolist() == [[True, False, False], [True, True, True]]
    assert not feats[0, 1:].any()
    items = [{"features": {"a": x}, "label": torch.tensor(0.0), "id": str(i)} for i, x in
             enumerate(xs)]  # fmt: skip
    out = collate_multimodal(items)
    assert torch.equal(out["features"]["a"], feats) and torch.equal(out["mask"]["a"], mask)
    vec, vmask, vlen = _pad_modality([torch.ones(4), torch.zeros(4)])
    assert vec.shape == (2, 4) and vmask.tolist() == [True, True] and vlen.tolist() == [1, 1]


def _make_split_reference(g, split, n, t, dims, proj, bases, rho, coverage, noise, text_noise,
                          frame_noise, pooled=0.0):  # fmt: skip
    """The generator's split as written before its helpers were extracted (one function)."""
    import math

    from modbalance.data import synthetic as syn

    rank = proj.shape[0]
    u = syn._randn(g, n)
    r = {m: syn._R_MAX * (2 * torch.rand(n, generator=g) - 1) for m in syn._WEAK}
    z = {m: r[m] * syn._Z_SCALE for m in syn._WEAK}
    covered = {m: (torch.rand(n, generator=g) < coverage).float() for m in syn._WEAK}
    eps = syn._randn(g, n)
    lengths = torch.randint(math.ceil(t / 2), t + 1, (n,), generator=g)
    valid = (torch.arange(t)[None, :] < lengths[:, None]).float()
    q = None
    if pooled > 0:
        q = {m: syn._randn(g, n) for m in syn._WEAK}
        a, b = math.sqrt(1.0 - pooled), math.sqrt(pooled)
        z = {m: a * z[m] + b * q[m] for m in syn._WEAK}
    core = syn._core(u.double(), z["audio"].double(), z["vision"].double(), rho)
    y = (core + noise * eps.double()).clamp(-3.0, 3.0).float().numpy()
    content = syn._randn(g, n, rank)
    content[:, 0] = syn._TEXT_GAIN * u
    content[:, 1] = syn._TEXT_GAIN * covered["audio"] * z["audio"]
    content[:, 2] = syn._TEXT_GAIN * covered["vision"] * z["vision"]
    frame = text_noise * syn._randn(g, n, t, rank)
    frame[..., :3] = 0.0
    low = content[:, None, :] + frame
    text = (low.reshape(n * t, rank) @ proj).reshape(n, t, dims["text"]) * valid[:, :, None]
    weak = {}
    for m in syn._WEAK:
        w = syn._parity_frames(g, r[m], t)
        rest = frame_noise[m] * syn._randn(g, n, t, dims[m] - syn._ORDER)
        if q is not None:
            rest[..., 0] += syn._POOLED_GAIN * q[m][:, None]
        weak[m] = (torch.cat([w, rest], -1) @ bases[m].T) * valid[:, :, None]
    tok = torch.randint(1000, 30000, (n, t), generator=g)
    tok[:, 0] = 101
    tok[torch.arange(n), lengths - 1] = 102
    attn = valid.long()
    text_bert = torch.stack([tok * attn, attn, torch.zeros_like(attn)], dim=1)
    return {"text": text.numpy(), "text_bert": text_bert.numpy(), "audio": weak["audio"].numpy(),
            "vision": weak["vision"].numpy(), "audio_lengths": lengths.numpy().astype(np.int64),
            "regression_labels": y}  # fmt: skip


@pytest.mark.parametrize("pooled", [0.0, 0.4])
def test_generator_split_is_bit_identical_to_the_single_function_version(pooled):
    from modbalance.data import synthetic as syn

    dims, t = {"text": 24, "audio": 5, "vision": 7}, 6
    frame_noise = {"audio": 2.5, "vision": 0.5}
    rho, coverage = syn._shares(0.9, 0.1)
    outs = []
    for fn in (syn._make_split, _make_split_reference):
        g = torch.Generator().manual_seed(7)
        proj = syn._orthonormal(g, dims["text"], 8).T.contiguous()
        bases = {m: syn._orthonormal(g, dims[m], dims[m]) for m in syn._WEAK}
        args = (g, "train", 11, t) + ((dims,) if fn is _make_split_reference else ())
        outs.append(fn(*args, proj, bases, rho, coverage, 0.3, 0.3, frame_noise, pooled=pooled))
    new, ref = outs
    for key, value in ref.items():
        assert new[key].dtype == value.dtype and np.array_equal(new[key], value), key
