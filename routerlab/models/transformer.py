"""A small causal transformer LM (nanoGPT-shaped) whose feed-forward blocks are MoE layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.models.common import MoEModel, make_ffn
from routerlab.registry import Spec


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg, layer_index: int, router_spec: Spec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.ffn = make_ffn(cfg, layer_index, router_spec)

    def forward(self, x: Tensor, token_ids: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x), token_ids)


class MoETransformerLM(MoEModel):
    def __init__(self, cfg, router_spec: Spec, vocab_size: int, block_size: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, router_spec) for i in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)

    def forward(self, inputs: Tensor, token_ids: Tensor | None = None) -> Tensor:
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        x = self.tok(inputs) + self.pos(positions)
        for block in self.blocks:
            x = block(x, inputs)
        return self.head(self.norm_out(x))
