"""RL routing: the TokenRouting env, the `rl` router (a saved SB3 policy) and the `reinforce` router."""
import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import environments  # noqa: F401  (registers the env ids)
from environments.evaluation import policy_chooser, random_chooser, run_episodes
from environments.experts import expert_losses
from environments.token_routing import TokenRoutingEnv
from routerlab.config import load_config
from routerlab.routers import build_router
from routerlab.train import Trainer

ENV_ID = "routerlab/TokenRouting-v0"


def frozen(**kwargs) -> TokenRoutingEnv:
    return TokenRoutingEnv(mode="frozen", **kwargs)  # pre-trained experts are cached per process


ONE_WORKER = pytest.mark.xdist_group("test_rl.ppo_policy")  # `make test` (xdist): the fixture's users run in one worker, so it runs once


@pytest.fixture(scope="module")
def ppo_policy(tmp_path_factory):
    """A short PPO run on the frozen Discrete env, saved as `routerlab rl train` saves it."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from environments.cli import save_policy

    venv = make_vec_env(ENV_ID, n_envs=4, seed=0)
    model = PPO("MlpPolicy", venv, n_steps=64, batch_size=128, learning_rate=1e-3, seed=0, device="cpu")
    model.learn(4096)
    out = tmp_path_factory.mktemp("ppo")
    save_policy(model, out, ENV_ID, {}, "ppo", frozen().observation_spec(), [])
    return model, out / "policy.zip"


@pytest.mark.parametrize("kwargs", [{"mode": "frozen"}, {"mode": "frozen", "chunk": 4, "obs_dim": 6}, {"mode": "cotrain", "chunk": 4, "tokens": 16}])
def test_both_env_checkers_pass(kwargs):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = TokenRoutingEnv(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checker warning fails the test
        gym_check(env, skip_render_check=True)
        sb3_check(env, warn=True)
    expected = gym.spaces.Discrete(4) if kwargs.get("chunk", 1) == 1 else gym.spaces.MultiDiscrete([4] * 4)
    assert env.action_space == expected


def test_reward_is_minus_mean_loss_of_the_chosen_experts():
    env = frozen(chunk=4, tokens=8, capacity_factor=10.0)
    env.pool_loss = np.arange(len(env.pool_labels) * 4, dtype=np.float32).reshape(-1, 4) / 1000.0  # hand-built table
    env.reset(seed=5)
    tokens = env.episode_tokens[:4]
    env._prepare_chunk()
    action = np.array([0, 3, 1, 1])
    _, reward, _, _, info = env.step(action)
    expected = -np.mean([env.pool_loss[t, a] for t, a in zip(tokens, action)])
    assert reward == pytest.approx(expected, rel=1e-6) and info["overflow"] == 0


def test_capacity_overflow_is_penalized_exactly_as_configured():
    env = frozen(chunk=4, tokens=8, capacity_factor=0.5, overflow_penalty=2.0)  # capacity ceil(0.5*8/4) = 1
    env.pool_loss = np.zeros_like(env.pool_loss)
    assert env.capacity == 1
    env.reset(seed=0)
    obs, reward, _, _, info = env.step(np.array([0, 0, 0, 1]))  # expert 0 gets 3: 2 over
    assert info["overflow"] == 2 and reward == pytest.approx(-2.0 * 2 / 4)
    assert obs[-4:].tolist() == [3.0, 1.0, 0.0, 0.0]  # load / capacity is observed
    _, reward, done, _, info = env.step(np.array([0, 1, 2, 3]))  # experts 0 and 1 each one more over
    assert info["overflow"] == 2 and reward == pytest.approx(-1.0) and done
    assert info["episode_overflow_frac"] == pytest.approx(4 / 8)


@pytest.mark.parametrize("mode", ["frozen", "cotrain"])
def test_same_seed_same_episode(mode):
    def episode(seed):
        env = TokenRoutingEnv(mode=mode, chunk=4, tokens=16)
        obs, _ = env.reset(seed=seed)
        trace, done = [obs], False
        while not done:
            obs, reward, done, _, _ = env.step(np.array([0, 1, 2, 3]))
            trace += [obs, np.array([reward])]
        return np.concatenate(trace)

    assert np.array_equal(episode(3), episode(3))
    assert not np.array_equal(episode(3), episode(4))


def test_cotrain_experts_learn_from_the_chosen_assignment_every_train_every_chunks():
    env = TokenRoutingEnv(mode="cotrain", chunk=4, tokens=24, train_every=4)
    env.reset(seed=0)
    before = {k: v.clone() for k, v in env.trainer.model.state_dict().items() if "experts." in k}
    for _ in range(4):
        env.step(np.array([2, 2, 2, 2]))  # every token to expert 2
    assert env.trainer.step == 1
    after = env.trainer.model.state_dict()
    changed = {k: bool((after[k] - v).abs().sum(dim=tuple(range(1, v.dim()))).nonzero().flatten().tolist() == [2]) for k, v in before.items()}
    assert all(changed.values()), changed  # only expert 2's weights moved
    env.step(np.array([0, 1, 2, 3]))
    env.step(np.array([0, 1, 2, 3]))  # episode end: the remaining 2 chunks are trained on too
    assert env.trainer.step == 2


def test_invalid_actions_are_refused():
    env = frozen()
    env.reset(seed=0)
    for bad in (4, -1, 1.5, np.array([0, 1])):
        with pytest.raises(ValueError, match="invalid action"):
            env.step(bad)
    multi = frozen(chunk=4, tokens=8)
    multi.reset(seed=0)
    for bad in (np.array([0, 1, 2]), np.array([0, 1, 2, 4]), 2):
        with pytest.raises(ValueError, match="invalid action"):
            multi.step(bad)
    multi.step(np.array([0, 1, 2, 3]))
    multi.step(np.array([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="reset"):
        multi.step(np.array([0, 1, 2, 3]))


def test_vectorized_envs_step_in_lockstep():
    envs = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode="sync", chunk=8, tokens=32)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (3, 8 * 16 + 4)
    for _ in range(4):
        obs, reward, terminated, _, info = envs.step(envs.action_space.sample())
    assert terminated.all() and np.all(reward < 0)
    envs.close()


@ONE_WORKER
def test_short_ppo_run_beats_random_oracle_accuracy(ppo_policy):
    model, _ = ppo_policy
    env = frozen()
    trained = run_episodes(env, policy_chooser(model), episodes=5, seed=100)
    random = run_episodes(env, random_chooser(0), episodes=5, seed=100)
    assert random["oracle_accuracy"] < 0.4
    assert trained["oracle_accuracy"] > 0.85 and trained["return"] > random["return"] + 50


@ONE_WORKER
def test_rl_router_matches_the_policy_deterministic_actions(ppo_policy):
    model, path = ppo_policy
    env = frozen()
    router = build_router({"name": "rl", "policy": str(path)}, d_model=16, num_experts=4)
    inputs, targets, _ = (t[:200] for t in env.trainer.task.data["train"])
    _, x = expert_losses(env.trainer, inputs, targets)  # the router inputs the env observes
    routing = router(x)
    obs = np.concatenate([env.pool_features[:200], np.zeros((200, 4), np.float32)], 1)  # the env's observations, empty load
    actions, _ = model.predict(obs, deterministic=True)
    assert routing.experts.shape == (200, 1) and np.array_equal(routing.experts[:, 0].numpy(), actions)


def test_rl_router_with_chunks_and_projection_matches_policy_in_a_trainer(tmp_path):
    from stable_baselines3 import PPO

    from environments.cli import save_policy

    env = frozen(chunk=2, obs_dim=4, tokens=8)
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu")  # untrained: still deterministic
    save_policy(model, tmp_path, ENV_ID, {"chunk": 2, "obs_dim": 4, "tokens": 8}, "ppo", env.observation_spec(), [])
    router = build_router({"name": "rl", "policy": str(tmp_path / "policy.zip"), "load_scale": 0.0}, 16, 4)
    obs, _ = env.reset(seed=1)
    inputs, targets, _ = (t[env.episode_tokens[:2]] for t in env.trainer.task.data["train"])
    _, x = expert_losses(env.trainer, inputs, targets)
    assert np.allclose(router.observations(x)[0].numpy(), obs, atol=1e-5)
    assert router(x).experts[:, 0].tolist() == model.predict(obs, deterministic=True)[0].tolist()
    # inside the one trainer like any router (non-trainable policy, load state from after_step)
    overrides = ["task.name=clusters", "task.num_clusters=4", "task.input_dim=8", "model.d_model=16", "model.n_layers=1",
                 "model.num_experts=4", "model.expert_hidden=16", "router.name=rl", f"router.policy={tmp_path / 'policy.zip'}",
                 "train.steps=3", "train.batch_size=16", "train.eval_batches=1", "run.checkpoint=false"]
    trainer = Trainer(load_config(None, overrides), log=False)
    metrics = trainer.fit()
    assert metrics["load_cv"] >= 0 and float(trainer.layers[0].router.load_state.sum()) > 0


def test_reinforce_surrogate_gradient_is_the_reinforce_estimator():
    torch.manual_seed(0)
    router = build_router({"name": "reinforce", "entropy": 0.0, "baseline_decay": 0.5}, d_model=6, num_experts=3)
    router.train()
    x = torch.randn(10, 6)
    for step, token_loss in enumerate((torch.rand(10), torch.rand(10) * 3)):
        routing = router(x)
        e = routing.experts[:, 0]
        surrogate = router.observe_token_loss(token_loss)["reinforce"]
        router.gate.weight.grad = None
        surrogate.backward()
        r = -token_loss
        b = r.mean() if step == 0 else previous_mean  # bias-corrected EMA after one step = that step's mean
        previous_mean = r.mean()
        logp = torch.log_softmax(x @ router.gate.weight.detach().t(), -1)
        onehot = torch.nn.functional.one_hot(e, 3).float()
        # d/dW of -mean_t (r_t - b) log pi(e_t|x_t) = -mean_t (r_t - b) (onehot - pi) x_t^T
        expected = -(((r - b)[:, None] * (onehot - logp.exp())).t() @ x) / 10
        assert torch.allclose(router.gate.weight.grad, expected, atol=1e-6), step
    router.eval()
    assert router.observe_token_loss(torch.rand(10)) == {} and router(x).experts.shape == (10, 1)


def test_reinforce_trains_through_the_trainer_hook(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["task.name=clusters", "router.name=reinforce", "router.balance=0.1", "train.steps=40", "train.lr=1e-2"])
    trainer = Trainer(cfg, log=False)
    gate = trainer.layers[0].router.gate.weight.detach().clone()
    metrics = trainer.fit()
    assert not torch.equal(gate, trainer.layers[0].router.gate.weight)  # only the surrogate reaches the gate
    assert int(trainer.layers[0].router.baseline_steps) == 40 and np.isfinite(metrics["loss"])
    assert float(trainer.layers[0].router.baseline) < 0  # the baseline tracks the (negative) reward


def test_cli_train_and_eval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from routerlab.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["rl", "train", "--timesteps", "512", "--n-envs", "2", "--n-steps", "64", "--batch-size", "64",
                                 "--eval-every", "256", "--eval-episodes", "2", "--kw", "tokens=32", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "env.json").read_text())
    assert meta["env_kwargs"] == {"tokens": 32} and meta["observation"]["num_experts"] == 4
    assert [row["timesteps"] for row in json.loads((out / "curve.json").read_text())][0] == 0
    events = EventAccumulator(str(next(out.glob("tb_*"))), size_guidance={"scalars": 0}).Reload()
    assert {"routing/oracle_accuracy", "routing/load_cv", "eval/oracle_accuracy", "train/value_loss"} <= set(events.Tags()["scalars"])
    result = runner.invoke(app, ["rl", "eval", "--policy", str(out / "policy.zip"), "--episodes", "2", "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "e.json").read_text())
    assert set(table) == {"policy", "random", "greedy"} and table["greedy"]["return"] > table["random"]["return"]
    bad = runner.invoke(app, ["rl", "train", "--kw", "chunks=3", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "valid:" in bad.output and "Traceback" not in bad.output
