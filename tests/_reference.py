"""Obviously correct references shared by the Shapley tests (enumeration, written out by hand)."""

from __future__ import annotations

import itertools

import torch


def code_of(players) -> int:
    return sum(1 << p for p in players)


def brute_force_permutation_mean(table: torch.Tensor, perms) -> torch.Tensor:
    """Average marginal contribution over the given orderings of the players."""
    m = table.numel().bit_length() - 1
    phi = torch.zeros(m, dtype=torch.float64)
    for perm in perms:
        prefix: list[int] = []
        for player in perm:
            before = table[code_of(prefix)]
            prefix.append(player)
            phi[player] += table[code_of(prefix)] - before
    return phi / len(perms)


def brute_force_shapley(table: torch.Tensor) -> torch.Tensor:
    """Average marginal contribution over all M! orderings."""
    m = table.numel().bit_length() - 1
    return brute_force_permutation_mean(table, list(itertools.permutations(range(m))))
