"""One registry for every component kind: routers, tasks, expert backends, dispatchers, federated
strategies, and whatever comes next.

A component is one file that registers itself by name with a typed parameter class:

    @dataclasses.dataclass(frozen=True)
    class MyParams(Params):
        alpha: float = 0.5
        def __post_init__(self):
            require(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")

    @ROUTERS.register("my_router", MyParams)      # or the kind's own name: @register_router(...)
    class MyRouter(Router): ...

One parameter style for every kind: a frozen dataclass (every field with a default), so components
import nothing but the standard library and torch. When pydantic is installed, `Registry.parse` validates
with a pydantic TypeAdapter (types coerced and checked); without it (a bare GPU machine) the dataclass is
constructed as given. `__post_init__` checks value ranges either way.

A config section `{"name": ..., **params}` is parsed ONCE into a `Spec(kind, name, params)` when the config
is read; everything downstream receives the Spec, never the dict. A Spec reads as the mapping it came
from (`spec["name"]`, `dict(spec)`, `spec == {"name": ...}`), so YAML, `--set router.k=2`, checkpoints and
fingerprints see the same data as before.

Discovery: a registry with a `package` imports every module of that package the first time it is asked
for a name, so a new component is one new file. Plugin files (a config's `plugins: [...]` or
`ROUTERLAB_PLUGINS=a.py:b.py`) are imported the same way and may register components of any kind.

This module imports only the standard library (pydantic lazily), so `routerlab.routers` and
`routerlab.moe` can use it on a machine where only torch is installed.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

from routerlab.errors import ConfigError, format_validation_error

T = TypeVar("T")

PLUGINS_ENV = "ROUTERLAB_PLUGINS"


@dataclasses.dataclass(frozen=True)
class Params:
    """Base of every component's parameters. Subclass it as a frozen dataclass, every field with a default."""

    def __post_init__(self) -> None:
        pass


def require(condition: bool, message: str) -> None:
    """Value check for `__post_init__`: raises ValueError(message) when condition is false."""
    if not condition:
        raise ValueError(message)


def param_fields(params_type: type) -> dict[str, Any]:
    """{field: default} of a parameter dataclass (a default factory is called; "(required)" when none)."""
    out = {}
    for f in dataclasses.fields(params_type):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = "(required)"
    return out


class Spec(Mapping):
    """A component chosen by a config: its kind ("router", "task", ...), registered name and typed params.

    Immutable. Reads as the YAML mapping `{"name": name, **params}` it was parsed from.
    """

    __slots__ = ("kind", "name", "params")

    def __init__(self, kind: str, name: str, params: Any) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "params", params)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"a Spec is immutable; parse a new one ({self.kind} {self.name!r})")

    def __reduce__(self):
        return (Spec, (self.kind, self.name, self.params))

    def as_dict(self) -> dict[str, Any]:
        """The plain-data form: {"name": name, **params} (what YAML, checkpoints and fingerprints hold)."""
        params = dataclasses.asdict(self.params) if dataclasses.is_dataclass(self.params) else {}
        return {"name": self.name, **params}

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __repr__(self) -> str:
        return f"Spec({self.kind!r}, {self.as_dict()!r})"


class Entry(NamedTuple):
    """A registered component: the object to build (usually a class) and its parameter type."""

    obj: Any
    params: type


