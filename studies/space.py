"""Study definitions: search spaces as data (YAML), checked against the config and router registry.

A study file (studies/defs/NAME.yaml, or any path) holds

    description: one line
    base: {task: ..., model: ..., router: ..., train: ...}   # a routerlab config, inline
    objectives: [{metric: loss, direction: minimize}]        # several = multi-objective (Pareto)
    pruner: {type: median}                                   # median | hyperband | none (single objective)
    sampler: {type: tpe, seed: 0}                            # tpe | random
    n_trials: 30
    baseline: true                                           # trial 0 = the base config as it is
    space:                                                   # config key -> distribution
      model.num_experts: {choice: [4, 8, 16]}
      train.lr: {float: [1.0e-3, 1.0e-2], log: true}
    routers: [softmax_topk, switch]                          # router families; several = router.name searched
    router_space: {switch: {alpha: {float: [1.0e-3, 1.0e-1], log: true}}}   # replaces the family's library space

A router family's parameters come from studies/spaces/routers.yaml unless `router_space` replaces them;
they are sampled only in trials of that family (conditional parameters).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from routerlab.config import ModelConfig, Strict, TrainConfig, make_config, set_key
from routerlab.errors import ConfigError, format_validation_error
from routerlab.routers.registry import param_fields, router_entry

HERE = Path(__file__).parent
DEFS_DIR = HERE / "defs"
ROUTER_SPACES = HERE / "spaces" / "routers.yaml"

# evaluation metrics a study may optimize (Trainer.evaluate keys; LM tasks add perplexity)
METRICS = (
    "loss", "accuracy", "perplexity", "train_loss", "load_cv", "max_vio", "dropped_frac", "dead_experts",
    "router_entropy", "usage_entropy", "z_value", "max_logit", "switch_balance", "specialization",
    "params_total", "params_active", "tokens_per_s",
)


class Dist(Strict):
    """One parameter's distribution: exactly one of int: [low, high], float: [low, high], choice: [...]."""

    int_: tuple[int, int] | None = Field(None, alias="int")
    float_: tuple[float, float] | None = Field(None, alias="float")
    choice: list[Any] | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "Dist":
        kinds = [k for k in ("int_", "float_", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of int: [low, high], float: [low, high], choice: [values]")
        bounds = self.int_ or self.float_
        if bounds is not None:
            low, high = bounds
            if low > high:
                raise ValueError(f"low {low} is above high {high}")
            if self.log and low <= 0:
                raise ValueError(f"a log scale needs low > 0, got {low}")
            if self.log and self.step is not None:
                raise ValueError("log and step cannot be combined")
        elif self.log or self.step is not None:
            raise ValueError("log and step apply to int and float ranges, not choice")
        elif not self.choice:
            raise ValueError("choice needs at least one value")
        return self

    def suggest(self, trial, name: str) -> Any:
        if self.int_ is not None:
            return trial.suggest_int(name, *self.int_, step=int(self.step or 1), log=self.log)
        if self.float_ is not None:
            return trial.suggest_float(name, *self.float_, step=self.step, log=self.log)
        return trial.suggest_categorical(name, self.choice)

    def corners(self) -> list[Any]:
        """The values that validation tries: both ends of a range, every choice."""
        return list(self.choice) if self.choice is not None else list(self.int_ or self.float_)

    def contains(self, value: Any) -> bool:
        if self.choice is not None:
            return value in self.choice
        low, high = self.int_ or self.float_
        return isinstance(value, (int, float)) and low <= value <= high


class Objective(Strict):
    metric: str
    direction: Literal["minimize", "maximize"] = "minimize"


class Pruner(Strict):
    type: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)  # median: trials that finish before pruning starts
    n_warmup_steps: int = Field(0, ge=0)  # median: steps of a trial before it may be pruned
    min_resource: int | None = Field(None, ge=1)  # hyperband: steps every trial gets (default train.eval_every)
    reduction_factor: int = Field(3, ge=2)  # hyperband


class Sampler(Strict):
    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0


class StudySpec(Strict):
    name: str = ""
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(metric="loss")], min_length=1)
    pruner: Pruner | None = None
    sampler: Sampler = Field(default_factory=Sampler)
    n_trials: int = Field(20, ge=0)
    baseline: bool = False
    space: dict[str, Dist] = Field(default_factory=dict)
    routers: list[str] = Field(default_factory=list)
    router_space: dict[str, dict[str, Dist]] = Field(default_factory=dict)
    enqueue: list[dict[str, Any]] = Field(default_factory=list)  # fixed trials to run first (by param name)

    # filled by validate(): the family -> {param: Dist} actually searched
    families: dict[str, dict[str, Dist]] = Field(default_factory=dict, exclude=True)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def run_dir(self) -> Path:
        return Path(self.base.get("run", {}).get("dir", "runs")) / "studies" / self.name

    # ---- sampling --------------------------------------------------------------------------------
    def param_name(self, family: str, param: str) -> str:
        # one family: plain config keys; several: prefixed, so k of switch and k of noisy_topk stay apart
        return f"router.{param}" if len(self.families) <= 1 else f"{family}.{param}"

    def sample(self, trial) -> dict[str, Any]:
        """Draw a trial's parameters; return them as config overrides {config key: value}."""
        values = {key: dist.suggest(trial, key) for key, dist in self.space.items()}
        if self.families:
            names = list(self.families)
            family = trial.suggest_categorical("router.name", names) if len(names) > 1 else names[0]
            values["router.name"] = family
            for param, dist in self.families[family].items():
                values[f"router.{param}"] = dist.suggest(trial, self.param_name(family, param))
        return values

    def config_data(self, values: dict[str, Any]) -> dict[str, Any]:
        """The base config with these overrides; a new router family starts from its own defaults."""
        data = copy.deepcopy(self.base)
        router = dict(data.get("router") or {"name": "softmax_topk"})
        family = values.get("router.name", router.get("name", "softmax_topk"))
        if family != router.get("name", "softmax_topk"):
            router = {"name": family}
        data["router"] = router
        for key, value in values.items():
            set_key(data, key, value)
        return data

    def baseline_params(self) -> dict[str, Any]:
        """The base config's values under this study's parameter names (trial 0 when baseline: true)."""
        config = make_config(self.base)
        dump = config.model_dump()
        params: dict[str, Any] = {}
        for key, dist in self.space.items():
            section, _, field = key.partition(".")
            params[key] = dump["seed"] if section == "seed" else dump[section][field]
        if self.families:
            family = config.router.name
            if family not in self.families:
                raise ConfigError(f"study {self.name!r}: baseline: the base router {family!r} is not among routers {list(self.families)}")
            if len(self.families) > 1:
                params["router.name"] = family
            for param in self.families[family]:
                params[self.param_name(family, param)] = getattr(config.router.params, param)
        return params

    # ---- validation ------------------------------------------------------------------------------
    def validate_against_registry(self) -> "StudySpec":
        where = f"study {self.name!r}"
        for o in self.objectives:
            if o.metric not in METRICS:
                raise ConfigError(f"{where}: unknown objective metric {o.metric!r}; valid: {', '.join(METRICS)}")
        if self.multi_objective and self.pruner is not None and self.pruner.type != "none":
            raise ConfigError(f"{where}: pruning works with one objective only; remove 'pruner' or keep one objective")
        base = make_config(self.base)  # the base itself must be a valid config
        self.base = base.model_dump(mode="json")
        self.base.setdefault("run", {})
        for key in self.space:
            check_space_key(where, key)
        library = load_router_library()
        self.families = {}
        for family in self.routers:
            _, params_model = router_entry(family)  # unknown family: ConfigError listing valid routers
            space = self.router_space.get(family, library.get(family))
            if space is None:
                raise ConfigError(f"{where}: router {family!r} has no search space in {ROUTER_SPACES.name} and none in router_space; add one")
            fields = param_fields(params_model)
            for param in space:
                if param == "name" or param not in fields:
                    raise ConfigError(f"{where}: router {family!r} has no parameter {param!r}; valid: {', '.join(sorted(fields))}")
            self.families[family] = space
        for family in self.router_space:
            if family not in self.routers:
                raise ConfigError(f"{where}: router_space names {family!r}, which is not in routers {self.routers}")
        self._check_corners(where)
        if self.baseline:
            for name, value in self.baseline_params().items():
                dist = self._dist_of(name)
                if not dist.contains(value):
                    raise ConfigError(f"{where}: baseline: the base value {name}={value!r} lies outside its space {dist.corners()}; widen the space or set baseline: false")
        return self

    def _dist_of(self, name: str) -> Dist:
        if name in self.space:
            return self.space[name]
        if name == "router.name":
            return Dist(choice=list(self.families))
        for family, space in self.families.items():
            for param, dist in space.items():
                if self.param_name(family, param) == name:
                    return dist
        raise KeyError(name)

    def _check_corners(self, where: str) -> None:
        """Build a config at every range end and every choice, one parameter at a time."""
        families = list(self.families) or [None]
        for family in families:
            fixed = {} if family is None else {"router.name": family}
            trials = [dict(fixed)]
            for key, dist in self.space.items():
                trials += [{**fixed, key: v} for v in dist.corners()]
            for param, dist in (self.families.get(family) or {}).items():
                trials += [{**fixed, f"router.{param}": v} for v in dist.corners()]
            for values in trials:
                try:
                    make_config(self.config_data(values))
                except ConfigError as err:
                    raise ConfigError(f"{where}: space value {values} gives an invalid config: {err}") from None
        # k above the smallest expert count would fail every such trial: refuse it now
        experts = self.space.get("model.num_experts")
        fewest = min(experts.corners()) if experts else self.base["model"]["num_experts"]
        for family, space in self.families.items():
            k = space.get("k")
            if k is not None and max(k.corners()) > fewest:
                raise ConfigError(f"{where}: router {family!r}: k reaches {max(k.corners())} but there may be only {fewest} experts; keep k <= {fewest}")


