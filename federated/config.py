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

PARTITIONS = ("iid", "dirichlet", "classes", "contiguous", "domains")
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
    node_wait: float = Field(120.0, gt=0)  # seconds the ServerApp waits for all SuperNodes to connect
    # expert-sparse communication: each client is sent (and returns) only `send_experts` experts per layer
    send_experts: int = Field(0, ge=0)  # 0 = every expert
    explore_experts: int = Field(1, ge=0)  # of those, slots for experts the client did not use most last round
    # unequal clients: the first `small_clients` partitions hold at most small_experts experts and route with small_k
    small_clients: int = Field(0, ge=0)
    small_experts: int = Field(0, ge=0)  # 0 = as the others
    small_k: int = Field(0, ge=0)  # 0 = the router's k
    # clients that never train: evaluated on the final model after 0 and adapt_steps local steps
    unseen_clients: int = Field(0, ge=0)
    adapt_steps: int = Field(0, ge=0)  # final evaluation: also after this many router-only / full fine-tuning steps

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        from federated.strategies import strategy_names

        if v not in strategy_names():
            raise ValueError(f"unknown strategy {v!r}; valid strategies: {', '.join(strategy_names())}")
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
    if lm and fed.partition not in ("contiguous", "domains"):  # domains: corpus tasks with domain labels (stdlib)
        raise ConfigError(f"task {config.task.name!r} is split into contiguous slices of the corpus; set federated.partition=contiguous (or domains for a corpus with domain labels, e.g. stdlib; got {fed.partition!r})")
    k = int(config.router.get("k", 1))
    num = config.model.num_experts
    for name, m, kk in (("send_experts", fed.send_experts, k), ("small_experts", fed.small_experts, fed.small_k or k)):
        if m and not kk <= m <= num:
            raise ConfigError(f"federated.{name}={m} must lie between the top-k ({kk}) and num_experts ({num}), or be 0 (= every expert)")
    if fed.small_k and fed.small_k > k:
        raise ConfigError(f"federated.small_k={fed.small_k} must be at most the router's k={k} (or 0 = the same)")
    if fed.small_k and "k" not in config.router:
        raise ConfigError(f"federated.small_k needs a router with a k parameter; router {config.router['name']!r} has none set")
    if fed.small_clients > fed.num_clients:
        raise ConfigError(f"federated.small_clients={fed.small_clients} exceeds federated.num_clients={fed.num_clients}")


def load_setup(path: str | Path | None, overrides: list[str] = ()) -> FederatedSetup:
    """Read a federated config (default: federated/digits.yaml) and apply `--set key=value` overrides."""
    data = read_config_file(path if path is not None else DEFAULT_CONFIG, "task, model, router, train, run, federated")
    return make_setup(apply_overrides(data, list(overrides)))
