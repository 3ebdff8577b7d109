"""Routers: one small file each, registered by name. See docs/routers.md."""
from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import (
    ROUTERS,
    RouterParams,
    build_router,
    describe_routers,
    load_plugin,
    parse_router,
    parse_router_params,
    register_router,
    require,
    router_names,
)

__all__ = [
    "ROUTERS",
    "Router",
    "RouterParams",
    "Routing",
    "build_router",
    "describe_routers",
    "load_plugin",
    "parse_router",
    "parse_router_params",
    "register_router",
    "require",
    "router_names",
]
