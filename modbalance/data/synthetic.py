r"""Deterministic synthetic data sets with *measured* modality competition built in.

Real MOSI / MOSEI features cannot be shipped, so :func:`make_competition_data` generates a stand-in
in MMSA's exact pickle layout and MOSI's shapes, and :func:`make_classification_competition` a
generic three-view classification task. Both follow the recipe that creates competition in late
fusion (Zhang, Latham & Saxe, ICML 2024): the weak modalities' signal needs *learned, non-linear*
features (a linear read-out of their raw input gets nothing), and the strong modality is fast to
fit and largely sufficient on the training set because it also carries, for most samples, what the
weak ones know. What a weak modality adds is carried by the *same* non-linear feature as what it
shares with the strong one, so a jointly trained weak encoder sees only a fraction of the learning
signal it would see alone (``benchmarks/verify_competition.py`` measures the gap).

**Sentiment regression** (:func:`make_competition_data`). Per sample, with independent latents
:math:`u \sim \mathcal N(0, 1)`, :math:`r_a, r_v \sim \mathcal U(-r_{\max}, r_{\max})`
(:math:`r_{\max} = 0.8`), coverage flags :math:`\pi_a, \pi_v \sim \mathrm{Bernoulli}(\kappa)` and
label noise :math:`\varepsilon \sim \mathcal N(0, 1)`:

.. math::

    z_m = \frac{\sqrt 3}{r_{\max}}\, r_m, \qquad
    y = \operatorname{clip}\!\Big(s\,\big(\sqrt{\rho_t}\, u + \sqrt{\rho_a}\, z_a
        + \sqrt{\rho_v}\, z_v\big) + \sigma\,\varepsilon,\; -3,\; 3\Big),

with :math:`s = 1.5` (the three terms have unit variance and are independent).

* **text** (strong, easy): every valid frame shows :math:`g\,(u,\ \pi_a z_a,\ \pi_v z_v)` exactly
  on three fixed axes (gain :math:`g = 3`), plus a label-irrelevant per-sample "content" vector
  with per-frame noise ``text_noise`` on 13 more axes, embedded in a random rank-16 subspace of the
  768-d feature space. One frame read linearly gives everything text knows: its own term :math:`u`
  and, on the *covered* fraction :math:`\kappa` of the samples, the audio and vision terms.
* **audio / vision** (weak, non-linear): frame :math:`t` is :math:`x_t = B_m [w_t;\ n_t]` for a
  fixed random orthonormal :math:`B_m`, where :math:`w_t \in \mathbb R^3` has standard normal
  magnitudes and a sign pattern with :math:`P(\operatorname{sign}(w_{t1} w_{t2} w_{t3}) = +1) =
  (1 + r_m)/2`, and :math:`n_t \sim \mathcal N(0, \text{frame\_noise}_m^2 I)` fills the other
  :math:`D_m - 3` directions. Every moment of the frames of order below 3 is independent of
  :math:`r_m`, so a linear (or quadratic) read-out of the pooled frames explains nothing; an
  encoder that learns the per-frame third-order parity and averages it over time recovers
  :math:`r_m`. What audio and vision add to text is :math:`z_m` on the :math:`1 - \kappa`
  uncovered samples.

The shares follow from ``text_strength`` :math:`\tau` (the fraction of the signal variance text
carries) and ``text_unique`` :math:`f` (the part of it only text has): :math:`\rho_t = f\tau`,
:math:`\rho_a = \rho_v = (1 - \rho_t)/2` and :math:`\kappa = (\tau - \rho_t)/(1 - \rho_t)`. The
larger :math:`\tau`, the less learning signal is left for the weak encoders in joint training and
the larger the competition gap, while what each weak modality knows alone stays about the same.

**Pooled variant** (``pooled_share`` :math:`\lambda > 0`, default 0). Real acoustic and visual
features keep part of their signal under averaging over time. With :math:`\lambda > 0` each weak
modality's term becomes :math:`\tilde z_m = \sqrt{1 - \lambda}\, z_m + \sqrt{\lambda}\, q_m`
with an independent :math:`q_m \sim \mathcal N(0, 1)` (unit variance still; text shows
:math:`\tilde z_m` on its covered samples), and the first noise direction of every frame gets the
constant offset :math:`q_m` on top of its noise: the time-mean of the frames reveals :math:`q_m`
linearly, up to noise :math:`\text{frame\_noise}_m / \sqrt L`, while the parity part (a share
:math:`1 - \lambda`) still needs learned per-frame features. At :math:`\lambda = 0` nothing is
drawn for it and the data are bit-identical to the plain process.

Sequences have a per-sample length :math:`L \in [\lceil T/2 \rceil, T]` shared by the three
modalities (word-aligned, MOSI ``aligned_50`` style); frames after :math:`L` are zero
(post-padding) and ``audio_lengths``/``vision_lengths`` record :math:`L`. Given its frames, a weak
modality's latent has the posterior :math:`\propto (1 + r)^{n_+} (1 - r)^{L - n_+}` where
:math:`n_+` counts the valid frames of positive parity; the ground truth integrates it.

**Classification** (:func:`make_classification_competition`). A class :math:`y` uniform on
:math:`\{0, \dots, K-1\}` has the code :math:`b \in \{\pm 1\}^B`, :math:`B = \lceil \log_2 K
\rceil` (the bits of :math:`y`). The strong view is a class mean :math:`\mu\, e_y` plus
:math:`\mathcal N(0, I)` noise in many dimensions (fast to fit, and easy to memorise), but only for
a covered fraction :math:`\kappa` of the samples (pure noise otherwise). Each weak view holds, for
every bit :math:`j`, a pair :math:`p_j \sim \mathcal N(0, 1)`, :math:`q_j = |g_j|\,
\operatorname{sign}(p_j)\, b_j` with :math:`g_j \sim \mathcal N(0, 1)` (so
:math:`\operatorname{sign}(p_j q_j) = b_j`: an XOR code whose class-conditional mean is zero) on
two fixed directions, plus isotropic noise.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from modbalance._checks import ModbalanceError, check_int, check_real
from modbalance.data.mmsa import MultimodalDataset, _dataset_from_mmsa_split

__all__ = [
    "ClassificationCompetitionData",
    "CompetitionData",
    "make_classification_competition",
    "make_competition_data",
]

_MODALITIES = ("text", "audio", "vision")
_WEAK = ("audio", "vision")
_SUBSETS = (
    ("text",), ("audio",), ("vision",), ("text", "audio"), ("text", "vision"),
    ("audio", "vision"), ("text", "audio", "vision"),
)  # fmt: skip
_SCALE = 1.5  # standard deviation of the noise-free label core
_TEXT_RANK = 16
_TEXT_GAIN = 3.0  # amplitude of text's signal axes (text is fast to fit)
_ORDER = 3  # order of the weak modalities' per-frame parity
_R_MAX = 0.8  # r_m is uniform on (-_R_MAX, _R_MAX)
_Z_SCALE = math.sqrt(3.0) / _R_MAX  # z_m = _Z_SCALE * r_m has unit variance
_GT_SAMPLES = 1 << 19  # Monte Carlo sample size of the ground truth
_GT_CHUNKS = 8
_GT_GRID = 256  # grid for the posterior draws that rejection sampling leaves
_GT_SEED = 20261201  # fixed seed of the ground-truth Monte Carlo
_POOLED_GAIN = 1.0  # offset per unit of q_m on the weak frames' first noise direction
_VIEWS = ("strong", "weak1", "weak2")


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
            the generating process, not from a fitted model: a Monte Carlo estimate over
            :math:`2^{19}` samples with a fixed seed (standard error about 1e-3), see
            :func:`make_competition_data`. No predictor can exceed it in expectation.
        label_variance: :math:`\mathrm{Var}(y)` of the generating process (same estimate).
        config: The generator's arguments, plus the derived shares ``rho`` (text, audio,
            vision) and the text ``coverage`` :math:`\kappa`.
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


def _erf(x):
    """The error function of a tensor, or of an array (Abramowitz & Stegun 7.1.26, |err| < 2e-7)."""
    if isinstance(x, torch.Tensor):
        return torch.special.erf(x)
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * 1.421413741))
    poly = poly + t**4 * (-1.453152027 + t * 1.061405429)
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _clip_moments(mu, var, lo: float = -3.0, hi: float = 3.0):
    """E[clip(X, lo, hi)] and E[clip(X, lo, hi)^2] for X ~ N(mu, var) (var > 0), elementwise.

    Works on tensors and on numpy arrays (the ground truth uses numpy: no thread-pool overhead).
    """
    exp = torch.exp if isinstance(mu, torch.Tensor) else np.exp
    sigma = var**0.5
    a = (lo - mu) / sigma
    b = (hi - mu) / sigma
    pa = 0.5 * (1 + _erf(a / math.sqrt(2)))
    pb = 0.5 * (1 + _erf(b / math.sqrt(2)))
    fa = exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    fb = exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
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


def _shares(text_strength: float, text_unique: float) -> tuple[tuple[float, float, float], float]:
    """Signal shares (rho_t, rho_a, rho_v) and the text coverage kappa (module docstring)."""
    rho_t = text_unique * text_strength
    rho_w = (1.0 - rho_t) / 2
    coverage = (text_strength - rho_t) / (1.0 - rho_t)
    return (rho_t, rho_w, rho_w), coverage


def _core(u, za, zv, rho: tuple[float, float, float]):
    rt, ra, rv = rho
    return _SCALE * (math.sqrt(rt) * u + math.sqrt(ra) * za + math.sqrt(rv) * zv)


def _posterior_draw(
    rng: np.random.Generator, positive: np.ndarray, length: np.ndarray
) -> np.ndarray:
    r"""One draw of :math:`r` from its posterior given a weak modality's frames.

    A frame's sign product :math:`s_t = \operatorname{sign}(w_{t1} w_{t2} w_{t3})` is +1 with
    probability :math:`(1 + r)/2`; the magnitudes and the noise directions carry no information,
    so the count ``positive`` of positive frames among the :math:`L` valid ones is sufficient and
    the posterior is :math:`\propto (1 + r)^{n_+} (1 - r)^{L - n_+}` on
    :math:`(-r_{\max}, r_{\max})` (uniform prior): :math:`(1 + r)/2` is
    :math:`\mathrm{Beta}(n_+ + 1, L - n_+ + 1)` truncated to :math:`((1 - r_{\max})/2,
    (1 + r_{\max})/2)`, drawn exactly by rejection (a fine grid takes the rare draws that are
    rejected 64 times).
    """
    a, b = positive + 1.0, length - positive + 1.0
    lo, hi = (1 - _R_MAX) / 2, (1 + _R_MAX) / 2
    p = rng.beta(a, b)
    bad = np.flatnonzero((p <= lo) | (p >= hi))
    for _ in range(64):
        if bad.size == 0:
            break
        p[bad] = rng.beta(a[bad], b[bad])
        bad = bad[(p[bad] <= lo) | (p[bad] >= hi)]
    if bad.size:
        width = (hi - lo) / _GT_GRID
        grid = lo + width * (np.arange(_GT_GRID) + 0.5)
        loglik = (a[bad] - 1)[:, None] * np.log(grid) + (b[bad] - 1)[:, None] * np.log1p(-grid)
        w = np.exp(loglik - loglik.max(1, keepdims=True)).cumsum(1)
        idx = (w < rng.random((bad.size, 1)) * w[:, -1:]).sum(1)
        p[bad] = grid[np.minimum(idx, _GT_GRID - 1)] + (rng.random(bad.size) - 0.5) * width
    return 2 * p - 1


@functools.lru_cache(maxsize=16)
def _ground_truth_items(
    rho: tuple[float, float, float],
    coverage: float,
    noise: float,
    t: int,
    pooled: float = 0.0,
    pooled_noise: tuple[float, float] = (0.0, 0.0),
) -> tuple[tuple[tuple[str, float], ...], float]:
    r"""Monte Carlo estimate of Var(E[y | x_S]) / Var(y) for every modality subset S.

    Uses :math:`\mathrm{Var}(E[y \mid X]) = \mathrm{Cov}(y, y')` where :math:`y'` is generated
    from a second, independent posterior draw of the latents *given the same observation*
    :math:`X`, so one level of sampling suffices. The posterior is explicit: text reveals
    :math:`u` and, where it covers, :math:`z_m` exactly; a weak modality's frames give the
    posterior of :math:`r_m` through the count of positive parities (:func:`_posterior_draw`; the
    count is drawn as Binomial(L, (1 + r)/2)); unobserved latents keep their prior. The label
    noise and the clipping are integrated in closed form (:func:`_clip_moments`). Common random
    numbers across the subsets; fixed seed; chunked (small memory).

    With ``pooled`` :math:`\lambda > 0` a weak term is :math:`\sqrt{1-\lambda} z_m +
    \sqrt\lambda q_m`; the frames' sum :math:`S` along the pooled direction is
    :math:`\mathcal N(L c q_m, L \sigma_m^2)` (``pooled_noise`` :math:`\sigma_m`, gain :math:`c`),
    so :math:`q_m \mid S` is Gaussian with mean :math:`c S / (\sigma_m^2 + L c^2)` and variance
    :math:`\sigma_m^2 / (\sigma_m^2 + L c^2)`. Its draws come after the plain ones, only when
    :math:`\lambda > 0` (the plain estimate is unchanged).
    """
    rng = np.random.default_rng(_GT_SEED)
    keys = ["+".join(x) for x in _SUBSETS]
    sums = dict.fromkeys(["m1", "m2", *keys], 0.0)
    sums_b = dict.fromkeys(keys, 0.0)
    chunk = _GT_SAMPLES // _GT_CHUNKS
    var_noise = max(noise, 1e-12) ** 2
    core = functools.partial(_core, rho=rho)

    for _ in range(_GT_CHUNKS):
        u, u_prior = rng.standard_normal((2, chunk))
        length = rng.integers(math.ceil(t / 2), t + 1, chunk)
        z, post, prior, covered = {}, {}, {}, {}
        for m in _WEAK:
            r = rng.uniform(-_R_MAX, _R_MAX, chunk)
            positive = rng.binomial(length, (1 + r) / 2)
            z[m] = r * _Z_SCALE
            post[m] = _posterior_draw(rng, positive, length) * _Z_SCALE
            prior[m] = rng.uniform(-_R_MAX, _R_MAX, chunk) * _Z_SCALE
            covered[m] = rng.random(chunk) < coverage
            if pooled > 0:
                sigma2, c = pooled_noise[_WEAK.index(m)] ** 2, _POOLED_GAIN
                q, xi, q_post, q_prior = rng.standard_normal((4, chunk))
                total = length * c * q + np.sqrt(length * sigma2) * xi
                denom = sigma2 + length * c * c
                q_post = c * total / denom + np.sqrt(sigma2 / denom) * q_post
                a, b = math.sqrt(1.0 - pooled), math.sqrt(pooled)
                z[m], post[m] = a * z[m] + b * q, a * post[m] + b * q_post
                prior[m] = a * prior[m] + b * q_prior
        m1, m2 = _clip_moments(core(u, z["audio"], z["vision"]), var_noise)
        sums["m1"] += float(m1.sum())
        sums["m2"] += float(m2.sum())
        for subset, key in zip(_SUBSETS, keys):
            zs = {}
            for m in _WEAK:
                zs[m] = post[m] if m in subset else prior[m]
                if "text" in subset:
                    zs[m] = np.where(covered[m], z[m], zs[m])
            m1b, _ = _clip_moments(
                core(u if "text" in subset else u_prior, zs["audio"], zs["vision"]), var_noise
            )
            sums[key] += float((m1 * m1b).sum())
            sums_b[key] += float(m1b.sum())
    n = chunk * _GT_CHUNKS
    mean_y = sums["m1"] / n
    var_y = sums["m2"] / n - mean_y**2
    truth = {}
    for key in keys:
        cov = sums[key] / n - mean_y * sums_b[key] / n
        truth[key] = min(1.0, max(0.0, cov / var_y))
    return tuple(truth.items()), var_y


# ----------------------------------------------------------------------------------------------
# generator
# ----------------------------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _orthonormal(g: torch.Generator, d: int, r: int) -> torch.Tensor:
    """(d, r) matrix with orthonormal columns (r <= d)."""
    q, _ = torch.linalg.qr(_randn(g, d, r))
    return q


def _parity_frames(g: torch.Generator, r: torch.Tensor, t: int) -> torch.Tensor:
    r"""(n, t, 3) frames: standard normal magnitudes, sign product +1 with probability (1+r)/2.

    Each frame draws :math:`w \sim \mathcal N(0, I_3)` and flips the sign of its last
    coordinate where :math:`\operatorname{sign}(w_1 w_2 w_3)` disagrees with a :math:`\pm 1`
    draw of mean ``r``; every moment of order below 3 is that of :math:`\mathcal N(0, I_3)`.
    """
    n = r.shape[0]
    w = _randn(g, n, t, _ORDER)
    want = torch.where(torch.rand(n, t, generator=g) < (1 + r[:, None]) / 2, 1.0, -1.0)
    w[..., -1] *= torch.sign(w.prod(-1)) * want  # flips where the product has the wrong sign
    return w


def _text_frames(
    g: torch.Generator,
    u: torch.Tensor,
    z: Mapping[str, torch.Tensor],
    covered: Mapping[str, torch.Tensor],
    valid: torch.Tensor,
    proj: torch.Tensor,
    text_noise: float,
) -> torch.Tensor:
    """Text frames: the label's latents exactly on 3 axes, noisy label-free content elsewhere.

    Draws (n, r) then (n, t, r) normals from ``g`` (in this order).

    Args:
        g: The generator.
        u: (n,) text-only latent.
        z: ``{"audio": (n,), "vision": (n,)}`` weak-modality latents.
        covered: ``{"audio": (n,), "vision": (n,)}`` 0/1: text carries that latent.
        valid: (n, t) float, 1 on the valid frames and 0 on the padding.
        proj: (r, D_t) orthonormal rows, the projection of the rank-r content.
        text_noise: Per-frame noise of the label-free content.

    Returns:
        (n, t, D_t) float32 frames, zero on the padding.
    """
    n, t = valid.shape
    rank = proj.shape[0]
    content = _randn(g, n, rank)
    content[:, 0] = _TEXT_GAIN * u
    content[:, 1] = _TEXT_GAIN * covered["audio"] * z["audio"]
    content[:, 2] = _TEXT_GAIN * covered["vision"] * z["vision"]
    frame = text_noise * _randn(g, n, t, rank)
    frame[..., :3] = 0.0
    low = content[:, None, :] + frame
    text = (low.reshape(n * t, rank) @ proj).reshape(n, t, proj.shape[1])
    return text * valid[:, :, None]


def _weak_frames(
    g: torch.Generator,
    r: torch.Tensor,
    valid: torch.Tensor,
    basis: torch.Tensor,
    frame_noise: float,
    pooled: torch.Tensor | None,
) -> torch.Tensor:
    """Frames of a weak modality: the per-frame parity signal, rotated into D_m dimensions.

    Draws the parity frames, then (n, t, D_m - 3) normals from ``g`` (in this order).

    Args:
        g: The generator.
        r: (n,) parity bias of the modality (:func:`_parity_frames`), on the first 3 axes.
        valid: (n, t) float, 1 on the valid frames and 0 on the padding.
        basis: (D_m, D_m) orthonormal rotation.
        frame_noise: Standard deviation of the ``D_m - 3`` label-free axes.
        pooled: (n,) signal that survives the time-mean, added to the first label-free axis
            (the pooled variant), or ``None``.

    Returns:
        (n, t, D_m) float32 frames, zero on the padding.
    """
    n, t = valid.shape
    w = _parity_frames(g, r, t)  # (n, t, 3)
    rest = frame_noise * _randn(g, n, t, basis.shape[0] - _ORDER)
    if pooled is not None:  # the part of the signal that survives the time-mean
        rest[..., 0] += _POOLED_GAIN * pooled[:, None]
    return (torch.cat([w, rest], -1) @ basis.T) * valid[:, :, None]


def _bert_rows(g: torch.Generator, lengths: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The ``text_bert`` rows of a split: token ids, attention mask and segment ids.

    Args:
        g: The generator (draws (n, t) token ids).
        lengths: (n,) valid frames per sample.
        valid: (n, t) float, 1 on the valid frames and 0 on the padding.

    Returns:
        (n, 3, t) int64: ids (``[CLS]`` 101 first, ``[SEP]`` 102 at ``lengths - 1``, 0 on the
        padding), the attention mask and zero segment ids.
    """
    n, t = valid.shape
    tok = torch.randint(1000, 30000, (n, t), generator=g)
    tok[:, 0] = 101
    tok[torch.arange(n), lengths - 1] = 102
    attn = valid.long()
    return torch.stack([tok * attn, attn, torch.zeros_like(attn)], dim=1)


