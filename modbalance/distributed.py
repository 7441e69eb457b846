"""Small :mod:`torch.distributed` helpers that are no-ops without an initialised process group.

Stateful components (prototype EMA, coalition values, modulation coefficients) call these helpers so
that every rank ends up with the state a single process would compute on the concatenated batch.
Without ``torch.distributed`` initialised, they return their input untouched and cost nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_mean", "all_reduce_sum", "is_distributed", "rank", "world_size"]


def is_distributed() -> bool:
    """Return ``True`` when ``torch.distributed`` is available and a process group is initialised.

    Example:
        >>> from modbalance.distributed import is_distributed
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Return the number of processes in the default group (1 when not distributed).

    Example:
        >>> from modbalance.distributed import world_size
        >>> world_size()
        1
    """
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Return this process's rank in the default group (0 when not distributed).

    Example:
        >>> from modbalance.distributed import rank
        >>> rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (identity when not distributed).

    The tensor must live on a device the backend supports (CPU for gloo, CUDA for NCCL). Autograd
    does not flow through the reduction; call it on statistics computed under ``no_grad``.

    Args:
        tensor: Any-shaped tensor, identical in shape and dtype on every rank.

    Returns:
        The same tensor object, now holding the sum over ranks.

    Example:
        >>> import torch
        >>> from modbalance.distributed import all_reduce_sum
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if is_distributed() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over all ranks, in place, and return it (identity when not distributed).

    Example:
        >>> import torch
        >>> from modbalance.distributed import all_reduce_mean
        >>> all_reduce_mean(torch.tensor([3.0]))
        tensor([3.])
    """
    n = world_size()
    if n > 1:
        all_reduce_sum(tensor)
        if tensor.is_floating_point():
            tensor.div_(n)
        else:
            tensor.copy_(torch.div(tensor, n, rounding_mode="floor"))
    return tensor
