"""The MoE core: dispatch, grouped expert compute, combine, routing statistics. Imports torch only."""
from routerlab.moe.experts import BACKENDS, ExpertBank
from routerlab.moe.layer import MoELayer, capacity_for, dispatch
from routerlab.moe.stats import RoutingStats, fluctuation, routing_metrics, specialization

__all__ = ["BACKENDS", "ExpertBank", "MoELayer", "RoutingStats", "capacity_for", "dispatch", "fluctuation", "routing_metrics", "specialization"]
