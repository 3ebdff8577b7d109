"""Routing decisions per second of routerlab/TokenRouting-v0 (one decision = one token routed).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rl_env.py            # frozen and cotrain, single and vectorized

Actions are random (the policy's cost is not counted): this measures the environment itself. Vectorized
runs use gymnasium.make_vec (sync) and stable-baselines3's DummyVecEnv, autoreset included. gymnasium's
default autoreset is next-step: the vector step after a sub-env's last step only resets that sub-env, so
it routes no token there and is not counted as a decision (SB3 resets within the terminal step).
"""
from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch

import environments  # noqa: F401

ENV_ID = "routerlab/TokenRouting-v0"


def single(kwargs: dict, seconds: float) -> float:
    env = gym.make(ENV_ID, **kwargs)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    E, C = kwargs.get("num_experts", 4), kwargs.get("chunk", 1)
    decisions, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        action = int(rng.integers(E)) if C == 1 else rng.integers(0, E, size=C)
        _, _, done, _, _ = env.step(action)
        decisions += C
        if done:
            env.reset()
    return decisions / (time.perf_counter() - start)


def vectorized(kwargs: dict, num_envs: int, seconds: float, kind: str) -> float:
    C = kwargs.get("chunk", 1)
    if kind == "gymnasium":
        envs = gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="sync", **kwargs)
        envs.reset(seed=0)
        step = lambda a: envs.step(a)  # noqa: E731
    else:
        from stable_baselines3.common.env_util import make_vec_env

        envs = make_vec_env(ENV_ID, n_envs=num_envs, seed=0, env_kwargs=kwargs)
        envs.reset()
        step = lambda a: envs.step(a)  # noqa: E731
    space = envs.action_space
    space.seed(0)
    if kind == "gymnasium":  # a batched space
        actions = [space.sample() for _ in range(64)]
    else:  # SB3 vec envs expose the single env's space
        actions = [np.stack([space.sample() for _ in range(num_envs)]) for _ in range(64)]
    decisions, i, start = 0, 0, time.perf_counter()
    resetting = np.zeros(num_envs, dtype=bool)  # gymnasium next-step autoreset: these sub-envs only reset now
    while time.perf_counter() - start < seconds:
        out = step(actions[i % 64])
        decisions += C * int((~resetting).sum())
        if kind == "gymnasium":
            resetting = np.logical_or(out[2], out[3])
        i += 1
    envs.close()
    return decisions / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--num-envs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for mode, chunk in (("frozen", 1), ("frozen", 64), ("cotrain", 1), ("cotrain", 64)):
        kwargs = {"mode": mode, "chunk": chunk, "tokens": 256}
        gym.make(ENV_ID, **kwargs)  # pre-training (frozen) happens once per process, outside the timing
        rows.append((mode, chunk, "single", 1, single(kwargs, args.seconds)))
        for kind in ("gymnasium", "sb3"):
            rows.append((mode, chunk, kind, args.num_envs, vectorized(kwargs, args.num_envs, args.seconds, kind)))
    print("| mode | chunk C | env | envs | decisions/s |")
    print("|---|---:|---|---:|---:|")
    for mode, chunk, kind, n, rate in rows:
        print(f"| {mode} | {chunk} | {kind} | {n} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
