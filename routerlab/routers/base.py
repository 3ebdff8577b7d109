"""The router contract: a router decides, the MoE core computes.

A router maps hidden states x [T, d] (and, when the task has them, token ids [T]) to a `Routing`:
which experts each token goes to, with which weights. Routers never touch expert weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from routerlab.routers.balancing import shares, slot_counts


@dataclass
class Routing:
    """What a router returns. Nothing else crosses the router/core boundary.

    experts: int64 [T, k]; -1 marks an unused slot (variable experts per token).
    weights: [T, k] combine weights; 0 in unused slots. Non-differentiable routers return them detached.
    logits:  [T, E] router scores before normalization, or None for routers without scores (hash).
    aux:     already-scaled scalar losses, added to the task loss by the trainer.
    """

    experts: Tensor
    weights: Tensor
    logits: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)


class Router(nn.Module):
    """Base class of every router. Subclasses set `needs_token_ids` and `causal` where they differ.

    Constructor: `Router(d_model, num_experts, params)` where params is the router's pydantic model.
    """

    needs_token_ids: bool = False  # hash-style routers read token ids instead of hidden states
    causal: bool = True  # False when one token's routing depends on other tokens of the batch

    def __init__(self, d_model: int, num_experts: int, params) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_experts = num_experts
        self.params = params

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:  # pragma: no cover
        raise NotImplementedError

    def forward_is_pure(self) -> bool:
        """Whether this forward writes no state, draws no random numbers and reads nothing on the host: then an eager
        MoELayer on CUDA replays it from a CUDA graph with its core, and replays it again where a backward needs its
        activations back (moe/core_graph.py). Its class says so with `pure_forward = True` (the class's own word: a
        subclass may add state), and nobody hooked into it (a hook would run only on the eager calls)."""
        return vars(type(self)).get("pure_forward", False) and not (self._forward_hooks or self._forward_pre_hooks)

    def before_step(self) -> None:
        """Called by the trainer after backward, before the optimizer step (e.g. a router-only grad clip)."""

    def after_step(self, stats) -> None:
        """Called by the trainer after each optimizer step with this layer's `RoutingStats`."""

    def extra_metrics(self) -> dict[str, float]:
        """Router-specific scalars for TensorBoard (e.g. adversary prices), logged by the trainer with the
        training routing metrics as routing/<name>/layer<i>; default none."""
        return {}

    def observe_token_loss(self, token_loss: Tensor) -> dict[str, Tensor]:
        """Called by the trainer in training, after the forward and before backward, with the detached
        per-token task loss [T] (tokens in the order this layer routed them). Returns extra already-scaled
        losses to add before backward (e.g. a policy-gradient surrogate); default none."""
        return {}


def topk_routing(probs: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Top-k experts of each row of probs, with their probabilities (optionally renormalized to sum 1)."""
    weights, experts = probs.topk(k, dim=-1)
    if renormalize and k > 1:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
    return experts, weights


def switch_balance_loss(probs: Tensor, experts: Tensor, num_experts: int, token_weights: Tensor | None = None) -> Tensor:
    """E * sum_i f_i * P_i (Fedus et al. 2021): f from the hard choices (-1 skipped), P the differentiable
    mean probability, optionally token-weighted (the importance-weighting option)."""
    f = shares(slot_counts(experts, num_experts, "all").to(probs.dtype))
    if token_weights is None:
        P = probs.mean(0)
    else:
        P = (token_weights[:, None] * probs).sum(0) / token_weights.sum().clamp_min(1e-9)
    return num_experts * (f * P).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).square().mean()
