"""Adversarial load balancing with a critic: a small discriminator judges per-group expert usage.

The batch's T tokens are cut into groups of `group_size` consecutive tokens (micro-batches; in `chars`, one
sequence each when group_size = block_size). For each group g the router's usage is u_g = E * (expert
frequencies of the group's token-slots), sorted in descending order so the critic judges how peaked the
usage is, not which expert is favoured. "Balanced usage" is the same thing measured on random routing (every
token takes k distinct experts uniformly at random) with the same group size. The critic D (an MLP
E -> hidden -> 1, logit = "this is the router") minimises the logistic loss of telling the two apart; the
router receives its non-saturating generator loss  weight * mean_g softplus(D(u_g))  as the balance loss.
The frequencies are hard counts with a straight-through path through the soft group usage mean p_t, so
the critic sees what the experts really get and the router still receives gradients.

The critic's weights are a buffer, not parameters, so the trainer's AdamW never touches them (it would
otherwise step them to help the router). They are trained in `after_step` by Adam on the usage vectors of
the step's training forward, with the Adam moments and step count as buffers too; the balanced samples come
from a generator seeded with that step count. Everything is in the model state_dict: exact resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from routerlab.routers.base import Routing
from routerlab.routers.gated import GateParams, GatedRouter
from routerlab.routers.registry import register_router, require


@dataclass(frozen=True)
class AdversarialCriticParams(GateParams):
    k: int = 2
    renormalize: bool = True
    weight: float = 0.05  # coefficient of the router's (generator) loss
    group_size: int = 32  # tokens per usage vector (consecutive tokens: micro-batches / sequences)
    hidden: int = 32  # critic width
    critic_lr: float = 1e-2  # Adam step of the critic in after_step
    critic_steps: int = 1  # critic updates per optimizer step
    seed: int = 0  # seed of the balanced (random routing) samples; the step count is added

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.weight >= 0, f"weight must be >= 0, got {self.weight}")
        require(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        require(self.hidden >= 1, f"hidden must be >= 1, got {self.hidden}")
        require(self.critic_lr >= 0, f"critic_lr must be >= 0, got {self.critic_lr}")
        require(self.critic_steps >= 1, f"critic_steps must be >= 1, got {self.critic_steps}")


def critic_logit(flat: Tensor, usage: Tensor, hidden: int) -> Tensor:
    """D(u) for usage [G, E] with the critic's weights packed in `flat` ([hidden*E + 2*hidden + 1])."""
    E = usage.shape[1]
    w1 = flat[: hidden * E].view(hidden, E)
    b1 = flat[hidden * E : hidden * (E + 1)]
    w2 = flat[hidden * (E + 1) : hidden * (E + 2)]
    return torch.tanh(F.linear(usage, w1, b1)) @ w2 + flat[-1]


