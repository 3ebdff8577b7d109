"""MoE MLP classifier: input projection, residual pre-norm FFN blocks (MoE or dense), linear head."""
from __future__ import annotations

from torch import Tensor, nn

from routerlab.models.common import MoEModel, make_ffn
from routerlab.registry import Spec


class MoEClassifier(MoEModel):
    def __init__(self, cfg, router_spec: Spec, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(input_dim, cfg.d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.n_layers))
        self.ffns = nn.ModuleList(make_ffn(cfg, i, router_spec) for i in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_classes)

    def forward(self, inputs: Tensor, token_ids: Tensor | None = None) -> Tensor:
        x = self.embed(inputs)
        for norm, ffn in zip(self.norms, self.ffns):
            x = x + ffn(norm(x), token_ids)  # dropped tokens keep the residual
        return self.head(self.norm_out(x))
