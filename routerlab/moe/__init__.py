"""The MoE core: dispatch, grouped expert compute, combine, routing statistics. Imports torch only."""
from routerlab.moe.backends import BACKEND_REGISTRY, BACKENDS, ExpertBackend, register_backend
from routerlab.moe.experts import ExpertBank, expert_shard
from routerlab.moe.layer import DispatchPlan, LocalDispatch, MoELayer, capacity_for, combine, permute, plan_dispatch
from routerlab.moe.stats import RoutingStats, fluctuation, routing_metrics, specialization

__all__ = ["BACKENDS", "BACKEND_REGISTRY", "register_backend", "DispatchPlan", "ExpertBackend", "ExpertBank", "LocalDispatch", "MoELayer", "expert_shard", "combine", "permute", "plan_dispatch", "RoutingStats", "capacity_for", "fluctuation", "routing_metrics", "specialization"]