class Registry:
    """Components of one kind, registered by name with a parameter dataclass.

    kind:    what a component is, in messages ("router" -> "unknown router 'x'; valid routers: ...").
    package: a package whose modules are imported on first use (discovery); `skip` names modules to leave.
    params:  the parameter type of a component registered without one.
    name_attribute: the attribute of a registered class that receives its name (e.g. "router_name").
    """

    def __init__(self, kind: str, *, package: str | None = None, skip: tuple[str, ...] = (), plural: str | None = None,
                 params: type = Params, name_attribute: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.package = package
        self.skip = set(skip)
        self.default_params = params
        self.name_attribute = name_attribute
        self._entries: dict[str, Entry] = {}
        self._discovered = False
        REGISTRIES[kind] = self

    # ---- registering -------------------------------------------------------------------------------
    def register(self, name: str, params: type | None = None, *, override: bool = False) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name", MyParams)` on a class (or a factory function).
        Replacing a registered name needs `override=True`: a plugin cannot silently shadow a built-in."""

        def decorate(obj: T) -> T:
            self.add(name, obj, params, override=override)
            return obj

        return decorate

    def add(self, name: str, obj: Any, params: type | None = None, *, override: bool = False) -> None:
        module = getattr(obj, "__module__", "") or ""
        if self.package is not None and module != self.package and not module.startswith(self.package + "."):
            self.discover()  # the built-ins first, so a plugin that reuses one's name is the one refused
        old = self._entries.get(name)
        if old is not None and old.obj is not obj and not override and not _same_definition(old.obj, obj):
            where = getattr(old.obj, "__module__", "?")
            raise ConfigError(f"{self.kind} {name!r} is already registered (by {where}); register the new one under another "
                              f"name, or pass override=True to replace it on purpose")
        params = self.default_params if params is None else params
        if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
            raise TypeError(f"{self.kind} {name!r}: params must be a dataclass type (subclass routerlab.registry.Params), got {params!r}")
        self._entries[name] = Entry(obj, params)
        if self.name_attribute is not None:
            setattr(obj, self.name_attribute, name)

    # ---- looking up --------------------------------------------------------------------------------
    def discover(self) -> None:
        """Import every module of the package (once), then the plugin files named in ROUTERLAB_PLUGINS."""
        if self._discovered:
            return
        self._discovered = True
        if self.package is not None:
            package = importlib.import_module(self.package)
            for module in pkgutil.iter_modules(package.__path__):
                if module.name not in self.skip and not module.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{module.name}")
        load_env_plugins()

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def entry(self, name: str) -> Entry:
        self.discover()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(sorted(self._entries)) or '(none)'}")
        return self._entries[name]

    def fields(self, name: str) -> dict[str, Any]:
        """{param: default} of a registered component."""
        return param_fields(self.entry(name).params)

    # ---- parsing and building ----------------------------------------------------------------------
    def parse(self, data: Mapping[str, Any] | Spec) -> Spec:
        """Validate `{"name": ..., **params}` into a Spec; errors name the bad field and the valid ones."""
        if isinstance(data, Spec):
            if data.kind != self.kind:
                raise ConfigError(f"expected a {self.kind}, got a {data.kind} ({data.name!r})")
            return data
        if not isinstance(data, Mapping):
            raise ConfigError(f"a {self.kind} is a mapping with a 'name' (and its parameters), got {data!r}; valid {self.plural}: {', '.join(self.names())}")
        values = dict(data)
        name = values.pop("name", None)
        if name is None:
            raise ConfigError(f"{self.kind} needs a 'name'; valid {self.plural}: {', '.join(self.names())}")
        params_type = self.entry(name).params
        return Spec(self.kind, name, self.parse_params(name, params_type, values))

    def parse_params(self, name: str, params_type: type, values: dict[str, Any]) -> Any:
        fields = {f.name for f in dataclasses.fields(params_type)}
        unknown = set(values) - fields
        if unknown:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(f"{self.kind} {name!r} has no parameter {', '.join(sorted(unknown))}; valid: {valid}")
        try:
            from pydantic import TypeAdapter, ValidationError  # lazy: the GPU machine has torch alone
        except ImportError:  # no pydantic: construct without type coercion
            try:
                return params_type(**values)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{self.kind} {name!r}: {err}") from None
        try:
            return TypeAdapter(params_type).validate_python(values)
        except ValidationError as err:
            raise ConfigError(f"{self.kind} {name!r}: {format_validation_error(err)}") from None
        except ValueError as err:
            raise ConfigError(f"{self.kind} {name!r}: {err}") from None

    def build(self, data: Mapping[str, Any] | Spec, *args: Any, **kwargs: Any) -> Any:
        """Build a component: `obj(*args, params, **kwargs)` (params last, the convention of every kind)."""
        spec = self.parse(data)
        return self.entry(spec.name).obj(*args, spec.params, **kwargs)

    def describe(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, first line of its docstring, {param: default}) for every registered component."""
        rows = []
        for name in self.names():
            obj, params_type = self._entries[name]
            doc = (obj.__doc__ or "").strip().splitlines()
            rows.append((name, doc[0] if doc else "", param_fields(params_type)))
        return rows


REGISTRIES: dict[str, Registry] = {}  # kind -> registry, for tools that list every component


def _same_definition(old: Any, new: Any) -> bool:
    """The same class defined again by re-importing its module (importlib.reload, a re-run test module)."""
    return getattr(old, "__module__", None) == getattr(new, "__module__", None) and \
        getattr(old, "__qualname__", None) == getattr(new, "__qualname__", None)


# ---- plugins -----------------------------------------------------------------------------------------
_LOADED_PLUGINS: dict[Path, Any] = {}


def load_plugin(path: str | Path) -> None:
    """Import a Python file that registers components (of any kind). Each file is imported once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plugin file {str(path)!r} does not exist")
    key = path.resolve()
    if key in _LOADED_PLUGINS:
        return
    module_name = f"routerlab_plugin_{path.stem}_{len(_LOADED_PLUGINS)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclass and pydantic resolve annotations through sys.modules
    _LOADED_PLUGINS[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        del _LOADED_PLUGINS[key], sys.modules[module_name]
        if isinstance(err, SyntaxError):
            raise ConfigError(f"plugin file {str(path)!r} has a syntax error at line {err.lineno}: {err.msg}") from None
        if isinstance(err, ConfigError):
            raise ConfigError(f"plugin file {str(path)!r}: {err}") from None
        if isinstance(err, Exception):  # the plugin's own bug: one line naming it, not a traceback
            raise ConfigError(f"plugin file {str(path)!r} failed to import: {type(err).__name__}: {err}") from None
        raise


def load_env_plugins() -> None:
    """The plugin files named in ROUTERLAB_PLUGINS (paths separated by ':')."""
    for path in filter(None, os.environ.get(PLUGINS_ENV, "").split(":")):
        load_plugin(path)