def _make_split(
    g: torch.Generator,
    split: str,
    n: int,
    t: int,
    proj: torch.Tensor,
    bases: Mapping[str, torch.Tensor],
    rho: tuple[float, float, float],
    coverage: float,
    noise: float,
    text_noise: float,
    frame_noise: Mapping[str, float],
    pooled: float = 0.0,
) -> dict[str, Any]:
    """One split of :func:`make_competition_data` in the MMSA layout (arrays by key).

    Draws from ``g`` in a fixed order (latents, lengths, [pooled signal], text, audio, vision,
    tokens), so identical arguments give identical data.
    """
    u = _randn(g, n)
    r = {m: _R_MAX * (2 * torch.rand(n, generator=g) - 1) for m in _WEAK}
    z = {m: r[m] * _Z_SCALE for m in _WEAK}
    covered = {m: (torch.rand(n, generator=g) < coverage).float() for m in _WEAK}
    eps = _randn(g, n)
    lengths = torch.randint(math.ceil(t / 2), t + 1, (n,), generator=g)
    valid = (torch.arange(t)[None, :] < lengths[:, None]).float()  # (n, t)
    q = None
    if pooled > 0:  # drawn only for the pooled variant: the plain data stay bit-identical
        q = {m: _randn(g, n) for m in _WEAK}
        a, b = math.sqrt(1.0 - pooled), math.sqrt(pooled)
        z = {m: a * z[m] + b * q[m] for m in _WEAK}

    core = _core(u.double(), z["audio"].double(), z["vision"].double(), rho)
    y = (core + noise * eps.double()).clamp(-3.0, 3.0).float().numpy()
    # the generator's draws, in this order: text, audio, vision, tokens
    text = _text_frames(g, u, z, covered, valid, proj, text_noise)
    audio, vision = (
        _weak_frames(g, r[m], valid, bases[m], frame_noise[m], None if q is None else q[m])
        for m in _WEAK
    )
    text_bert = _bert_rows(g, lengths, valid)
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


