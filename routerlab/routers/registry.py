"""Routers registered by name, each with a typed parameter model.

A YAML config, an Optuna trial, a Flower run config or a test builds a router from
`{"name": ..., **params}`. Files in this package are imported automatically, and so are the files
named in `ROUTERLAB_PLUGINS` (paths separated by ':'), so a new router is one file and no edits elsewhere.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from pathlib import Path
from typing import Any, Callable

import dataclasses

from routerlab.errors import ConfigError
from routerlab.routers.base import Router


@dataclasses.dataclass(frozen=True)
class RouterParams:
    """Parameters every router accepts. Subclass it (as a frozen dataclass, every field with a default).

    Plain dataclasses keep this package free of anything but torch; pydantic validates them when a
    config is read (types are coerced and checked), and `__post_init__` checks value ranges.
    """

    def __post_init__(self) -> None:
        pass


def require(condition: bool, message: str) -> None:
    """Value check for `__post_init__`: raises ValueError(message) when condition is false."""
    if not condition:
        raise ValueError(message)


_ROUTERS: dict[str, tuple[type[Router], type[RouterParams]]] = {}
_discovered = False


def register_router(name: str, params: type[RouterParams] = RouterParams) -> Callable[[type[Router]], type[Router]]:
    """Class decorator: `@register_router("my_router", MyParams)`."""

    def decorate(cls: type[Router]) -> type[Router]:
        _ROUTERS[name] = (cls, params)
        cls.router_name = name
        return cls

    return decorate


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("routerlab.routers")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in ("base", "registry"):
            importlib.import_module(f"routerlab.routers.{module.name}")
    for path in filter(None, os.environ.get("ROUTERLAB_PLUGINS", "").split(":")):
        load_plugin(path)


def load_plugin(path: str | Path) -> None:
    """Import a Python file that registers routers (or tasks)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plugin file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"routerlab_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ConfigError(f"plugin file {str(path)!r} has a syntax error at line {err.lineno}: {err.msg}") from None
    except Exception as err:  # the plugin's own bug: name it in one line, not a traceback
        raise ConfigError(f"plugin file {str(path)!r} failed to import: {type(err).__name__}: {err}") from None


def router_names() -> list[str]:
    _discover()
    return sorted(_ROUTERS)


def router_entry(name: str) -> tuple[type[Router], type[RouterParams]]:
    _discover()
    if name not in _ROUTERS:
        raise ConfigError(f"unknown router {name!r}; valid routers: {', '.join(sorted(_ROUTERS))}")
    return _ROUTERS[name]


def param_fields(params_model: type[RouterParams]) -> dict[str, Any]:
    """{field: default} of a router's parameter dataclass."""
    return {f.name: f.default for f in dataclasses.fields(params_model)}


def parse_router_params(spec: dict[str, Any]) -> RouterParams:
    """Validate `{"name": ..., **params}`; errors name the bad field and the valid ones."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name is None:
        raise ConfigError(f"router needs a 'name'; valid routers: {', '.join(router_names())}")
    _, params_model = router_entry(name)
    fields = param_fields(params_model)
    unknown = set(spec) - set(fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise ConfigError(f"router {name!r} has no parameter {', '.join(sorted(unknown))}; valid: {valid}")
    try:
        from pydantic import TypeAdapter, ValidationError  # lazy: the GPU machine has torch alone
    except ImportError:  # no pydantic: construct without type coercion
        try:
            return params_model(**spec)
        except ValueError as err:
            raise ConfigError(f"router {name!r}: {err}") from None
    try:
        return TypeAdapter(params_model).validate_python(spec)
    except ValidationError as err:
        raise ConfigError(f"router {name!r}: {format_validation_error(err)}") from None
    except ValueError as err:
        raise ConfigError(f"router {name!r}: {err}") from None


def format_validation_error(err) -> str:
    """One line from a pydantic ValidationError: 'field: problem; field: problem'."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def build_router(spec: dict[str, Any], d_model: int, num_experts: int) -> Router:
    params = parse_router_params(spec)
    cls, _ = router_entry(spec["name"])
    k = getattr(params, "k", None)
    if k is not None and k > num_experts:
        raise ConfigError(f"router {spec['name']!r}: k={k} is larger than num_experts={num_experts}; use k <= {num_experts}")
    return cls(d_model, num_experts, params)


def describe_routers() -> list[tuple[str, str, dict[str, Any]]]:
    """(name, one-line doc, {param: default}) for every registered router."""
    rows = []
    for name in router_names():
        cls, params_model = _ROUTERS[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append((name, doc, param_fields(params_model)))
    return rows
