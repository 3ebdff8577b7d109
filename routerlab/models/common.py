"""Pieces both models share: the MoE feed-forward block and the dense one it replaces."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.moe import ExpertBank, MoELayer
from routerlab.moe.shared import SharedExperts
from routerlab.registry import Spec
from routerlab.routers import build_router
from routerlab.routers.balancing import pooled_balance


class DenseFFN(nn.Module):
    """SwiGLU or GELU feed-forward, the dense counterpart of one expert."""

    def __init__(self, d_model: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        h = F.silu(self.w1(x)) * self.w3(x) if self.w3 is not None else F.gelu(self.w1(x))
        return self.w2(h)


def make_ffn(cfg, layer_index: int, router_spec: Spec) -> nn.Module:
    """MoE in every `moe_every`-th layer (counting from the last), a dense FFN elsewhere; moe_every=0: all dense."""
    is_moe = cfg.moe_every > 0 and (cfg.n_layers - 1 - layer_index) % cfg.moe_every == 0
    if not is_moe:
        return DenseFFN(cfg.d_model, cfg.dense_hidden or cfg.expert_hidden, cfg.activation)
    router = build_router(router_spec, cfg.d_model, cfg.num_experts)
    experts = ExpertBank(cfg.num_experts, cfg.d_model, cfg.expert_hidden, cfg.activation)
    shared = SharedExperts(cfg.d_model, cfg.shared_experts, cfg.shared_hidden or cfg.expert_hidden, cfg.shared_gate) if cfg.shared_experts else None
    return MoELayer(router, experts, cfg.capacity_factor, cfg.backend, shared=shared, eval_capacity_factor=cfg.eval_capacity_factor,
                    min_capacity=cfg.min_capacity, drop_policy=cfg.drop_policy)


class MoEModel(nn.Module):
    """What the trainer needs from a model: its MoE layers and their auxiliary losses."""

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def aux_losses(self) -> dict[str, Tensor]:
        out = {}
        parts = []
        for i, layer in enumerate(self.moe_layers()):
            for name, value in layer.aux_losses.items():
                out[f"layer{i}/{name}"] = value
            part = getattr(layer.router, "balance_part", None)
            if part is not None:  # a layer-pooled balance loss (gate option balance_layers: pool)
                parts.append(part)
                layer.router.balance_part = None
        if parts:
            out["pooled/balance_batch"] = pooled_balance(parts)
        return out
