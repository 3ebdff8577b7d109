"""The Flower ServerApp: find the clients, run the rounds with the configured strategy, write the outputs.

Reads its config from the run config when started by `flwr run` ([tool.flwr.app.config]: `config` =
a federated YAML file, empty = federated/digits.yaml; `set` = overrides "key=value key=value";
`run-dir` = output folder, empty = runs/fed-...-run<id> under the ServerApp's working directory), or
takes it directly from `routerlab federate` (make_server_app).

Three parts: `round_loop` (train, aggregate and evaluate through the strategy's configure/aggregate
methods), `evaluate_global` (the server's own validation set), `FederationLog` (TensorBoard events,
rounds.csv/md (one row per round), clients.csv (per client and round: accuracies, bytes down and up),
final.csv (per client, seen and unseen, after the final evaluation and adaptation), summary.json,
model.pt (the final global state_dict)). A run that fails writes failed.json instead of summary.json.
"""
from __future__ import annotations

import csv
import io
import json
import random
import shlex
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from federated.aggregate import client_expert_mi, is_local, worst_decile
from federated.config import FederatedSetup, load_setup
from federated.strategies import strategy_class
from federated.strategies.base import ExpertStrategy
from routerlab.checkpoint import atomic_write, atomic_write_text
from routerlab.train import Trainer


