"""Shared machinery of learned routers: a linear gate x -> logits [T, E] and the stability options.

Not a router itself; `softmax_topk`, `noisy_topk`, `switch` and the zoo's learned routers build on it.
Every option below is a field of `GateParams`, so every learned router accepts it (docs/routers.md,
"Balancing and stability options"):

  z_loss             coefficient of the ST-MoE z-loss  mean_x logsumexp(l(x))^2
  entropy            coefficient of the mean router entropy  mean_x H(p(x)); > 0 sharpens, < 0 explores
  temperature        logits are divided by it before anything else uses them
  smoothing, ema_decay
                     p~(x) = (1 - smoothing) p(x) + smoothing m,  m an EMA (decay ema_decay) of the batch-mean
                     gate probabilities; routing uses p~ (logits are replaced by lse(l) + log p~)
  router_clip        gradient-norm clip of the router's own parameters, applied in `before_step`
  jitter             multiplicative input noise U(1-jitter, 1+jitter) in training (Switch)
  fp32               compute the gate in float32 whatever the model dtype
  importance_balance, importance_power
                     importance-weighted balance loss  c * E * sum_i f_i P~_i,  P~_i = sum_x w_x p_i(x) / sum_x w_x,
                     w_x = (mean_j f_j / f_{e(x)})^power  (detached), e(x) the token's top-1 expert
  balance_batch, balance_sequence, balance_global, balance_count, balance_layers
                     coefficients of the balance loss E * sum_e f_e P_e at three scopes (balancing.py), any
                     number at once; balance_count "all" counts every slot, "first" the first choice;
                     balance_layers "pool": balance_batch over all layers' f and P pooled (the model adds it)
  init_std, fp64     gate weights drawn from N(0, init_std^2) (0 = nn.Linear's default); gate in float64

Selection options, honoured by the top-k family (routers that route through `route_topk`: softmax_topk,
switch, bias_balanced, adversarial, top_p); other routers refuse non-default values:
  score              softmax | sigmoid | sqrt_softplus: s = score(logits); the balance losses use s / sum(s)
  normalize_k1       with the router's renormalize on, also normalize at k=1 (weight 1)
  route_scale        combine weights multiplied by it after normalization (DeepSeek's routed scaling factor)
  expert_groups, top_groups
                     experts in `expert_groups` equal groups; each token picks its top_groups groups by the sum of
                     each group's best two scores, then its top-k inside them (DeepSeek-V3); 0 = off
  null_experts       n zero-compute experts (MoE++): the gate scores E + n; a slot given to one is unused
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.errors import ConfigError
from routerlab.routers.balancing import BalancePart, GlobalCounts, batch_balance, global_balance, sequence_balance, slot_counts
from routerlab.routers.base import Router, Routing, switch_balance_loss, z_loss
from routerlab.routers.registry import RouterParams, require

SCORES = ("softmax", "sigmoid", "sqrt_softplus")
SELECTION_DEFAULTS = {"score": "softmax", "normalize_k1": False, "route_scale": 1.0, "expert_groups": 1, "top_groups": 0, "null_experts": 0}


@dataclass(frozen=True)
class GateParams(RouterParams):
    z_loss: float = 0.0  # ST-MoE router z-loss coefficient
    jitter: float = 0.0  # multiplicative input noise U(1-jitter, 1+jitter) in training (Switch)
    fp32: bool = True  # compute the gate in float32 whatever the model dtype
    entropy: float = 0.0  # coefficient of mean router entropy: > 0 sharpens, < 0 explores
    temperature: float = 1.0  # logits / temperature before softmax (and everything else)
    smoothing: float = 0.0  # weight of the EMA of gate probabilities mixed into every token's gate
    ema_decay: float = 0.99  # decay of that EMA (updated in training forwards)
    router_clip: float = 0.0  # max grad norm of the router's parameters (0 = off), applied in before_step
    importance_balance: float = 0.0  # coefficient of the importance-weighted balance loss (0 = off)
    importance_power: float = 1.0  # gamma in w_x = (mean f / f_{e(x)})^gamma
    balance_batch: float = 0.0  # coefficient of E sum f P over the micro-batch
    balance_sequence: float = 0.0  # ... per sequence, averaged over sequences (DeepSeek-V2/V3)
    balance_global: float = 0.0  # ... f over the whole step: accumulation micro-batches and ranks (Qiu et al. 2025)
    balance_count: str = "all"  # f counts "all" k slots of a token or its "first" choice only
    balance_layers: str = "sum"  # balance_batch per layer, summed ("sum"), or f and P pooled over layers ("pool")
    init_std: float = 0.0  # gate weights ~ N(0, init_std^2); 0 = nn.Linear's default init
    fp64: bool = False  # compute the gate in float64 (over fp32)
    score: str = "softmax"  # softmax | sigmoid | sqrt_softplus (top-k family)
    normalize_k1: bool = False  # renormalize also at k=1 (top-k family)
    route_scale: float = 1.0  # routed scaling factor on the combine weights (top-k family)
    expert_groups: int = 1  # expert groups for group-limited routing (top-k family)
    top_groups: int = 0  # groups each token may use; 0 = no limit (top-k family)
    null_experts: int = 0  # zero-compute experts (MoE++) beside the E real ones (top-k family)

    def __post_init__(self) -> None:
        require(self.z_loss >= 0, f"z_loss must be >= 0, got {self.z_loss}")
        require(0 <= self.jitter < 1, f"jitter must be in [0, 1), got {self.jitter}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(0 <= self.smoothing < 1, f"smoothing must be in [0, 1), got {self.smoothing}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.router_clip >= 0, f"router_clip must be >= 0 (0 = off), got {self.router_clip}")
        require(self.importance_balance >= 0, f"importance_balance must be >= 0, got {self.importance_balance}")
        require(self.importance_power >= 0, f"importance_power must be >= 0, got {self.importance_power}")
        for name in ("balance_batch", "balance_sequence", "balance_global"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        require(self.balance_count in ("all", "first"), f"balance_count must be 'all' or 'first', got {self.balance_count!r}")
        require(self.balance_layers in ("sum", "pool"), f"balance_layers must be 'sum' or 'pool', got {self.balance_layers!r}")
        require(self.init_std >= 0, f"init_std must be >= 0 (0 = default init), got {self.init_std}")
        require(self.score in SCORES, f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        require(self.route_scale > 0, f"route_scale must be > 0, got {self.route_scale}")
        require(self.expert_groups >= 1, f"expert_groups must be >= 1, got {self.expert_groups}")
        require(0 <= self.top_groups <= self.expert_groups, f"top_groups must be in [0, expert_groups={self.expert_groups}] (0 = off), got {self.top_groups}")
        require(self.null_experts >= 0, f"null_experts must be >= 0, got {self.null_experts}")


def importance_weights(top1: Tensor, num_experts: int, power: float) -> Tensor:
    """w_x = (mean_j f_j / f_{e(x)})^power from the batch's top-1 choices; detached.

    With power 1 every expert's group of tokens carries the same total weight, so the balance signal is
    not dominated by the crowd on the over-used experts.
    """
    # index_add, not bincount: bincount reads the largest id on the host (a sync per layer and step on CUDA)
    counts = torch.zeros(num_experts, device=top1.device).index_add_(0, top1, torch.ones(top1.shape, device=top1.device))
    f = counts / counts.sum().clamp_min(1.0)
    ratio = (1.0 / num_experts) / f[top1].clamp_min(1e-9)
    return ratio.pow(power).detach()


def score_fn(name: str, logits: Tensor) -> Tensor:
    """Router scores from logits: softmax, sigmoid, or sqrt(softplus) (elementwise for the last two)."""
    if name == "softmax":
        return logits.softmax(-1)
    if name == "sigmoid":
        return torch.sigmoid(logits)
    return F.softplus(logits).sqrt()


def group_limit_mask(scores: Tensor, groups: int, top_groups: int) -> Tensor:
    """[T, E] bool: experts inside each token's top_groups groups, groups ranked by the sum of their best two
    scores (their best one when a group has a single expert). DeepSeek-V3's node-limited routing."""
    T, E = scores.shape
    grouped = scores.view(T, groups, E // groups)
    group_score = grouped.topk(min(2, E // groups), dim=-1).values.sum(-1)  # [T, G]
    chosen = group_score.topk(top_groups, dim=-1).indices
    keep = torch.zeros(T, groups, dtype=torch.bool, device=scores.device).scatter_(1, chosen, True)
    return keep[:, :, None].expand(T, groups, E // groups).reshape(T, E)


@dataclass
class TopK:
    """What route_topk hands back: the Routing, and for router-specific losses the logits and scores over all
    E + null_experts gate outputs and the chosen ids before null slots became -1."""

    routing: Routing
    logits: Tensor
    scores: Tensor
    chosen: Tensor


class GatedRouter(Router):
    """A router whose scores come from a linear gate over the hidden state, with the stability options."""

    supports_selection_options = False  # True for the top-k family, which routes through route_topk

    def __init__(self, d_model: int, num_experts: int, params: GateParams) -> None:
        super().__init__(d_model, num_experts, params)
        if not self.supports_selection_options:
            bad = [f"{k}={getattr(params, k)!r}" for k, v in SELECTION_DEFAULTS.items() if getattr(params, k) != v]
            if bad:
                raise ConfigError(f"router {getattr(self, 'router_name', type(self).__name__)!r} does not take {', '.join(bad)}; "
                                  "the selection options (score, normalize_k1, route_scale, expert_groups, top_groups, null_experts) "
                                  "work with softmax_topk, switch, bias_balanced, adversarial and top_p")
        if num_experts % params.expert_groups:
            raise ConfigError(f"expert_groups={params.expert_groups} must divide num_experts={num_experts}")
        self.gate = nn.Linear(d_model, num_experts + params.null_experts, bias=False)
        if params.init_std > 0:
            nn.init.normal_(self.gate.weight, 0.0, params.init_std)
        self.register_buffer("gate_ema", torch.full((num_experts + params.null_experts,), 1.0 / (num_experts + params.null_experts)))
        self.global_counts = GlobalCounts()
        self.sequence_length: int | None = None  # set by the MoE layer before each forward (None: one sequence)
        self.balance_part: BalancePart | None = None  # this forward's share of a layer-pooled balance loss

    # -- scores ---------------------------------------------------------------------------------------
    def raw_logits(self, x: Tensor, gate: nn.Linear | None = None) -> Tensor:
        """x @ W^T with jitter (training) and the fp32 option; no temperature, no smoothing."""
        gate = self.gate if gate is None else gate
        if self.training and self.params.jitter > 0:
            eps = self.params.jitter
            x = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
        if self.params.fp64:
            return F.linear(x.double(), gate.weight.double(), None if gate.bias is None else gate.bias.double())
        if self.params.fp32:  # also under autocast (bf16-mixed), which would otherwise run the linear in bf16
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), gate.weight.float(), None if gate.bias is None else gate.bias.float())
        return gate(x)

    def apply_temperature(self, logits: Tensor) -> Tensor:
        t = self.params.temperature
        return logits if t == 1.0 else logits / t

    def apply_smoothing(self, logits: Tensor) -> Tensor:
        """p~ = (1 - smoothing) softmax(logits) + smoothing * EMA; returns lse(logits) + log p~ ([T, E])."""
        p = self.params
        if p.smoothing == 0:
            return logits
        probs = logits.softmax(-1)
        mixed = (1 - p.smoothing) * probs + p.smoothing * self.gate_ema.to(probs.dtype)
        if self.training:
            with torch.no_grad():
                self.gate_ema.mul_(p.ema_decay).add_((1 - p.ema_decay) * probs.detach().mean(0).to(self.gate_ema.dtype))
        # softmax(lse + log p~) = p~ and logsumexp(...) = lse, so the z-loss still sees the logit scale
        return torch.logsumexp(logits, -1, keepdim=True) + mixed.clamp_min(1e-30).log()

    def postprocess(self, logits: Tensor) -> Tensor:
        """Temperature, then gate smoothing toward the EMA of gate probabilities ([T, E] logits in and out)."""
        return self.apply_smoothing(self.apply_temperature(logits))

    def gate_logits(self, x: Tensor) -> Tensor:
        return self.postprocess(self.raw_logits(x))

    def balance_probs(self, logits: Tensor) -> Tensor:
        """Normalized scores P(x) the balance losses average: softmax, or s / sum(s) for elementwise scores."""
        if self.params.score == "softmax":
            return logits.float().softmax(-1)
        s = score_fn(self.params.score, logits.float())
        return s / s.sum(-1, keepdim=True).clamp_min(1e-9)

    # -- the top-k family's forward -------------------------------------------------------------------
    def route_topk(self, x: Tensor, k: int, renormalize: bool, selection_bias: Tensor | None = None,
                   normalize_k1: bool | None = None) -> TopK:
        """Scores -> (group limit) -> top-k of score + bias -> normalize -> scale -> null slots to -1; aux losses.

        normalize_k1 overrides the gate option (bias_balanced normalizes at k=1 by its own `normalize`).
        """
        p = self.params
        E = self.num_experts
        logits = self.gate_logits(x)
        scores = score_fn(p.score, logits)
        select = scores.detach()
        if selection_bias is not None:
            select = select + selection_bias.to(select.dtype)
        if p.top_groups and p.top_groups < p.expert_groups:
            mask = group_limit_mask(select[:, :E], p.expert_groups, p.top_groups)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], p.null_experts)], 1)
            select = select.masked_fill(~mask, float("-inf"))
        experts = select.topk(k, dim=-1).indices
        weights = scores.gather(1, experts)
        if renormalize and (k > 1 or (p.normalize_k1 if normalize_k1 is None else normalize_k1)):
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        if p.route_scale != 1.0:
            weights = weights * p.route_scale
        aux = self.stability_losses(logits, experts)
        chosen, full_logits = experts, logits
        if p.null_experts:
            null = experts >= E
            experts = experts.masked_fill(null, -1)
            weights = weights.masked_fill(null, 0.0)
            logits = logits[:, :E]
        return TopK(Routing(experts, weights.to(x.dtype), logits, aux), full_logits, scores, chosen)

    # -- losses ---------------------------------------------------------------------------------------
    def stability_losses(self, logits: Tensor, experts: Tensor | None = None) -> dict[str, Tensor]:
        """z-loss, entropy, importance-weighted and scoped balance terms (only those switched on).

        experts: [T, k] choices (-1 unused) for the importance weighting and the balance losses; default the
        top-1 of the logits.
        """
        p = self.params
        aux = {}
        if self.training and logits.shape[0] > 0 and (p.balance_batch or p.balance_sequence or p.balance_global):
            probs = self.balance_probs(logits)
            chosen = probs.argmax(-1, keepdim=True) if experts is None else experts
            if p.balance_batch and p.balance_layers == "pool":  # the model pools every layer's part (pooled_balance)
                self.balance_part = BalancePart(p.balance_batch, slot_counts(chosen, probs.shape[-1], p.balance_count), probs.mean(0))
            elif p.balance_batch:
                aux["balance_batch"] = p.balance_batch * batch_balance(probs, chosen, p.balance_count)
            if p.balance_sequence:
                aux["balance_sequence"] = p.balance_sequence * sequence_balance(probs, chosen, p.balance_count, self.sequence_length)
            if p.balance_global:
                aux["balance_global"] = p.balance_global * global_balance(probs, chosen, p.balance_count, self.global_counts)
        if p.z_loss > 0:
            aux["z_loss"] = p.z_loss * z_loss(logits)
        if p.entropy != 0:
            logp = logits.float().log_softmax(-1)
            aux["entropy"] = p.entropy * -(logp.exp() * logp).sum(-1).mean()
        if p.importance_balance > 0 and logits.shape[0] > 0:
            probs = logits.float().softmax(-1)
            top1 = probs.argmax(-1)
            if experts is not None:
                top1 = torch.where(experts[:, 0] >= 0, experts[:, 0], top1)
            w = importance_weights(top1, probs.shape[-1], p.importance_power)
            chosen = top1[:, None] if experts is None else experts
            aux["importance_balance"] = p.importance_balance * switch_balance_loss(probs, chosen, probs.shape[-1], w)
        return aux

    # -- hooks ----------------------------------------------------------------------------------------
    def before_step(self) -> None:
        self.global_counts.reset()  # once per optimizer step, after every micro-batch's backward
        if self.params.router_clip > 0:
            grads = [q for q in self.parameters() if q.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.params.router_clip)
