"""The Flower ServerApp: rounds of (train on every live client, aggregate, evaluate on every client).

Reads its config from the run config when started by `flwr run` ([tool.flwr.app.config]: `config` =
a federated YAML file, empty = federated/digits.yaml; `set` = overrides "key=value key=value";
`run-dir` = output folder), or takes it directly from `routerlab federate` (make_server_app).

Writes to the run folder: TensorBoard events (fed/...), rounds.csv and rounds.md (one row per round),
clients.csv (per client and round), summary.json, model.pt (the final global state_dict).
"""
from __future__ import annotations

import csv
import io
import json
import random
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from federated.aggregate import ClientUpdate, aggregate, client_expert_mi, shared_keys, worst_decile
from federated.config import FederatedSetup, load_setup
from routerlab.checkpoint import atomic_write, atomic_write_text
from routerlab.train import Trainer

NODE_WAIT_S = 120.0


def array_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} SuperNodes connected within {NODE_WAIT_S:.0f} s")
        time.sleep(0.5)


def run_federation(grid: Grid, setup: FederatedSetup, run_dir: Path) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    started = time.time()
    fed, strategy = setup.fed, setup.fed.strategy
    run_dir.mkdir(parents=True, exist_ok=True)
    server = Trainer(setup.config, log=False, progress=False)  # the global model and the global validation set
    global_state = {k: v.clone() for k, v in server.model.state_dict().items()}
    nodes = wait_for_nodes(grid, fed.num_clients)
    rng = random.Random(setup.config.seed)  # node ids are 64-bit: keep them Python ints
    setup_json = setup.to_json()
    writer = SummaryWriter(str(run_dir))
    rounds, clients, aggregate_s = [], [], 0.0
    keys_sent, keys_received = set(), set()  # which parameters ever crossed the network
    first_round_at = time.time()
    for rnd in range(1, fed.rounds + 1):
        failing = set(rng.sample(nodes, int(round(fed.fail_fraction * len(nodes)))))
        sent = ArrayRecord({k: global_state[k] for k in shared_keys(global_state, strategy)})
        messages = [
            Message(RecordDict({"arrays": sent, "config": ConfigRecord({"round": rnd, "setup": setup_json, "fail": fed.fail_mode if n in failing else ""})}),
                    dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(rnd))
            for n in nodes
        ]
        round_start = time.perf_counter()
        replies = [r for r in grid.send_and_receive(messages, timeout=fed.round_timeout) if not r.has_error()]
        # replies come in arrival order; aggregate in client order so that sums, and so results, repeat exactly
        replies.sort(key=lambda r: int(r.content["metrics"]["partition-id"]))
        train_s = time.perf_counter() - round_start
        bytes_down = array_bytes(sent) * len(messages)
        keys_sent.update(sent.keys())
        bytes_up = sum(array_bytes(r.content["arrays"]) for r in replies)

        t0 = time.perf_counter()
        updates, personal, tables = [], {}, {}
        for r in replies:
            m = r.content["metrics"]
            tokens = {k.split(":", 1)[1]: torch.tensor(list(v), dtype=torch.float64) for k, v in m.items() if k.startswith("tokens:")}
            keys_received.update(r.content["arrays"].keys())
            updates.append(ClientUpdate(r.content["arrays"].to_torch_state_dict(), int(m["num-examples"]), tokens))
            personal[int(m["partition-id"])] = float(m["personal-accuracy"])
            for layer, t in tokens.items():
                tables.setdefault(layer, []).append(t.numpy())
            clients.append({"round": rnd, "client": int(m["partition-id"]), "personal_accuracy": float(m["personal-accuracy"]),
                            "train_loss": float(m["train-loss"]), "train_seconds": float(m["train-seconds"])})
        global_state = aggregate(strategy, global_state, updates)
        aggregate_s += time.perf_counter() - t0

        # evaluation of the new global model on every client that is still there
        sent = ArrayRecord({k: global_state[k] for k in shared_keys(global_state, strategy)})
        live = [n for n in nodes if n not in failing] if fed.client_eval else []
        messages = [Message(RecordDict({"arrays": sent, "config": ConfigRecord({"round": rnd, "setup": setup_json})}),
                            dst_node_id=n, message_type=MessageType.EVALUATE, group_id=str(rnd)) for n in live]
        evals = [r for r in grid.send_and_receive(messages, timeout=fed.round_timeout) if not r.has_error()] if messages else []
        bytes_down += array_bytes(sent) * len(messages)
        global_acc = {int(r.content["metrics"]["partition-id"]): float(r.content["metrics"]["global-accuracy"]) for r in evals}
        for row in clients:
            if row["round"] == rnd:
                row["global_accuracy"] = global_acc.get(row["client"], float("nan"))
        server_acc = float("nan")
        if strategy != "personal_router":  # the server never sees the routers it would need
            server.model.load_state_dict(global_state)
            server_acc = server.evaluate()["accuracy"]
        row = {
            "round": rnd, "replied": len(replies), "failed": len(nodes) - len(replies),
            "global_acc_mean": float(np.mean(list(global_acc.values()))) if global_acc else float("nan"),
            "global_acc_worst10": worst_decile(list(global_acc.values())),
            "personal_acc_mean": float(np.mean(list(personal.values()))) if personal else float("nan"),
            "personal_acc_worst10": worst_decile(list(personal.values())),
            "server_val_acc": server_acc,
            "client_expert_mi": client_expert_mi([np.stack(t) for t in tables.values()]),
            "bytes_down": bytes_down, "bytes_up": bytes_up, "train_phase_s": train_s,
        }
        rounds.append(row)
        for key, value in row.items():
            if key != "round":
                writer.add_scalar(f"fed/{key}", value, rnd)
        for pid, acc in global_acc.items():
            writer.add_scalar(f"fed/client{pid}/global_acc", acc, rnd)
        for pid, acc in personal.items():
            writer.add_scalar(f"fed/client{pid}/personal_acc", acc, rnd)
        writer.flush()
    writer.close()

    hit = [r["round"] for r in rounds if r["global_acc_mean"] >= fed.target_accuracy]  # NaN (no client eval) never hits
    summary = {
        "strategy": strategy, "num_clients": fed.num_clients, "rounds": fed.rounds, "final": rounds[-1],
        "rounds_to_target": hit[0] if hit else None, "target_accuracy": fed.target_accuracy,
        "server_started_at": started, "first_round_at": first_round_at, "finished_at": time.time(),
        "aggregate_s": aggregate_s, "client_train_s": sum(c["train_seconds"] for c in clients),
        "keys_sent": sorted(keys_sent), "keys_received": sorted(keys_received),
    }
    atomic_write(run_dir / "model.pt", lambda tmp: torch.save(global_state, tmp))
    atomic_write_text(run_dir / "rounds.csv", to_csv(rounds))
    atomic_write_text(run_dir / "clients.csv", to_csv(clients))
    atomic_write_text(run_dir / "rounds.md", to_markdown(rounds))
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def setup_from_run_config(run_config: dict) -> tuple[FederatedSetup, Path]:
    path = str(run_config.get("config", "") or "") or None
    overrides = shlex.split(str(run_config.get("set", "") or ""))
    run_dir = Path(str(run_config.get("run-dir", "") or "runs/federated")).expanduser().resolve()
    return load_setup(path, overrides), run_dir


def make_server_app(setup: FederatedSetup | None = None, run_dir: str | Path | None = None) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if setup is None:
            s, d = setup_from_run_config(dict(context.run_config))
        else:
            s, d = setup, Path(run_dir)
        run_federation(grid, s, d)

    return server_app


app = make_server_app()  # `flwr run .` entry point (pyproject [tool.flwr.app.components])
