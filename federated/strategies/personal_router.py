"""personal_router: routers never leave the clients (FedMix / pFedMoE spirit); experts and shared
layers as expert_weighted. The server's own router stays the initial one."""
from federated.strategies import register_strategy
from federated.strategies.expert_weighted import ExpertWeighted


@register_strategy("personal_router")
class PersonalRouter(ExpertWeighted):
    local = (".router.",)
