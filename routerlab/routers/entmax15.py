"""1.5-entmax gating (Peters, Niculae & Martins 2019), capped at k_max experts per token.

entmax15(z) = [z/2 - tau]_+^2 with tau such that the result sums to 1: between softmax (dense) and sparsemax
(sparser); exact zeros. Capped like `sparsemax`: the map is taken over each token's k_max largest logits.
"""
from __future__ import annotations

from routerlab.routers.registry import register_router
from routerlab.routers.sparsemax import SparseGate, SparseGateParams, entmax15


@register_router("entmax15", SparseGateParams)
class Entmax15(SparseGate):
    """1.5-entmax over the k_max largest logits: 1..k_max experts per token, exact zeros."""

    cuda_graph_safe = True  # no Python state across steps, no host reads (always k_max slots, -1 where unused)
    pure_forward = True  # Router.forward_is_pure: MoELayer may graph it with the core

    transform = staticmethod(entmax15)
