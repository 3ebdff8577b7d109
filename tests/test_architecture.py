"""The shape of the code: no import circle, the layering rule, and components found by name from one plugin
file with no edits elsewhere (docs/design.md)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("routerlab", "environments", "federated", "studies")


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path, module_level_only: bool) -> set[str]:
    """Absolute names a module imports (`from a import b` yields a and a.b); function-level (lazy)
    imports only when module_level_only is False."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if module_level_only:  # statements run at import: the module body, including its if/try blocks
        nodes, todo = [], list(tree.body)
        while todo:
            node = todo.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []), *[s for h in getattr(node, "handlers", []) for s in h.body]]
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.add(module)
            out |= {f"{module}.{alias.name}" for alias in node.names}
    return out


def test_no_import_circle_between_modules():
    """Module-level imports form a DAG (a package's __init__ importing its own submodules is not a circle)."""
    files = module_files()
    graph = {m: {i for i in imported_names(m, p, True) if i in files and i != m and not m.startswith(i + ".")}
             for m, p in files.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(state) == len(files) > 60


# routers -> moe -> models/config -> train -> cli -> apps: a module imports only from its own layer or below.
# Support modules not named here (board, checkpoint, distributed, ...) sit between and are not checked.
LAYERS = [("routerlab.errors", 0), ("routerlab.registry", 0), ("routerlab.kernel_choice", 0), ("routerlab.routers", 1), ("routerlab.moe", 2),
          ("routerlab.models", 3), ("routerlab.tasks", 3), ("routerlab.config", 3), ("routerlab.train", 4),
          ("routerlab.cli", 5), ("routerlab.ablate", 5), ("routerlab.analysis", 5), ("routerlab.bench", 5),
          ("environments", 6), ("federated", 6), ("studies", 6)]
# lazy imports that point up, each with its reason; the list must not grow
UPWARD_LAZY = {("routerlab.routers.replay", "routerlab.analysis.trace")}  # the replay router reads a trace file


def layer_of(module: str) -> int | None:
    return next((rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + ".")), None)


def test_imports_point_down_the_layers():
    files = module_files()
    upward = set()
    for module, path in files.items():
        for lazy in (False, True):
            for name in imported_names(module, path, module_level_only=not lazy):
                if name in files and None not in (layer_of(name), layer_of(module)) and layer_of(name) > layer_of(module):
                    assert lazy, f"{module} imports {name} at module level: {name} sits in a higher layer (docs/design.md)"
                    upward.add((module, name))
    assert upward <= UPWARD_LAZY, f"lazy imports up the layers: {sorted(upward - UPWARD_LAZY)}"


def test_layering_core_imports_only_torch_and_numpy():
    """routers -> moe -> models/config -> train -> cli -> apps: the core (routers, moe, registry, errors)
    imports at module level only the standard library, torch, numpy and triton (torch's own compiler),
    and the library never imports an app, not even lazily."""
    files = module_files()
    core = ("routerlab.routers", "routerlab.moe", "routerlab.registry", "routerlab.errors", "routerlab.kernel_choice")
    allowed_third_party = {"torch", "numpy", "triton"}
    for module, path in files.items():
        names = imported_names(module, path, module_level_only=True)
        if module.startswith(core):
            for name in names:
                top = name.split(".")[0]
                if top == "routerlab":
                    assert name.startswith(core), f"{module} imports {name}: the core imports only routerlab.{{routers, moe, registry, errors, kernel_choice}}"
                    if module.startswith("routerlab.routers"):
                        assert not name.startswith("routerlab.moe"), f"{module} imports {name}: routers sit below the MoE core"
                else:
                    assert top in sys.stdlib_module_names or top in allowed_third_party or top == "__future__", f"{module} imports {name} at module level"
        if module.startswith("routerlab"):
            lazy = imported_names(module, path, module_level_only=False)
            apps = sorted(n for n in lazy if n.split(".")[0] in ("environments", "federated", "studies"))
            assert not apps, f"{module} imports the app {apps[0]}: apps build on routerlab, never the other way round"


PLUGIN = '''
"""One plugin file adding a component of several kinds; nothing else in the repository is edited."""
import dataclasses

import torch

from routerlab.registry import require
from routerlab.tasks import ClassificationTask, TaskParams, register_task


@dataclasses.dataclass(frozen=True)
class ParityParams(TaskParams):
    bits: int = 6

    def __post_init__(self):
        require(self.bits >= 2, f"bits must be >= 2, got {self.bits}")


@register_task("parity", ParityParams)
class Parity(ClassificationTask):
    """Parity of random bit strings; the label is the number of ones."""

    def __init__(self, params):
        self.params = params
        self.input_dim, self.num_classes, self.num_labels = params.bits, 2, params.bits + 1
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 2, (256, params.bits), generator=g)
        ones = x.sum(1)
        self.data = {split: (x.float(), ones % 2, ones) for split in ("train", "val")}


from routerlab.moe.backends import Loop, register_backend


@register_backend("counting_loop")
class CountingLoop(Loop):
    """The loop backend, counting its calls."""

    calls = 0

    def __call__(self, bank, x, counts):
        CountingLoop.calls += 1
        return super().__call__(bank, x, counts)


from federated.strategies import register_strategy
from federated.strategies.fedavg import FedAvg


@register_strategy("fedavg_local_routers")
class FedAvgLocalRouters(FedAvg):
    """FedAvg whose routers never leave the clients."""

    local = (".router.",)
'''