def wait_for_nodes(grid: Grid, count: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {count} SuperNodes connected within {wait_s:.0f} s (federated.node_wait)")
        time.sleep(0.5)


class FederationLog:
    """Everything the run writes, all atomically."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(run_dir))
        self.rounds: list[dict] = []
        self.clients: list[dict] = []
        self.final: list[dict] = []

    def round(self, row: dict, clients: list[dict]) -> None:
        self.rounds.append(row)
        self.clients += clients
        rnd = row["round"]
        for key, value in row.items():
            if key != "round":
                self.writer.add_scalar(f"fed/{key}", value, rnd)
        for c in clients:
            for key in ("global_accuracy", "personal_accuracy"):
                self.writer.add_scalar(f"fed/client{c['client']}/{key.split('_')[0]}_acc", c[key], rnd)
        self.writer.flush()

    def finish(self, summary: dict, global_state: dict[str, torch.Tensor]) -> None:
        self.writer.close()
        atomic_write(self.run_dir / "model.pt", lambda tmp: torch.save(global_state, tmp))
        atomic_write_text(self.run_dir / "rounds.csv", to_csv(self.rounds))
        atomic_write_text(self.run_dir / "clients.csv", to_csv(self.clients))
        atomic_write_text(self.run_dir / "final.csv", to_csv(self.final))
        atomic_write_text(self.run_dir / "rounds.md", to_markdown(self.rounds))
        (self.run_dir / "failed.json").unlink(missing_ok=True)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))


def evaluate_global(server: Trainer, strategy: ExpertStrategy) -> float:
    """The global model on the server's validation split; NaN when parts of the model stay on the clients."""
    if strategy.local:
        return float("nan")
    server.model.load_state_dict(strategy.global_state)
    return server.evaluate()["accuracy"]


def final_rows(replies, strategy: ExpertStrategy) -> list[dict]:
    rows = []
    for r in sorted((r for r in replies if not r.has_error()), key=lambda r: int(r.content["metrics"]["partition-id"])):
        m = r.content["metrics"]
        pid = int(m["partition-id"])
        row = {"client": pid, "seen": int(pid < strategy.fed.num_clients)}
        for key in ("global", "router-ft", "full-ft"):
            row[f"{key.replace('-', '_')}_accuracy"] = float(m.get(f"{key}-accuracy", float("nan")))
            row[f"{key.replace('-', '_')}_loss"] = float(m.get(f"{key}-loss", float("nan")))
        rows.append(row)
    return rows


def summarize_final(rows: list[dict]) -> dict:
    out = {}
    for group, flag in (("seen", 1), ("unseen", 0)):
        members = [r for r in rows if r["seen"] == flag]
        for key in ("global", "router_ft", "full_ft"):
            values = [r[f"{key}_accuracy"] for r in members if r[f"{key}_accuracy"] == r[f"{key}_accuracy"]]
            out[f"{group}_{key}_acc_mean"] = float(np.mean(values)) if values else float("nan")
            out[f"{group}_{key}_acc_worst10"] = worst_decile(values)
            # perplexity per client (LM tasks); the worst decile of perplexity is its highest 10%
            ppl = [float(np.exp(min(r[f"{key}_loss"], 50.0))) for r in members if r[f"{key}_loss"] == r[f"{key}_loss"]]
            out[f"{group}_{key}_ppl_mean"] = float(np.mean(ppl)) if ppl else float("nan")
            out[f"{group}_{key}_ppl_worst10"] = -worst_decile([-v for v in ppl]) if ppl else float("nan")
    return out


def round_loop(grid: Grid, setup: FederatedSetup, strategy: ExpertStrategy, arrays: ArrayRecord, log: FederationLog, server: Trainer) -> ArrayRecord:
    fed = setup.fed
    rng = random.Random(setup.config.seed)  # node ids are 64-bit: keep them Python ints
    base = {"setup": setup.to_json()}
    seen = strategy.seen()
    for rnd in range(1, fed.rounds + 1):
        strategy.failing = set(rng.sample(seen, int(round(fed.fail_fraction * len(seen)))))
        round_start = time.perf_counter()
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({**base, "round": rnd}), grid))
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
        train_s = time.perf_counter() - round_start
        t0 = time.perf_counter()
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        aggregate_s = time.perf_counter() - t0
        arrays = new_arrays if new_arrays is not None else arrays
        train_bytes = {n: dict(b) for n, b in strategy.bytes.items()}

        final = rnd == fed.rounds
        config = {**base, "round": rnd, "final": final, "adapt-steps": fed.adapt_steps if final else 0}
        evals = list(grid.send_and_receive(list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(config), grid)), timeout=fed.round_timeout)) \
            if fed.client_eval else []
        eval_metrics = strategy.aggregate_evaluate(rnd, evals) if evals else None
        eval_down = sum(b["down"] for b in strategy.bytes.values()) - sum(b["down"] for b in train_bytes.values())
        if final:
            log.final = final_rows(evals, strategy)

        ok = sorted((r for r in replies if not r.has_error()), key=lambda r: int(r.content["metrics"]["partition-id"]))
        global_acc = {int(r.content["metrics"]["partition-id"]): float(r.content["metrics"]["global-accuracy"]) for r in evals if not r.has_error()}
        clients, tables = [], {}
        for r in ok:
            m = r.content["metrics"]
            pid = int(m["partition-id"])
            b = train_bytes.get(r.metadata.src_node_id, {"down": 0, "up": 0})
            clients.append({"round": rnd, "client": pid, "personal_accuracy": float(m["personal-accuracy"]),
                            "global_accuracy": global_acc.get(pid, float("nan")), "train_loss": float(m["train-loss"]),
                            "train_seconds": float(m["train-seconds"]), "bytes_down": b["down"], "bytes_up": b["up"],
                            "experts_held": sum(len(v) for k, v in m.items() if k.startswith("held:")) or -1})
            for k, v in m.items():
                if k.startswith("tokens:"):
                    tables.setdefault(k, []).append(np.asarray(list(v)))
        em = dict(eval_metrics) if eval_metrics is not None else {}
        tm = dict(train_metrics) if train_metrics is not None else {}
        row = {
            "round": rnd, "replied": len(ok), "failed": len(messages) - len(ok),
            "global_acc_mean": float(em.get("global-acc-mean", float("nan"))),
            "global_acc_worst10": float(em.get("global-acc-worst10", float("nan"))),
            "personal_acc_mean": float(tm.get("personal-acc-mean", float("nan"))),
            "personal_acc_worst10": float(tm.get("personal-acc-worst10", float("nan"))),
            "server_val_acc": evaluate_global(server, strategy),
            "client_expert_mi": client_expert_mi([np.stack(t) for t in tables.values()]),
            "bytes_down": sum(b["down"] for b in train_bytes.values()), "bytes_up": sum(b["up"] for b in train_bytes.values()),
            "eval_bytes_down": eval_down, "train_phase_s": train_s, "aggregate_s": aggregate_s,
        }
        log.round(row, clients)
    return arrays


