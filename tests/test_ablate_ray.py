"""`routerlab ablate --ray`: a real two-node Ray cluster on this machine (CPU only, private temp dir), and a
worker node killed mid-grid: its cell runs again on the other node, nothing is lost or written twice."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")  # the flwr[simulation] extra

from routerlab.ablate import run_ablation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "raygrid",
    "base": {
        "task": {"name": "clusters", "train_size": 512, "val_size": 128, "num_clusters": 4},
        "model": {"d_model": 16, "n_layers": 1, "num_experts": 4, "expert_hidden": 16},
        "train": {"steps": 40, "batch_size": 64, "eval_every": 20, "eval_batches": 2, "log_every": 20},
    },
    "axes": {"router": ["softmax_topk"], "seed": [0, 1, 2]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every process we can read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry)] = (parent, command)
    return out


def with_descendants(roots: set[int]) -> set[int]:
    table = processes()
    found = set(roots) & set(table)
    while True:
        more = {pid for pid, (parent, _) in table.items() if parent in found} - found
        if not more:
            return found
        found |= more


def kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def cluster():
    """A head node and a second node, 1 CPU each, both here; yields (address, the second node's processes, its raylet port)."""
    temp = Path(tempfile.mkdtemp(prefix="rlray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats",
               f"--temp-dir={temp}"]
    ours = lambda: {pid for pid, (_, cmd) in processes().items() if str(temp) in cmd or f":{port}" in cmd}  # noqa: E731
    try:
        subprocess.run(ray_cli + ["--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                                  f"--dashboard-port={free_port()}"], env=env, check=True, capture_output=True, timeout=120)
        head = ours()
        second_port = free_port()
        subprocess.run(ray_cli + [f"--address=127.0.0.1:{port}", f"--node-manager-port={second_port}"], env=env, check=True,
                       capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", ours() - head, second_port
    finally:
        if ray.is_initialized():
            ray.shutdown()
        kill(with_descendants(ours()))  # by PID: `ray stop` would end every Ray process of this user
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_grid_survives_a_killed_worker_node(cluster, tmp_path):
    address, second_node, second_port = cluster
    path = tmp_path / "raygrid.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "base": {**SPEC["base"], "run": {"dir": str(tmp_path / "runs")}}}))
    out = tmp_path / "out"
    killed = threading.Event()

    def in_flight() -> int:  # started (TensorBoard folder made) and not finished (no result yet)
        started = {p.name for p in (tmp_path / "runs" / "out").glob("*")} if (tmp_path / "runs" / "out").is_dir() else set()
        return len(started - {p.stem for p in (out / "cells").glob("*.json")})

    def kill_second_node_while_busy():
        deadline = time.time() + 300
        while time.time() < deadline and in_flight() < 2:  # 1 CPU per node: two cells in flight = one on each node
            time.sleep(0.05)
        kill(with_descendants(second_node))  # its raylet and the worker training its current cell
        killed.set()

    killer = threading.Thread(target=kill_second_node_while_busy, daemon=True)
    killer.start()
    report = run_ablation(path, out=out, ray=address)
    killer.join(timeout=5)
    assert killed.is_set() and not report.errors and report.ran == 3
    results = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    assert len(results) == 3 and len({r["id"] for r in results}) == 3
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["seed"] for r in rows) == ["0", "1", "2"]  # each cell once
    (second,) = [n["NodeID"] for n in ray.nodes() if n["NodeManagerPort"] == second_port]
    rerun = [r for r in results if r["attempts"] > 1]
    assert rerun, "the cell in flight on the killed node should have run again"
    assert all(r["node"] != second for r in rerun)  # ... on the node that survived
    assert all(r["node"] != second or r["attempts"] == 1 for r in results)
    assert all(r["train_tokens"] == 40 * 64 and r["metrics"]["step"] == 40 for r in results)  # every cell ran to its end
    again = run_ablation(path, out=out, ray=address)  # resumable: every cell is done
    assert again.ran == 0 and len(list((out / "cells").glob("*.json"))) == 3
