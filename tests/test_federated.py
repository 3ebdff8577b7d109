"""Federated expert training (issue 8): partitions, strategies, failures, simulation and deployment.

The two Flower runs dominate the time: the Ray simulation (~20-40 s) and the deployment engine
(superlink + 2 supernodes, one round; ~30-60 s, each message starts a `flwr-clientapp` process).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

for _key, _value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
    os.environ.setdefault(_key, _value)

from federated.aggregate import ClientUpdate, aggregate, client_expert_mi, worst_decile  # noqa: E402
from federated.config import load_setup, make_setup  # noqa: E402
from federated.partition import client_task, split_indices  # noqa: E402
from routerlab.errors import ConfigError  # noqa: E402
from routerlab.tasks import build_task  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "seed": 0, "task": {"name": "digits"},
    "model": {"d_model": 16, "n_layers": 1, "num_experts": 4, "expert_hidden": 16},
    "router": {"name": "softmax_topk", "k": 1},
    "train": {"batch_size": 32, "lr": 1e-2, "lr_schedule": "constant", "eval_batches": 2},
    "run": {"checkpoint": False},
}


def tiny_setup(**fed):
    return make_setup({**TINY, "federated": {"num_clients": 3, "rounds": 2, "local_steps": 3, **fed}})


# ---- partitions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,kw", [("iid", {}), ("dirichlet", {"alpha": 0.1}), ("dirichlet", {"alpha": 1.0}), ("classes", {"classes_per_client": 2}), ("contiguous", {})])
def test_partitions_cover_every_example_exactly_once(scheme, kw):
    labels = build_task({"name": "digits"}).data["train"][1].numpy()
    parts = split_indices(labels, 10, scheme, seed=3, min_examples=8, **kw)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))  # every example, exactly once
    again = split_indices(labels, 10, scheme, seed=3, min_examples=8, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # same seed, same split
    if scheme == "classes":
        assert all(len(np.unique(labels[p])) == 2 for p in parts)
    if scheme == "dirichlet" and kw["alpha"] == 0.1:  # strong skew: most clients dominated by few classes
        top_share = [np.bincount(labels[p]).max() / len(p) for p in parts]
        assert np.median(top_share) > 0.3  # IID would give about 0.1-0.15
        assert min(len(p) for p in parts) >= 8


def test_chars_contiguous_slices_cover_the_corpus(tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(chr(97 + (i // 300) % 26) for i in range(6000)))  # topics = letter runs
    setup = make_setup({**TINY, "task": {"name": "chars", "corpus": str(corpus), "block_size": 8},
                        "federated": {"num_clients": 4, "partition": "contiguous"}})
    task = build_task(setup.config.task)
    pieces = [client_task(task, setup, i) for i in range(4)]
    rebuilt = torch.cat([torch.cat([p.data["train"], p.data["val"]]) for p in pieces])
    assert torch.equal(rebuilt, task.data["train"])
    assert task.data["train"].numel() == 5400  # the base task is untouched


def test_client_evaluation_set_follows_the_client_classes():
    setup = tiny_setup(num_clients=5, partition="classes", classes_per_client=2)
    task = build_task(setup.config.task)
    part = client_task(task, setup, 1)
    train_classes = set(part.data["train"][1].tolist())
    assert len(train_classes) == 2 and set(part.data["val"][1].tolist()) <= train_classes


# ---- aggregation --------------------------------------------------------------------------------
EXPERT, SHARED, ROUTER = "ffns.0.experts.w_in", "embed.weight", "ffns.0.router.gate.weight"


def state(expert, shared, router):
    return {EXPERT: torch.tensor(expert, dtype=torch.float32).reshape(3, 1), SHARED: torch.tensor([shared], dtype=torch.float32),
            ROUTER: torch.tensor([router], dtype=torch.float32)}


def test_expert_weighted_with_one_client_returns_its_weights():
    start, client = state([0, 0, 0], 0, 0), state([1, 2, 3], 4, 5)
    out = aggregate("expert_weighted", start, [ClientUpdate(client, 17, {"ffns.0": torch.tensor([5.0, 1.0, 2.0])})])
    for key in client:
        assert torch.equal(out[key], client[key])


def test_expert_weighted_two_clients_matches_hand_computation():
    start = state([9, 9, 9], 9, 9)
    a = ClientUpdate(state([1, 10, 100], 1, 1), 1, {"ffns.0": torch.tensor([3.0, 0.0, 0.0])})
    b = ClientUpdate(state([2, 20, 200], 5, 5), 3, {"ffns.0": torch.tensor([1.0, 2.0, 0.0])})
    out = aggregate("expert_weighted", start, [a, b])
    # expert 0: tokens 3:1; expert 1: only b used it; expert 2: nobody did -> keeps the global 9
    assert torch.allclose(out[EXPERT].flatten(), torch.tensor([(3 * 1 + 1 * 2) / 4, 20.0, 9.0]))
    assert torch.allclose(out[SHARED], torch.tensor([(1 * 1 + 3 * 5) / 4]))  # shared: by examples 1:3
    assert torch.allclose(out[ROUTER], torch.tensor([(1 * 1 + 3 * 5) / 4]))
    fed = aggregate("fedavg", start, [a, b])  # fedavg: everything by examples, unused experts included
    assert torch.allclose(fed[EXPERT].flatten(), torch.tensor([(1 + 3 * 2) / 4, (10 + 3 * 20) / 4, (100 + 3 * 200) / 4]))
    # personal_router: the updates carry no router, so the global router stays as it was
    no_router = [ClientUpdate({k: v for k, v in u.state.items() if k != ROUTER}, u.num_examples, u.tokens) for u in (a, b)]
    pr = aggregate("personal_router", start, no_router)
    assert torch.equal(pr[ROUTER], start[ROUTER]) and torch.allclose(pr[EXPERT], out[EXPERT])


def test_merge_over_the_clients_that_held_each_expert():
    """Unequal clients: a holds experts {0, 1}, b holds {1, 2}; each expert is averaged over its holders."""
    start = state([9, 9, 9], 9, 9)
    a = ClientUpdate({EXPERT: torch.tensor([[1.0], [10.0]]), SHARED: torch.tensor([1.0])}, 1, {"ffns.0": torch.tensor([4.0, 1.0, 0.0])}, {"ffns.0": [0, 1]})
    b = ClientUpdate({EXPERT: torch.tensor([[20.0], [200.0]]), SHARED: torch.tensor([5.0])}, 3, {"ffns.0": torch.tensor([0.0, 3.0, 2.0])}, {"ffns.0": [1, 2]})
    fed = aggregate("fedavg", start, [a, b])
    # expert 0: only a (value 1); expert 1: a 10, b 20 by examples 1:3; expert 2: only b (200)
    assert torch.allclose(fed[EXPERT].flatten(), torch.tensor([1.0, (10 + 3 * 20) / 4, 200.0]))
    assert torch.allclose(fed[SHARED], torch.tensor([(1 + 3 * 5) / 4]))
    assert torch.equal(fed[ROUTER], start[ROUTER])  # nobody sent a router
    ew = aggregate("expert_weighted", start, [a, b])  # expert 1 by tokens 1:3
    assert torch.allclose(ew[EXPERT].flatten(), torch.tensor([1.0, (1 * 10 + 3 * 20) / 4, 200.0]))
    lone = aggregate("expert_weighted", start, [ClientUpdate({EXPERT: torch.tensor([[5.0]])}, 2, {"ffns.0": torch.tensor([0.0, 0.0, 0.0])}, {"ffns.0": [2]})])
    assert torch.equal(lone[EXPERT], start[EXPERT])  # held but never used: keeps its global value


def test_choose_experts_keeps_the_most_used_and_explores():
    from federated.aggregate import choose_experts

    tokens = np.array([0, 50, 3, 0, 20, 0, 7, 0])
    for seed in range(5):
        rng = np.random.default_rng(seed)
        chosen = choose_experts(tokens, 8, keep=4, explore=1, rng=rng)
        assert len(chosen) == 4 and chosen == sorted(set(chosen))
        assert {1, 4, 6} <= set(chosen)  # the three most used (50, 20, 7)
        assert len(set(chosen) - {1, 4, 6}) == 1  # plus one explored expert
    first = choose_experts(None, 8, keep=3, explore=1, rng=np.random.default_rng(0))
    assert len(first) == 3  # no history: a random subset
    assert choose_experts(tokens, 8, keep=8, explore=1, rng=np.random.default_rng(0)) == list(range(8))


def test_sparse_client_routes_only_among_its_experts_and_returns_only_them():
    """A client holding experts {1, 3} of 4, told to route top-1 although the config says top-2, never routes
    elsewhere; its reply carries just those rows."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from federated.client_app import app as client_app
    from routerlab.train import Trainer

    setup = make_setup({**TINY, "router": {"name": "softmax_topk", "k": 2}, "federated": {"num_clients": 2, "local_steps": 4}})
    global_state = Trainer(setup.config, log=False).model.state_dict()
    layers = sorted({k.split(".experts.")[0] for k in global_state if ".experts." in k})
    held = [1, 3]
    arrays = {k: (v[held] if ".experts." in k else v) for k, v in global_state.items()}
    config = {"round": 1, "setup": setup.to_json(), "local": [], "k": 1, **{f"experts:{layer}": held for layer in layers}}
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    msg = Message(RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)}), dst_node_id=7, message_type=MessageType.TRAIN, group_id="1")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    reply = client_app(msg, context)
    m = reply.content["metrics"]
    for layer in layers:
        tokens = list(m[f"tokens:{layer}"])
        assert tokens[0] == 0 and tokens[2] == 0 and tokens[1] + tokens[3] == 4 * 32  # 4 steps x 32 examples x top-1
        assert list(m[f"held:{layer}"]) == held
    back = reply.content["arrays"].to_torch_state_dict()
    assert set(back) == set(arrays)
    for k, v in back.items():
        assert v.shape == arrays[k].shape  # expert tensors: 2 rows, not 4
    sent = sum(len(a.data) for a in ArrayRecord(arrays).values())  # serialized arrays: data plus a small header each
    assert sum(len(a.data) for a in reply.content["arrays"].values()) == sent  # the bytes up are what was sent down
    assert sent < 0.75 * sum(len(a.data) for a in ArrayRecord(global_state).values())  # half the experts: far fewer bytes


