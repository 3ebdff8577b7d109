"""Benchmarks of the MoE core (core.py: `routerlab bench [cpu|gpu]`) and of expert parallelism (parallel.py,
under torchrun). Outside the library's import graph: nothing in routerlab imports this package; the CLI finds
`register` through its `routerlab.commands` entry point (pyproject.toml)."""


def register(app) -> None:
    from routerlab.bench.core import register as register_core

    register_core(app)
