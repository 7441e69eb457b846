"""Eval mode inside a block, with every submodule's training flag restored on exit."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["EvalMode"]


class EvalMode:
    """Put every submodule in eval mode and restore each one's training flag on exit.

    Each submodule's ``training`` flag is set directly (as ``module.eval()`` does for the
    standard modules), once per module even when the roots overlap; on exit every flag gets its
    value from before the block, so a model that was partly in eval mode stays so. Used by the
    games' masked passes and by AGM's mono-modal responses.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        seen: dict[int, nn.Module] = {}
        for root in modules:
            for sub in root.modules():
                seen.setdefault(id(sub), sub)
        self._modules = list(seen.values())
        self._flags: list[bool] = []

    def __enter__(self) -> None:
        self._flags = [mod.training for mod in self._modules]
        for mod in self._modules:
            mod.training = False

    def __exit__(self, *exc: object) -> None:
        for mod, flag in zip(self._modules, self._flags):
            mod.training = flag
