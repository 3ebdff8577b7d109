"""Routers registered by name, each with a typed parameter dataclass (the generic `routerlab.registry`).

A YAML config, an Optuna trial, a Flower run config or a test builds a router from
`{"name": ..., **params}` or a parsed `Spec`. Files in this package are imported automatically, and so
are plugin files (`plugins:` in a config, `ROUTERLAB_PLUGINS`), so a new router is one file and no edits
elsewhere.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

from routerlab.errors import ConfigError, format_validation_error  # noqa: F401  (re-exported for old imports)
from routerlab.registry import Entry, Params, Registry, Spec, load_plugin, param_fields, require  # noqa: F401
from routerlab.routers.base import Router


@dataclasses.dataclass(frozen=True)
class RouterParams(Params):
    """Parameters every router accepts. Subclass it (as a frozen dataclass, every field with a default).

    Plain dataclasses keep this package free of anything but torch; pydantic validates them when a
    config is read (types are coerced and checked), and `__post_init__` checks value ranges.
    """


ROUTERS = Registry("router", package="routerlab.routers", skip=("base", "registry"), params=RouterParams, name_attribute="router_name")

register_router: Callable[..., Callable[[type[Router]], type[Router]]] = ROUTERS.register
"""Class decorator: `@register_router("my_router", MyParams)`; the class is built as `cls(d_model, num_experts, params)`."""


def router_names() -> list[str]:
    return ROUTERS.names()


def router_entry(name: str) -> Entry:
    """(router class, parameter dataclass) of a registered router."""
    return ROUTERS.entry(name)


def parse_router(spec: Mapping[str, Any] | Spec) -> Spec:
    return ROUTERS.parse(spec)


def parse_router_params(spec: Mapping[str, Any] | Spec) -> RouterParams:
    """Validate `{"name": ..., **params}`; errors name the bad field and the valid ones."""
    return ROUTERS.parse(spec).params


def build_router(spec: Mapping[str, Any] | Spec, d_model: int, num_experts: int) -> Router:
    spec = ROUTERS.parse(spec)
    k = getattr(spec.params, "k", None)
    if k is not None and k > num_experts:
        raise ConfigError(f"router {spec.name!r}: k={k} is larger than num_experts={num_experts}; use k <= {num_experts}")
    return ROUTERS.build(spec, d_model, num_experts)


def describe_routers() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, one-line doc, {param: default}) for every registered router."""
    return ROUTERS.describe()
