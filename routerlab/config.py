"""Run configuration: plain data (YAML), validated by pydantic.

A config has five parts: task, model, router, train, run. `task` and `router` are written as
`{"name": ..., **params}` mappings and parsed once, when the config is read, into typed `Spec`s
(`routerlab.registry`) checked against the registered component's own parameters.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, field_validator, model_validator

from routerlab.errors import ConfigError, format_validation_error
from routerlab.moe.experts import ACTIVATIONS
from routerlab.registry import Registry, Spec, load_plugin
from routerlab.routers.registry import ROUTERS
from routerlab.tasks.base import TASKS


DEFAULT_TASK = "chars"
DEFAULT_ROUTER = "softmax_topk"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lr=inf or .nan trains to NaN: refuse at parse time


def spec_field(registry: Registry, default: str) -> Any:
    """A config section `{"name": ..., **params}` parsed into a typed Spec (name defaults to `default`);
    dumped back to the same mapping, so YAML, fingerprints and checkpoints see plain data."""

    def parse(value: Any) -> Spec:
        if isinstance(value, Spec):
            return registry.parse(value)
        if not isinstance(value, Mapping):
            raise ValueError(f"must be a mapping of name and parameters (for example {{name: {default}}}), got {value!r}")
        return registry.parse({"name": default, **value})

    return Annotated[Spec, PlainValidator(parse), PlainSerializer(Spec.as_dict, return_type=dict[str, Any])]


TaskSpec = spec_field(TASKS, DEFAULT_TASK)
RouterSpec = spec_field(ROUTERS, DEFAULT_ROUTER)


class ModelConfig(Strict):
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)  # language models only
    moe_every: int = Field(1, ge=0)  # MoE FFN in every n-th layer (the last always); 0 = dense model
    num_experts: int = Field(8, ge=1)
    expert_hidden: int = Field(128, ge=1)
    dense_hidden: int | None = Field(None, ge=1)  # hidden size of dense FFN layers; default expert_hidden
    activation: Literal[ACTIVATIONS] = "swiglu"
    capacity_factor: float | None = Field(None, gt=0)  # None = dropless
    eval_capacity_factor: Annotated[float, Field(gt=0)] | Literal["train"] | None = "train"  # at evaluation: "train" = capacity_factor, None = dropless
    min_capacity: int = Field(1, ge=1)  # slots per expert never below this (when capacity_factor is set)
    drop_policy: Literal["position", "probability"] = "position"  # over capacity drop later slots, or lowest weights
    shared_experts: int = Field(0, ge=0)  # always-on experts beside the routed ones (DeepSeekMoE, Qwen-MoE)
    shared_hidden: int | None = Field(None, ge=1)  # hidden size of each shared expert; default expert_hidden
    shared_gate: bool = False  # scale the shared output by a learned per-token sigmoid (Qwen-MoE)
    backend: str = "auto"  # an expert backend's name (routerlab/moe/backends.py: auto, loop, grouped, padded, or a plugin's)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from routerlab.moe.backends import BACKEND_REGISTRY

        if v not in BACKEND_REGISTRY:  # plugin files (config `plugins`) are loaded before this section is checked
            raise ValueError(f"unknown expert backend {v!r}; valid: {', '.join(BACKEND_REGISTRY.names())}")
        return v


class TrainConfig(Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(4, ge=1)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(0, ge=0)  # 0 = only at the end
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop the run, or skip that update
    device: str = "cpu"
    # fp32: everything float32 (TF32 matmuls on CUDA unless tf32=false); bf16-mixed: float32 master weights and
    # optimizer state, forward and backward in bfloat16 (torch.autocast), learned gates in float32;
    # bf16-pure: weights, optimizer state and compute all bfloat16 (updates below a bf16 ulp are lost)
    precision: Literal["fp32", "bf16-mixed", "bf16-pure"] = "fp32"
    dtype: Literal["float32", "bfloat16"] | None = None  # old key: float32 -> fp32, bfloat16 -> bf16-pure
    micro_batches: int = Field(1, ge=1)  # gradient accumulation: a step = micro_batches x batch_size sequences
    timing_skip: int = Field(10, ge=0)  # first steps left out of tokens/s, step time and MFU (JIT, allocator warm-up)
    peak_flops: float | None = Field(None, gt=0)  # the card's bf16 peak FLOP/s for MFU; None = known cards by name (docs/gpu.md)
    # torch.compile of the model (routerlab/compile.py): "dense" = everything but the MoE layers, "moe" = the MoE
    # layers too; "auto" = off for now (measured slower in the trainer before a router fix; see compile.py)
    compile: Literal["auto", "off", "dense", "moe"] = "auto"
    tf32: bool = True  # float32 matmuls on CUDA (fp32 runs; the float32 router gates of bf16 runs) in TF32; false = full fp32
    # CUDA: capture a micro-batch's forward + backward once as a CUDA graph and replay it (routerlab/step_graph.py) when
    # the step qualifies (one process, routers declared graph-safe, no extra loss terms); where only the routers are
    # graph-safe, each MoE layer's dispatch + experts + combine instead, with the router where its forward is pure
    # (routerlab/moe/core_graph.py); false: every kernel launched eagerly; CPU: ignored
    cuda_graph: bool = True
    # CUDA: the AdamW step as routerlab's Triton kernel (routerlab/adamw.py: fewer bytes moved) or torch's fused
    # AdamW; the same state and semantics either way. CPU: torch's AdamW, ignored
    optimizer_kernel: Literal["triton", "torch"] = "triton"

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v):  # YAML and command-line overrides read off / on as booleans
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="before")
    @classmethod
    def _dtype_to_precision(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("dtype") is not None:
            mapped = {"float32": "fp32", "bfloat16": "bf16-pure"}.get(data["dtype"])
            if mapped is None:
                raise ValueError(f"dtype {data['dtype']!r} is not supported; use precision: fp32 | bf16-mixed | bf16-pure")
            if data.get("precision") not in (None, mapped):
                raise ValueError(f"dtype={data['dtype']} (old key, means precision={mapped}) contradicts precision={data['precision']}; set only precision")
            data = {**data, "precision": mapped, "dtype": None}
        return data

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        kind, _, index = v.partition(":")
        if kind not in ("cpu", "cuda") or (":" in v and not index.isdigit()):  # N is a GPU index
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {v!r}")
        return v


class ParallelConfig(Strict):
    expert: int = Field(1, ge=1)  # expert-parallel group size (ranks the experts are split over); >1 needs torchrun


class RunConfig(Strict):
    dir: str = "runs"  # TensorBoard run folders go under here
    name: str | None = None  # default: <task>-<router>-s<seed>-<config hash>
    checkpoint: bool = True  # write <run folder>/checkpoint.pt


class Config(Strict):
    seed: int = 0
    task: TaskSpec = Field(default_factory=lambda: TASKS.parse({"name": DEFAULT_TASK}))
    model: ModelConfig = Field(default_factory=ModelConfig)
    router: RouterSpec = Field(default_factory=lambda: ROUTERS.parse({"name": DEFAULT_ROUTER}))
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    plugins: list[str] = Field(default_factory=list)  # Python files that register components (routers, tasks, ...)

    @model_validator(mode="before")
    @classmethod
    def _plugins_first(cls, data: Any) -> Any:
        # plugin files register components, so they load before those sections are checked
        if isinstance(data, dict):
            for path in data.get("plugins") or []:
                load_plugin(path)
        return data

    def fingerprint(self) -> str:
        """Hash of what determines the trained weights' meaning (not run length, logging or paths)."""
        data = self.model_dump(mode="json")
        for section, registry in (("task", TASKS), ("router", ROUTERS)):
            # name plus the parameters that differ from the component's defaults: a section left out, written
            # out in full, or dumped and read back hashes the same (a default section hashes by name alone, as before)
            spec = getattr(self, section)
            defaults = json.loads(json.dumps(registry.fields(spec.name), default=str))
            data[section] = {k: v for k, v in data[section].items() if k == "name" or defaults.get(k, object()) != v}
            source = plugin_source_hash(registry.entry(spec.name).obj)
            if source:  # a component from a plugin file: its code decides what the weights mean
                data[section]["plugin_source"] = source
        data.pop("run")
        data.pop("parallel")  # checkpoints move between rank counts
        for key in ("steps", "eval_every", "eval_batches", "log_every", "checkpoint_every", "device", "on_nonfinite", "cuda_graph",
                    "optimizer_kernel"):
            data["train"].pop(key)
        return content_hash(data)

    def run_name(self) -> str:
        return self.run.name or f"{self.task.name}-{self.router.name}-s{self.seed}-{self.fingerprint()}"


