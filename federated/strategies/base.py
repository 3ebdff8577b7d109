"""ExpertStrategy: the Flower `Strategy` every federated strategy here subclasses.

A subclass says two things: which parameters stay on the clients (`local`, name patterns) and how an
expert's rows are weighted in the average (`expert_weights`; default: training examples). The base
class does the rest, the same for all:

configure_train   one message per training client: the global arrays minus the local ones, expert
                  tensors cut to the experts this client holds this round, and a config record that
                  tells the client what to do: "local" (patterns it keeps in its own state),
                  "experts:<layer>" (the expert ids it holds; absent = all), "k" (its top-k), "fail".
aggregate_train   `federated.aggregate.merge` over the replies, then the next round's expert choice
                  per client (`choose_experts`: last round's most used experts plus exploration).
configure_evaluate / aggregate_evaluate   the same payload to each live client, which evaluates it
                  (and, in the final evaluation, adapts it for a few steps); mean and worst decile.

Clients are discovered once with a QUERY message (`discover`): partition id, expert budget and k.
Partition ids >= federated.num_clients are unseen clients: never trained, evaluated at the end only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from federated.aggregate import ClientUpdate, choose_experts, expert_layer, is_expert, is_local, merge, worst_decile


@dataclass
class ClientInfo:
    partition: int
    max_experts: int  # 0 = every expert
    k: int  # 0 = the config's k


class ExpertStrategy(Strategy):
    name = ""
    local: tuple[str, ...] = ()  # parameter-name patterns that never leave the clients

    def __init__(self, setup) -> None:
        self.setup = setup
        self.fed = setup.fed
        self.clients: dict[int, ClientInfo] = {}  # node id -> what it told us
        self.held: dict[int, dict[str, list[int]]] = {}  # node id -> layer -> expert ids it holds now
        self.last_tokens: dict[int, dict[str, Tensor]] = {}
        self.failing: set[int] = set()  # nodes told to fail this round (failure injection)
        self.global_state: dict[str, Tensor] = {}
        self.bytes: dict[int, dict[str, int]] = {}  # node id -> bytes down/up in the current round
        self.replied: set[int] = set()  # nodes whose training reply arrived this round

    # ---- what a subclass may change --------------------------------------------------------------
    @staticmethod
    def expert_weights(update: ClientUpdate, layer: str) -> Tensor | None:
        """[E] weights of this client's rows of `layer`'s experts; None = its number of training examples."""
        return None

    # ---- clients ---------------------------------------------------------------------------------
    def discover(self, grid: Grid, nodes: list[int], timeout: float) -> None:
        """Ask every node for its partition id and budget; ask again those that have not answered
        (a first message can take long while a simulation starts its workers) until `timeout` has passed."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [n for n in nodes if n not in self.clients]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(missing)} of {len(nodes)} SuperNodes did not answer the discovery query within {timeout:.0f} s")
            messages = [Message(RecordDict({"config": ConfigRecord({"setup": self.setup.to_json()})}), dst_node_id=n,
                                message_type=MessageType.QUERY, group_id="0") for n in missing]
            for r in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())):
                if r.has_error():
                    raise RuntimeError(f"node {r.metadata.src_node_id} did not answer the discovery query: {r.error.reason}")
                m = r.content["metrics"]
                self.clients[r.metadata.src_node_id] = ClientInfo(int(m["partition-id"]), int(m["max-experts"]), int(m["k"]))
        pids = sorted(c.partition for c in self.clients.values())
        if len(set(pids)) != len(pids):
            raise RuntimeError(f"two SuperNodes share a partition id: {pids}")

    def seen(self) -> list[int]:
        return sorted((n for n, c in self.clients.items() if c.partition < self.fed.num_clients), key=lambda n: self.clients[n].partition)

    def unseen(self) -> list[int]:
        return sorted((n for n, c in self.clients.items() if c.partition >= self.fed.num_clients), key=lambda n: self.clients[n].partition)

    def layers(self) -> dict[str, int]:
        """MoE layer name -> number of experts, read from the stacked expert tensors."""
        return {expert_layer(k): v.shape[0] for k, v in self.global_state.items() if is_expert(k)}

    def budget(self, node: int, num_experts: int) -> int:
        cap = min(self.clients[node].max_experts or num_experts, num_experts)
        if self.clients[node].partition >= self.fed.num_clients:
            return cap  # an unseen client has no routing history to choose from: it gets what it can hold, once
        return min(cap, self.fed.send_experts or num_experts)

    def rng(self, server_round: int, node: int) -> np.random.Generator:
        return np.random.default_rng([self.setup.config.seed, server_round, self.clients[node].partition])

    def select(self, node: int, server_round: int) -> None:
        """The experts `node` holds from `server_round` on (kept until the next aggregation)."""
        rng = self.rng(server_round, node)
        held = {}
        for layer, num in self.layers().items():
            keep = self.budget(node, num)
            if keep < num:
                last = self.last_tokens.get(node, {}).get(layer)
                held[layer] = choose_experts(None if last is None else last.numpy(), num, keep, self.fed.explore_experts, rng)
        self.held[node] = held

    # ---- messages --------------------------------------------------------------------------------
    def payload(self, node: int) -> tuple[ArrayRecord, dict]:
        held = self.held.get(node, {})
        arrays = {}
        for key, value in self.global_state.items():
            if is_local(key, self.local):
                continue
            rows = held.get(expert_layer(key)) if is_expert(key) else None
            arrays[key] = value if rows is None else value[torch.as_tensor(rows, dtype=torch.long)].contiguous()
        config = {f"experts:{layer}": rows for layer, rows in held.items()}
        config.update({"local": list(self.local), "k": self.clients[node].k})
        return ArrayRecord(arrays), config

    def messages(self, nodes: list[int], message_type: str, server_round: int, config: ConfigRecord) -> list[Message]:
        out = []
        for n in nodes:
            arrays, own = self.payload(n)
            if message_type == MessageType.TRAIN:
                own["fail"] = self.fed.fail_mode if n in self.failing else ""
            self.bytes.setdefault(n, {"down": 0, "up": 0})["down"] += array_bytes(arrays)
            out.append(Message(RecordDict({"arrays": arrays, "config": ConfigRecord({**dict(config), **own})}),
                               dst_node_id=n, message_type=message_type, group_id=str(server_round)))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        self.bytes = {}
        nodes = self.seen()
        for n in nodes:
            if n not in self.held:
                self.select(n, server_round)
        return self.messages(nodes, MessageType.TRAIN, server_round, config)

    def updates(self, replies: list[Message]) -> list[ClientUpdate]:
        out = []
        for r in replies:
            m = r.content["metrics"]
            tokens = {k.split(":", 1)[1]: torch.tensor(list(v), dtype=torch.float64) for k, v in m.items() if k.startswith("tokens:")}
            held = {k.split(":", 1)[1]: [int(e) for e in v] for k, v in m.items() if k.startswith("held:")}
            out.append(ClientUpdate(r.content["arrays"].to_torch_state_dict(), int(m["num-examples"]), tokens, held))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # replies come in arrival order; aggregate in client order so that sums, and so results, repeat exactly
        replies = sorted((r for r in replies if not r.has_error()), key=lambda r: int(r.content["metrics"]["partition-id"]))
        for r in replies:
            self.bytes.setdefault(r.metadata.src_node_id, {"down": 0, "up": 0})["up"] += array_bytes(r.content["arrays"])
        updates = self.updates(replies)
        self.replied = {r.metadata.src_node_id for r in replies}
        if updates:
            self.global_state = merge(self.global_state, updates, self.expert_weights)
        for r, u in zip(replies, updates):
            self.last_tokens[r.metadata.src_node_id] = u.tokens
        for n in self.seen():  # the experts each client holds next round (and in this round's evaluation)
            self.select(n, server_round + 1)
        personal = [float(r.content["metrics"]["personal-accuracy"]) for r in replies]
        metrics = MetricRecord({"replied": len(replies), "personal-acc-mean": float(np.mean(personal)) if personal else float("nan"),
                                "personal-acc-worst10": worst_decile(personal)})
        return ArrayRecord(self.global_state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        nodes = [n for n in self.seen() if n in self.replied]  # a client that failed or vanished this round is not asked again
        if bool(config.get("final", False)):
            nodes += self.unseen()
            for n in self.unseen():
                self.select(n, server_round)  # every expert, or a random subset of its budget
        return self.messages(nodes, MessageType.EVALUATE, server_round, config)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        acc = [float(r.content["metrics"]["global-accuracy"]) for r in replies if not r.has_error()
               and int(r.content["metrics"]["partition-id"]) < self.fed.num_clients]
        if not acc:
            return None
        return MetricRecord({"global-acc-mean": float(np.mean(acc)), "global-acc-worst10": worst_decile(acc)})

    def summary(self) -> None:
        pass


def array_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())
