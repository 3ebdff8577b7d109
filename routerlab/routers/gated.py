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

Selection options (docs/routers.md, "Selection options": which router takes which, and why not where not).
A router lists the ones it cannot honour in `refuses`, each with the reason; a non-default value of one of
those is refused when the router is built, in one line:
  score              softmax | sigmoid | sqrt_softplus: s = score(logits); the balance losses use s / sum(s)
  normalize_k1       also normalize the weights of a token that uses one expert (weight 1, as top-k
                     normalization does at k=1)
  route_scale        combine weights multiplied by it after normalization (DeepSeek's routed scaling factor)
  expert_groups, top_groups
                     experts in `expert_groups` equal groups; each token picks its top_groups groups by the sum of
                     each group's best two scores, then its experts inside them (DeepSeek-V3); 0 = off
  null_experts       n zero-compute experts (MoE++): the gate scores E + n; a slot given to one is unused
Routers that select through `route_topk` apply all five there; the others apply score, groups and null experts
in their own forward, and normalize_k1 and route_scale by a forward hook on the Routing they return.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerlab.errors import ConfigError
from routerlab.kernel_choice import uses_triton
from routerlab.routers.balancing import BalancePart, GlobalCounts, batch_balance, global_balance, sequence_balance, slot_counts
from routerlab.routers.base import Router, Routing, switch_balance_loss, z_loss
from routerlab.routers.registry import RouterParams, require

SCORES = ("softmax", "sigmoid", "sqrt_softplus")
SELECTION_OPTIONS = ("score", "normalize_k1", "route_scale", "expert_groups", "top_groups", "null_experts")
MAX_FUSED_EXPERTS = 1024  # the fused top-k holds a token's scores in registers
MAX_GATE_KERNEL_OUTPUTS = 128  # triton_gate holds a block of tokens' logits in registers; wider gates take the cast path


def uses_gate_kernel(x: Tensor, gate: nn.Linear) -> bool:
    """Whether the float32 gate runs as routers/triton_gate.py's kernels: a bf16 x and weight where the Triton kernels
    run, no bias, at most MAX_GATE_KERNEL_OUTPUTS, TF32 on (the kernels are at least as precise as the cast path's
    TF32 GEMM; with TF32 off the cast path computes in full fp32), and on CUDA only while a CUDA graph is captured
    (train.cuda_graph): the graph pays the kernels' host launches once, where an eager step, bound by its launches,
    pays ~0.3 ms a layer more than the cast path's (docs/benchmarks.md, issue 19 v9). CPU tensors reach here only
    under Triton's interpreter (the tests), which takes the kernels."""
    w = gate.weight
    return (x.dtype == torch.bfloat16 and w.dtype == x.dtype and gate.bias is None and w.shape[0] <= MAX_GATE_KERNEL_OUTPUTS
            and uses_triton(x) and torch.backends.cuda.matmul.allow_tf32
            and (torch.cuda.is_current_stream_capturing() if x.is_cuda else True))


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
    score: str = "softmax"  # softmax | sigmoid | sqrt_softplus
    normalize_k1: bool = False  # a token with one expert gets weight 1 (normalization at k=1)
    route_scale: float = 1.0  # routed scaling factor on the combine weights
    expert_groups: int = 1  # expert groups for group-limited routing
    top_groups: int = 0  # groups each token may use; 0 = no limit
    null_experts: int = 0  # zero-compute experts (MoE++) beside the E real ones

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
    E + null_experts gate outputs (scores with the noise, if any) and the chosen ids before null slots became -1."""

    routing: Routing
    logits: Tensor
    scores: Tensor
    chosen: Tensor


def finish_weights(routing: Routing, normalize_k1: bool, route_scale: float) -> Routing:
    """normalize_k1: a token with exactly one used slot gets weight w / w = 1; then weights * route_scale."""
    w = routing.weights
    if normalize_k1:
        single = (routing.experts >= 0).sum(-1, keepdim=True) == 1
        w = torch.where(single, w / w.sum(-1, keepdim=True).clamp_min(1e-9), w)
    if route_scale != 1.0:
        w = w * route_scale
    routing.weights = w
    return routing


def _finish_weights_hook(router: "GatedRouter", args, routing: Routing) -> Routing:
    return finish_weights(routing, router.params.normalize_k1, router.params.route_scale)


class GatedRouter(Router):
    """A router whose scores come from a linear gate over the hidden state, with the stability options."""

    # selection options this router cannot honour, each with the reason (one line; docs/routers.md)
    refuses: dict[str, str] = {}
    # True where forward applies normalize_k1 and route_scale itself (route_topk); else a forward hook does
    finishes_weights = False

    def __init__(self, d_model: int, num_experts: int, params: GateParams) -> None:
        super().__init__(d_model, num_experts, params)
        defaults = {f.name: f.default for f in fields(params)}
        for option in SELECTION_OPTIONS:
            value = getattr(params, option)
            if value != defaults[option] and option in self.refuses:
                name = getattr(self, "router_name", type(self).__name__)
                raise ConfigError(f"router {name!r} does not take {option}={value!r}: {self.refuses[option]}")
        if num_experts % params.expert_groups:
            raise ConfigError(f"expert_groups={params.expert_groups} must divide num_experts={num_experts}")
        if not self.finishes_weights and (params.normalize_k1 or params.route_scale != 1.0):
            self.register_forward_hook(_finish_weights_hook)
        self.gate = nn.Linear(d_model, num_experts + params.null_experts, bias=False)
        if params.init_std > 0:
            nn.init.normal_(self.gate.weight, 0.0, params.init_std)
        self.register_buffer("gate_ema", torch.full((num_experts + params.null_experts,), 1.0 / (num_experts + params.null_experts)))
        self.global_counts = GlobalCounts()
        self.sequence_length: int | None = None  # set by the MoE layer before each forward (None: one sequence)
        self.balance_part: BalancePart | None = None  # this forward's share of a layer-pooled balance loss

    def forward_is_pure(self) -> bool:
        """Router.forward_is_pure, with the gate options that write state or draw in a training forward off: jitter
        (noise), smoothing (the EMA), balance_global (the step's counts) and balance_layers="pool" (the layer's part)."""
        p = self.params
        writes = self.training and (p.jitter or p.smoothing or p.balance_global or (p.balance_batch and p.balance_layers == "pool"))
        hooks = self._forward_pre_hooks or any(h is not _finish_weights_hook for h in self._forward_hooks.values())
        return vars(type(self)).get("pure_forward", False) and not (writes or hooks)

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
            if uses_gate_kernel(x, gate):
                from routerlab.routers.triton_gate import Fp32Gate

                return Fp32Gate.apply(x, gate.weight)
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

    # -- selection options shared by every router's forward -------------------------------------------
    def scores(self, logits: Tensor) -> Tensor:
        """The gate option `score` of the logits: [T, E (+ null)] routing scores."""
        return score_fn(self.params.score, logits)

    def group_mask(self, scores: Tensor) -> Tensor | None:
        """[T, E + null] bool, True inside each token's top groups (null experts always allowed); None when off."""
        p = self.params
        if not p.top_groups or p.top_groups == p.expert_groups:
            return None
        E = self.num_experts
        mask = group_limit_mask(scores[:, :E], p.expert_groups, p.top_groups)
        return torch.cat([mask, mask.new_ones(mask.shape[0], scores.shape[1] - E)], 1)

    def drop_null(self, experts: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Slots on null experts (ids >= E) become unused: expert -1, weight 0."""
        if not self.params.null_experts:
            return experts, weights
        null = experts >= self.num_experts
        return experts.masked_fill(null, -1), weights.masked_fill(null, 0.0)

    # -- the top-k family's forward -------------------------------------------------------------------
    def route_topk(self, x: Tensor, k: int, renormalize: bool, selection_bias: Tensor | None = None,
                   normalize_k1: bool | None = None, logits: Tensor | None = None,
                   logit_noise: Tensor | None = None) -> TopK:
        """Scores -> (group limit) -> top-k of score + bias -> normalize -> scale -> null slots to -1; aux losses.

        logits: the router's own [T, E + null] logits (default the gate's); logit_noise is added to them before
        scoring (noisy top-k), while the losses and the returned logits stay clean. normalize_k1 overrides the
        gate option (noisy_topk and bias_balanced normalize at k=1 by their own rule).
        """
        p = self.params
        logits = self.gate_logits(x) if logits is None else logits
        renormalize = renormalize and (k > 1 or (p.normalize_k1 if normalize_k1 is None else normalize_k1))
        softmax = None  # (probs, logsumexp) of the logits where the fused kernel gives them with the selection
        aux = None  # the aux losses, where the fused kernels compute them too
        if self.uses_fused_topk(logits, k, selection_bias, logit_noise):
            from routerlab.routers.triton_topk import TopKSoftmax

            fused = self.fused_losses(logits.shape[0])
            scores, lse, experts, weights, balance, z = TopKSoftmax.apply(logits, k, renormalize, fused and fused[1:])
            softmax = (scores, lse)
            if fused:  # in stability_losses' order
                aux = {"balance_batch": balance} if fused[0] == "balance_batch" else {}
                if p.z_loss > 0:
                    aux["z_loss"] = z
                if fused[0] == "importance_balance":
                    aux["importance_balance"] = balance
        else:
            scores = self.scores(logits if logit_noise is None else logits + logit_noise)
            select = scores.detach()
            if selection_bias is not None:
                select = select + selection_bias.to(select.dtype)
            mask = self.group_mask(select)
            if mask is not None:
                select = select.masked_fill(~mask, float("-inf"))
            experts = select.topk(k, dim=-1).indices
            weights = scores.gather(1, experts)
            if renormalize:
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        if p.route_scale != 1.0:
            weights = weights * p.route_scale
        if aux is None:
            aux = self.stability_losses(logits, experts, softmax)
        chosen, full_logits = experts, logits
        experts, weights = self.drop_null(experts, weights)
        routing = Routing(experts, weights.to(x.dtype), logits[:, : self.num_experts], aux)
        return TopK(routing, full_logits, scores, chosen)

    def uses_fused_topk(self, logits: Tensor, k: int, selection_bias: Tensor | None, logit_noise: Tensor | None) -> bool:
        """Whether route_topk takes the one-kernel softmax + top-k (routers/triton_topk.py): float32 logits on CUDA
        (kernel_choice.uses_triton), softmax scores, none of bias, noise, group limit or null experts."""
        p = self.params
        plain = p.score == "softmax" and not p.null_experts and (not p.top_groups or p.top_groups == p.expert_groups)
        return (plain and selection_bias is None and logit_noise is None and logits.dtype == torch.float32 and logits.dim() == 2
                and k <= logits.shape[1] <= MAX_FUSED_EXPERTS and uses_triton(logits))

    def fused_losses(self, num_tokens: int) -> tuple[str | None, float, float] | None:
        """(name, coefficient) of the balance loss and the z-loss coefficient where the fused top-k kernels compute every
        aux loss this forward has (routers/triton_topk.py): at most one balance term of the Switch form over the
        micro-batch counting all k slots (balance_batch summed per layer, or importance_balance at power 0, which is
        the same number) and the z-loss; None where any other loss is on (stability_losses computes them all then)."""
        p = self.params
        batch = p.balance_batch if self.training else 0.0  # the balance terms apply in training, the others always
        other_losses = p.entropy or (self.training and (p.balance_sequence or p.balance_global))
        other_forms = (batch and (p.balance_count != "all" or p.balance_layers != "sum")) or (p.importance_balance and p.importance_power != 0)
        if num_tokens == 0 or other_losses or other_forms or (batch and p.importance_balance) or not (batch or p.importance_balance or p.z_loss):
            return None  # also with no losses at all: the plain kernel
        name = "balance_batch" if batch else "importance_balance" if p.importance_balance else None
        return name, batch or p.importance_balance, p.z_loss

    # -- losses ---------------------------------------------------------------------------------------
    def stability_losses(self, logits: Tensor, experts: Tensor | None = None,
                         softmax: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """z-loss, entropy, importance-weighted and scoped balance terms (only those switched on).

        experts: [T, k] choices (-1 unused) for the importance weighting and the balance losses; default the
        top-1 of the logits. softmax: (probs, logsumexp) of these logits in float32 where already computed (the fused
        top-k; softmax scores only), used instead of computing them again.
        """
        p = self.params
        aux = {}
        if self.training and logits.shape[0] > 0 and (p.balance_batch or p.balance_sequence or p.balance_global):
            probs = self.balance_probs(logits) if softmax is None else softmax[0]
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
            aux["z_loss"] = p.z_loss * (z_loss(logits) if softmax is None else softmax[1].square().mean())
        if p.entropy != 0:
            logp = logits.float().log_softmax(-1)
            aux["entropy"] = p.entropy * -(logp.exp() * logp).sum(-1).mean()
        if p.importance_balance > 0 and logits.shape[0] > 0:
            probs = logits.float().softmax(-1) if softmax is None else softmax[0]
            w = top1 = None  # power 0: every token weighs 1, and the plain mean is the same number
            if experts is None or p.importance_power != 0:
                top1 = probs.argmax(-1)
                if experts is not None:
                    top1 = torch.where(experts[:, 0] >= 0, experts[:, 0], top1)
            if p.importance_power != 0:
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