def _frame_noise_dict(frame_noise: float | Mapping[str, float] | None) -> dict[str, float]:
    """``frame_noise`` of :func:`make_competition_data` as ``{"audio": ..., "vision": ...}``.

    ``None`` gives the defaults ``{"audio": 2.5, "vision": 0.5}``, a number is used for both.
    """
    if frame_noise is None:
        frame_noise = {"audio": 2.5, "vision": 0.5}
    elif not isinstance(frame_noise, Mapping):
        frame_noise = dict.fromkeys(_WEAK, frame_noise)
    if set(frame_noise) != set(_WEAK):
        raise ModbalanceError(
            "`frame_noise` must be a number or a dict with the keys 'audio' and 'vision', got "
            f"{sorted(frame_noise)}."
        )
    return {m: check_real(frame_noise[m], f"frame_noise[{m!r}]", low=0) for m in _WEAK}


def _dims_dict(dims: Mapping[str, int] | None) -> dict[str, int]:
    """``dims`` of :func:`make_competition_data`, checked, as a new dict.

    The default is MOSI's ``{"text": 768, "audio": 5, "vision": 20}``; text needs at least 3
    features, audio and vision at least 4.
    """
    dims = dict({"text": 768, "audio": 5, "vision": 20} if dims is None else dims)
    if set(dims) != set(_MODALITIES):
        raise ModbalanceError(
            f"`dims` must have exactly the keys 'text', 'audio', 'vision', got {sorted(dims)}."
        )
    dims["text"] = check_int(dims["text"], "dims['text']", low=3)
    for m in _WEAK:
        dims[m] = check_int(dims[m], f"dims[{m!r}]", low=_ORDER + 1)
    return dims


