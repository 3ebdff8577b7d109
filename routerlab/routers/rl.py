"""`rl`: a policy trained by stable-baselines3 on `routerlab/TokenRouting-v0`, routing inside the MoE core.

Loads `policy.zip` (PPO or A2C) and the `env.json` that `routerlab rl train` writes beside it. The model's
T tokens are cut into chunks of the env's C tokens; every chunk becomes one observation, built by the same
`observation` function the env uses, and the policy's distribution is evaluated on all chunks in one call
(no Python loop over tokens). The load part of the observation differs, because a model routes a whole
batch at once: the env shows load_so_far / capacity within the episode; here every chunk sees
`load_scale * load_e / capacity` of the previous training step (capacity as the env defines it for a batch
of T tokens), i.e. the env's state halfway through an episode with load_scale = 0.5. See docs/rl.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from routerlab.errors import ConfigError
from routerlab.routers.base import Router, Routing
from routerlab.routers.registry import RouterParams, register_router, require

FEATURE_CLIP = 10.0  # token features are clipped to +-FEATURE_CLIP (the env's Box bounds)


def observation_projection(d_model: int, obs_dim: int | None, seed: int) -> Tensor | None:
    """Fixed random [d_model, obs_dim] projection of router inputs (None: features are the router input)."""
    if obs_dim is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_model, obs_dim, generator=g) / math.sqrt(d_model)


def observation(x: Tensor, load_frac: Tensor, projection: Tensor | None) -> Tensor:
    """x [B, C, d] router inputs, load_frac [B, E] -> observations [B, C * D + E] (float32)."""
    features = x.float() if projection is None else x.float() @ projection.to(x.device)
    features = features.clamp(-FEATURE_CLIP, FEATURE_CLIP).reshape(x.shape[0], -1)
    return torch.cat([features, load_frac.float().to(features.device)], 1)


@dataclass(frozen=True)
class RLParams(RouterParams):
    policy: str = ""  # path to policy.zip written by `routerlab rl train` (env.json beside it)
    load_scale: float = 0.5  # in-model load state = load_scale * previous step's load / capacity (0 = empty)
    deterministic: bool = True  # argmax actions; False samples from the policy

    def __post_init__(self) -> None:
        require(bool(self.policy), "policy must name a policy.zip written by `routerlab rl train`")
        require(self.load_scale >= 0, f"load_scale must be >= 0, got {self.load_scale}")


@register_router("rl", RLParams)
class RLRouter(Router):
    """Routes with a saved stable-baselines3 policy (PPO/A2C) trained on routerlab/TokenRouting-v0."""

    def __init__(self, d_model: int, num_experts: int, params: RLParams) -> None:
        super().__init__(d_model, num_experts, params)
        path = Path(params.policy)
        meta_path = path.parent / "env.json"
        if not path.is_file() or not meta_path.is_file():
            raise ConfigError(f"router 'rl': {str(path)!r} with env.json beside it does not exist; train one with `routerlab rl train`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        obs = meta["observation"]
        if obs["num_experts"] != num_experts or obs["d_model"] != d_model:
            raise ConfigError(f"router 'rl': the policy was trained for num_experts={obs['num_experts']}, d_model={obs['d_model']}; this model has {num_experts}, {d_model}")
        self.chunk, self.capacity_factor = obs["chunk"], obs["capacity_factor"]
        self.causal = self.chunk == 1  # with C > 1 a token's expert depends on the other tokens of its chunk
        self.register_buffer("projection", observation_projection(d_model, obs["obs_dim"], obs["projection_seed"]), persistent=False)
        self.register_buffer("load_state", torch.zeros(num_experts))
        from stable_baselines3 import A2C, PPO  # lazy: the core imports torch only

        algo = {"ppo": PPO, "a2c": A2C}[meta.get("algo", "ppo")]
        # a plain attribute, not a submodule: the trainer's optimizer and state_dict must not see the policy
        object.__setattr__(self, "policy", algo.load(path, device="cpu").policy)
        self.policy.set_training_mode(False)

    def observations(self, x: Tensor) -> Tensor:
        """[T/C, C*D + E] observations of the model's tokens (the last chunk padded by repeating its last token)."""
        pad = (-x.shape[0]) % self.chunk
        x = x.detach()
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, -1)])
        chunks = x.reshape(-1, self.chunk, x.shape[-1])
        load = (self.params.load_scale * self.load_state).expand(chunks.shape[0], -1)
        return observation(chunks, load, self.projection)

    def forward(self, x: Tensor, *, token_ids: Tensor | None = None) -> Routing:
        num_tokens = x.shape[0]
        with torch.no_grad():
            dist = self.policy.get_distribution(self.observations(x).cpu())
            actions = dist.get_actions(deterministic=self.params.deterministic)
            parts = dist.distribution if isinstance(dist.distribution, list) else [dist.distribution]
            logits = torch.stack([p.logits for p in parts], 1).reshape(-1, self.num_experts)[:num_tokens]
        experts = actions.reshape(-1)[:num_tokens].long().to(x.device).unsqueeze(1)
        return Routing(experts, torch.ones(experts.shape, dtype=x.dtype, device=x.device), logits.to(x.device))

    def after_step(self, stats) -> None:
        capacity = max(1.0, math.ceil(self.capacity_factor * float(stats.tokens) / self.num_experts))
        self.load_state.copy_(stats.load.to(self.load_state) / capacity)
