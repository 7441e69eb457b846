r"""Distances between feature rows and prototype rows, written once for the library.

:func:`pairwise_distance` compares every row of ``x`` ``(..., N, D)`` with every row of ``y``
``(..., K, D)`` and returns ``(..., N, K)``; :func:`cosine_similarity` and :func:`unit` are the
pieces its cosine metric is made of, for callers that keep unit vectors (the prototype
calibrator, the OT aligner). Used by :class:`~modbalance.prototypes.PrototypeCalibrator`,
:class:`~modbalance.ot.SinkhornAligner` and :class:`~modbalance.methods.pmr.PMR`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["METRICS", "cosine_similarity", "pairwise_distance", "unit"]

#: The metrics of :func:`pairwise_distance`.
METRICS = ("sqeuclidean", "euclidean", "cosine")
#: The smallest norm :func:`unit` divides by (``F.normalize``'s default ``eps``).
NORM_EPS = 1e-12


def unit(x: Tensor) -> Tensor:
    """``F.normalize(x, dim=-1)``: the same kernels and values, without its Python layers."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)


def _dots(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y^T`` over the last two dimensions (``bmm`` directly for matching 3-D batches)."""
    if x.ndim == 3 and y.ndim == 3 and x.shape[0] == y.shape[0]:
        return torch.bmm(x, y.transpose(1, 2))  # matmul's kernel, without its reshapes
    return x @ y.transpose(-1, -2)


def cosine_similarity(x: Tensor, y: Tensor, *, normalized: bool = False) -> Tensor:
    r"""``(..., N, K)`` cosines :math:`\cos(x_i, y_k)`; ``normalized``: both are unit rows already.

    A zero row has cosine 0 with everything (it is divided by :data:`NORM_EPS`, not its norm).
    """
    if not normalized:
        x, y = unit(x), unit(y)
    return _dots(x, y)


def pairwise_distance(x: Tensor, y: Tensor, metric: str, *, normalized: bool = False) -> Tensor:
    r"""Distance of every row of ``x`` ``(..., N, D)`` to every row of ``y`` ``(..., K, D)``.

    * ``"sqeuclidean"``: :math:`\lVert x_i - y_k\rVert^2` expanded as
      :math:`\lVert x_i\rVert^2 + \lVert y_k\rVert^2 - 2 x_i \cdot y_k` (one matrix product, no
      ``(N, K, D)`` intermediate), clamped at 0 against the rounding of that difference;
    * ``"euclidean"``: :math:`\sqrt{\max(\lVert x_i - y_k\rVert^2, \text{tiny})}` from the
      differences themselves (exact near 0, where the expansion cancels), the floor keeping the
      gradient of the square root finite at coinciding points;
    * ``"cosine"``: :math:`1 - \cos(x_i, y_k) \in [0, 2]`, see :func:`cosine_similarity`
      (``normalized`` is passed on; the other metrics ignore it).

    Differentiable with respect to both inputs; batch dimensions broadcast.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> y = torch.tensor([[3.0, 0.0]])
        >>> pairwise_distance(x, y, "sqeuclidean")
        tensor([[ 9.],
                [16.]])
        >>> pairwise_distance(x, y, "euclidean")
        tensor([[3.],
                [4.]])
        >>> pairwise_distance(x, y, "cosine")
        tensor([[1.0000],
                [0.4000]])
    """
    if metric == "cosine":
        return 1.0 - cosine_similarity(x, y, normalized=normalized)
    if metric == "sqeuclidean":
        sq = x.pow(2).sum(-1).unsqueeze(-1) + y.pow(2).sum(-1).unsqueeze(-2) - 2.0 * _dots(x, y)
        return sq.clamp_min(0.0)
    if metric == "euclidean":
        diff = x.unsqueeze(-2) - y.unsqueeze(-3)
        return diff.pow(2).sum(-1).clamp_min(torch.finfo(diff.dtype).tiny).sqrt()
    raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
