"""Federated strategies: one file each, a Flower `Strategy` subclass registered by name.

`register_strategy(name)` on a subclass of `ExpertStrategy` (base.py) is all a new strategy needs;
the files of this package are discovered on first use, plugins through the `routerlab.strategies`
entry-point group or `load_strategy_plugin(path)`.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

from routerlab.errors import ConfigError

_STRATEGIES: dict[str, type] = {}
_DISCOVERED = False


def register_strategy(name: str):
    def decorate(cls):
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group="routerlab.strategies"):
        ep.load()


def load_strategy_plugin(path: str | Path) -> None:
    """Import a Python file that registers strategies (for configs that name a strategy outside this package)."""
    spec = importlib.util.spec_from_file_location(f"routerlab_strategy_plugin_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def strategy_names() -> list[str]:
    _discover()
    order = ["fedavg", "expert_weighted", "personal_router", "local_only"]  # the documented ones first
    return [n for n in order if n in _STRATEGIES] + sorted(n for n in _STRATEGIES if n not in order)


def strategy_class(name: str) -> type:
    _discover()
    if name not in _STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid strategies: {', '.join(strategy_names())}")
    return _STRATEGIES[name]
