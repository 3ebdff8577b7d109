"""expert_weighted: shared parameters as fedavg; expert e of a layer averaged with weights = tokens each
client routed to e in that layer this round, so clients that never used an expert do not dilute it."""
from __future__ import annotations

from torch import Tensor

from federated.aggregate import ClientUpdate
from federated.strategies import register_strategy
from federated.strategies.base import ExpertStrategy


@register_strategy("expert_weighted")
class ExpertWeighted(ExpertStrategy):
    @staticmethod
    def expert_weights(update: ClientUpdate, layer: str) -> Tensor | None:
        return update.tokens.get(layer)
