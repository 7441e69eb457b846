r"""A deterministic synthetic sentiment dataset with modality competition built in.

Real MOSI / MOSEI features cannot be shipped, so :func:`make_competition_data` generates a stand-in
in MMSA's exact pickle layout and MOSI's shapes, designed so that the best predictor needs every
modality while plain joint training is tempted to rely on text alone.

Generating process (per sample; the latent factors are independent standard normals):

.. math::

    y = \operatorname{clip}\!\Big(s\,\big(\sqrt{\rho_t}\, z_t + \sqrt{\rho_a}\, z_a
        + \sqrt{\rho_v}\, h(z_v) + \sqrt{\rho_{av}}\, z_a z_v\big)
        + \sigma\,\varepsilon,\; -3,\; 3\Big),
    \qquad h(z) = \frac{|z| - \sqrt{2/\pi}}{\sqrt{1 - 2/\pi}},

with :math:`s = 1.5`, :math:`\rho_t` = ``text_strength`` and the remaining
:math:`1 - \rho_t` of the signal variance split 0.40 / 0.35 / 0.25 between the audio term, the
vision term and the audio-vision interaction (each term has unit variance and they are
uncorrelated).

* **text** (easy): every valid frame is :math:`z_t` along a fixed direction plus weak noise and a
  label-irrelevant per-sample "content" vector, embedded in a random rank-16 subspace of the
  768-d feature space — one frame, read linearly, already gives :math:`z_t`.
* **audio** (harder): every frame is :math:`z_a` along a fixed direction buried in isotropic
  noise of standard deviation ``frame_noise`` (per-frame SNR :math:`1/\text{frame\_noise}^2`);
  only pooling over time recovers it.
* **vision** (harder, non-linear): like audio for :math:`z_v`, but the label depends on
  :math:`|z_v|`, so a linear read-out of pooled vision explains nothing; and the
  :math:`z_a z_v` part is visible only to a model that combines audio and vision.

Sequences have a per-sample length :math:`L \in [\lceil T/2 \rceil, T]` shared by the three
modalities (word-aligned, MOSI ``aligned_50`` style); frames after :math:`L` are zero
(post-padding) and ``audio_lengths``/``vision_lengths`` record :math:`L`. The per-frame noise is
scaled by :math:`\sqrt{L/T}`, so the time-average over the valid frames — the sufficient statistic
of each latent — has the same noise level :math:`\text{noise}/\sqrt{T}` whatever :math:`L`.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import torch

from modbalance._checks import ModbalanceError, check_int, check_real
from modbalance.data.mmsa import MultimodalDataset, _dataset_from_mmsa_split

__all__ = ["CompetitionData", "make_competition_data"]

_MODALITIES = ("text", "audio", "vision")
_SCALE = 1.5  # standard deviation of the noise-free label core
_REST_SPLIT = (0.40, 0.35, 0.25)  # audio, vision, audio x vision shares of (1 - text_strength)
_TEXT_RANK = 16
_ABS_MEAN = math.sqrt(2.0 / math.pi)
_ABS_STD = math.sqrt(1.0 - 2.0 / math.pi)


@dataclass
class CompetitionData:
    r"""A synthetic competition dataset in MMSA layout, with its ground truth.

    Attributes:
        data: The MMSA pickle dict ``{"train"|"valid"|"test": {key: array}}`` (numpy arrays:
            ``text`` (N, T, D_t) float32, ``text_bert`` (N, 3, T) int64, ``audio`` (N, T, D_a)
            and ``vision`` (N, T, D_v) float32, ``audio_lengths``/``vision_lengths`` (N,) int64,
            ``regression_labels`` (N,) float32 in [-3, 3], ``classification_labels`` (N,) int64
            (0 negative, 1 neutral, 2 positive), ``annotations``, ``raw_text`` and ``id``
            (N,) str).
        ground_truth: Fraction of the label variance, :math:`\mathrm{Var}(E[y \mid x_S]) /
            \mathrm{Var}(y)`, that each non-empty modality subset :math:`S` can explain, keyed
            by the modality names joined with ``"+"`` in the order text, audio, vision
            (``"text"``, ``"audio+vision"``, ``"text+audio+vision"``...). It is computed from
            the generating process (the Gaussian posterior of each latent given its modality's
            time-averaged features, integrated in closed form and by quadrature), not from a fitted
            model; no predictor can exceed it in expectation.
        label_variance: :math:`\mathrm{Var}(y)` of the generating process.
        config: The generator's arguments.
    """

    data: dict[str, dict[str, Any]]
    ground_truth: dict[str, float]
    label_variance: float
    config: dict[str, Any] = field(default_factory=dict)

    def dataset(self, split: str = "train") -> MultimodalDataset:
        """Return one split as a :class:`MultimodalDataset` (no file round trip, no feature copy).

        Args:
            split: ``"train"``, ``"valid"`` or ``"test"``.
        """
        if split not in self.data:
            raise ModbalanceError(
                f"`split` must be one of {', '.join(map(repr, self.data))}; got {split!r}."
            )
        return _dataset_from_mmsa_split(self.data[split], split, "text", "<synthetic>")

    def save(self, path: str | os.PathLike) -> None:
        """Write :attr:`data` to ``path`` as a pickle (protocol 4) that ``load_mmsa`` reads."""
        with open(os.fspath(path), "wb") as f:
            pickle.dump(self.data, f, protocol=4)

    def ground_truth_for(self, modalities: Iterable[str]) -> float:
        """Explainable variance fraction of a modality subset given in any order.

        Example:
            >>> from modbalance.data import make_competition_data
            >>> d = make_competition_data(n_train=4, n_valid=2, n_test=2, seq_len=4)
            >>> d.ground_truth_for(["vision", "text"]) == d.ground_truth["text+vision"]
            True
        """
        mods = set(modalities)
        unknown = mods - set(_MODALITIES)
        if unknown or not mods:
            raise ModbalanceError(
                f"`modalities` must be a non-empty subset of {_MODALITIES}, got {sorted(mods)}."
            )
        return self.ground_truth["+".join(m for m in _MODALITIES if m in mods)]


# ----------------------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------------------


def _clip_moments(mu: torch.Tensor, var: torch.Tensor, lo: float = -3.0, hi: float = 3.0):
    """E[clip(X, lo, hi)] and E[clip(X, lo, hi)^2] for X ~ N(mu, var) (var > 0), elementwise."""
    sigma = var.sqrt()
    a = (lo - mu) / sigma
    b = (hi - mu) / sigma
    pa = 0.5 * (1 + torch.special.erf(a / math.sqrt(2)))
    pb = 0.5 * (1 + torch.special.erf(b / math.sqrt(2)))
    fa = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    fb = torch.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
    mid = pb - pa
    m1 = lo * pa + hi * (1 - pb) + mu * mid + sigma * (fa - fb)
    m2 = (
        lo * lo * pa
        + hi * hi * (1 - pb)
        + mu * mu * mid
        + 2 * mu * sigma * (fa - fb)
        + var * (mid + a * fa - b * fb)
    )
    return m1, m2


def _gh(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Hermite nodes/weights for the standard normal density (float64)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.from_numpy(x), torch.from_numpy(w / w.sum())


def _core(zt, za, zv, rho: tuple[float, float, float, float]):
    rt, ra, rv, rav = rho
    h = ((zv).abs() - _ABS_MEAN) / _ABS_STD
    return _SCALE * (math.sqrt(rt) * zt + math.sqrt(ra) * za + math.sqrt(rv) * h
                     + math.sqrt(rav) * za * zv)  # fmt: skip


def _split_gauss_legendre(
    mu: torch.Tensor, sd: float, n: int, width: float = 8.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes/weights integrating a function of z ~ N(mu, sd^2) that has a kink at z = 0.

    Gauss-Legendre on [mu - width*sd, c] and [c, mu + width*sd] with c = 0 clamped into the
    range, so each piece is smooth and the rule converges fast. Returns arrays of shape
    (*mu.shape, 2n) with weights that include the normal density and sum to ~1.
    """
    x, w = np.polynomial.legendre.leggauss(n)
    x, w = torch.from_numpy(x), torch.from_numpy(w)
    lo, hi = mu - width * sd, mu + width * sd
    cut = torch.minimum(torch.maximum(torch.zeros_like(mu), lo), hi)
    nodes, weights = [], []
    for a, b in ((lo, cut), (cut, hi)):
        half = (b - a)[..., None] / 2
        z = (a + b)[..., None] / 2 + half * x
        nodes.append(z)
        weights.append(half * w)
    z = torch.cat(nodes, -1)
    wt = torch.cat(weights, -1) * torch.exp(-0.5 * ((z - mu[..., None]) / sd) ** 2)
    wt = wt / (sd * math.sqrt(2 * math.pi))
    return z, wt