def make_competition_data(
    *,
    n_train: int = 1284,
    n_valid: int = 229,
    n_test: int = 686,
    dims: Mapping[str, int] | None = None,
    seq_len: int = 50,
    seed: int = 0,
    text_strength: float = 0.9,
    text_unique: float = 0.1,
    noise: float = 0.3,
    text_noise: float = 0.3,
    frame_noise: float | Mapping[str, float] | None = None,
    pooled_share: float = 0.0,
) -> CompetitionData:
    r"""Generate the synthetic competition dataset (MMSA layout, MOSI shapes by default).

    See the module docstring for the generating process. ``text_strength`` :math:`\tau` sets how
    dominant text is: the share of the label's signal variance that text carries; a
    ``text_unique`` part :math:`f` of it only text has, the rest it shares with audio and vision
    on the covered samples. Audio and vision each carry :math:`(1 - f\tau)/2` of the signal
    through a per-frame third-order parity that no linear read-out of their frames can see.

    The ground truth (:attr:`CompetitionData.ground_truth`) is a large-sample Monte Carlo
    estimate from the generating process with a fixed seed (:math:`2^{19}` samples, standard
    error about 1e-3; computed once per configuration and process, about a second). At the
    defaults it is about text 0.86, audio 0.40, vision 0.40, audio+vision 0.80, text+audio 0.91
    and all three 0.95 (``text_strength=0.5``: text 0.48, audio 0.42, all three 0.92): text alone
    is close to sufficient, and what audio and vision add needs their non-linear feature. It
    depends on neither ``frame_noise`` (the noise fills directions orthogonal to the signal) nor
    ``text_noise``.

    Memory: text dominates, :math:`4 \cdot N \cdot T \cdot D_t` bytes (about 340 MB at the
    defaults: 2199 samples × 50 frames × 768 float32); use smaller ``n_*``, ``seq_len`` or
    ``dims["text"]`` for quick runs. The default size is generated in about a second on a CPU,
    identical for identical arguments (a seeded :class:`torch.Generator`), so nothing needs to
    be cached on disk.

    Args:
        n_train: Training samples (MOSI: 1284).
        n_valid: Validation samples (MOSI: 229).
        n_test: Test samples (MOSI: 686).
        dims: Feature sizes ``{"text": 768, "audio": 5, "vision": 20}`` (MOSI's); text needs at
            least 3, audio and vision at least 4.
        seq_len: Frames per sequence T (MOSI aligned: 50).
        seed: Seed of the generator.
        text_strength: Share :math:`\tau` in (0, 1) of the label's signal variance carried by
            text.
        text_unique: Part :math:`f` in [0, 1) of text's share that only text carries.
        noise: Standard deviation of the label noise (in label units, before clipping).
        text_noise: Per-frame noise of text's label-irrelevant content (text's signal axes
            are noise-free: text is easy).
        frame_noise: Standard deviation of the audio and vision frames in their
            ``D_m - 3`` label-free directions: a number, or ``{"audio": ..., "vision": ...}``.
            Default ``{"audio": 2.5, "vision": 0.5}``: audio has only two such directions, so a
            larger noise there keeps its signal as slow to find as vision's.
        pooled_share: Share :math:`\lambda` in [0, 1) of each weak modality's signal that is
            linear in the time-mean of its frames (module docstring, "pooled variant"); the
            rest stays in the per-frame parity. 0 (the default) is the plain process,
            bit-identical to the data generated before this option existed. With
            :math:`\lambda > 0` the ground truth also depends on ``frame_noise``.

    Returns:
        A :class:`CompetitionData`.

    Raises:
        ModbalanceError: On out-of-range arguments, or ``dims`` / ``frame_noise`` without the
            expected keys.

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
    text_unique = check_real(text_unique, "text_unique", low=0, high=1, high_inclusive=False)
    noise = check_real(noise, "noise", low=0)
    text_noise = check_real(text_noise, "text_noise", low=0)
    frame_noise = _frame_noise_dict(frame_noise)
    pooled_share = check_real(pooled_share, "pooled_share", low=0, high=1, high_inclusive=False)
    dims = _dims_dict(dims)

    rho, coverage = _shares(text_strength, text_unique)
    if pooled_share > 0:
        pooled_noise = (frame_noise["audio"], frame_noise["vision"])
        items, var_y = _ground_truth_items(
            rho, coverage, noise, seq_len, pooled_share, pooled_noise
        )
    else:
        items, var_y = _ground_truth_items(rho, coverage, noise, seq_len)

    g = torch.Generator().manual_seed(seed)
    rank = min(_TEXT_RANK, dims["text"])
    proj = _orthonormal(g, dims["text"], rank).T.contiguous()  # (rank, D_t)
    bases = {m: _orthonormal(g, dims[m], dims[m]) for m in _WEAK}  # first 3 columns: signal
    data = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        data[split] = _make_split(
            g, split, n, seq_len, proj, bases, rho, coverage, noise, text_noise, frame_noise,
            pooled=pooled_share,
        )  # fmt: skip
    config = {
        "n_train": n_train, "n_valid": n_valid, "n_test": n_test, "dims": dims,
        "seq_len": seq_len, "seed": seed, "text_strength": text_strength,
        "text_unique": text_unique, "noise": noise, "text_noise": text_noise,
        "frame_noise": frame_noise, "rho": rho, "coverage": coverage,
        "pooled_share": pooled_share,
    }  # fmt: skip
    return CompetitionData(data=data, ground_truth=dict(items), label_variance=var_y, config=config)


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------


@dataclass
class ClassificationCompetitionData:
    r"""A synthetic three-view classification task with competition (vector features).

    Attributes:
        data: ``{"train"|"valid"|"test": {"features": {view: (N, F_view) float32 array},
            "labels": (N,) int64 array, "covered": (N,) bool array}}``; ``covered`` marks the
            samples whose strong view shows the class (kept for analysis, not a model input).
        modalities: The view names, ``("strong", "weak1", "weak2")``.
        weak: The weak views, ``("weak1", "weak2")``.
        num_classes: K.
        config: The generator's arguments.
    """

    data: dict[str, dict[str, Any]]
    modalities: tuple[str, ...] = _VIEWS
    weak: tuple[str, ...] = _VIEWS[1:]
    num_classes: int = 8
    config: dict[str, Any] = field(default_factory=dict)

    def _check_split(self, split: str) -> None:
        if split not in self.data:
            raise ModbalanceError(
                f"`split` must be one of {', '.join(map(repr, self.data))}; got {split!r}."
            )

    def tensors(self, split: str = "train") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One split as ``({view: (N, F) float32 tensor}, (N,) int64 labels)`` (no copy).

        Example:
            >>> from modbalance.data.synthetic import make_classification_competition
            >>> d = make_classification_competition(n_train=16, n_valid=4, n_test=4)
            >>> x, y = d.tensors("valid")
            >>> {m: tuple(v.shape) for m, v in x.items()}, y.dtype
            ({'strong': (4, 512), 'weak1': (4, 16), 'weak2': (4, 16)}, torch.int64)
        """
        self._check_split(split)
        s = self.data[split]
        return {m: torch.from_numpy(s["features"][m]) for m in self.modalities}, torch.from_numpy(
            s["labels"]
        )

    def dataset(self, split: str = "train") -> MultimodalDataset:
        """One split as a :class:`MultimodalDataset` of ``(N, F)`` vectors and integer labels."""
        features, labels = self.tensors(split)
        return MultimodalDataset(features, labels, split=split)


