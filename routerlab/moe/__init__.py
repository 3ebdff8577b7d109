"""The MoE core: dispatch, grouped expert compute, combine, routing statistics. Imports torch only."""
from routerlab.moe.experts import BACKENDS, ExpertBank
from routerlab.moe.layer import DispatchPlan, MoELayer, capacity_for, combine, permute, plan_dispatch
from routerlab.moe.stats import RoutingStats, fluctuation, routing_metrics, specialization

__all__ = ["BACKENDS", "DispatchPlan", "ExpertBank", "MoELayer", "combine", "permute", "plan_dispatch", "RoutingStats", "capacity_for", "fluctuation", "routing_metrics", "specialization"]
