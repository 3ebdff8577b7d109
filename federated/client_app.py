"""The Flower ClientApp: each client trains the routerlab model with the one trainer on its partition.

train message    arrays (the global model, without routers under personal_router) + config
                 {"round", "setup" (federated config as JSON), "fail" ("" | "raise" | "disappear")}
train reply      arrays (the locally trained model, same keys) + metrics {"num-examples",
                 "partition-id", "personal-accuracy", "train-loss", "train-seconds",
                 "tokens:<layer>" (token-slots routed to each expert during local training)}
evaluate message arrays + config {"round", "setup"}; reply metrics {"global-accuracy", "global-loss", ...}

Under personal_router the client keeps its routers in `context.state` across rounds; they are never
sent. The partition comes from the node config: `partition-id` and `num-partitions` (set by the
simulation, or by `flower-supernode --node-config "partition-id=0 num-partitions=2"`).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federated.aggregate import is_router, shared_keys
from federated.config import FederatedSetup
from federated.partition import client_task
from routerlab.moe.layer import MoELayer
from routerlab.tasks import build_task
from routerlab.train import Trainer

app = ClientApp()
_TASKS: dict[str, object] = {}  # base tasks built once per process (digits loads from disk)
ROUTER_STATE = "router"


def _partition(context: Context, setup: FederatedSetup) -> int:
    pid = int(context.node_config.get("partition-id", -1))
    num = int(context.node_config.get("num-partitions", setup.fed.num_clients))
    if num != setup.fed.num_clients or pid < 0:
        raise RuntimeError(f"node config partition-id={pid} num-partitions={num} does not fit federated.num_clients={setup.fed.num_clients}")
    return pid


def local_trainer(msg: Message, context: Context) -> tuple[Trainer, FederatedSetup, int, int]:
    """A Trainer on this client's partition with the received arrays (and own routers) loaded."""
    torch.set_num_threads(1)
    cfg = msg.content["config"]
    setup = FederatedSetup.from_json(str(cfg["setup"]))
    server_round = int(cfg["round"])
    pid = _partition(context, setup)
    key = setup.config.model_dump_json(include={"task"})
    if key not in _TASKS:
        _TASKS[key] = build_task(setup.config.task)
    # the model is built from the config's seed, so a router never received starts as the server's does
    trainer = Trainer(setup.config, task=client_task(_TASKS[key], setup, pid), log=False, progress=False)
    round_seed = setup.config.seed * 1_000_003 + server_round * 1009 + pid
    trainer.reseed_data(round_seed)  # each client and round draws its own batches
    torch.manual_seed(round_seed)
    trainer.load_weights(msg.content["arrays"].to_torch_state_dict())
    if setup.fed.strategy == "personal_router" and ROUTER_STATE in context.state:
        trainer.load_weights(context.state[ROUTER_STATE].to_torch_state_dict())
    return trainer, setup, pid, server_round


def proximal_term(model: torch.nn.Module, mu: float, skip_routers: bool) -> Callable[[], torch.Tensor]:
    """FedProx: mu/2 ||w - w_global||^2 over the parameters as they are now (the global weights), for the
    trainer's add_loss_term."""
    anchored = [(p, p.detach().clone()) for name, p in model.named_parameters()
                if p.requires_grad and not (skip_routers and is_router(name))]
    return lambda: 0.5 * mu * sum(((p - anchor) ** 2).sum() for p, anchor in anchored)


def inject_failure(mode: str, setup: FederatedSetup) -> None:
    if mode == "raise":
        raise RuntimeError("injected client failure (federated.fail_fraction)")
    if mode == "disappear":  # never answer within the round: the server gives up after round_timeout
        time.sleep(setup.fed.round_timeout + 5.0)
        raise RuntimeError("injected client disappearance (federated.fail_fraction)")


@app.train()
def train(msg: Message, context: Context) -> Message:
    mode = str(msg.content["config"].get("fail", ""))
    if mode:
        inject_failure(mode, FederatedSetup.from_json(str(msg.content["config"]["setup"])))
    trainer, setup, pid, _ = local_trainer(msg, context)
    personal = setup.fed.strategy == "personal_router"
    if setup.fed.proximal_mu > 0:
        trainer.add_loss_term("proximal", proximal_term(trainer.model, setup.fed.proximal_mu, skip_routers=personal))
    layers = {name: m for name, m in trainer.model.named_modules() if isinstance(m, MoELayer)}
    tokens = {name: torch.zeros(m.experts.num_experts, dtype=torch.float64) for name, m in layers.items()}
    start = time.perf_counter()
    losses = []
    for _ in range(setup.fed.local_steps):
        losses.append(trainer.train_step())
        for name, m in layers.items():
            tokens[name] += m.stats.load.double().cpu()
    seconds = time.perf_counter() - start
    personal_eval = trainer.evaluate()
    state = trainer.weights()
    if personal:
        context.state[ROUTER_STATE] = ArrayRecord({k: v for k, v in state.items() if is_router(k)})
    metrics = {
        "num-examples": trainer.task.num_examples("train"),
        "partition-id": pid,
        "personal-accuracy": personal_eval["accuracy"],
        "personal-loss": personal_eval["loss"],
        "train-loss": float(sum(losses) / len(losses)),
        "train-seconds": seconds,
    }
    metrics.update({f"tokens:{name}": t.tolist() for name, t in tokens.items()})
    arrays = ArrayRecord({k: state[k] for k in shared_keys(state, setup.fed.strategy)})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    trainer, _, pid, _ = local_trainer(msg, context)
    result = trainer.evaluate()
    metrics = {"num-examples": trainer.task.num_examples("val"),
               "partition-id": pid, "global-accuracy": result["accuracy"], "global-loss": result["loss"]}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
