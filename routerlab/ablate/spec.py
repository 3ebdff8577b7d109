"""An ablation file: a base config, axes, metrics. Expanded into cells, every one validated up front.

    name: demo                       # optional; default: the file's stem
    base: configs/chars.yaml         # a config file (relative to the ablation file or the cwd) or a mapping
    baseline: "switch"               # optional: the row (labels joined by " / ") others are compared with
    axes:                            # the grid is the product of all axes
      task: [chars, {name: clusters, set: {train.batch_size: 128}}]
      router: [all, {name: noisy_topk, w_load: 0.0, label: no-load-loss}]
      router.z_loss: [0.0, 1.0e-3]   # any config key (dotted)
      seed: [0, 1]                   # seeds are averaged over in the summary
    exclude: [rl]                    # routers that `all` leaves out
    metrics: [loss, load_cv]         # columns of the summary (default: DEFAULT_METRICS)

A `task` or `router` entry is a name, `all` (router axis only: every registered router), or a mapping with
the component's parameters plus optional `label` (its name in tables) and `set` (dotted config keys that
go with it, e.g. a batch size that suits the task). Cells whose router cannot run on the task (the trainer's
compatibility check), and routers from `all` whose config does not validate, are skipped with the reason;
every other invalid cell fails the whole file before anything runs.

Seeds reach every random choice of a cell: a router with a `seed` parameter (hash tables) takes the run's
seed unless the file sets `router.seed` itself. A cell's id hashes its config and its data's content.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from routerlab.config import Config, content_hash, make_config, read_config_file, set_key
from routerlab.errors import ConfigError

DEFAULT_METRICS = [
    "loss", "accuracy", "perplexity", "load_cv", "max_vio", "dropped_frac", "dead_experts", "router_entropy",
    "specialization", "fluctuation", "tokens_per_s", "params_active", "params_total",
]
KNOWN_METRICS = DEFAULT_METRICS + ["train_loss", "usage_entropy", "z_value", "max_logit", "switch_balance",
                                   "loss_se", "test_loss", "test_loss_se", "test_accuracy", "regret", "mrr", "top1_is_best",
                                   "max_vio_batch", "max_vio_seq", "mean_k", "rank_overload"]
KNOWN_METRICS += [f"{m}_as_trained" for m in ("load_cv", "max_vio", "dropped_frac", "dead_experts", "usage_entropy", "switch_balance")]
SPECIAL_AXES = ("task", "router", "seed")
SECTION_MODELS = ("model", "train", "run")


@dataclass
class Cell:
    """One training run: a config, its axis labels and the id its results are stored under."""

    id: str
    labels: dict[str, str]  # axis -> label (seed excluded)
    seed: int
    config: Config
    data_checksum: str = ""  # sha256 of the task's data: the cell is what it ran on, not where the data lay

    @property
    def group(self) -> tuple[str, ...]:
        return tuple(self.labels.values())


@dataclass
class Plan:
    spec: AblationSpec
    cells: list[Cell] = field(default_factory=list)
    skipped: list[tuple[dict[str, str], str]] = field(default_factory=list)  # (labels, reason)


@dataclass
class AblationSpec:
    name: str
    path: str
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    exclude: list[str]
    metrics: list[str]
    description: str = ""
    baseline: str | None = None  # label of the row every other row is compared with, paired by seed

    def config_hash(self) -> str:
        """Hash of everything that decides the results (the resolved base, axes, exclude list)."""
        data = {"base": self.base, "axes": self.axes, "exclude": self.exclude}  # baseline changes the report only
        return content_hash(data)


def load_spec(path: str | Path) -> AblationSpec:
    p = Path(path)
    data = read_config_file(p, "name, description, base, axes, exclude, metrics, baseline", what="ablation file")
    return parse_spec(data, name=p.stem, path=str(p), here=p.parent)


def parse_spec(data: dict[str, Any], *, name: str = "ablation", path: str = "", here: Path = Path(".")) -> AblationSpec:
    valid_keys = {"name", "description", "base", "axes", "exclude", "metrics", "baseline"}
    unknown = set(data) - valid_keys
    if unknown:
        raise ConfigError(f"ablation file has unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid_keys))}")
    base = data.get("base") or {}
    if isinstance(base, str):
        base = _read_base(base, here)
    if not isinstance(base, dict):
        raise ConfigError("ablation 'base' must be a config mapping or the path of a config file")
    axes = data.get("axes") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise ConfigError("ablation 'axes' must map each axis (task, router, seed or a dotted config key) to a non-empty list")
    axes = {("seed" if k == "seeds" else k): v for k, v in axes.items()}
    for key in axes:
        if key not in SPECIAL_AXES:
            check_key(key)
    metrics = data.get("metrics") or list(DEFAULT_METRICS)
    bad = [m for m in metrics if m not in KNOWN_METRICS]
    if bad:
        raise ConfigError(f"unknown metric(s) {', '.join(bad)}; valid metrics: {', '.join(KNOWN_METRICS)}")
    exclude = list(data.get("exclude") or [])
    baseline = data.get("baseline")
    if baseline is not None and not isinstance(baseline, str):
        raise ConfigError(f"ablation 'baseline' must be the label of one row (axis labels joined by ' / '), got {baseline!r}")
    return AblationSpec(str(data.get("name") or name), path, base, axes, exclude, list(metrics), str(data.get("description") or ""), baseline)


def _read_base(text: str, here: Path) -> dict[str, Any]:
    for candidate in (here / text, Path(text)):
        if candidate.is_file():
            return read_config_file(candidate, what="base config")
    raise ConfigError(f"base config file {text!r} does not exist (looked beside the ablation file and in the current folder)")


def check_key(key: str) -> None:
    """A dotted config key names a real field (router.* and task.* are checked per component later)."""
    parts = key.split(".")
    top = set(Config.model_fields)
    if parts[0] not in top:
        raise ConfigError(f"unknown config key {key!r}; valid sections and keys: {', '.join(sorted(top))}")
    if parts[0] in SECTION_MODELS:
        fields = Config.model_fields[parts[0]].annotation.model_fields
        if len(parts) != 2 or parts[1] not in fields:
            raise ConfigError(f"unknown config key {key!r}; valid {parts[0]} keys: {', '.join(sorted(fields))}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")[:48] or "x"


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _component(axis: str, value: Any, from_all: bool = False) -> tuple[str, dict[str, Any], dict[str, Any], bool]:
    """(label, section, extra overrides, expanded-from-all) of a task or router axis entry."""
    if isinstance(value, str):
        return value, {"name": value}, {}, from_all
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"each {axis} axis entry must be a name or a mapping with 'name', got {value!r}")
    value = dict(value)
    label = value.pop("label", None)
    extra = value.pop("set", None) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{axis} entry {value['name']!r}: 'set' must map dotted config keys to values")
    for key in extra:
        check_key(key)
    params = {k: v for k, v in value.items() if k != "name"}
    if label is None:
        label = value["name"]
        if axis == "router" and params:
            label += "(" + ",".join(f"{k}={_fmt(v)}" for k, v in params.items()) + ")"
    return str(label), value, extra, from_all


def _axis_entries(spec: AblationSpec, axis: str) -> list[tuple[str, dict[str, Any], dict[str, Any], bool]]:
    from routerlab.routers import router_names

    out = []
    for value in spec.axes[axis]:
        if axis == "router" and value == "all":
            listed = {v if isinstance(v, str) else v.get("name") for v in spec.axes[axis]}
            for name in router_names():
                if name not in spec.exclude and name not in listed:
                    out.append(_component(axis, name, from_all=True))
        else:
            out.append(_component(axis, value))
    labels = [entry[0] for entry in out]
    twice = sorted({l for l in labels if labels.count(l) > 1})
    if twice:
        raise ConfigError(f"{axis} axis has entries with the same label {', '.join(twice)}; give each a distinct 'label'")
    return out


def _set_key(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    set_key(data, key, copy.deepcopy(value))
    return data


def data_checksum(task: Any) -> str:
    """sha256 of a task's data content: its own `data_checksum` when it has one, else every split's tensors
    (and a vocabulary, where token ids index one)."""
    own = getattr(task, "data_checksum", None)
    if own is not None:
        return own() if callable(own) else str(own)
    import numpy as np
    import torch

    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(np.ascontiguousarray(value.detach().cpu().numpy()).tobytes())
        elif isinstance(value, (tuple, list)):
            for item in value:
                feed(item)
        elif isinstance(value, dict):
            for key in sorted(value):
                digest.update(str(key).encode())
                feed(value[key])
        else:
            digest.update(repr(value).encode())

    feed(getattr(task, "data", {}))
    feed(getattr(task, "chars", None))
    return digest.hexdigest()


def cell_id(config: Config, labels: dict[str, str], checksum: str = "") -> str:
    """Deterministic from what decides the cell's results, so a changed file never reuses a stale cell.

    The data enters by its checksum; task parameters that are paths (a corpus file) do not, so the same
    file from another folder, or other text at the same path, is told apart by what it holds."""
    data = config.model_dump(mode="json")
    data.pop("run")
    data["train"].pop("device")
    if checksum:
        data["task"] = {k: v for k, v in data["task"].items() if not (isinstance(v, str) and _is_path(v))}
        data["data_checksum"] = checksum
    digest = content_hash(data)
    parts = [v if k in SPECIAL_AXES else f"{k.split('.')[-1]}={v}" for k, v in labels.items()]
    return _slug("-".join(parts))[:64] + f"-s{config.seed}-{digest}"


def _is_path(value: str) -> bool:
    return "/" in value or "\\" in value or Path(value).exists()


def _router_seed_follows_run(data: dict[str, Any], seed: int) -> dict[str, Any]:
    """A router's own `seed` (a hash table) follows the run seed unless the file pins it."""
    from routerlab.routers.registry import param_fields, router_entry

    router = data.get("router")
    if not isinstance(router, dict) or "name" not in router or "seed" in router:
        return data
    try:
        _, params = router_entry(router["name"])
    except ConfigError:
        return data  # make_config reports the unknown name
    if "seed" in param_fields(params):
        data = {**data, "router": {**router, "seed": seed}}
    return data