def check_space_key(where: str, key: str) -> None:
    section, _, field = key.partition(".")
    fields = {"model": ModelConfig.model_fields, "train": TrainConfig.model_fields}
    if key == "seed":
        return
    if section == "task" and field and field != "name":
        return  # checked against the task's parameters when the corner configs are built
    if section in fields and field in fields[section]:
        return
    if section == "router":
        raise ConfigError(f"{where}: space key {key!r}: router parameters go under 'routers' / 'router_space', per family")
    valid = [f"model.{f}" for f in ModelConfig.model_fields] + [f"train.{f}" for f in TrainConfig.model_fields]
    raise ConfigError(f"{where}: space key {key!r} is not a config key; valid: seed, task.<param>, {', '.join(valid)}")


def parse_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping")
    return data


def load_router_library(path: Path = ROUTER_SPACES) -> dict[str, dict[str, Dist]]:
    """The per-family search spaces (not yet checked against the registry: validate_router_library does)."""
    data = parse_yaml(path, "router space library")
    out = {}
    for family, space in data.items():
        try:
            out[family] = {param: Dist(**(dist or {})) for param, dist in (space or {}).items()}
        except ValidationError as err:
            raise ConfigError(f"{path.name}: router {family!r}: {format_validation_error(err)}") from None
    return out


