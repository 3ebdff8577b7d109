"""DSelect-k (Hazimeh et al. 2021): differentiable selection of k experts through binary codes.

E = 2^m experts. k selectors; selector i has m logits z_i(x) = (Z x)_i and a smooth step
    S(t) = 0 (t <= -gamma/2),  1 (t >= gamma/2),  -2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2 otherwise;
r_i(x)_e = prod_j [S(z_ij) if bit j of e is 1 else 1 - S(z_ij)]  (a distribution over the E codes).
Gate q(x) = sum_i softmax(A x)_i r_i(x). q has exact zeros once the steps saturate; before that a token may
reach more than k experts (the number of non-zero q entries, capped by k_max if set). Aux loss:
entropy_reg * mean_x sum_i H(r_i(x)), which pushes selectors to binary (the paper's regularizer).
Routing logits: log q (clamped at 1e-9). Temperature divides the selector logits; the z-loss acts on the
selector-weight logits A x; gate smoothing is not applied (it would make the gate dense). Of the selection
options only route_scale applies (see `refuses`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from routerlab.errors import ConfigError
from routerlab.routers.base import Routing, z_loss
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class DSelectKParams(GateParams):
    k: int = 2  # number of selectors (at most k experts once converged)
    gamma: float = 1.0  # width of the smooth step
    entropy_reg: float = 1e-3  # selector entropy regularization
    k_max: int = 0  # cap on experts per token while not converged (0 = no cap)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.gamma > 0, f"gamma must be > 0, got {self.gamma}")
        require(self.entropy_reg >= 0, f"entropy_reg must be >= 0, got {self.entropy_reg}")
        require(self.k_max >= 0, f"k_max must be >= 0, got {self.k_max}")


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    inner = -2 / gamma**3 * t**3 + 3 / (2 * gamma) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), inner))


@register_router("dselect_k", DSelectKParams)
class DSelectK(GatedRouter):
    """k binary-code selectors with smooth steps, mixed by a softmax; sparse once the steps saturate."""

    refuses = {"score": "its gate is a softmax mixture of binary-code selectors, not a score of per-expert logits",
               "normalize_k1": "its gate q sums to 1 for every token, one expert included",
               "expert_groups": "its selectors pick experts by binary code, not by ranking per-expert scores",
               "top_groups": "its selectors pick experts by binary code, not by ranking per-expert scores",
               "null_experts": "its E = 2^m binary codes are the experts; there is no code for a null expert"}

    def __init__(self, d_model: int, num_experts: int, params: DSelectKParams) -> None:
        bits = round(math.log2(num_experts)) if num_experts >= 1 else 0
        if 2**bits != num_experts:
            raise ConfigError(f"router 'dselect_k' needs num_experts to be a power of two (binary codes); got {num_experts}")
        super().__init__(d_model, num_experts, params)
        self.bits = bits
        self.gate = nn.Linear(d_model, params.k * max(bits, 1), bias=False)  # selector logits Z
        self.selector_weights = nn.Linear(d_model, params.k, bias=False)  # A
        codes = torch.arange(num_experts)
        self.register_buffer("code_bits", ((codes[:, None] >> torch.arange(max(bits, 1))) & 1).float())  # [E, m]

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        p = self.params
        T, E = x.shape[0], self.num_experts
        alpha_logits = self.apply_temperature(self.raw_logits(x, self.selector_weights))
        if self.bits == 0:
            r = torch.ones(T, p.k, 1, device=x.device)
            sel = None
        else:
            z = self.apply_temperature(self.raw_logits(x)).view(T, p.k, self.bits)
            s = smooth_step(z, p.gamma)  # [T, k, m]
            # r[t, i, e] = prod_j (bit ? s : 1 - s)
            factors = s[:, :, None, :] * self.code_bits + (1 - s[:, :, None, :]) * (1 - self.code_bits)
            r = factors.prod(-1)  # [T, k, E]
            sel = r
        q = (alpha_logits.softmax(-1)[:, :, None] * r).sum(1)  # [T, E]
        used = q > 0
        if p.k_max:
            cap = min(p.k_max, E)
            top_q, top_i = q.topk(cap, dim=-1)
            keep = torch.zeros_like(used).scatter(1, top_i, top_q > 0)
            q = torch.where(keep, q, torch.zeros_like(q))
            q = q / q.sum(-1, keepdim=True).clamp_min(1e-9)
            used = keep
        kk = max(1, int(used.sum(1).max())) if T else 1
        order = torch.where(used, q.detach(), torch.full_like(q, -1.0)).argsort(dim=1, descending=True, stable=True)[:, :kk]
        chosen = used.gather(1, order)
        experts = torch.where(chosen, order, torch.full_like(order, -1))
        weights = torch.where(chosen, q.gather(1, order), torch.zeros_like(q[:, :kk]))
        logits = q.clamp_min(1e-9).log()
        aux = self.stability_losses(logits, experts)
        aux.pop("z_loss", None)
        if p.z_loss > 0:
            aux["z_loss"] = p.z_loss * z_loss(alpha_logits)
        if p.entropy_reg > 0 and sel is not None and self.training:
            ent = -(sel * sel.clamp_min(1e-12).log()).sum((1, 2)).mean()  # sum over selectors and codes, mean over tokens
            aux["selector_entropy"] = p.entropy_reg * ent
        return Routing(experts, weights.to(x.dtype), logits, aux)
