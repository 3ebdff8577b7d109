"""The Flower ClientApp: each client trains the routerlab model with the one trainer on its partition.

It does what the message says, whatever the strategy:
query message    config {"setup"}; reply metrics {"partition-id", "max-experts", "k"} (this client's budget)
train message    arrays (what the server shares) + config {"round", "setup", "fail" ("" | "raise" |
                 "disappear"), "local" (name patterns this client keeps in its own state and never
                 sends), "experts:<layer>" (the expert ids it holds; absent = all), "k" (0 = the config's)}
train reply      arrays (the received keys, locally trained; expert tensors cut to the held experts)
                 + metrics {"num-examples", "partition-id", "personal-accuracy", "personal-loss",
                 "train-loss", "train-seconds", "tokens:<layer>" ([E] token-slots routed during local
                 training), "held:<layer>"}
evaluate message as train, plus "final" and "adapt-steps"; reply metrics {"global-accuracy",
                 "global-loss"} and, with adapt-steps > 0, the same after adapt-steps of router-only
                 ("router-ft-") and of full ("full-ft-") fine-tuning from the received model.

A client that holds a subset of the experts routes only among them (the other experts' gate logits are
pushed to -1e4), so it neither uses nor changes what it does not hold. The partition comes from the
node config: `partition-id` and `num-partitions`; optional `max-experts` and `k` set this client's budget
(default: from federated.small_clients / small_experts / small_k).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federated.aggregate import expert_layer, is_expert, is_local, is_router
from federated.config import FederatedSetup
from federated.partition import client_task
from routerlab.config import make_config
from routerlab.errors import ConfigError
from routerlab.moe.layer import MoELayer
from routerlab.tasks import build_task
from routerlab.train import Trainer

app = ClientApp()
_TASKS: dict[str, object] = {}  # base tasks built once per process (digits loads from disk)
LOCAL_STATE = "local"
MASKED_LOGIT = -1e4  # softmax weight exp(-1e4) = 0 in float32, without the NaNs of -inf in entropy terms


def _partition(context: Context, setup: FederatedSetup) -> int:
    pid = int(context.node_config.get("partition-id", -1))
    num = int(context.node_config.get("num-partitions", setup.fed.num_clients))
    total = setup.fed.num_clients + setup.fed.unseen_clients
    if num != total or pid < 0:
        raise RuntimeError(f"node config partition-id={pid} num-partitions={num} does not fit federated.num_clients + unseen_clients = {total}")
    return pid


def client_budget(context: Context, setup: FederatedSetup, pid: int) -> tuple[int, int]:
    """(max experts, k) of this client; 0 = no limit / the config's k. The node config wins over the setup."""
    small = pid < setup.fed.small_clients
    experts = int(context.node_config.get("max-experts", setup.fed.small_experts if small else 0))
    k = int(context.node_config.get("k", setup.fed.small_k if small else 0))
    return experts, k


def held_experts(config) -> dict[str, list[int]]:
    return {k.split(":", 1)[1]: [int(e) for e in v] for k, v in config.items() if k.startswith("experts:")}


def restrict_routing(model: torch.nn.Module, held: dict[str, list[int]]) -> None:
    """Route only among the held experts of each layer: the others' gate logits become MASKED_LOGIT."""
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer) or name not in held:
            continue
        router = layer.router
        if not hasattr(router, "gate_logits"):
            raise ConfigError(f"router {type(router).__name__} has no gate to restrict; expert-sparse clients need a gated router (softmax_topk, noisy_topk, switch, ...)")
        mask = torch.full((router.num_experts,), MASKED_LOGIT)
        mask[torch.as_tensor(held[name], dtype=torch.long)] = 0.0
        original = router.gate_logits
        router.gate_logits = lambda x, original=original, mask=mask: original(x) + mask.to(x.device)


def local_trainer(msg: Message, context: Context) -> tuple[Trainer, FederatedSetup, int, dict[str, list[int]]]:
    """A Trainer on this client's partition with the received arrays (and its own kept ones) loaded."""
    torch.set_num_threads(1)
    cfg = msg.content["config"]
    setup = FederatedSetup.from_json(str(cfg["setup"]))
    server_round = int(cfg["round"])
    pid = _partition(context, setup)
    key = setup.config.model_dump_json(include={"task"})
    if key not in _TASKS:
        _TASKS[key] = build_task(setup.config.task)
    config = setup.config
    k = int(cfg.get("k", 0))
    if k:
        config = make_config({**config.model_dump(mode="json"), "router": {**dict(config.router), "k": k}})  # parsed again: a Spec
    # the model is built from the config's seed, so whatever is never received starts as the server's does
    trainer = Trainer(config, task=client_task(_TASKS[key], setup, pid), log=False, progress=False)
    round_seed = setup.config.seed * 1_000_003 + server_round * 1009 + pid
    trainer.reseed_data(round_seed)  # each client and round draws its own batches
    torch.manual_seed(round_seed)
    held = held_experts(cfg)
    if LOCAL_STATE in context.state:
        trainer.load_weights(context.state[LOCAL_STATE].to_torch_state_dict())
    current, received = trainer.weights(), {}
    for name, value in msg.content["arrays"].to_torch_state_dict().items():
        rows = held.get(expert_layer(name)) if is_expert(name) else None
        if rows is None:
            received[name] = value
        else:  # the held rows of a stacked expert tensor; the others stay as built (never routed to)
            received[name] = current[name].clone()
            received[name][torch.as_tensor(rows, dtype=torch.long)] = value
    trainer.load_weights(received)
    restrict_routing(trainer.model, held)
    return trainer, setup, pid, held


