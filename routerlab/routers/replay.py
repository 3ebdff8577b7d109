"""Router replay (Megatron-Core's router replay, R3): route by a recorded trace instead of by a gate.

Token j of the stream this router sees gets the experts that token j of the trace got (a cursor over the
trace's tokens, in order, wrapping at its end), so feeding the probe batches again reproduces the
recorded routing exactly. Training new experts under a frozen routing separates router effects from
expert effects. Weights (`gates`): `recorded` (the trace's weights, no gradient) or `learned` (this
router's own linear gate, softmax over all experts, taken at the replayed experts and renormalized: the
gradient reaches a gate while the choice stays the recorded one, as in R3).

Which layer of the trace: `layer` >= 0, or -1 = the i-th replay router built from that trace in this
process (modulo the trace's layer count), which is layer i when one model is built at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from routerlab.errors import ConfigError
from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require

_built: dict[str, int] = {}  # replay routers built per trace file: the next one's layer when layer=-1


@dataclass(frozen=True)
class ReplayParams(RouterParams):
    trace: str = ""  # routing trace (.npz) written by 'routerlab trace' or a trainer's trace option
    layer: int = -1  # trace layer to replay; -1: the i-th replay router built from this trace gets layer i
    gates: Literal["recorded", "learned"] = "recorded"
    check_tokens: bool = True  # refuse a token stream whose ids differ from the trace's (when both have ids)

    def __post_init__(self) -> None:
        require(bool(self.trace), "trace must name a routing trace file (.npz from 'routerlab trace')")
        require(self.layer >= -1, f"layer must be >= 0, or -1 for automatic, got {self.layer}")


def next_layer(key: str, num_layers: int) -> int:
    index = _built.get(key, 0)
    _built[key] = index + 1
    return index % num_layers


@register_router("replay", ReplayParams)
class Replay(Router):
    """Routes each token as a recorded trace did (by token order); recorded or learned gate weights."""

    def __init__(self, d_model: int, num_experts: int, params: ReplayParams) -> None:
        super().__init__(d_model, num_experts, params)
        from routerlab.analysis.trace import load_trace  # numpy + torch only

        trace = load_trace(params.trace)
        if trace.num_experts != num_experts:
            raise ConfigError(f"trace {params.trace!r} has {trace.num_experts} experts, this model {num_experts}; replay a trace of a model with as many experts")
        layers = len(trace.layers)
        layer = params.layer if params.layer >= 0 else next_layer(params.trace, layers)
        if layer >= layers:
            raise ConfigError(f"trace {params.trace!r} has {layers} MoE layer(s); layer must be < {layers}")
        self.layer = layer
        self.register_buffer("experts", torch.from_numpy(trace.layers[layer].experts).long(), persistent=False)
        self.register_buffer("weights", torch.from_numpy(trace.layers[layer].weights).float(), persistent=False)
        self.register_buffer("token_ids", torch.from_numpy(trace.token_ids).long(), persistent=False)
        self.gate = nn.Linear(d_model, num_experts, bias=False) if params.gates == "learned" else None
        self.cursor = 0

    def positions(self, count: int) -> Tensor:
        """Trace positions of the next `count` tokens (wrapping), and advance the cursor."""
        n = self.experts.shape[0]
        pos = (self.cursor + torch.arange(count, device=self.experts.device)) % n
        self.cursor = (self.cursor + count) % n
        return pos

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        pos = self.positions(x.shape[0])
        if self.params.check_tokens and token_ids is not None:
            recorded = self.token_ids[pos]
            if bool((recorded >= 0).all()) and not torch.equal(recorded, token_ids.long()):
                first = int((recorded != token_ids.long()).nonzero()[0, 0])
                raise ConfigError(f"replay: token {int(pos[first])} of trace {self.params.trace!r} is id {int(recorded[first])}, the stream has {int(token_ids[first])}; "
                                  "feed the traced probe batches in order, or set check_tokens=false")
        experts = self.experts[pos]
        if self.gate is None:
            return Routing(experts, self.weights[pos].to(x.dtype))
        logits = self.gate(x.float())
        probs = logits.softmax(-1).gather(1, experts.clamp_min(0))
        probs = torch.where(experts >= 0, probs, 0)
        weights = probs / probs.sum(-1, keepdim=True).clamp_min(1e-9)
        return Routing(experts, weights.to(x.dtype), logits)