def test_strategy_from_a_plugin_file(tmp_path):
    """A new strategy is one file: registered by name, valid in a config, used by aggregate."""
    from federated.strategies import load_strategy_plugin, strategy_names

    plugin = tmp_path / "median_experts.py"
    plugin.write_text(
        "import torch\n"
        "from federated.strategies import register_strategy\n"
        "from federated.strategies.base import ExpertStrategy\n\n"
        "@register_strategy('equal_experts')\n"
        "class EqualExperts(ExpertStrategy):\n"
        "    @staticmethod\n"
        "    def expert_weights(update, layer):\n"
        "        return torch.ones(3)\n"
    )
    load_strategy_plugin(plugin)
    assert "equal_experts" in strategy_names()
    assert tiny_setup(strategy="equal_experts").fed.strategy == "equal_experts"
    a = ClientUpdate(state([1, 10, 100], 1, 1), 1)
    b = ClientUpdate(state([3, 30, 300], 5, 5), 3)
    out = aggregate("equal_experts", state([0, 0, 0], 0, 0), [a, b])
    assert torch.allclose(out[EXPERT].flatten(), torch.tensor([2.0, 20.0, 200.0]))  # experts 1:1, shared 1:3
    assert torch.allclose(out[SHARED], torch.tensor([4.0]))


