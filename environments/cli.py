"""`routerlab rl train` / `routerlab rl eval`: stable-baselines3 on the routing environments (docs/rl.md).

Registered as a `routerlab.commands` entry point. gymnasium and stable-baselines3 are imported inside
the commands, so `routerlab` starts without them.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from routerlab.checkpoint import atomic_write_text
from routerlab.errors import ConfigError

rl_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and evaluate RL routing policies (stable-baselines3).")
console = Console()
ALGOS = ("ppo", "a2c")


def parse_env_kwargs(items: list[str]) -> dict:
    from routerlab.config import parse_value

    kwargs = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--kw expects key=value (for example chunk=4), got {item!r}")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = parse_value(value)
    return kwargs


def make_env(env_id: str, kwargs: dict):
    """gymnasium.make with user-facing errors (unknown id, unknown or invalid kwargs)."""
    import gymnasium as gym

    import environments
    from environments.token_routing import TokenRoutingEnv

    if env_id not in environments.ENV_IDS:
        raise ConfigError(f"unknown env {env_id!r}; valid: {', '.join(environments.ENV_IDS)}")
    valid = [p for p in inspect.signature(TokenRoutingEnv).parameters if p != "render_mode"]
    unknown = set(kwargs) - set(valid)
    if unknown:
        raise ConfigError(f"env {env_id!r} has no option {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
    return gym.make(env_id, **kwargs)


def oracle_curve_callback(eval_env, every: int, episodes: int, curve: list, progress):
    """SB3 callback: env metrics of finished episodes into TensorBoard, plus a deterministic-policy learning curve."""
    from stable_baselines3.common.callbacks import BaseCallback

    from environments.evaluation import policy_chooser, run_episodes

    class OracleCurve(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next_eval = 0

        def _evaluate(self) -> None:
            metrics = run_episodes(eval_env, policy_chooser(self.model), episodes, seed=10_000)
            curve.append({"timesteps": self.num_timesteps, **metrics})
            for key, value in metrics.items():
                self.logger.record(f"eval/{key}", value)
            self.next_eval += every

        def _on_training_start(self) -> None:
            self._evaluate()

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                for key, value in info.items():
                    if key.startswith("episode_"):
                        self.logger.record_mean(f"routing/{key.removeprefix('episode_')}", value)
            if self.num_timesteps >= self.next_eval:
                self._evaluate()
            progress(self.num_timesteps)
            return True

    return OracleCurve()


@rl_app.command("train")
def train_cmd(
    env_id: str = typer.Option("routerlab/TokenRouting-v0", "--env", help="registered env id"),
    kw: List[str] = typer.Option([], "--kw", help="env option key=value, repeatable: --kw mode=cotrain --kw chunk=4"),
    algo: str = typer.Option("ppo", "--algo", help="ppo or a2c"),
    timesteps: int = typer.Option(20_000, "--timesteps", help="environment steps (each routes `chunk` tokens)"),
    n_envs: int = typer.Option(8, "--n-envs", help="parallel envs (DummyVecEnv)"),
    n_steps: int = typer.Option(64, "--n-steps", help="rollout length per env"),
    batch_size: int = typer.Option(256, "--batch-size", help="PPO minibatch size"),
    lr: float = typer.Option(1e-3, "--lr"),
    gamma: float = typer.Option(0.99, "--gamma"),
    ent_coef: float = typer.Option(0.0, "--ent-coef"),
    seed: int = typer.Option(0, "--seed"),
    eval_every: int = typer.Option(5_000, "--eval-every", help="timesteps between learning-curve evaluations"),
    eval_episodes: int = typer.Option(10, "--eval-episodes"),
    out: Path = typer.Option(Path("runs/rl/token-routing"), "--out", help="folder for policy.zip, env.json, curve.json, TensorBoard"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a PPO/A2C routing policy; saves policy.zip + env.json (what the `rl` router loads)."""
    from routerlab.cli import user_errors  # the decorator lives with the main app

    user_errors(_train)(env_id, kw, algo, timesteps, n_envs, n_steps, batch_size, lr, gamma, ent_coef, seed, eval_every, eval_episodes, out, progress)