def proximal_term(model: torch.nn.Module, mu: float, skip: list[str] | tuple[str, ...] = ()) -> Callable[[], torch.Tensor]:
    """FedProx: mu/2 ||w - w_global||^2 over the parameters as they are now (the global weights), but those
    matching a `skip` pattern (the ones the client keeps local), for the trainer's add_loss_term."""
    anchored = [(p, p.detach().clone()) for name, p in model.named_parameters() if p.requires_grad and not is_local(name, skip)]
    return lambda: 0.5 * mu * sum(((p - anchor) ** 2).sum() for p, anchor in anchored)


def inject_failure(mode: str, setup: FederatedSetup) -> None:
    if mode == "raise":
        raise RuntimeError("injected client failure (federated.fail_fraction)")
    if mode == "disappear":  # never answer within the round: the server gives up after round_timeout
        time.sleep(setup.fed.round_timeout + 5.0)
        raise RuntimeError("injected client disappearance (federated.fail_fraction)")


def num_examples(trainer: Trainer, split: str) -> int:
    """Training examples (classification) or tokens (LM) of this client: the fedavg weight."""
    task = trainer.task
    try:
        return task.num_examples(split)
    except NotImplementedError:  # corpus LM tasks: their tokens
        return len(task.tokens[split])


def sent_back(state: dict[str, torch.Tensor], received: list[str], held: dict[str, list[int]]) -> ArrayRecord:
    """The received keys, with expert tensors cut to the held rows."""
    out = {}
    for name in received:
        rows = held.get(expert_layer(name)) if is_expert(name) else None
        out[name] = state[name] if rows is None else state[name][torch.as_tensor(rows, dtype=torch.long)].contiguous()
    return ArrayRecord(out)


def keep_local(context: Context, state: dict[str, torch.Tensor], local: list[str]) -> None:
    if local:
        context.state[LOCAL_STATE] = ArrayRecord({k: v for k, v in state.items() if is_local(k, local)})


@app.query()
def query(msg: Message, context: Context) -> Message:
    setup = FederatedSetup.from_json(str(msg.content["config"]["setup"]))
    pid = _partition(context, setup)
    experts, k = client_budget(context, setup, pid)
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "max-experts": experts, "k": k})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    mode = str(cfg.get("fail", ""))
    if mode:
        inject_failure(mode, FederatedSetup.from_json(str(cfg["setup"])))
    trainer, setup, pid, held = local_trainer(msg, context)
    local = [str(p) for p in cfg.get("local", [])]
    if setup.fed.proximal_mu > 0:
        trainer.add_loss_term("proximal", proximal_term(trainer.model, setup.fed.proximal_mu, skip=local))
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
    keep_local(context, state, local)
    metrics = {
        "num-examples": num_examples(trainer, "train"),
        "partition-id": pid,
        "personal-accuracy": personal_eval["accuracy"],
        "personal-loss": personal_eval["loss"],
        "train-loss": float(sum(losses) / len(losses)),
        "train-seconds": seconds,
    }
    metrics.update({f"tokens:{name}": t.tolist() for name, t in tokens.items()})
    metrics.update({f"held:{name}": rows for name, rows in held.items()})
    arrays = sent_back(state, list(msg.content["arrays"].keys()), held)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def fine_tune(msg: Message, context: Context, steps: int, router_only: bool) -> dict[str, float]:
    """Evaluate after `steps` local steps from the received model: only the routers trained, or everything."""
    trainer, *_ = local_trainer(msg, context)
    if router_only:
        for name, p in trainer.model.named_parameters():
            p.requires_grad_(is_router(name))  # AdamW skips parameters without a gradient
    for _ in range(steps):
        trainer.train_step()
    return trainer.evaluate()


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    trainer, setup, pid, _ = local_trainer(msg, context)
    result = trainer.evaluate()
    metrics = {"num-examples": num_examples(trainer, "val"), "partition-id": pid,
               "global-accuracy": result["accuracy"], "global-loss": result["loss"]}
    steps = int(msg.content["config"].get("adapt-steps", 0))
    if steps:
        for prefix, router_only in (("router-ft", True), ("full-ft", False)):
            tuned = fine_tune(msg, context, steps, router_only)
            metrics.update({f"{prefix}-accuracy": tuned["accuracy"], f"{prefix}-loss": tuned["loss"]})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