def expand(spec: AblationSpec, runs_dir: str | Path) -> Plan:
    """Every cell of the grid, validated (config and router/task compatibility) before anything runs."""
    from routerlab.models import build_model
    from routerlab.tasks import build_task
    from routerlab.train import check_compatible

    tasks = _axis_entries(spec, "task") if "task" in spec.axes else [(None, None, {}, False)]
    routers = _axis_entries(spec, "router") if "router" in spec.axes else [(None, None, {}, False)]
    others = [k for k in spec.axes if k not in SPECIAL_AXES]
    seeds = spec.axes.get("seed", [spec.base.get("seed", 0)])
    plan = Plan(spec)
    task_cache: dict[str, Any] = {}
    seen: set[str] = set()
    for task, router, *values in itertools.product(tasks, routers, *(spec.axes[k] for k in others)):
        data = copy.deepcopy(spec.base)
        labels: dict[str, str] = {}
        for axis, (label, section, extra, _) in (("task", task), ("router", router)):
            if section is not None:
                data[axis] = copy.deepcopy(section)
                labels[axis] = label
                for key, value in extra.items():
                    data = _set_key(data, key, value)
        for key, value in zip(others, values):
            data = _set_key(data, key, value)
            labels[key] = _fmt(value)
        from_all = router[3]
        for seed in seeds:
            data["seed"] = seed
            data["run"] = {**data.get("run", {}), "dir": str(runs_dir)}
            data["run"].setdefault("checkpoint", False)
            try:
                config = make_config(_router_seed_follows_run(data, seed))
            except ConfigError as err:
                if from_all:
                    plan.skipped.append((labels, str(err)))
                    break
                raise ConfigError(f"cell {' / '.join(labels.values()) or 'base'} (seed {seed}): {err}") from None
            try:
                key = json.dumps(config.task.as_dict(), sort_keys=True)
                if key not in task_cache:
                    task = build_task(config.task)
                    task_cache[key] = (task, data_checksum(task))
                task, checksum = task_cache[key]
                model = build_model(config.model, config.router, task)
                check_compatible(model, task, config)
            except ConfigError as err:
                plan.skipped.append((labels, str(err)))
                break
            cid = cell_id(config, labels, checksum)
            if cid in seen:
                raise ConfigError(f"two cells of the grid are the same run ({cid}); remove the duplicate axis value")
            seen.add(cid)
            config.run.name = cid
            plan.cells.append(Cell(cid, dict(labels), int(seed), config, checksum))
    if not plan.cells:
        raise ConfigError("the ablation has no runnable cell" + (f"; skipped: {plan.skipped[0][1]}" if plan.skipped else ""))
    rows = list(dict.fromkeys(group_label(c.labels) for c in plan.cells))
    if spec.baseline is not None and spec.baseline not in rows:
        raise ConfigError(f"baseline {spec.baseline!r} is not a row of the grid; valid rows: {', '.join(map(repr, rows))}")
    return plan


def group_label(labels: dict[str, str]) -> str:
    """A row's name in tables: its axis labels (seed excluded) joined by ' / '."""
    return " / ".join(labels.values()) or "base"