@register_router("adversarial_critic", AdversarialCriticParams)
class AdversarialCritic(GatedRouter):
    """Softmax top-k; a discriminator over per-group expert usage supplies the balance loss."""

    def __init__(self, d_model: int, num_experts: int, params: AdversarialCriticParams) -> None:
        super().__init__(d_model, num_experts, params)
        h, E = params.hidden, num_experts
        flat = torch.cat([torch.randn(h * E) / math.sqrt(E), torch.zeros(h), torch.randn(h) / math.sqrt(h), torch.zeros(1)])
        self.register_buffer("critic", flat)
        self.register_buffer("critic_m", torch.zeros_like(flat))  # Adam moments, buffers for exact resume
        self.register_buffer("critic_v", torch.zeros_like(flat))
        self.register_buffer("critic_step", torch.zeros((), dtype=torch.long))
        self._usage: Tensor | None = None  # detached group usage of the last training forward (written in place)
        self._fresh: Tensor | None = None  # bool, on its device: a training forward wrote _usage since the last after_step
        self._group_n = 1  # its tokens per group
        self._last_critic_loss = float("nan")

    def group_usage(self, probs: Tensor, experts: Tensor) -> Tensor:
        """[G, E] sorted usage E * freq, straight-through through the soft usage E * mean p."""
        n = min(self.params.group_size, probs.shape[0])
        G = probs.shape[0] // n
        onehot = F.one_hot(experts[: G * n].clamp_min(0), self.num_experts).to(probs.dtype)
        onehot = onehot * (experts[: G * n, :, None] >= 0)
        hard = onehot.sum(1).view(G, n, -1).mean(1) / self.params.k
        soft = probs[: G * n].view(G, n, -1).mean(1)
        usage = self.num_experts * (hard + soft - soft.detach())
        return usage.sort(-1, descending=True).values

    def balanced_usage(self, groups: int, n: int, generator: torch.Generator) -> Tensor:
        """[groups, E] the same statistic for random routing: every token takes k distinct uniform experts."""
        picks = torch.rand(groups * n, self.num_experts, generator=generator).topk(self.params.k, -1).indices
        freq = F.one_hot(picks, self.num_experts).float().sum(1).view(groups, n, -1).mean(1) / self.params.k
        return (self.num_experts * freq).sort(-1, descending=True).values

    finishes_weights = True  # route_topk normalizes and scales
    # the forward reads the critic (a buffer after_step updates in place) and copies the usage into one tensor that
    # after_step reads (keep_usage); after_step's host reads and CPU generator run eagerly, outside the captured step
    cuda_graph_safe = True
    refuses = {"null_experts": "the critic compares usage with uniform random routing over the E real experts; a null "
                               "expert has no load to judge"}

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        out = self.route_topk(x, self.params.k, self.params.renormalize)
        experts, aux = out.routing.experts, out.routing.aux
        probs = self.balance_probs(out.logits)  # softmax (or the normalized `score`)
        if probs.shape[0] > 0:
            usage = self.group_usage(probs, experts)
            if self.training:
                self.keep_usage(usage.detach())
                self._group_n = min(self.params.group_size, probs.shape[0])
            # non-saturating generator loss: the router wants its usage called balanced (D logit low)
            aux["critic"] = self.params.weight * F.softplus(critic_logit(self.critic.float(), usage, self.params.hidden)).mean()
        return out.routing

    def keep_usage(self, usage: Tensor) -> None:
        """Copy the usage into the same tensor every step (a new one only when its shape changes) and mark it fresh on
        the device: a replayed CUDA graph of the step (train.cuda_graph) writes both there, and after_step reads them."""
        if self._usage is None or (self._usage.shape, self._usage.dtype, self._usage.device) != (usage.shape, usage.dtype, usage.device):
            self._usage = usage.clone()
            self._fresh = torch.ones((), dtype=torch.bool, device=usage.device)
        else:
            self._usage.copy_(usage)
            self._fresh.fill_(True)

    def after_step(self, stats) -> None:
        # bool(_fresh) reads the device: fine here, after_step runs eagerly, outside a captured step
        if self._usage is None or not bool(self._fresh):  # no training forward since the last step: nothing to learn from
            return
        self._fresh.fill_(False)
        usage = self._usage.to(self.critic.device)
        p = self.params
        for _ in range(p.critic_steps):
            self.critic_step += 1
            gen = torch.Generator().manual_seed(p.seed * 1_000_003 + int(self.critic_step))
            balanced = self.balanced_usage(usage.shape[0], self._group_n, gen).to(usage.device)
            with torch.enable_grad():
                flat = self.critic.detach().float().requires_grad_()  # float32 math even in a bf16 model
                fake, real = critic_logit(flat, usage, p.hidden), critic_logit(flat, balanced, p.hidden)
                loss = F.softplus(-fake).mean() + F.softplus(real).mean()  # logistic loss: router = 1, balanced = 0
                (grad,) = torch.autograd.grad(loss, flat)
            with torch.no_grad():  # Adam (betas 0.9, 0.999), state in buffers
                t = int(self.critic_step)
                m = self.critic_m.float().mul(0.9).add_(grad, alpha=0.1)
                v = self.critic_v.float().mul(0.999).addcmul_(grad, grad, value=0.001)
                denom = (v / (1 - 0.999**t)).sqrt_().add_(1e-8)
                self.critic.copy_(flat.detach().addcdiv(m / (1 - 0.9**t), denom, value=-p.critic_lr))
                self.critic_m.copy_(m)
                self.critic_v.copy_(v)
            self._last_critic_loss = float(loss.detach())

    def extra_metrics(self) -> dict[str, float]:
        return {"critic_loss": self._last_critic_loss}
