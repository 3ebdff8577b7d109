"""Flower's deployment engine on one machine: a `flower-superlink` and N `flower-supernode` processes
on 127.0.0.1, the app started against them with `flwr run`, everything stopped afterwards.

This is what users do when clients are real machines (there each SuperNode runs on its own host with
`--superlink <host>:<fleet port>`). Used by the deployment test and documented in docs/federated.md.
All Flower state goes to a private FLWR_HOME, so ~/.flwr and the repository's pyproject.toml are not touched.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from federated.simulation import OFFLINE_ENV

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ, **OFFLINE_ENV, FLWR_HOME=str(flwr_home))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flwr-serverapp / flwr-clientapp
    return env


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started and the processes it spawned (its own session / process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    else:  # the leader is gone; its children may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def copy_app(dest: Path) -> Path:
    """A copy of the Flower app (pyproject.toml + federated/) to run `flwr run` from."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    shutil.copytree(REPO / "federated", dest / "federated", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return dest


@contextmanager
def local_deployment(workdir: Path, num_nodes: int = 2) -> Iterator[dict]:
    """Start a SuperLink and `num_nodes` SuperNodes on 127.0.0.1; yields {"env", "connection", "procs"}."""
    workdir = Path(workdir)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(flwr_home)
    port = free_port()  # Flower 1.42 serves the Fleet, Control and Runtime APIs over one HTTP port
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        def start(name: str, args: list[str]) -> subprocess.Popen:
            log = open(workdir / f"{name}.log", "wb")
            logs.append(log)
            proc = subprocess.Popen(args, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            return proc

        bin_dir = Path(sys.executable).parent
        link = start("superlink", [str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                   "--disable-runtime-dependency-installation"])
        wait_for_port(port, link)
        nodes = []
        for i in range(num_nodes):  # start them all, then wait: they come up in parallel
            node_port = free_port()
            nodes.append((node_port, start(f"supernode{i}", [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                                            "--host", "127.0.0.1", "--port", str(node_port),
                                            "--node-config", f"partition-id={i} num-partitions={num_nodes}"])))
        for node_port, node in nodes:
            wait_for_port(node_port, node)
        yield {"env": env, "connection": "local-deployment", "procs": procs, "workdir": workdir}
    finally:
        for proc in reversed(procs):
            stop(proc)
        for log in logs:
            log.close()


def flwr_run(app_dir: Path, deployment: dict, run_config: dict[str, str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """`flwr run <app_dir> <connection> --run-config ... --stream` (returns when the run has finished)."""
    config = " ".join(f'{k}="{v}"' for k, v in run_config.items())
    args = [str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), deployment["connection"], "--run-config", config, "--stream"]
    return subprocess.run(args, env=deployment["env"], cwd=deployment["workdir"], capture_output=True, text=True, timeout=timeout)