def test_round_metrics():
    assert worst_decile([0.9, 0.2, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.95, 0.85]) == 0.2
    assert worst_decile([0.5] * 10 + [0.1, 0.2]) == pytest.approx(0.15)  # 12 clients: lowest 2
    assert client_expert_mi([np.array([[10, 0], [0, 10]])]) == pytest.approx(1.0)
    assert client_expert_mi([np.array([[5, 5], [5, 5]])]) == pytest.approx(0.0)


def test_proximal_term_gradient():
    from federated.client_app import proximal_term

    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        anchor = [p.clone() for p in model.parameters()]
    term = proximal_term(model, mu=0.5)  # the trainer adds it with add_loss_term
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    x = torch.ones(2, 3)
    (model(x).sum() + term()).backward()
    hooked = [p.grad.clone() for p in model.parameters()]
    plain = torch.nn.Linear(3, 1)
    with torch.no_grad():
        for q, p in zip(plain.parameters(), model.parameters()):
            q.copy_(p)
    (plain(x).sum() + 0.25 * sum(((q - a) ** 2).sum() for q, a in zip(plain.parameters(), anchor))).backward()
    for h, q in zip(hooked, plain.parameters()):
        assert torch.allclose(h, q.grad)


# ---- bad input ----------------------------------------------------------------------------------
def test_invalid_strategy_and_alpha_fail_clearly():
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'; valid strategies: fedavg, expert_weighted, personal_router, local_only"):
        load_setup(None, ["federated.strategy=fedsgd"])
    for alpha in ("0", "-1"):
        with pytest.raises(ConfigError, match="alpha must be > 0"):
            load_setup(None, [f"federated.alpha={alpha}"])
    with pytest.raises(ConfigError, match="send_experts=1 must lie between the top-k"):
        make_setup({**TINY, "router": {"name": "softmax_topk", "k": 2}, "federated": {"send_experts": 1}})
    with pytest.raises(ConfigError, match="partition=contiguous"):
        make_setup({**TINY, "task": {"name": "chars"}, "federated": {"partition": "iid"}})