def run_federation(grid: Grid, setup: FederatedSetup, run_dir: Path) -> dict:
    started = time.time()
    fed = setup.fed
    log = FederationLog(run_dir)
    try:
        server = Trainer(setup.config, log=False, progress=False)  # the global model and the global validation set
        initial = {k: v.clone() for k, v in server.model.state_dict().items()}
        strategy = strategy_class(fed.strategy)(setup)
        nodes = wait_for_nodes(grid, fed.num_clients + fed.unseen_clients, fed.node_wait)
        strategy.discover(grid, nodes, fed.node_wait + fed.round_timeout)
        first_round_at = time.time()
        arrays = round_loop(grid, setup, strategy, ArrayRecord(initial), log, server)
    except Exception as err:
        atomic_write_text(run_dir / "failed.json", json.dumps({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}, indent=2))
        raise
    global_state = arrays.to_torch_state_dict()
    rounds = log.rounds
    hit = [r["round"] for r in rounds if r["global_acc_mean"] >= fed.target_accuracy]  # NaN (no client eval) never hits
    shared = [k for k in initial if not is_local(k, strategy.local)]
    summary = {
        "strategy": fed.strategy, "num_clients": fed.num_clients, "unseen_clients": fed.unseen_clients, "rounds": fed.rounds,
        "final": rounds[-1], "final_clients": summarize_final(log.final),
        "rounds_to_target": hit[0] if hit else None, "target_accuracy": fed.target_accuracy,
        "bytes_per_round": float(np.mean([r["bytes_down"] + r["bytes_up"] for r in rounds])),
        "dense_bytes_per_round": 2 * fed.num_clients * sum(initial[k].numel() * initial[k].element_size() for k in shared),
        "server_started_at": started, "first_round_at": first_round_at, "finished_at": time.time(),
        "aggregate_s": float(sum(r["aggregate_s"] for r in rounds)), "client_train_s": sum(c["train_seconds"] for c in log.clients),
        "keys_sent": sorted(shared), "keys_received": sorted(shared) if any(r["bytes_up"] for r in rounds) else [],
    }
    log.finish(summary, global_state)
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


def default_run_dir(setup: FederatedSetup, run_id: int) -> Path:
    """Without `run-dir`: one folder per run, so a run never overwrites the last."""
    from federated.simulation import run_dir_for

    return run_dir_for(setup).with_name(f"{run_dir_for(setup).name}-run{run_id}")


def setup_from_run_config(run_config: dict, run_id: int = 0) -> tuple[FederatedSetup, Path]:
    path = str(run_config.get("config", "") or "") or None
    overrides = shlex.split(str(run_config.get("set", "") or ""))
    setup = load_setup(path, overrides)
    given = str(run_config.get("run-dir", "") or "")
    run_dir = Path(given).expanduser() if given else default_run_dir(setup, run_id)
    return setup, run_dir.resolve()


def make_server_app(setup: FederatedSetup | None = None, run_dir: str | Path | None = None) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if setup is None:
            s, d = setup_from_run_config(dict(context.run_config), int(context.run_id))
        else:
            s, d = setup, Path(run_dir)
        run_federation(grid, s, d)

    return server_app


app = make_server_app()  # `flwr run .` entry point (pyproject [tool.flwr.app.components])
