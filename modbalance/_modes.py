"""Eval mode inside a block, with every submodule's training flag restored on exit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["EvalMode", "ModuleTree"]

_MODULE_SETATTR = nn.Module.__setattr__

#: Bumped by a process-wide module-registration hook whenever a submodule is added anywhere,
#: so that a cached walk of a module tree (:class:`ModuleTree`) knows when it may be stale.
_TREE_VERSION = [0]
_TREE_HOOK: list[object] = []


def _set_training(module: nn.Module, flag: bool) -> None:
    """``module.training = flag``, without ``nn.Module.__setattr__``'s checks when it is safe.

    For a bool attribute that is no parameter, buffer or submodule, ``nn.Module.__setattr__``
    ends in ``object.__setattr__``; calling it directly is 20x faster. Classes that override
    ``__setattr__`` (e.g. scripted modules) get the ordinary assignment.
    """
    if type(module).__setattr__ is _MODULE_SETATTR:
        object.__setattr__(module, "training", flag)
    else:
        module.training = flag


def _watch_module_trees() -> bool:
    """Install the registration hook once; ``False`` if this torch has no global hook."""
    if not _TREE_HOOK:
        register = getattr(
            torch.nn.modules.module, "register_module_module_registration_hook", None
        )
        if register is None:
            return False

        def bump(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
            _TREE_VERSION[0] += 1

        _TREE_HOOK.append(register(bump))
    return True


def _walk(roots: Sequence[nn.Module]) -> list[nn.Module]:
    """Every module reachable from ``roots``, each once even where the roots overlap."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append(module)
        stack.extend(sub for sub in module._modules.values() if sub is not None)
    return found


class ModuleTree:
    """Every module reachable from ``roots``, walked again only after a module was registered.

    Adding a submodule anywhere (attribute assignment, ``add_module``, ``ModuleList.append``,
    ``ModuleDict[...] = ...``) goes through ``register_module``/``__setattr__`` and their global
    hook, which invalidates the cache; a removed submodule may stay listed, which is harmless
    for :class:`EvalMode` (its flag is restored like the others).
    """

    def __init__(self, roots: Sequence[nn.Module]) -> None:
        self._roots = list(roots)
        self._cached = _watch_module_trees()
        self._version = -1
        self._modules: list[nn.Module] = []

    def modules(self) -> list[nn.Module]:
        if self._cached and self._version == _TREE_VERSION[0]:
            return self._modules
        self._version, self._modules = _TREE_VERSION[0], _walk(self._roots)
        return self._modules


class EvalMode:
    """Put every submodule in eval mode and restore each one's training flag on exit.

    Each submodule's ``training`` flag is set directly (as ``module.eval()`` does for the
    standard modules), once per module even when the roots overlap; on exit every flag gets its
    value from before the block, so a model that was partly in eval mode stays so. Only the
    flags that change are written. Used by the games' masked passes and by AGM's mono-modal
    responses.

    Args:
        modules: The root modules, walked now; or a :class:`ModuleTree`, whose cached walk is
            read on entry (for callers that enter once per training step, where the walk's
            fixed cost counts).
    """

    def __init__(self, modules: Sequence[nn.Module] | ModuleTree) -> None:
        self._tree = modules if isinstance(modules, ModuleTree) else None
        self._modules = [] if self._tree is not None else _walk(modules)
        self._saved: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        modules = self._tree.modules() if self._tree is not None else self._modules
        self._saved = [(module, module.training) for module in modules]
        for module in modules:
            if module.training:
                _set_training(module, False)

    def __exit__(self, *exc: object) -> None:
        for module, flag in self._saved:
            if module.training != flag:
                _set_training(module, flag)
        self._saved = []
