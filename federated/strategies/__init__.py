"""Federated strategies: one file each, a Flower `Strategy` subclass registered by name in the generic
registry (`routerlab.registry`, kind "strategy").

`@register_strategy("name")` on a subclass of `ExpertStrategy` (base.py) is all a new strategy needs:
the files of this package are discovered on first use, plugin files (a config's `plugins`,
ROUTERLAB_PLUGINS, or `load_strategy_plugin(path)`) register the same way.
"""
from __future__ import annotations

from pathlib import Path

from routerlab.registry import Registry, load_plugin

STRATEGIES = Registry("strategy", package="federated.strategies", skip=("base",), plural="strategies", name_attribute="name")
register_strategy = STRATEGIES.register
ORDER = ("fedavg", "expert_weighted", "personal_router", "local_only")  # the documented ones first


def load_strategy_plugin(path: str | Path) -> None:
    """Import a Python file that registers strategies (or components of any kind)."""
    load_plugin(path)


def strategy_names() -> list[str]:
    names = STRATEGIES.names()
    return [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]


def strategy_class(name: str) -> type:
    return STRATEGIES.entry(name).obj
