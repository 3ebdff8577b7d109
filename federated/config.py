"""The federated config: a routerlab config (task, model, router, train, run) plus a `federated:`
section, validated by pydantic. Bad values raise ConfigError with what is valid.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from routerlab.config import Config, Strict, apply_overrides, make_config, read_config_file
from routerlab.errors import ConfigError, format_validation_error
from routerlab.tasks.base import task_entry

STRATEGIES = ("fedavg", "expert_weighted", "personal_router")
PARTITIONS = ("iid", "dirichlet", "classes", "contiguous")
DEFAULT_CONFIG = Path(__file__).with_name("digits.yaml")


class FederatedParams(Strict):
    strategy: str = "expert_weighted"
    num_clients: int = Field(10, ge=1)
    rounds: int = Field(5, ge=1)
    local_steps: int = Field(20, ge=1)  # trainer steps per client per round
    partition: str = "dirichlet"
    alpha: float = 1.0  # Dirichlet concentration; small = strong label skew
    classes_per_client: int = Field(2, ge=1)  # partition=classes
    partition_seed: int | None = None  # default: the config's seed
    min_examples: int = Field(8, ge=1)  # Dirichlet splits are redrawn until every client has this many
    proximal_mu: float = Field(0.0, ge=0)  # FedProx; works with every strategy
    fail_fraction: float = Field(0.0, ge=0, lt=1)  # clients that fail in each round
    fail_mode: Literal["raise", "disappear"] = "raise"
    round_timeout: float = Field(120.0, gt=0)  # seconds the server waits for replies
    target_accuracy: float = Field(0.8, gt=0, le=1)  # for "rounds to target"
    client_eval: bool = True  # evaluate the new global model on every client after each round
    sim_cpus: int = Field(2, ge=1)  # Ray simulation: CPUs (one client per CPU at a time)

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; valid strategies: {', '.join(STRATEGIES)}")
        return v

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
        if v not in PARTITIONS:
            raise ValueError(f"unknown partition {v!r}; valid partitions: {', '.join(PARTITIONS)}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"alpha must be > 0 (Dirichlet concentration; 0.1 = strong skew, 100 = nearly IID), got {v}")
        return v


@dataclass(frozen=True)
class FederatedSetup:
    """Everything a federation needs; travels to clients as JSON inside each message."""

    config: Config
    fed: FederatedParams

    def to_json(self) -> str:
        return json.dumps({**self.config.model_dump(mode="json"), "federated": self.fed.model_dump(mode="json")})

    @classmethod
    def from_json(cls, text: str) -> FederatedSetup:
        return make_setup(json.loads(text))


def make_setup(data: dict[str, Any]) -> FederatedSetup:
    data = dict(data)
    fed_data = data.pop("federated", None) or {}
    if not isinstance(fed_data, dict):
        raise ConfigError("the federated section must be a mapping (strategy, num_clients, rounds, ...)")
    config = make_config(data)
    try:
        fed = FederatedParams(**fed_data)
    except ValidationError as err:
        raise ConfigError(f"invalid federated config: {format_validation_error(err)}") from None
    check_setup(config, fed)
    return FederatedSetup(config, fed)


def check_setup(config: Config, fed: FederatedParams) -> None:
    lm = task_entry(config.task.name).obj.kind == "lm"
    if lm and fed.partition != "contiguous":
        raise ConfigError(f"task {config.task.name!r} is split into contiguous slices of the corpus; set federated.partition=contiguous (got {fed.partition!r})")


def load_setup(path: str | Path | None, overrides: list[str] = ()) -> FederatedSetup:
    """Read a federated config (default: federated/digits.yaml) and apply `--set key=value` overrides."""
    data = read_config_file(path if path is not None else DEFAULT_CONFIG, "task, model, router, train, run, federated")
    return make_setup(apply_overrides(data, list(overrides)))
