"""An in-process engine: the ServerApp's loop and every ClientApp handler in one Python process, no Ray.

A Flower `Grid` whose `send_and_receive` calls the ClientApp (`client_app(message, context)`) for each
message in turn, with one `Context` per node kept across rounds, exactly as a SuperNode keeps it. The
strategies, messages and handlers are the same objects the simulation and the deployment engine run,
so the same seed gives the same numbers (tests/test_federated.py checks it against the Ray simulation);
what it saves is Ray's start-up and one process per client, which on a 2-core machine is most of a
small federation's time. For benchmark sweeps (`federated.compare`); a client that raises is answered
with an error reply as Flower does; `fail_mode=disappear` needs a real engine (it waits for a timeout).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from federated.config import FederatedSetup
from routerlab.errors import ConfigError


class InProcessGrid(Grid):
    def __init__(self, client_app, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self.node_ids = list(range(1001, 1001 + num_nodes))
        self.contexts = {n: Context(run_id=run_id, node_id=n, node_config={"partition-id": i, "num-partitions": num_nodes},
                                    state=RecordDict(), run_config={}) for i, n in enumerate(self.node_ids)}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def get_nodes(self):
        raise NotImplementedError("the in-process engine has no NodeInfo; use get_node_ids")

    def push_messages(self, messages):
        raise NotImplementedError("the in-process engine answers in send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("the in-process engine answers in send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            try:
                replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:  # Flower answers a failing ClientApp with an error reply
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg))
        return replies


def run_inprocess(setup: FederatedSetup, run_dir: str | Path) -> dict:
    """The federation on InProcessGrid; returns summary.json's content plus wall_s and run_dir."""
    from federated.client_app import app as client_app
    from federated.server_app import run_federation

    if setup.fed.fail_fraction > 0 and setup.fed.fail_mode == "disappear":
        raise ConfigError("fail_mode=disappear needs the simulation or the deployment engine (the in-process engine has no timeout)")
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    run_dir = Path(run_dir).resolve()
    started = time.time()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # what messages are stamped with
    grid = InProcessGrid(client_app, setup.fed.num_clients + setup.fed.unseen_clients)
    summary = run_federation(grid, setup, run_dir)
    summary = json.loads(json.dumps(summary))
    summary["wall_s"] = time.time() - started
    summary["run_dir"] = str(run_dir)
    return summary
