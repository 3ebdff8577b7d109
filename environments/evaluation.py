"""Run episodes with a policy, a random baseline or a greedy baseline, and average what the env reports."""
from __future__ import annotations

from typing import Callable

import numpy as np

Chooser = Callable[[np.ndarray, object], object]  # (observation, env) -> action


def random_chooser(seed: int) -> Chooser:
    rng = np.random.default_rng(seed)
    return lambda obs, env: _shape(rng.integers(0, env.num_experts, size=env.chunk), env)


def greedy_chooser() -> Chooser:
    """Privileged myopic baseline: each token's lowest-loss expert (it sees the loss table; ignores capacity)."""
    return lambda obs, env: _shape(env.expert_losses().argmin(1), env)


def policy_chooser(model) -> Chooser:
    return lambda obs, env: _shape(model.predict(obs, deterministic=True)[0], env)


def _shape(action, env):
    action = np.asarray(action, dtype=np.int64).reshape(env.chunk)
    return int(action[0]) if env.chunk == 1 else action


def run_episodes(env, choose: Chooser, episodes: int, seed: int) -> dict[str, float]:
    """Mean return and episode metrics over `episodes` consecutive episodes, the first reset with `seed`
    (cotrain: the experts start fresh there and keep learning through the following episodes)."""
    env = env.unwrapped
    rows = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed if i == 0 else None)
        total, done = 0.0, False
        while not done:
            obs, reward, done, _, info = env.step(choose(obs, env))
            total += reward
        rows.append({"return": total, **{k.removeprefix("episode_"): v for k, v in info.items() if k.startswith("episode_")}})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
