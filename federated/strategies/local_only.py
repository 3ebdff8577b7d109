"""local_only (baseline): nothing leaves the clients; each trains its own model on its own data for the
same rounds x local_steps. Bytes are zero; the server's model stays the initial one."""
from federated.strategies import register_strategy
from federated.strategies.base import ExpertStrategy


@register_strategy("local_only")
class LocalOnly(ExpertStrategy):
    local = ("",)  # '' matches every parameter name
