"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

H(x)_i = (x W_g)_i + n_i * softplus((x W_noise)_i),  n_i ~ N(0, 1) in training
G(x)   = softmax(KeepTopK(H(x), k))
L_importance = w_importance * CV(sum_x G(x))^2
L_load       = w_load * CV(sum_x P(x))^2,  P(x)_i = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / softplus((x W_noise)_i))
CV^2 = population variance / mean^2. Both weight matrices start at zero, as in the paper.
Selection goes through the gate's `route_topk` with the noise added to the logits: softmax(KeepTopK(H, k)) is
the softmax of H renormalized over the kept k, so `score` replaces the softmax (s(H) over the kept k,
normalized), and the group limit, null experts and route_scale apply; the two losses are over the E real experts.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class NoisyTopKParams(GateParams):
    k: int = 2
    w_importance: float = 0.1
    w_load: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.w_importance >= 0 and self.w_load >= 0, "w_importance and w_load must be >= 0")


def cv_squared(v: Tensor) -> Tensor:
    return v.var(correction=0) / (v.mean().square() + 1e-10)


def normal_cdf(z: Tensor) -> Tensor:
    """Phi(z), as torch.distributions.Normal(0, 1).cdf computes it, without its argument check (a host sync on CUDA)."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def load_probability(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """P(x)_i: probability that expert i stays in the top k when only its own noise is redrawn."""
    num_experts = clean.shape[-1]
    if k >= num_experts:
        return torch.ones_like(clean)
    top = noisy.topk(k + 1, dim=-1).values
    threshold_if_in = top[:, k : k + 1]  # i is in the top k: it must beat the (k+1)-th value
    threshold_if_out = top[:, k - 1 : k]  # i is out: it must beat the k-th value
    is_in = noisy > threshold_if_in
    prob_if_in = normal_cdf((clean - threshold_if_in) / noise_std)
    prob_if_out = normal_cdf((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


@register_router("noisy_topk", NoisyTopKParams)
class NoisyTopK(GatedRouter):
    """Noisy top-k gating with learned noise and the importance and load losses."""

    def __init__(self, d_model: int, num_experts: int, params: NoisyTopKParams) -> None:
        super().__init__(d_model, num_experts, params)
        self.noise = nn.Linear(d_model, num_experts + params.null_experts, bias=False)
        if params.init_std == 0:  # the paper's zero init unless the gate option asks for a std
            nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)

    finishes_weights = True  # route_topk normalizes and scales
    cuda_graph_safe = True  # no Python state across steps, no host reads (the load's normal CDF is erf, not torch.distributions)
    refuses = {"normalize_k1": "its weights, a softmax over the kept logits, are normalized at every k, k=1 included"}

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        k, E = self.params.k, self.num_experts
        clean = self.gate_logits(x)
        noise = None
        if self.training:
            noise_std = F.softplus(F.linear(x.float(), self.noise.weight.float())) + 1e-2
            noise = torch.randn_like(clean) * noise_std
        out = self.route_topk(x, k, renormalize=True, normalize_k1=True, logits=clean, logit_noise=noise)
        routing = out.routing
        if self.training:
            gates = torch.zeros_like(out.scores).scatter(1, out.chosen, routing.weights.to(out.scores.dtype))[:, :E]
            if self.params.w_importance > 0:
                routing.aux["importance"] = self.params.w_importance * cv_squared(gates.sum(0))
            if self.params.w_load > 0:
                load = load_probability(clean, clean + noise, noise_std, k)[:, :E].sum(0)
                routing.aux["load"] = self.params.w_load * cv_squared(load)
        return routing