def _train(env_id, kw, algo, timesteps, n_envs, n_steps, batch_size, lr, gamma, ent_coef, seed, eval_every, eval_episodes, out, progress) -> None:
    if algo not in ALGOS:
        raise ConfigError(f"unknown algo {algo!r}; valid: {', '.join(ALGOS)}")
    if min(timesteps, n_envs, n_steps, batch_size, eval_every, eval_episodes) < 1:
        raise ConfigError("timesteps, n-envs, n-steps, batch-size, eval-every and eval-episodes must be >= 1")
    kwargs = parse_env_kwargs(kw)
    eval_env = make_env(env_id, kwargs)  # validates the kwargs before anything heavy starts
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.manual_seed(seed)
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=kwargs)
    common = dict(learning_rate=lr, n_steps=n_steps, gamma=gamma, ent_coef=ent_coef, seed=seed, verbose=0, tensorboard_log=str(out), device="cpu")
    model = PPO("MlpPolicy", venv, batch_size=batch_size, **common) if algo == "ppo" else A2C("MlpPolicy", venv, **common)
    curve: list = []
    with Progress("[bold]rl train", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        job = bar.add_task("train", total=timesteps)
        callback = oracle_curve_callback(eval_env, eval_every, eval_episodes, curve, lambda n: bar.update(job, completed=min(n, timesteps)))
        model.learn(total_timesteps=timesteps, callback=callback, tb_log_name="tb")
    if curve[-1]["timesteps"] != model.num_timesteps:
        callback._evaluate()
    save_policy(model, out, env_id, kwargs, algo, eval_env.unwrapped.observation_spec(), curve)
    final = curve[-1]
    console.print(f"after {model.num_timesteps} steps: return {final['return']:.3f}, oracle accuracy {final['oracle_accuracy']:.3f}, load CV {final['load_cv']:.3f}")
    console.print(f"policy: {out / 'policy.zip'}   TensorBoard: tensorboard --logdir {out}")


def save_policy(model, out: Path, env_id: str, kwargs: dict, algo: str, observation: dict, curve: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".policy-{os.getpid()}.tmp.zip"  # SB3 writes the zip itself: write aside, then rename
    model.save(tmp)
    os.replace(tmp, out / "policy.zip")
    meta = {"env_id": env_id, "env_kwargs": kwargs, "algo": algo, "observation": observation, "timesteps": model.num_timesteps}
    atomic_write_text(out / "env.json", json.dumps(meta, indent=2))
    atomic_write_text(out / "curve.json", json.dumps(curve, indent=2))


@rl_app.command("eval")
def eval_cmd(
    policy: Path = typer.Option(..., "--policy", help="policy.zip written by `routerlab rl train`"),
    kw: List[str] = typer.Option([], "--kw", help="override env options key=value (default: those it was trained with)"),
    episodes: int = typer.Option(20, "--episodes"),
    seed: int = typer.Option(10_000, "--seed", help="seed of the first episode's reset; later episodes continue"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the table as JSON here"),
) -> None:
    """Return, oracle accuracy and load metrics of a policy against random and greedy routing."""
    from routerlab.cli import user_errors

    user_errors(_eval)(policy, kw, episodes, seed, json_out)


def evaluate_policy(policy: Path, kw: list[str], episodes: int, seed: int) -> dict[str, dict[str, float]]:
    from stable_baselines3 import A2C, PPO

    from environments.evaluation import greedy_chooser, policy_chooser, random_chooser, run_episodes

    meta_path = policy.parent / "env.json"
    if not policy.is_file() or not meta_path.is_file():
        raise ConfigError(f"{str(policy)!r} with env.json beside it does not exist; train one with `routerlab rl train`")
    if episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {episodes}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    env = make_env(meta["env_id"], {**meta["env_kwargs"], **parse_env_kwargs(kw)})
    model = {"ppo": PPO, "a2c": A2C}[meta["algo"]].load(policy, device="cpu")
    choosers = {"policy": policy_chooser(model), "random": random_chooser(seed), "greedy": greedy_chooser()}
    return {name: run_episodes(env, choose, episodes, seed) for name, choose in choosers.items()}


def _eval(policy, kw, episodes, seed, json_out) -> None:
    results = evaluate_policy(policy, kw, episodes, seed)
    table = Table(title=f"{policy}: {episodes} episodes", header_style="bold")
    columns = list(next(iter(results.values())))
    table.add_column("routing")
    for c in columns:
        table.add_column(c, justify="right")
    for name, row in results.items():
        table.add_row(name, *(f"{row[c]:.3f}" for c in columns))
    console.print(table)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(results, indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(rl_app, name="rl")