def plugin_source_hash(obj: Any) -> str | None:
    """sha256 of the plugin file that defines `obj`, or None for a built-in component."""
    import sys

    module = sys.modules.get(getattr(obj, "__module__", ""))
    path = getattr(module, "__file__", None)
    if module is None or not module.__name__.startswith("routerlab_plugin_") or not path:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalar or flow collection (3, 1e-3, true, null, [1, 2], {a: 1})."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides. Changing router.name or task.name drops the old component's params."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (for example train.steps=100), got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        section = data.get(key.split(".")[0])
        if key in ("router.name", "task.name") and isinstance(section, dict) and section.get("name") != value:
            section.clear()  # a new component starts from its own defaults
        set_key(data, key, parse_value(value), where="--set ")
    return data


def non_finite_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose value is a float inf or nan, at any depth."""
    if isinstance(data, dict):
        return [k for key, v in data.items() for k in non_finite_keys(v, f"{prefix}{key}.")]
    if isinstance(data, (list, tuple)):
        return [k for i, v in enumerate(data) for k in non_finite_keys(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if isinstance(data, float) and not math.isfinite(data) else []
def set_key(data: dict[str, Any], key: str, value: Any, where: str = "") -> None:
    """Set a dotted key (`train.lr`, `router.k`) in nested plain data, in place, making sections as needed.
    The one implementation of dotted overrides (--set, ablation axes, study parameters)."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}{key}: {part!r} is not a section")
    node[last] = value


def content_hash(data: Any) -> str:
    """Short sha256 of JSON-able data (keys sorted): config fingerprints, ablation cell ids, spec hashes."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


def make_config(data: dict[str, Any]) -> Config:
    try:
        config = Config(**data)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {format_validation_error(err)}") from None
    bad = non_finite_keys(config.model_dump())  # router and task params are parsed by their own registries
    if bad:
        raise ConfigError(f"invalid config: {bad[0]}: must be a finite number, got {dict_get(config.model_dump(), bad[0])}")
    return config


def dict_get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def read_config_file(path: str | Path, sections: str = "task, model, router, train, run", what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML file; a missing, unreadable or non-mapping file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {yaml_error_text(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of sections ({sections})")
    return data


def yaml_error_text(err: Exception) -> str:
    """The problem and where it is: 'mapping values are not allowed here (line 3, column 8)'."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data = read_config_file(path) if path is not None else {}
    return make_config(apply_overrides(data, list(overrides)))