PLUGIN_CHECK = '''
import json, sys
from routerlab.config import make_config
from routerlab.train import Trainer

out = {}


def config(backend):
    return make_config({"plugins": [sys.argv[1]], "task": {"name": "parity", "bits": "5"}, "router": {"name": "switch"},
                        "model": {"d_model": 8, "num_experts": 2, "expert_hidden": 8, "n_layers": 1, "backend": backend},
                        "train": {"steps": 2, "batch_size": 8, "eval_batches": 1}, "run": {"checkpoint": False}})


trainer = Trainer(config("counting_loop"), log=False)
metrics = trainer.fit()
c = trainer.config
out["task"] = [c.task.name, c.task.params.bits, type(trainer.task).__name__, trainer.task.num_examples("train"), metrics["step"]]
reference = Trainer(config("loop"), log=False)
reference.fit()
plugin_backend = sys.modules[type(trainer.task).__module__].CountingLoop
out["backend"] = [c.model.backend, plugin_backend.calls > 0, trainer.losses == reference.losses]

from federated.config import make_setup
from federated.strategies import strategy_class, strategy_names

setup = make_setup({**config("loop").model_dump(mode="json"),
                    "federated": {"strategy": "fedavg_local_routers", "num_clients": 2, "partition": "iid"}})
cls = strategy_class(setup.fed.strategy)
out["strategy"] = [setup.fed.strategy, cls.__name__, list(cls.local), "fedavg_local_routers" in strategy_names()]
from federated.inprocess import run_inprocess  # one round of 2 clients on the plugin's task, in this process

setup = make_setup({**config("loop").model_dump(mode="json"), "federated": {
    "strategy": "fedavg_local_routers", "num_clients": 2, "rounds": 1, "local_steps": 2, "partition": "iid"}})
summary = run_inprocess(setup, sys.argv[2])
out["federation"] = [summary["strategy"], summary["final"]["replied"], any(".router." in k for k in summary["keys_sent"]),
                     any(".experts." in k for k in summary["keys_sent"])]
try:
    make_config({"plugins": [sys.argv[1]], "task": {"name": "parity", "bits": 1}})
except Exception as err:
    out["task_error"] = str(err)
print(json.dumps(out))
'''


def test_one_plugin_file_adds_components_found_by_name(tmp_path):
    """Done-when of issue 20: a task, an expert backend and a federated strategy added by one file, each
    found by name in a config, no other edits."""
    plugin = tmp_path / "my_components.py"
    plugin.write_text(PLUGIN, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ROUTERLAB_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", PLUGIN_CHECK, str(plugin), str(tmp_path / "federation")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["task"] == ["parity", 5, "Parity", 256, 2]  # "5" typed to the int 5 by the registry
    assert "task 'parity': bits must be >= 2, got 1" in found["task_error"]
    assert found["backend"] == ["counting_loop", True, True]  # used, and the same numbers as the loop it wraps
    assert found["strategy"] == ["fedavg_local_routers", "FedAvgLocalRouters", [".router."], True]
    assert found["federation"] == ["fedavg_local_routers", 2, False, True]  # both replied; routers stayed home


def test_every_library_module_imports_in_a_fresh_interpreter_dependents_first():
    """The library's modules imported in one fresh interpreter, each module before the modules it imports
    (the order in which a circle raises ImportError 'partially initialized module'); `__main__` files run
    their program, so they are left out. The apps (flwr, optuna, gymnasium: seconds to import) are
    covered by the static check above."""
    files = module_files()
    graph = {m: {i for i in imported_names(m, p, True) if i in files and i != m} for m, p in files.items()}
    depth: dict[str, int] = {}

    def height(m: str, seen: frozenset = frozenset()) -> int:
        if m not in depth:
            depth[m] = 1 + max((height(n, seen | {m}) for n in graph[m] if n not in seen), default=0)
        return depth[m]

    order = sorted((m for m in files if m.startswith("routerlab") and not m.endswith("__main__")), key=lambda m: (-height(m), m))
    script = textwrap.dedent("""
        import importlib, json, sys
        sys.modules["pydantic"] = None  # first the core as on a GPU machine without pydantic: routers still parse
        from routerlab.errors import ConfigError
        from routerlab.routers import ROUTERS
        assert ROUTERS.parse({"name": "switch", "alpha": 0.5}).params.alpha == 0.5
        try:
            ROUTERS.parse({"name": "softmax_topk", "k": 0})
            raise SystemExit("k=0 accepted")
        except ConfigError as err:
            assert str(err) == "router 'softmax_topk': k must be >= 1, got 0", err
        del sys.modules["pydantic"]
        for name in json.loads(sys.argv[1]):
            importlib.import_module(name)
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("ROUTERLAB_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", script, json.dumps(order)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
