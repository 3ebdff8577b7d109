"""Gymnasium environments for routing, registered under `routerlab/...` ids. See docs/rl.md.

    import environments, gymnasium as gym
    env = gym.make("routerlab/TokenRouting-v0", mode="frozen", chunk=4)
"""
import gymnasium

ENV_IDS = ("routerlab/TokenRouting-v0",)

if "routerlab/TokenRouting-v0" not in gymnasium.registry:
    gymnasium.register(id="routerlab/TokenRouting-v0", entry_point="environments.token_routing:TokenRoutingEnv")
