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
    term = proximal_term(model, mu=0.5, skip_routers=False)  # the trainer adds it with add_loss_term
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
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'; valid strategies: fedavg, expert_weighted, personal_router"):
        load_setup(None, ["federated.strategy=fedsgd"])
    for alpha in ("0", "-1"):
        with pytest.raises(ConfigError, match="alpha must be > 0"):
            load_setup(None, [f"federated.alpha={alpha}"])
    with pytest.raises(ConfigError, match="partition=contiguous"):
        make_setup({**TINY, "task": {"name": "chars"}, "federated": {"partition": "iid"}})


def test_cli_rejects_bad_strategy_with_one_line():
    from typer.testing import CliRunner

    from routerlab.cli import app

    result = CliRunner().invoke(app, ["federate", "--set", "federated.strategy=nope"])
    assert result.exit_code == 2
    assert "unknown strategy 'nope'" in result.output and "Traceback" not in result.output


# ---- Flower runs --------------------------------------------------------------------------------
def test_simulation_personal_router_with_failed_client(tmp_path):
    """Ray simulation: 3 clients, one raises in every round; routers never leave the clients."""
    from federated.simulation import simulate

    setup = tiny_setup(strategy="personal_router", fail_fraction=0.34, proximal_mu=0.01, sim_cpus=2)
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


def test_deployment_engine_run_returns_a_trained_model(tmp_path):
    """flower-superlink + 2 flower-supernode on 127.0.0.1, `flwr run` of a copy of the app, all stopped."""
    from federated.deployment import copy_app, flwr_run, local_deployment
    from routerlab.train import Trainer

    before = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    run_dir = tmp_path / "run"
    overrides = "federated.num_clients=2 federated.rounds=1 federated.local_steps=40 federated.strategy=fedavg federated.partition=iid federated.client_eval=false"
    with local_deployment(tmp_path, num_nodes=2) as deployment:
        procs = deployment["procs"]
        result = flwr_run(copy_app(tmp_path / "app"), deployment, {"set": overrides, "run-dir": str(run_dir)}, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
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
