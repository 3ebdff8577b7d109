"""The oracle router, for analysis only: each probe token goes to the single expert under which its loss
is lowest (found by `routerlab analyze`, which tries every expert), or every token to one expert.

It reads the answer (the targets), so it is neither causal nor trainable: it bounds what a top-1 router
could reach on the probe set, and its forced mode (`expert` >= 0) is the single-expert counterfactual the
regret analysis measures. With `trace` it replays an oracle trace (written by `routerlab analyze` as
<run>/analysis/oracle.npz) by token order, exactly as `replay` does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require
from routerlab.routers.replay import Replay, ReplayParams


@dataclass(frozen=True)
class OracleParams(RouterParams):
    expert: int = -1  # >= 0: every token to this expert (weight 1); -1: replay the oracle trace
    trace: str = ""  # oracle trace (<run>/analysis/oracle.npz) when expert = -1
    layer: int = -1  # as in replay
    allow_noncausal: bool = False  # opt in to running it on a causal LM (it has seen the targets)

    def __post_init__(self) -> None:
        require(self.expert >= 0 or bool(self.trace), "oracle needs expert >= 0 (force one expert) or trace (an oracle trace from 'routerlab analyze')")


@register_router("oracle", OracleParams)
class Oracle(Router):
    """Analysis only: the lowest-loss single expert per probe token (from analyze), or one forced expert."""

    causal = False  # the choice was made from the targets

    def __init__(self, d_model: int, num_experts: int, params: OracleParams) -> None:
        super().__init__(d_model, num_experts, params)
        if params.expert >= num_experts:
            from routerlab.errors import ConfigError

            raise ConfigError(f"oracle: expert={params.expert} but the model has {num_experts} experts; use 0..{num_experts - 1}")
        self.replay = None if params.expert >= 0 else Replay(d_model, num_experts, ReplayParams(trace=params.trace, layer=params.layer, check_tokens=True))

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        if self.replay is not None:
            return self.replay(x, token_ids=token_ids)
        experts = torch.full((x.shape[0], 1), self.params.expert, dtype=torch.long, device=x.device)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device))


def forced(d_model: int, num_experts: int, expert: int) -> Oracle:
    """An oracle router that sends every token to `expert` (the regret analysis swaps it in)."""
    return Oracle(d_model, num_experts, OracleParams(expert=expert))