def validate_router_library(path: Path = ROUTER_SPACES) -> list[str]:
    """Check every family of the library against the registry; return the families."""
    families = load_router_library(path)
    for family, space in families.items():
        _, params_model = router_entry(family)
        fields = param_fields(params_model)
        unknown = sorted(set(space) - set(fields))
        if unknown:
            raise ConfigError(f"{path.name}: router {family!r} has no parameter {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    return sorted(families)


def available_studies() -> list[str]:
    return sorted(p.stem for p in DEFS_DIR.glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"study file {str(path)!r} does not exist")
        return path
    candidate = DEFS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown study {name_or_path!r}; valid: {', '.join(available_studies())} (or a path to a .yaml file)")
    return candidate


def load_study(name_or_path: str, overrides: list[str] = ()) -> StudySpec:
    """Read, validate and return a study definition; `overrides` (key=value) change its base config."""
    from routerlab.config import apply_overrides

    path = resolve(name_or_path)
    data = parse_yaml(path, "study file")
    data.setdefault("name", path.stem)
    try:
        spec = StudySpec(**data)
    except ValidationError as err:
        raise ConfigError(f"study {data['name']!r}: {format_validation_error(err)}") from None
    if not spec.name or any(c in spec.name for c in "/\\ "):
        raise ConfigError(f"study name {spec.name!r} must be non-empty, without spaces or slashes")
    if overrides:
        spec.base = apply_overrides(spec.base, list(overrides))
    return spec.validate_against_registry()


