"""`routerlab/TokenRouting-v0`: route one batch of T tokens, C tokens per step, to E experts.

Observation (float32 Box, length C * D + E):
  [features of the chunk's C tokens, each D = obs_dim values (the MoE router's input, projected by a fixed
   random matrix when obs_dim is set, clipped to +-10), then load_e / capacity for each expert so far]
  (built by `routerlab.routers.rl.observation`, the same function the `rl` router calls in the model).
Action: one expert per token: MultiDiscrete([E] * C), Discrete(E) when C = 1.
Reward: - mean over the chunk of loss[t, a_t]  -  overflow_penalty * (slots over capacity in this chunk) / C,
  loss[t, e] = cross-entropy of the MoE model on token t when routed to expert e,
  capacity = ceil(capacity_factor * T / E) tokens per expert per episode.
Modes:
  frozen   experts pre-trained on oracle routing (cluster c -> expert c mod E) and then fixed; info reports
           the oracle accuracy (fraction of tokens sent to their cluster's expert).
  cotrain  experts start untrained and take one trainer step every `train_every` chunks (and at the end of
           an episode) on the tokens routed since, each on the expert the policy chose (non-stationary). A reset with a seed restarts them; a reset without one keeps them.
"""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from environments.experts import ExpertSpec, expert_losses, make_trainer, pretrain_frozen, train_on_assignment
from routerlab.errors import ConfigError
from routerlab.moe.stats import normalized_mutual_information
from routerlab.routers.rl import FEATURE_CLIP, observation, observation_projection

def specialization(labels: np.ndarray, experts: np.ndarray, num_labels: int, num_experts: int) -> float:
    """I(label; expert) / min(H(label), log E) of an episode (numpy count table: per episode, so fast)."""
    counts = np.bincount(labels * num_experts + experts, minlength=num_labels * num_experts)
    return normalized_mutual_information(counts.reshape(num_labels, num_experts))


DEFAULT_TASK = {"name": "clusters", "num_clusters": 4, "input_dim": 8, "train_size": 4096, "val_size": 256}
_FROZEN_CACHE: dict[tuple, tuple] = {}  # ExpertSpec -> (loss table, features, labels, oracle): shared by envs of a process


class TokenRoutingEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        mode: str = "frozen",
        task: dict | None = None,
        num_experts: int = 4,
        tokens: int = 64,
        chunk: int = 1,
        obs_dim: int | None = None,
        capacity_factor: float = 1.25,
        overflow_penalty: float = 1.0,
        d_model: int = 16,
        expert_hidden: int = 32,
        pretrain_steps: int = 300,
        expert_lr: float = 1e-2,
        pool_size: int = 4096,
        expert_seed: int = 0,
        projection_seed: int = 0,
        expert_cache: str | None = None,
        train_every: int = 1,
        render_mode: str | None = None,  # accepted for vec-env helpers; nothing is rendered
    ) -> None:
        if mode not in ("frozen", "cotrain"):
            raise ConfigError(f"mode must be 'frozen' or 'cotrain', got {mode!r}")
        if chunk < 1 or tokens < 1 or tokens % chunk:
            raise ConfigError(f"tokens ({tokens}) must be a positive multiple of chunk ({chunk})")
        if train_every < 1:
            raise ConfigError(f"train_every must be >= 1, got {train_every}")
        if num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {num_experts}")
        if obs_dim is not None and obs_dim < 1:
            raise ConfigError(f"obs_dim must be >= 1 (or omitted for the model's own d_model features), got {obs_dim}")
        if capacity_factor <= 0 or overflow_penalty < 0:
            raise ConfigError(f"capacity_factor must be > 0 and overflow_penalty >= 0, got {capacity_factor}, {overflow_penalty}")
        self.mode, self.num_experts, self.tokens, self.chunk = mode, num_experts, tokens, chunk
        self.overflow_penalty, self.capacity_factor = overflow_penalty, capacity_factor
        self.obs_dim, self.projection_seed, self.train_every = obs_dim, projection_seed, train_every
        self.capacity = max(1, math.ceil(capacity_factor * tokens / num_experts))
        self.expert_spec = ExpertSpec(task=dict(task or DEFAULT_TASK), num_experts=num_experts, d_model=d_model, expert_hidden=expert_hidden,
                               pretrain_steps=pretrain_steps, lr=expert_lr, seed=expert_seed)
        self.expert_cache, self.pool_size = expert_cache, pool_size
        self.projection = observation_projection(d_model, obs_dim, projection_seed)
        feature_dim = obs_dim or d_model
        self.observation_space = spaces.Box(
            low=np.concatenate([np.full(chunk * feature_dim, -FEATURE_CLIP), np.zeros(num_experts)]).astype(np.float32),
            high=np.concatenate([np.full(chunk * feature_dim, FEATURE_CLIP), np.full(num_experts, tokens / self.capacity)]).astype(np.float32),
        )
        self.action_space = spaces.Discrete(num_experts) if chunk == 1 else spaces.MultiDiscrete([num_experts] * chunk)
        self.trainer = None
        self._setup_experts()
        self._done = True

    # ---- experts ----------------------------------------------------------------------------------
    def _setup_experts(self) -> None:
        if self.mode == "frozen":
            key = (repr(self.expert_spec), self.expert_cache, self.pool_size)
            if key not in _FROZEN_CACHE:
                trainer = pretrain_frozen(self.expert_spec, self.expert_cache)
                inputs, targets, labels = (t[: self.pool_size] for t in trainer.task.examples("train"))
                loss, x = expert_losses(trainer, inputs, targets)
                _FROZEN_CACHE[key] = (loss.numpy(), x, labels.numpy(), trainer)
            loss, x, labels, self.trainer = _FROZEN_CACHE[key]
            self.pool_loss, self.pool_labels = loss, labels
            self.pool_features = self._project(x)
        else:
            self.trainer = make_trainer(self.expert_spec, steps=10**9, lr_schedule="constant")
            self.pool_inputs, self.pool_targets, labels = self.trainer.task.examples("train")
            self.pool_labels = labels.numpy()

    def _project(self, x: torch.Tensor) -> np.ndarray:
        return observation(x.unsqueeze(1), torch.zeros(x.shape[0], 0), self.projection).numpy()

    def _prepare_chunk(self) -> None:
        """Loss table [C, E] and features [C, D] of the next chunk (cotrain: from the current experts)."""
        idx = self.episode_tokens[self.position : self.position + self.chunk]
        if self.mode == "frozen":
            self.chunk_loss, self.chunk_features = self.pool_loss[idx], self.pool_features[idx]
        else:  # the experts change only at trainer steps: one forward covers every chunk until the next one
            if self.window is None:
                window = self.episode_tokens[self.position : self.position + self.train_every * self.chunk]
                loss, x = expert_losses(self.trainer, self.pool_inputs[window], self.pool_targets[window])
                self.window = (self.position, loss.numpy(), self._project(x))
            start, loss, features = self.window
            offset = self.position - start
            self.chunk_loss, self.chunk_features = loss[offset : offset + self.chunk], features[offset : offset + self.chunk]
        self.chunk_labels = self.pool_labels[idx]

    def observation_spec(self) -> dict:
        """What the `rl` router needs to rebuild this env's observations inside a model (saved in env.json)."""
        return {"num_experts": self.num_experts, "d_model": self.expert_spec.d_model, "chunk": self.chunk, "obs_dim": self.obs_dim,
                "projection_seed": self.projection_seed, "capacity_factor": self.capacity_factor}

    def oracle_experts(self, labels: np.ndarray) -> np.ndarray:
        return labels % self.num_experts

    def expert_losses(self) -> np.ndarray:
        """Loss of every expert on the current chunk's tokens [C, E] (privileged: for the greedy baseline)."""
        return self.chunk_loss

    # ---- gymnasium API ----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if options:  # nothing is configurable per episode; silently ignoring options would hide a mistake
            raise ConfigError(f"reset(options=...) takes no options (got {sorted(options)}); set them when making the environment")
        super().reset(seed=seed)
        if self.mode == "cotrain" and seed is not None:
            self.trainer = make_trainer(self.expert_spec, steps=10**9, lr_schedule="constant")
        pool = len(self.pool_labels)
        self.episode_tokens = self.np_random.integers(0, pool, size=self.tokens)
        self.position = 0
        self.load = np.zeros(self.num_experts, dtype=np.int64)
        self.episode_actions, self.episode_labels, self.episode_losses = [], [], []
        self.overflow_total, self._done, self.trained_steps, self.window = 0, False, 0, None
        self._prepare_chunk()
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        load = (self.load / self.capacity).astype(np.float32)
        return np.concatenate([self.chunk_features.reshape(-1), load]).astype(np.float32)

    def step(self, action):
        if self._done:
            raise RuntimeError("episode is over: call reset() before step()")
        experts = self._validate(action)
        task_loss = float(self.chunk_loss[np.arange(self.chunk), experts].mean())
        before = np.maximum(self.load - self.capacity, 0).sum()
        self.load += np.bincount(experts, minlength=self.num_experts)
        overflow = int(np.maximum(self.load - self.capacity, 0).sum() - before)
        reward = -task_loss - self.overflow_penalty * overflow / self.chunk
        oracle = float((experts == self.oracle_experts(self.chunk_labels)).mean())
        self.episode_losses.append(task_loss)
        self.episode_actions.append(experts)
        self.episode_labels.append(self.chunk_labels)
        self.overflow_total += overflow
        info = {"task_loss": task_loss, "overflow": overflow, "oracle_accuracy": oracle}
        self.position += self.chunk
        terminated = self.position >= self.tokens
        if self.mode == "cotrain" and (terminated or len(self.episode_actions) % self.train_every == 0):
            self._train_experts()
        if terminated:
            self._done = True
            info.update(self.episode_metrics())
        else:
            self._prepare_chunk()
        return self._obs(), float(reward), terminated, False, info

    def _train_experts(self) -> None:
        """One trainer step on the tokens routed since the last one, each on the expert the policy chose."""
        steps = len(self.episode_actions) - self.trained_steps
        idx = self.episode_tokens[self.position - steps * self.chunk : self.position]
        experts = torch.as_tensor(np.concatenate(self.episode_actions[-steps:]))
        labels = torch.as_tensor(np.concatenate(self.episode_labels[-steps:]))
        train_on_assignment(self.trainer, self.pool_inputs[idx], self.pool_targets[idx], labels, experts)
        self.trained_steps = len(self.episode_actions)
        self.window = None

    def _validate(self, action) -> np.ndarray:
        """The action as int64 [C], or ValueError (wrong shape, type or range)."""
        a = np.asarray(action)
        valid = a.dtype.kind in "iu" and a.size == self.chunk and (self.chunk > 1 or a.ndim == 0) and (self.chunk == 1 or a.shape == (self.chunk,))
        if not valid or a.min() < 0 or a.max() >= self.num_experts:
            raise ValueError(f"invalid action {action!r}: expected {self.action_space}")
        return a.astype(np.int64).reshape(self.chunk)

    def episode_metrics(self) -> dict[str, float]:
        actions, labels = np.concatenate(self.episode_actions), np.concatenate(self.episode_labels)
        load = np.bincount(actions, minlength=self.num_experts).astype(np.float64)
        return {
            "episode_task_loss": float(np.mean(self.episode_losses)),
            "episode_oracle_accuracy": float((actions == self.oracle_experts(labels)).mean()),
            "episode_load_cv": float(load.std() / load.mean()),
            "episode_overflow_frac": self.overflow_total / len(actions),
            "episode_specialization": specialization(labels, actions, self.trainer.task.num_labels, self.num_experts),
        }
