"""Run configuration: plain data (YAML), validated by pydantic.

A config has five parts: task, model, router, train, run. `task` and `router` are
`{"name": ..., **params}` dicts checked against the registered component's own parameters.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from routerlab.errors import ConfigError
from routerlab.routers.registry import format_validation_error, load_plugin, parse_router_params
from routerlab.tasks.base import parse_task_params


DEFAULT_TASK = "chars"
DEFAULT_ROUTER = "softmax_topk"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)  # language models only
    moe_every: int = Field(1, ge=0)  # MoE FFN in every n-th layer (the last always); 0 = dense model
    num_experts: int = Field(8, ge=1)
    expert_hidden: int = Field(128, ge=1)
    dense_hidden: int | None = Field(None, ge=1)  # hidden size of dense FFN layers; default expert_hidden
    activation: Literal["swiglu", "gelu"] = "swiglu"
    capacity_factor: float | None = Field(None, gt=0)  # None = dropless
    eval_capacity_factor: Annotated[float, Field(gt=0)] | Literal["train"] | None = "train"  # at evaluation: "train" = capacity_factor, None = dropless
    min_capacity: int = Field(1, ge=1)  # slots per expert never below this (when capacity_factor is set)
    drop_policy: Literal["position", "probability"] = "position"  # over capacity drop later slots, or lowest weights
    shared_experts: int = Field(0, ge=0)  # always-on experts beside the routed ones (DeepSeekMoE, Qwen-MoE)
    shared_hidden: int | None = Field(None, ge=1)  # hidden size of each shared expert; default expert_hidden
    shared_gate: bool = False  # scale the shared output by a learned per-token sigmoid (Qwen-MoE)
    backend: Literal["auto", "loop", "grouped", "padded"] = "auto"


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
    tf32: bool = True  # float32 on CUDA: TF32 matmuls (about 8x the fp32 rate on an H200); false = full fp32

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
        if v.split(":")[0] not in ("cpu", "cuda"):
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
    task: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_TASK})
    model: ModelConfig = Field(default_factory=ModelConfig)
    router: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_ROUTER})
    train: TrainConfig = Field(default_factory=TrainConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    plugins: list[str] = Field(default_factory=list)  # Python files that register routers or tasks

    @model_validator(mode="before")
    @classmethod
    def _plugins_first(cls, data: Any) -> Any:
        # plugin files register routers and tasks, so they load before those sections are checked
        if isinstance(data, dict):
            for path in data.get("plugins") or []:
                load_plugin(path)
        return data

    @field_validator("task")
    @classmethod
    def _task(cls, v: dict[str, Any]) -> dict[str, Any]:
        v = {"name": DEFAULT_TASK, **v}
        params = parse_task_params(v)
        return {"name": v["name"], **params.model_dump()}

    @field_validator("router")
    @classmethod
    def _router(cls, v: dict[str, Any]) -> dict[str, Any]:
        v = {"name": DEFAULT_ROUTER, **v}
        params = parse_router_params(v)
        return {"name": v["name"], **dataclasses.asdict(params)}

    def fingerprint(self) -> str:
        """Hash of what determines the trained weights' meaning (not run length, logging or paths)."""
        data = self.model_dump(mode="json")
        data.pop("run")
        data.pop("parallel")  # checkpoints move between rank counts
        for key in ("steps", "eval_every", "eval_batches", "log_every", "checkpoint_every", "device"):
            data["train"].pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]

    def run_name(self) -> str:
        return self.run.name or f"{self.task['name']}-{self.router['name']}-s{self.seed}-{self.fingerprint()}"


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
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        if parts[-1] == "name" and len(parts) == 2 and parts[0] in ("router", "task") and node.get("name") != value:
            node.clear()
        node[parts[-1]] = parse_value(value)
    return data


def make_config(data: dict[str, Any]) -> Config:
    try:
        return Config(**data)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {format_validation_error(err)}") from None


def read_config_file(path: str | Path, sections: str = "task, model, router, train, run", what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML file; a missing, unreadable or non-mapping file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of sections ({sections})")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data = read_config_file(path) if path is not None else {}
    return make_config(apply_overrides(data, list(overrides)))