def _composite_gauss_legendre(
    sd: float, panels: int, order: int = 4, width: float = 8.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes/weights for z ~ N(0, sd^2): ``panels`` equal panels on [-width*sd, width*sd]."""
    x, w = np.polynomial.legendre.leggauss(order)
    x, w = torch.from_numpy(x), torch.from_numpy(w)
    edges = torch.linspace(-width * sd, width * sd, panels + 1, dtype=torch.float64)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    z = ((edges[1:] + edges[:-1])[:, None] / 2 + half * x).reshape(-1)
    wt = (half * w).reshape(-1) * torch.exp(-0.5 * (z / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    return z, wt / wt.sum()


def _ground_truth(
    rho: tuple[float, float, float, float],
    noise: float,
    k: dict[str, float],
    n_outer: int = 16,
    n_inner: int = 16,
    n_outer_vision: int = 12,
    n_outer_text: int = 16,
) -> tuple[dict[str, float], float]:
    r"""Var(E[y | pooled features of S]) / Var(y) for every subset S.

    Given its modality's pooled statistic, latent m has the Gaussian posterior
    N(mu_m, 1 - k_m) with mu_m ~ N(0, k_m) over the population; an unobserved latent keeps its
    N(0, 1) prior. Given z_v, the label core is *linear* in z_t and z_a, so core + noise is
    Gaussian given (posterior means, z_v) and E[clip(.)] has a closed form. What remains is
    integrated numerically: z_v (inner, split Gauss-Legendre around the kink of |z_v|) and the
    observed posterior means (outer, Gauss-Hermite).
    """
    rt, ra, rv, rav = rho
    at, aa = _SCALE * math.sqrt(rt), _SCALE * math.sqrt(ra)
    av, aav = _SCALE * math.sqrt(rv), _SCALE * math.sqrt(rav)
    xo, wo = _gh(n_outer)
    zero = (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))

    def moments(subset: tuple[str, ...]) -> tuple[float, float]:
        grids = {}
        for j, m in enumerate(_MODALITIES):
            if m not in subset:
                x, w = zero
            elif m == "vision":  # E[y | mu_v] bends sharply near 0: split rule there too
                x, w = _split_gauss_legendre(zero[0], math.sqrt(k[m]), n_outer_vision)
                x, w = x[0], w[0]
            elif m == "text":  # E[y | mu_t] bends at the clipping points: composite rule
                x, w = _composite_gauss_legendre(math.sqrt(k[m]), n_outer_text)
            else:
                x, w = xo * math.sqrt(k[m]), wo
            shape = [1, 1, 1]
            shape[j] = -1
            grids[m] = (x.reshape(shape), w.reshape(shape), 1 - k[m] if m in subset else 1.0)
        mu_t, w_t, v_t = grids["text"]
        mu_a, w_a, v_a = grids["audio"]
        mu_v, w_v, v_v = grids["vision"]
        zv, w_in = _split_gauss_legendre(mu_v, math.sqrt(v_v), n_inner)  # (1, 1, n_v, 2n)
        c = aa + aav * zv
        mean = (at * mu_t)[..., None] + c * mu_a[..., None] + av * (zv.abs() - _ABS_MEAN) / _ABS_STD
        var = noise**2 + at**2 * v_t + c * c * v_a
        m1, m2 = _clip_moments(mean, var.clamp_min(1e-12))
        cond1 = (m1 * w_in).sum(-1)
        w_out = w_t * w_a * w_v
        if not subset:
            return float((w_out * cond1).sum()), float((w_out * (m2 * w_in).sum(-1)).sum())
        return float((w_out * cond1).sum()), float((w_out * cond1 * cond1).sum())

    mean_y, second = moments(())
    var_y = second - mean_y**2
    truth: dict[str, float] = {}
    for r in range(1, 4):
        for subset in combinations(_MODALITIES, r):
            e1, e2 = moments(subset)
            truth["+".join(subset)] = min(1.0, max(0.0, e2 - e1 * e1) / var_y)
    return truth, var_y


@functools.lru_cache(maxsize=16)
def _cached_ground_truth_items(
    rho: tuple[float, float, float, float], noise: float, k: tuple[float, float, float]
) -> tuple[tuple[tuple[str, float], ...], float]:
    truth, var_y = _ground_truth(rho, noise, dict(zip(_MODALITIES, k)))
    return tuple(truth.items()), var_y


def _cached_ground_truth(
    rho: tuple[float, float, float, float], noise: float, k: tuple[float, float, float]
) -> tuple[dict[str, float], float]:
    items, var_y = _cached_ground_truth_items(rho, noise, k)
    return dict(items), var_y


# ----------------------------------------------------------------------------------------------
# generator
# ----------------------------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _unit(g: torch.Generator, d: int) -> torch.Tensor:
    u = _randn(g, d)
    return u / u.norm()


def _make_split(
    g: torch.Generator,
    split: str,
    n: int,
    t: int,
    dims: Mapping[str, int],
    proj: torch.Tensor,
    u_a: torch.Tensor,
    u_v: torch.Tensor,
    rho: tuple[float, float, float, float],
    noise: float,
    text_noise: float,
    frame_noise: float,
) -> dict[str, Any]:
    r = proj.shape[0]
    z = _randn(g, n, 3)
    eps = _randn(g, n)
    lengths = torch.randint(math.ceil(t / 2), t + 1, (n,), generator=g)
    valid = (torch.arange(t)[None, :] < lengths[:, None]).float()  # (n, t)
    scale = torch.sqrt(lengths.float() / t)[:, None, None]  # per-frame noise scaling

    zd = z.double()
    core = _core(zd[:, 0], zd[:, 1], zd[:, 2], rho)
    y = (core + noise * eps.double()).clamp(-3.0, 3.0).float().numpy()

    # text: z_t on the first latent axis, content on the others, weak per-frame noise; rank r
    content = _randn(g, n, r)
    content[:, 0] = z[:, 0]
    low = content[:, None, :] + text_noise * scale * _randn(g, n, t, r)
    text = (low.reshape(n * t, r) @ proj).reshape(n, t, dims["text"])
    text *= valid[:, :, None]

    def weak(zm: torch.Tensor, u: torch.Tensor, d: int) -> torch.Tensor:
        x = zm[:, None, None] * u[None, None, :] + frame_noise * scale * _randn(g, n, t, d)
        return x * valid[:, :, None]

    audio = weak(z[:, 1], u_a, dims["audio"])
    vision = weak(z[:, 2], u_v, dims["vision"])

    tok = torch.randint(1000, 30000, (n, t), generator=g)
    tok[:, 0] = 101
    tok[torch.arange(n), lengths - 1] = 102
    attn = valid.long()
    text_bert = torch.stack([tok * attn, attn, torch.zeros_like(attn)], dim=1)

    cls = np.where(y < 0, 0, np.where(y > 0, 2, 1)).astype(np.int64)
    names = np.array(["Negative", "Neutral", "Positive"])
    return {
        "raw_text": np.array([f"synthetic {split} utterance {i}" for i in range(n)]),
        "id": np.array([f"synth_{split}{i // 8:04d}$_${i % 8 + 1}" for i in range(n)]),
        "text": text.numpy(),
        "text_bert": text_bert.numpy(),
        "audio": audio.numpy(),
        "vision": vision.numpy(),
        "audio_lengths": lengths.numpy().astype(np.int64),
        "vision_lengths": lengths.numpy().astype(np.int64),
        "annotations": names[cls],
        "classification_labels": cls,
        "regression_labels": y,
    }


def make_competition_data(
    *,
    n_train: int = 1284,
    n_valid: int = 229,
    n_test: int = 686,
    dims: Mapping[str, int] | None = None,
    seq_len: int = 50,
    seed: int = 0,
    text_strength: float = 0.5,
    noise: float = 0.3,
    text_noise: float = 0.3,
    frame_noise: float = 3.0,
) -> CompetitionData:
    r"""Generate the synthetic competition dataset (MMSA layout, MOSI shapes by default).

    See the module docstring for the generating process. ``text_strength`` sets how dominant
    text is: the share of the label signal variance carried by text (e.g. 0.5 and 0.8 for two
    dominance levels); the rest goes to audio, vision and their interaction. The ground truth
    (:attr:`CompetitionData.ground_truth`) records how much label variance each modality subset
    can explain; at the defaults it is about text 0.49, audio 0.16, vision 0.11, text+audio 0.65,
    text+vision 0.60, audio+vision 0.34 and all three 0.84 (with ``text_strength=0.8``: text 0.77,
    all three 0.91). The quadrature behind it is accurate to about 1e-4.

    Memory: text dominates, :math:`4 \cdot N \cdot T \cdot D_t` bytes (about 340 MB at the
    defaults: 2199 samples × 50 frames × 768 float32); use smaller ``n_*``, ``seq_len`` or
    ``dims["text"]`` for quick runs. The default size is generated in one to two seconds on a
    CPU; the result is identical for identical arguments (a seeded :class:`torch.Generator`).

    Args:
        n_train: Training samples (MOSI: 1284).
        n_valid: Validation samples (MOSI: 229).
        n_test: Test samples (MOSI: 686).
        dims: Feature sizes ``{"text": 768, "audio": 5, "vision": 20}`` (MOSI's).
        seq_len: Frames per sequence T (MOSI aligned: 50).
        seed: Seed of the generator.
        text_strength: Share in (0, 1) of the label's signal variance carried by text.
        noise: Standard deviation of the label noise (in label units, before clipping).
        text_noise: Per-frame noise of the text signal (small: text is easy).
        frame_noise: Per-frame noise of the audio and vision signals (large: they need pooling).

    Returns:
        A :class:`CompetitionData`.

    Raises:
        ModbalanceError: On out-of-range arguments or ``dims`` without exactly the keys
            ``"text"``, ``"audio"``, ``"vision"``.

    Example:
        >>> from modbalance.data import make_competition_data
        >>> d = make_competition_data(n_train=32, n_valid=8, n_test=8, seq_len=10, seed=1)
        >>> d.data["train"]["text"].shape, d.data["train"]["audio"].dtype
        ((32, 10, 768), dtype('float32'))
        >>> gt = d.ground_truth
        >>> gt["text"] > gt["audio"], gt["text+audio+vision"] > gt["text"]
        (True, True)
        >>> len(d.dataset("test"))
        8
    """
    n_train = check_int(n_train, "n_train", low=1)
    n_valid = check_int(n_valid, "n_valid", low=1)
    n_test = check_int(n_test, "n_test", low=1)
    seq_len = check_int(seq_len, "seq_len", low=2)
    seed = check_int(seed, "seed", low=0)
    text_strength = check_real(
        text_strength, "text_strength", low=0, high=1, low_inclusive=False, high_inclusive=False
    )
    noise = check_real(noise, "noise", low=0)
    text_noise = check_real(text_noise, "text_noise", low=0)
    frame_noise = check_real(frame_noise, "frame_noise", low=0)
    dims = dict({"text": 768, "audio": 5, "vision": 20} if dims is None else dims)
    if set(dims) != set(_MODALITIES):
        raise ModbalanceError(
            f"`dims` must have exactly the keys 'text', 'audio', 'vision', got {sorted(dims)}."
        )
    for m in _MODALITIES:
        dims[m] = check_int(dims[m], f"dims[{m!r}]", low=1)

    rest = 1.0 - text_strength
    rho = (text_strength, rest * _REST_SPLIT[0], rest * _REST_SPLIT[1], rest * _REST_SPLIT[2])
    # shrinkage of each latent given its modality's time-averaged features (noise var / T)
    k = {
        "text": 1.0 / (1.0 + text_noise**2 / seq_len),
        "audio": 1.0 / (1.0 + frame_noise**2 / seq_len),
        "vision": 1.0 / (1.0 + frame_noise**2 / seq_len),
    }
    truth, var_y = _cached_ground_truth(rho, noise, (k["text"], k["audio"], k["vision"]))

    g = torch.Generator().manual_seed(seed)
    r = min(_TEXT_RANK, dims["text"])
    q, _ = torch.linalg.qr(_randn(g, dims["text"], r))  # (D_t, r), orthonormal columns
    proj = q.T.contiguous()  # (r, D_t)
    u_a = _unit(g, dims["audio"])
    u_v = _unit(g, dims["vision"])
    data = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        data[split] = _make_split(
            g, split, n, seq_len, dims, proj, u_a, u_v, rho, noise, text_noise, frame_noise
        )
    config = {
        "n_train": n_train, "n_valid": n_valid, "n_test": n_test, "dims": dims,
        "seq_len": seq_len, "seed": seed, "text_strength": text_strength, "noise": noise,
        "text_noise": text_noise, "frame_noise": frame_noise,
    }  # fmt: skip
    return CompetitionData(data=data, ground_truth=truth, label_variance=var_y, config=config)