def make_classification_competition(
    *,
    n_train: int = 2000,
    n_valid: int = 500,
    n_test: int = 1000,
    num_classes: int = 8,
    dims: Mapping[str, int] | None = None,
    coverage: float = 0.9,
    margin: float = 5.0,
    weak_noise: float = 0.1,
    seed: int = 0,
) -> ClassificationCompetitionData:
    r"""Generate a three-view classification task in which joint training under-trains two views.

    See the module docstring for the generating process. The strong view (``"strong"``) is
    linear and shows the class on a ``coverage`` fraction :math:`\kappa` of the samples (chance
    otherwise); the weak views (``"weak1"``, ``"weak2"``) show every sample's class, but only
    through XOR codes (signs of products of two latent directions), so a linear read-out of their
    raw features is at chance level and an encoder must learn the products. On the covered samples
    the strong view already has the answer, so in joint training only the uncovered
    :math:`1 - \kappa` of the samples push the weak encoders to learn.

    Args:
        n_train: Training samples.
        n_valid: Validation samples.
        n_test: Test samples.
        num_classes: K, from 2 to 16.
        dims: Feature sizes ``{"strong": 512, "weak1": 16, "weak2": 16}``; the strong view needs
            at least K, a weak view at least :math:`2\lceil \log_2 K \rceil`.
        coverage: Fraction :math:`\kappa` in [0, 1] of samples on which the strong view shows
            the class.
        margin: Norm :math:`\mu` of the strong view's class means (noise has unit variance).
        weak_noise: Standard deviation of the weak views' isotropic noise (the latent pairs have
            unit variance).
        seed: Seed of the generator.

    Returns:
        A :class:`ClassificationCompetitionData`.

    Raises:
        ModbalanceError: On out-of-range arguments or ``dims`` without exactly the keys
            ``"strong"``, ``"weak1"``, ``"weak2"``.

    Example:
        >>> from modbalance.data.synthetic import make_classification_competition
        >>> d = make_classification_competition(n_train=64, n_valid=16, n_test=16, seed=3)
        >>> x, y = d.tensors("train")
        >>> x["strong"].shape, x["weak1"].dtype, int(y.min()) >= 0, int(y.max()) < d.num_classes
        (torch.Size([64, 512]), torch.float32, True, True)
    """
    n_train = check_int(n_train, "n_train", low=1)
    n_valid = check_int(n_valid, "n_valid", low=1)
    n_test = check_int(n_test, "n_test", low=1)
    num_classes = check_int(num_classes, "num_classes", low=2, high=16)
    coverage = check_real(coverage, "coverage", low=0, high=1)
    margin = check_real(margin, "margin", low=0)
    weak_noise = check_real(weak_noise, "weak_noise", low=0)
    seed = check_int(seed, "seed", low=0)
    bits = max(1, math.ceil(math.log2(num_classes)))
    dims = dict({"strong": 512, "weak1": 16, "weak2": 16} if dims is None else dims)
    if set(dims) != set(_VIEWS):
        raise ModbalanceError(
            f"`dims` must have exactly the keys {', '.join(map(repr, _VIEWS))}, got {sorted(dims)}."
        )
    dims["strong"] = check_int(dims["strong"], "dims['strong']", low=num_classes)
    for m in _VIEWS[1:]:
        dims[m] = check_int(dims[m], f"dims[{m!r}]", low=2 * bits)

    g = torch.Generator().manual_seed(seed)
    means = margin * _orthonormal(g, dims["strong"], num_classes).T  # (K, F_s)
    weak_dirs = {m: _orthonormal(g, dims[m], 2 * bits) for m in _VIEWS[1:]}
    data = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        y = torch.randint(0, num_classes, (n,), generator=g)
        code = ((y[:, None] >> torch.arange(bits)) & 1).float() * 2 - 1  # (n, B) in {-1, +1}
        covered = torch.rand(n, generator=g) < coverage
        strong = covered.float()[:, None] * means[y] + _randn(g, n, dims["strong"])
        features = {"strong": strong}
        for m in _VIEWS[1:]:
            p = _randn(g, n, bits)
            q = _randn(g, n, bits).abs() * torch.sign(p) * code
            latent = torch.cat([p, q], 1)  # (n, 2B): pair j is (p_j, q_j)
            features[m] = latent @ weak_dirs[m].T + weak_noise * _randn(g, n, dims[m])
        data[split] = {
            "features": {m: x.numpy() for m, x in features.items()},
            "labels": y.numpy().astype(np.int64),
            "covered": covered.numpy(),
        }
    config = {
        "n_train": n_train, "n_valid": n_valid, "n_test": n_test, "num_classes": num_classes,
        "dims": dims, "coverage": coverage, "margin": margin, "weak_noise": weak_noise,
        "seed": seed,
    }  # fmt: skip
    return ClassificationCompetitionData(data=data, num_classes=num_classes, config=config)
