"""fedavg: every parameter averaged with weights = the client's number of training examples
(an expert row over the clients that held it)."""
from federated.strategies import register_strategy
from federated.strategies.base import ExpertStrategy


@register_strategy("fedavg")
class FedAvg(ExpertStrategy):
    pass
