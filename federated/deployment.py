"""Flower's deployment engine on one machine: a `flower-superlink` and N `flower-supernode` processes
on 127.0.0.1, the app started against them with `flwr run`, everything stopped afterwards.

Secure by default, as a deployment that is not open to anyone (Flower 1.42's documented way):
  TLS             the SuperLink serves HTTPS with a certificate signed by a CA (`--ssl-ca-certfile`,
                  `--ssl-certfile`, `--ssl-keyfile`); SuperNodes and `flwr` trust that CA
                  (`--root-certificates`, `root-certificates` in the connection's config.toml);
  authentication  the SuperLink runs with `--enable-supernode-auth`; each SuperNode has its own EC key
                  pair, the public key is registered with `flwr supernode register <key.pub>` before the
                  node starts with `--auth-supernode-private-key`. An unregistered SuperNode is refused
                  (it exits with Flower's exit code 305).
`insecure=True` (plain HTTP, no authentication) is only for trying things on one's own machine.
Certificates and keys come from `federated.credentials.make_credentials` (made on the fly).
All Flower state goes to a private FLWR_HOME, so ~/.flwr and the repository's pyproject.toml are not touched.
"""
from __future__ import annotations

import json
import os
import re
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
BIN = Path(sys.executable).parent


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
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # flwr-serverapp / flwr-clientapp
    return env


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process we started and the processes it spawned (its own session / process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
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


class Deployment:
    """A running SuperLink and its SuperNodes (from `local_deployment`)."""

    def __init__(self, workdir: Path, env: dict[str, str], port: int, insecure: bool, credentials: dict[str, Path]) -> None:
        self.workdir, self.env, self.port, self.insecure, self.credentials = workdir, env, port, insecure, credentials
        self.connection = "local-deployment"
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[subprocess.Popen] = []
        self._logs = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        self._logs.append(log)
        proc = subprocess.Popen(args, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    def register(self, name: str) -> None:
        """`flwr supernode register <name>.pub`: the SuperLink will accept the SuperNode holding <name>.key."""
        result = self.flwr("supernode", "register", str(self.credentials[f"{name}.pub"]), self.connection)
        if result.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {result.stdout}{result.stderr}")

    def start_node(self, name: str, node_config: str, key: str | None = None) -> subprocess.Popen:
        """A SuperNode; in a secure deployment it authenticates with the key `key` (default: its own name's)."""
        node_port = free_port()
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(node_port),
                "--node-config", node_config]
        if self.insecure:
            args.insert(1, "--insecure")
        else:
            args[1:1] = ["--root-certificates", str(self.credentials["ca"]), "--auth-supernode-private-key", str(self.credentials[f"{key or name}.key"])]
        proc = self.start(name, args)
        proc.node_port = node_port
        self.nodes.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        for log in self._logs:
            log.close()


@contextmanager
def local_deployment(workdir: Path, num_nodes: int = 2, insecure: bool = False, node_config: str = "") -> Iterator[Deployment]:
    """Start a SuperLink and `num_nodes` SuperNodes on 127.0.0.1 (TLS and SuperNode authentication
    unless `insecure`); node i gets `partition-id=i num-partitions=num_nodes` plus `node_config`."""
    from federated.credentials import make_credentials

    workdir = Path(workdir)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = flower_env(flwr_home)
    port = free_port()  # Flower 1.42 serves the Fleet, Control and Runtime APIs over one HTTP port
    names = [f"node{i}" for i in range(num_nodes)]
    credentials = {} if insecure else make_credentials(workdir / "credentials", names + ["stranger"])
    security = "insecure = true" if insecure else f'root-certificates = "{credentials["ca"]}"'
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )
    deployment = Deployment(workdir, env, port, insecure, credentials)
    try:
        args = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
        if insecure:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(credentials["ca"]), "--ssl-certfile", str(credentials["server_cert"]),
                     "--ssl-keyfile", str(credentials["server_key"]), "--enable-supernode-auth"]
        link = deployment.start("superlink", args)
        wait_for_port(port, link)
        for name in names if not insecure else []:
            deployment.register(name)
        for i, name in enumerate(names):  # start them all, then wait: they come up in parallel
            deployment.start_node(name, f"partition-id={i} num-partitions={num_nodes} {node_config}".strip())
        for node in deployment.nodes:
            wait_for_port(node.node_port, node)
        yield deployment
    finally:
        deployment.close()


def flwr_run(app_dir: Path, deployment: Deployment, run_config: dict[str, str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """`flwr run <app_dir> <connection> --run-config ... --stream`, returning when the run has finished.

    `flwr run` exits 0 even when the ServerApp fails (Flower 1.42); this asks the SuperLink for the run's
    status (`flwr ls --run-id <id> --format json`) and returns exit code 1 unless it is finished:completed.
    """
    config = " ".join(f'{k}="{v}"' for k, v in run_config.items())
    result = deployment.flwr("run", str(app_dir), deployment.connection, "--run-config", config, "--stream", timeout=timeout)
    found = re.search(r"started run (\d+)", result.stdout + result.stderr)
    status = run_status(deployment, int(found.group(1))) if found else "unknown (no run id)"
    result.run_status = status
    if result.returncode == 0 and status != "finished:completed":
        result.returncode = 1
    return result


def run_status(deployment: Deployment, run_id: int) -> str:
    """'finished:completed', 'finished:failed', 'running', ... as the SuperLink reports it."""
    result = deployment.flwr("ls", deployment.connection, "--run-id", str(run_id), "--format", "json")
    try:
        runs = json.loads(result.stdout[result.stdout.index("{"):])["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown ({result.stdout.strip()[:200]}{result.stderr.strip()[:200]})"