def test_cli_rejects_bad_strategy_with_one_line():
    from typer.testing import CliRunner

    from routerlab.cli import app

    result = CliRunner().invoke(app, ["federate", "--set", "federated.strategy=nope"])
    assert result.exit_code == 2
    assert "unknown strategy 'nope'" in result.output and "Traceback" not in result.output


# ---- Flower runs --------------------------------------------------------------------------------
@pytest.mark.slow
def test_simulation_personal_router_with_failed_client(tmp_path):
    """Ray simulation: 3 clients, one raises in every round; routers never leave the clients; the
    in-process engine gives the same model from the same seed."""
    from federated.inprocess import run_inprocess
    from federated.simulation import simulate

    setup = tiny_setup(strategy="personal_router", fail_fraction=0.34, proximal_mu=0.01, sim_cpus=2, round_timeout=600)  # a loaded machine starts Ray slowly
    summary = simulate(setup, tmp_path / "run")
    rounds = [line.split(",") for line in (tmp_path / "run" / "rounds.csv").read_text().splitlines()[1:]]
    assert [(r[1], r[2]) for r in rounds] == [("2", "1"), ("2", "1")]  # replied, failed in each round
    assert summary["rounds"] == 2 and 0.0 <= summary["final"]["personal_acc_mean"] <= 1.0
    assert summary["final"]["global_acc_mean"] == summary["final"]["global_acc_mean"]  # not NaN: clients evaluated
    assert any(".experts." in k for k in summary["keys_received"])
    assert not [k for k in summary["keys_sent"] + summary["keys_received"] if ".router." in k]
    # the server never received a router, so its global router is still the initial one
    from routerlab.train import Trainer

    initial = Trainer(setup.config, log=False).model.state_dict()
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    routers = [k for k in final if ".router." in k]
    assert routers and all(torch.equal(final[k], initial[k]) for k in routers)
    assert any(not torch.equal(final[k], initial[k]) for k in final if ".experts." in k)
    same = run_inprocess(setup, tmp_path / "inprocess")
    again = torch.load(tmp_path / "inprocess" / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert same["final"]["personal_acc_mean"] == summary["final"]["personal_acc_mean"]


@pytest.mark.slow
def test_secure_deployment_refuses_an_unknown_supernode(tmp_path):
    """TLS + SuperNode authentication: 2 registered SuperNodes train over HTTPS; a SuperNode whose key was
    never registered is refused (Flower's exit code 305 in its log) and never listed; `flwr run` of a copy of the app
    returns a trained model; pyproject.toml is unchanged and every process is stopped."""
    from federated.deployment import copy_app, flwr_run, local_deployment
    from routerlab.train import Trainer

    before = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    run_dir = tmp_path / "run"
    overrides = "federated.num_clients=2 federated.rounds=1 federated.local_steps=40 federated.strategy=fedavg federated.partition=iid federated.client_eval=false"
    with local_deployment(tmp_path, num_nodes=2) as deployment:
        assert "https://" in (tmp_path / "superlink.log").read_text()
        stranger = deployment.start_node("stranger", "partition-id=0 num-partitions=2")
        assert stranger.wait(timeout=90) != 0
        assert "Exit Code: 305" in (tmp_path / "stranger.log").read_text()  # Flower: "Failed to activate SuperNode"
        listed = deployment.flwr("supernode", "ls", deployment.connection, "--format", "json")
        assert listed.stdout.count('"node-id"') == 2, listed.stdout  # the stranger is not among them
        result = flwr_run(copy_app(tmp_path / "app"), deployment, {"set": overrides, "run-dir": str(run_dir)}, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.run_status == "finished:completed"
        procs = deployment.procs
    assert all(p.poll() is not None for p in procs)  # superlink and supernodes stopped
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["replied"] == 2
    setup = load_setup(None, overrides.split())
    trainer = Trainer(setup.config, log=False)
    chance = trainer.evaluate()["accuracy"]
    trainer.model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    trained = trainer.evaluate()["accuracy"]
    assert trained > max(0.5, chance + 0.2), (chance, trained)
    assert hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest() == before


def _clientapp_pids(session: int) -> set[int]:
    """PIDs of the flwr-clientapp processes in a SuperNode's session (one per message it handles)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == session and b"flwr-clientapp" in (entry / "cmdline").read_bytes():
                pids.add(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


@pytest.mark.slow
def test_failed_run_exits_nonzero_and_a_killed_supernode_costs_one_round_timeout(tmp_path):
    """Deployment engine (plain HTTP, the explicit local option): (1) a run wanting 3 SuperNodes where 2 are
    up fails after federated.node_wait and `flwr_run` reports it (exit 1, finished:failed, failed.json);
    (2) a SuperNode killed while it trains: the round completes from the other one, waiting at most
    round_timeout (measured in rounds.csv: train_phase_s)."""
    import signal
    import subprocess
    import time

    from federated.deployment import BIN, copy_app, flwr_run, local_deployment

    round_timeout = 60.0  # the surviving SuperNode must answer within it: a fresh flwr-clientapp process imports torch first
    with local_deployment(tmp_path, num_nodes=2, insecure=True) as deployment:
        app = copy_app(tmp_path / "app")
        bad = flwr_run(app, deployment, {"set": "federated.num_clients=3 federated.node_wait=2", "run-dir": str(tmp_path / "bad")}, timeout=240)
        assert bad.returncode == 1 and bad.run_status == "finished:failed", bad.stdout + bad.stderr
        assert "only 2 of 3 SuperNodes connected" in json.loads((tmp_path / "bad" / "failed.json").read_text())["error"]
        assert not (tmp_path / "bad" / "summary.json").exists()

        run_dir = tmp_path / "run"
        overrides = f"federated.num_clients=2 federated.rounds=1 federated.local_steps=10 federated.client_eval=false federated.round_timeout={round_timeout}"
        config = f'set="{overrides}" run-dir="{run_dir}"'
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(app), deployment.connection, "--run-config", config, "--stream"],
                               env=deployment.env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        victim = deployment.nodes[1]
        seen: set[int] = set()
        deadline = time.monotonic() + 180
        while len(seen) < 2 and time.monotonic() < deadline:  # message 1 is the discovery query, message 2 the training
            seen |= _clientapp_pids(victim.pid)
            time.sleep(0.2)
        assert len(seen) >= 2, "the SuperNode never started training"
        os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and its ClientApp vanish mid-round
        output, _ = run.communicate(timeout=240)
        assert run.returncode == 0, output
    rounds = (run_dir / "rounds.csv").read_text().splitlines()
    row = dict(zip(rounds[0].split(","), rounds[1].split(",")))
    assert (row["replied"], row["failed"]) == ("1", "1")
    assert float(row["train_phase_s"]) <= round_timeout + 10.0  # the round waited at most its timeout
    assert json.loads((run_dir / "summary.json").read_text())["final"]["replied"] == 1
