"""Nothing lost, nothing silently wrong: damaged checkpoints, non-finite numbers, locks, permissions,
stale temporary files, internal errors as one line. Every case is listed in docs/reliability.md."""
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from routerlab.checkpoint import load_checkpoint
from routerlab.cli import app
from routerlab.config import load_config
from routerlab.errors import ConfigError, RunStopped
from routerlab.train import Trainer

runner = CliRunner()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.steps=2", "model.d_model=16", "model.n_heads=2", "model.expert_hidden=16", "train.batch_size=4",
        "train.eval_batches=1", "task.name=clusters", "run.name=r"]


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def train_args(tmp_path, *extra):
    args = ["train", "--no-progress"]
    for item in TINY + [f"run.dir={tmp_path / 'runs'}", *extra]:
        args += ["--set", item]
    return args


def one_line(output: str) -> bool:
    return "Traceback" not in output and len(output.strip().splitlines()) == 1 and output.startswith("error: ")


# ---- checkpoints -----------------------------------------------------------------------------------
def test_a_checkpoint_with_flipped_bytes_is_refused_and_the_good_one_kept(tmp_path):
    code, out = cli(*train_args(tmp_path))
    assert code == 0, out
    good = tmp_path / "runs" / "r" / "checkpoint.pt"
    before = good.read_bytes()
    damaged = bytearray(before)
    middle = len(damaged) // 2
    damaged[middle:middle + 4096] = bytes(b ^ 0xFF for b in damaged[middle:middle + 4096])
    bad = tmp_path / "damaged.pt"
    bad.write_bytes(bytes(damaged))
    code, out = cli(*train_args(tmp_path), "--resume", bad)
    assert code == 2 and one_line(out), out
    assert "is damaged: its content hash is" in out or "is corrupt" in out
    assert good.read_bytes() == before


def test_one_flipped_payload_byte_fails_the_hash(tmp_path):
    """The outer file stays readable; only the independent sha256 of the payload notices."""
    import hashlib

    trainer = Trainer(load_config(None, TINY), run_dir=tmp_path / "run", log=False)
    path = trainer.save(tmp_path / "c.pt")
    record = torch.load(path, weights_only=True)
    assert record["sha256"] == hashlib.sha256(record["payload"].numpy().tobytes()).hexdigest()
    record["payload"][len(record["payload"]) // 2] ^= 1
    torch.save(record, path)
    with pytest.raises(ConfigError, match="is damaged"):
        load_checkpoint(path)


# ---- non-finite numbers ----------------------------------------------------------------------------
@pytest.mark.parametrize("setting, key", [
    ("train.lr=inf", "train.lr"), ("train.lr=.inf", "train.lr"), ("train.lr=1e999", "train.lr"),
    ("train.lr=.nan", "train.lr"), ("model.capacity_factor=.inf", "model.capacity_factor"),
    ("train.grad_clip=-.inf", "train.grad_clip"), ("router.z_loss=1e999", "router.z_loss"),
])
def test_non_finite_config_numbers_are_refused_at_parse_time(tmp_path, setting, key):
    code, out = cli(*train_args(tmp_path, setting))
    assert code == 2 and one_line(out), out
    assert key in out and "finite" in out
    assert not (tmp_path / "runs").exists()


def nan_batch(trainer):
    batch = trainer.task.batch("train", 4, torch.Generator().manual_seed(0))
    batch.inputs[0, 0] = float("nan")
    return batch


def test_a_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    trainer = Trainer(load_config(None, TINY), run_dir=tmp_path / "run", log=False)
    trainer.train_step()
    path = trainer.save()
    saved = path.read_bytes()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(RunStopped, match="step 2: the loss .* is not finite"):
        trainer.train_step(nan_batch(trainer))
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())  # no NaN update
    assert path.read_bytes() == saved


def test_skip_drops_the_non_finite_update_and_trains_on(tmp_path):
    trainer = Trainer(load_config(None, TINY + ["train.on_nonfinite=skip", "train.steps=5"]), run_dir=tmp_path / "run", log=False)
    trainer.train_step()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(nan_batch(trainer))
    assert trainer.skipped_steps == 1 and trainer.step == 2
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    trainer.train_step()
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert not all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())


NAN_PLUGIN = """
import torch
from routerlab.routers.registry import register_router
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

@register_router("nan_after_start", SoftmaxTopKParams)
class NanAfterStart(SoftmaxTopK):
    def forward(self, x, *, token_ids=None):
        out = super().forward(x, token_ids=token_ids)
        return type(out)(out.experts, out.weights * float("nan"), out.logits, out.aux)
"""


def test_the_cli_stops_a_nan_run_with_one_line_and_exit_1(tmp_path):
    plugin = tmp_path / "nan_router.py"
    plugin.write_text(NAN_PLUGIN)
    code, out = cli(*train_args(tmp_path, f"plugins=[{plugin}]", "router.name=nan_after_start"))
    assert code == 1 and one_line(out), out
    assert "is not finite; stopped without saving" in out
    assert not list((tmp_path / "runs").glob("**/checkpoint.pt"))


# ---- output folders --------------------------------------------------------------------------------
def test_outputs_follow_the_umask_and_stale_temporary_files_are_removed(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    stale = run_dir / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    old = os.umask(0o022)
    try:
        code, out = cli(*train_args(tmp_path))
    finally:
        os.umask(old)
    assert code == 0, out
    assert stat.S_IMODE((run_dir / "checkpoint.pt").stat().st_mode) == 0o644
    assert not stale.exists()


def hold_lock(folder):
    code = f"from routerlab.outputs import lock_output_dir; held = lock_output_dir({str(folder)!r}, 'x'); print('locked', flush=True); import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path):
    folder = tmp_path / "runs" / "r"
    holder = hold_lock(folder)
    try:
        code, out = cli(*train_args(tmp_path))
        assert code == 2 and one_line(out), out
        assert f"is already in use by PID {holder.pid}" in out
        assert not (folder / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    code, out = cli(*train_args(tmp_path))  # kill -9 of the holder released the lock
    assert code == 0, out


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unwritable_run_dir_fails_before_any_work(tmp_path, where):
    if where == "file":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        target = blocker / "runs"
    else:
        target = "/proc/routerlab-runs"
    code, out = cli(*train_args(tmp_path, f"run.dir={target}"))
    assert code == 2 and one_line(out), out
    assert "run.dir" in out and ("cannot be created" in out or "not writable" in out)


RAISING_PLUGIN = """
from routerlab.routers.registry import register_router
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

@register_router("broken_inside", SoftmaxTopKParams)
class BrokenInside(SoftmaxTopK):
    def forward(self, x, *, token_ids=None):
        raise RuntimeError("a bug inside the router")
"""


def test_an_internal_error_is_one_line_exit_1_with_the_traceback_in_a_log(tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text(RAISING_PLUGIN)
    code, out = cli(*train_args(tmp_path, f"plugins=[{plugin}]", "router.name=broken_inside"))
    assert code == 1 and one_line(out), out
    assert "internal error: RuntimeError: a bug inside the router; traceback in " in out
    log = out.split("traceback in ")[1].split()[0]
    assert "a bug inside the router" in open(log).read() and "Traceback" in open(log).read()


# ---- ablations -------------------------------------------------------------------------------------
ABLATION = """
name: tiny
base:
  task: {name: clusters, train_size: 512, val_size: 128, num_clusters: 4}
  model: {d_model: 16, n_layers: 1, num_experts: 4, expert_hidden: 16}
  train: {steps: %(steps)d, batch_size: 32, eval_every: %(steps)d, eval_batches: 1, log_every: 10}
  run: {dir: %(runs)s}
axes:
  router: [softmax_topk, switch]
  seed: [0, 1]
"""


def ablation_file(tmp_path, steps=4):
    path = tmp_path / "tiny.yaml"
    path.write_text(ABLATION % {"steps": steps, "runs": tmp_path / "runs"})
    return path


def test_ablate_set_overrides_the_base_of_every_cell(tmp_path):
    from routerlab.ablate.study import plan_ablation

    plan, _ = plan_ablation(ablation_file(tmp_path), tmp_path / "out", None, ["train.steps=7", "model.num_experts=8"])
    assert {(c.config.train.steps, c.config.model.num_experts) for c in plan.cells} == {(7, 8)}
    code, out = cli("ablate", ablation_file(tmp_path), "--dry-run", "--set", "train.stepz=3")
    assert code == 2 and one_line(out) and "train.stepz" in out, out


def test_ablate_refuses_an_unwritable_or_busy_out_before_any_cell(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, out = cli("ablate", ablation_file(tmp_path), "--out", blocker / "out", "--workers", "1")
    assert code == 2 and one_line(out) and "ablate --out" in out, out
    assert not (tmp_path / "runs").exists()  # no cell ran
    holder = hold_lock(tmp_path / "out")
    try:
        code, out = cli("ablate", ablation_file(tmp_path), "--out", tmp_path / "out", "--workers", "1")
        assert code == 2 and one_line(out) and f"already in use by PID {holder.pid}" in out, out
        assert not (tmp_path / "runs").exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_ablations_sharing_one_runs_folder_are_refused(tmp_path):
    """A cell clears its run folder before it trains: a second ablation writing to the same --runs (another
    --out) would delete the first one's live TensorBoard folders, so it stops before any cell."""
    holder = hold_lock(tmp_path / "shared-runs")  # the --runs lock of a live ablation
    try:
        code, out = cli("ablate", ablation_file(tmp_path), "--out", tmp_path / "out2", "--runs", tmp_path / "shared-runs", "--workers", "1")
        assert code == 2 and one_line(out), out
        assert f"ablate --runs '{tmp_path / 'shared-runs'}' is already in use by PID {holder.pid}" in out, out
        assert not (tmp_path / "out2" / "cells").exists()  # no cell ran
        assert [p.name for p in (tmp_path / "shared-runs").iterdir()] == [".routerlab.lock"]
    finally:
        holder.kill()
        holder.wait()


KILLER_PLUGIN = """
import multiprocessing, os, signal
from routerlab.routers.registry import register_router
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

@register_router("killer", SoftmaxTopKParams)
class Killer(SoftmaxTopK):
    def forward(self, x, *, token_ids=None):
        if multiprocessing.parent_process() is not None:  # inside a pool worker only, never the test process
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x, token_ids=token_ids)
"""


def test_an_ablation_whose_worker_dies_reports_the_cell_and_exits_1(tmp_path):
    plugin = tmp_path / "killer.py"
    plugin.write_text(KILLER_PLUGIN)
    path = ablation_file(tmp_path)
    path.write_text(path.read_text().replace("base:\n", f"base:\n  plugins: [{plugin}]\n").replace("[softmax_topk, switch]", "[killer]"))  # two cells: the pool path
    code, out = cli("ablate", path, "--out", tmp_path / "out", "--workers", "2")
    assert code == 1, out
    summary = (tmp_path / "out" / "summary.md").read_text()  # the report is written all the same
    killed = [line for line in summary.splitlines() if "killer" in line and "worker process died" in line]
    assert killed and "rerun the same command to continue" in killed[0], summary
    assert not list((tmp_path / "out").glob("cells/*killer*.json"))
    assert "Traceback" not in out and "worker process died" in out


def children(pid: int) -> set[int]:
    found = set()
    for stat_file in os.listdir("/proc"):
        if stat_file.isdigit():
            try:
                fields = open(f"/proc/{stat_file}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(stat_file))
    return found


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def still_alive(pids, seconds: float) -> list[int]:
    """The pids still running after waiting up to `seconds` for all of them to end."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the process group a test started (start_new_session=True), whatever is left of it."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_ablate_leaves_no_worker_behind(tmp_path):
    cmd = [sys.executable, "-m", "routerlab", "ablate", str(ablation_file(tmp_path, steps=400)), "--out", str(tmp_path / "out"), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(children(proc.pid)) < 3:  # two pool workers and the resource tracker
            time.sleep(0.2)
        time.sleep(1.0)  # mid-start: a worker may still be importing, before its parent-death signal is armed
        workers = children(proc.pid)
        assert len(workers) >= 2, "the workers never started"
        proc.kill()  # the parent only: its workers must follow by themselves
        proc.wait()
        assert not still_alive(workers, 15), "orphaned ablate workers"
        assert not list((tmp_path / "out").glob("cells/*.json"))  # only the work in flight was lost
    finally:
        kill_group(proc)


def test_piped_output_keeps_a_long_checkpoint_path_on_one_line(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "runs"
    code, out = cli("train", "--no-progress", *[a for item in TINY + [f"run.dir={deep}"] for a in ("--set", item)])
    assert code == 0, out
    path = str(deep / "r" / "checkpoint.pt")
    assert len(path) > 120 and any(line.rstrip().endswith(f"checkpoint: {path}") for line in out.splitlines()), out


# ---- the bad-input table: one line, exit 2, nothing written -----------------------------------------
def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD = [
    (lambda p: ["train.device=cuda:abc"], r"device must be 'cpu' or 'cuda\[:N\]', got 'cuda:abc'"),
    (lambda p: ["plugins=[" + str(write(p, "syn.py", "def broken(:\n")) + "]"], r"plugin file .*syn.py' has a syntax error at line 1"),
    (lambda p: [f"plugins=[{write(p, 'imp.py', 'import no_such_module_xyz')}]"], r"plugin file .*imp.py' failed to import: ModuleNotFoundError"),
    (lambda p: ["router.name=gshard_top2", "router.capacity_factor=0"], r"capacity_factor must be > 0, or null"),
    (lambda p: ["model.capacity_factor=.inf"], r"model.capacity_factor: Input should be a finite number"),
    (lambda p: ["train.lr=1e999"], r"train.lr: Input should be a finite number"),
    (lambda p: ["train.on_nonfinite=ignore"], r"train.on_nonfinite: Input should be 'stop' or 'skip'"),
    (lambda p: ["router.name=hash"], r"router 'hash' routes by token id, but task 'clusters' has no token ids"),
]


@pytest.mark.parametrize("make, message", BAD)
def test_bad_input_table(tmp_path, make, message):
    import re

    code, out = cli(*train_args(tmp_path, *make(tmp_path)))
    assert code == 2 and one_line(out), out
    assert re.search(message, " ".join(out.split())), out
    assert not (tmp_path / "runs").exists()


def test_a_yaml_error_keeps_its_line_and_column(tmp_path):
    config = write(tmp_path, "c.yaml", "train:\n  lr: 0.1\n  steps: [1\nmodel: 2\n")
    code, out = cli("train", "--config", config)
    assert code == 2 and one_line(out), out
    assert "(line 4, column 6)" in out


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": 0}, "num_experts must be >= 1"),
    ({"obs_dim": 0}, "obs_dim must be >= 1"),
])
def test_environment_arguments_are_checked(kwargs, message):
    pytest.importorskip("gymnasium")
    from environments.token_routing import TokenRoutingEnv

    with pytest.raises(ConfigError, match=message):
        TokenRoutingEnv(**kwargs)


def test_environment_reset_refuses_options_and_accepts_none():
    pytest.importorskip("gymnasium")
    from environments.token_routing import TokenRoutingEnv

    env = TokenRoutingEnv(num_experts=4, tokens=8, pretrain_steps=1)
    first, _ = env.reset(seed=3)
    for empty in (None, {}):  # what gymnasium's wrappers and vector envs pass
        obs, info = env.reset(seed=3, options=empty)
        assert np.array_equal(obs, first) and info == {}
    with pytest.raises(ConfigError, match=r"reset\(options=\.\.\.\) takes no options \(got \['tokens'\]\)"):
        env.reset(options={"tokens": 16})
    assert env.tokens == 8


def test_a_cuda_index_this_machine_lacks_is_bad_input(tmp_path, monkeypatch):
    """cuda:N past the machine's GPUs is refused before anything is built or written (a GPU machine is
    simulated: one GPU). Without any GPU, every cuda device is refused the same way."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, out = cli(*train_args(tmp_path, "train.device=cuda:3"))
    assert code == 2 and one_line(out), out
    assert "train.device is 'cuda:3' but this machine has 1 CUDA GPU (cuda:0 .. cuda:0)" in out, out
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, out = cli(*train_args(tmp_path, "train.device=cuda:2"))
    assert code == 2 and "this machine has 2 CUDA GPUs (cuda:0 .. cuda:1); choose one of them" in out, out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out = cli(*train_args(tmp_path, "train.device=cuda:0"))
    assert code == 2 and out == "error: train.device is 'cuda' but no CUDA GPU is available; use train.device=cpu\n", out
    assert not (tmp_path / "runs").exists()


def test_the_study_storage_url_is_not_on_worker_command_lines(tmp_path, monkeypatch):
    """run_study hands the URL (password included) to its workers through the environment."""
    import studies.runner as runner_module

    seen = {}

    class Recorder:
        def __init__(self, cmd, env, preexec_fn=None):
            seen["cmd"], seen["env"] = cmd, env
            self.pid = 1

        def wait(self):
            return -9  # killed by a signal: the parent must not report success

    monkeypatch.setattr(runner_module.subprocess, "Popen", Recorder)
    url = "postgresql://user:s3cret@db.example/x"
    code, _ = runner_module.run_study(["name", "--n-trials", "2"], 1, url)
    assert code == 1
    assert not any("s3cret" in part for part in seen["cmd"])
    assert seen["env"]["ROUTERLAB_STUDY_STORAGE"] == url


def test_trials_left_running_by_killed_workers_are_failed_and_queued_again(tmp_path):
    import optuna

    from studies.runner import fail_orphaned_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead.set_user_attr("worker", "host:111")
    other = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    other.set_user_attr("worker", "elsewhere:222")  # another machine's live worker: left alone
    assert fail_orphaned_trials(study, {"host:111"}) == [dead.number]
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[dead.number] == "FAIL" and states[other.number] == "RUNNING"
    queued = [t for t in study.get_trials() if t.state.name == "WAITING"]
    assert len(queued) == 1 and queued[0].system_attrs["fixed_params"] == dead.params  # enqueued: params fixed when it starts


# ---- plugins -----------------------------------------------------------------------------------------
SHADOW = """
from routerlab.routers.registry import register_router
from routerlab.routers.softmax_topk import SoftmaxTopK, SoftmaxTopKParams

@register_router("switch", SoftmaxTopKParams{override})
class NotSwitch(SoftmaxTopK):
    pass
"""


def test_a_plugin_cannot_shadow_a_registered_name_silently(tmp_path):
    plugin = write(tmp_path, "shadow.py", SHADOW.format(override=""))
    code, out = cli(*train_args(tmp_path, f"plugins=[{plugin}]", "router.name=switch"))
    assert code == 2 and one_line(out), out
    assert "router 'switch' is already registered (by routerlab.routers.switch)" in " ".join(out.split())
    assert not (tmp_path / "runs").exists()


def test_the_fingerprint_covers_the_plugin_source(tmp_path):
    from routerlab.config import load_config

    plugin = write(tmp_path, "mine.py", NAN_PLUGIN.replace("nan_after_start", "fp_probe"))
    config = load_config(None, [f"plugins=[{plugin}]", "router.name=fp_probe"])
    first = config.fingerprint()
    plugin.write_text(plugin.read_text().replace('float("nan")', "2.0"))  # same name, other code
    assert config.fingerprint() != first
    plain = load_config(None, ["router.name=softmax_topk"]).fingerprint()
    spelled_out = load_config(None, ["router.name=softmax_topk", "router.k=2", "router.z_loss=0.0"]).fingerprint()
    assert spelled_out == plain  # default parameters written out hash as the defaults


# ---- TensorBoard reading -------------------------------------------------------------------------------
def test_tensorboard_layout_and_hparams_read_well(tmp_path):
    from routerlab.board import Board, custom_layout, flat_hparams

    layout = custom_layout()
    training = layout["routing (training batches)"]
    assert "specialization" not in training and "fluctuation" not in training  # they exist only at evaluation
    assert "specialization" in layout["routing (evaluation)"]
    assert layout["task"]["accuracy"][1] == [r"eval/accuracy"] and layout["task"]["perplexity"][1] == [r"eval/perplexity"]
    config = load_config(None, ["router.name=switch"])
    assert list(flat_hparams(config))[:2] == ["router.name", "task.name"] and flat_hparams(config)["router.name"] == "switch"
    board = Board(tmp_path / "tb")
    seen = {}
    board.writer.add_hparams = lambda hp, metrics, run_name: seen.update(metrics)
    metrics = {"loss": 1.0, "accuracy": 0.5, "load_cv": 0.2, **{f"layer{i}/load_cv": 0.1 for i in range(8)}, "step": 3}
    board.hparams(config, metrics)
    board.close()
    assert set(seen) == {"hparam/loss", "hparam/accuracy", "hparam/load_cv"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc")
def test_study_workers_die_with_a_killed_parent(tmp_path):
    """The mechanism run_study gives its workers (preexec_fn=set_parent_death_signal): kill -9 the parent,
    the child follows at once."""
    parent_code = ("import subprocess, sys, time; from routerlab.procs import set_parent_death_signal; "
                   "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=set_parent_death_signal); "
                   "print(c.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait()
        assert not still_alive([child], 10)
    finally:
        kill_group(parent)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_a_real_study_with_workers_leaves_no_worker_behind(tmp_path):
    """End to end: `routerlab study FILE --workers 2`, its two workers started, kill -9 of the parent."""
    pytest.importorskip("optuna")
    import yaml

    spec = {"name": "killed", "base": {"task": {"name": "clusters", "train_size": 256, "val_size": 64},
                                       "model": {"d_model": 16, "n_layers": 1, "num_experts": 4, "expert_hidden": 16},
                                       "train": {"steps": 1000000, "eval_every": 1000000, "batch_size": 16}, "run": {"dir": str(tmp_path / "runs")}},
            "space": {"train.lr": {"float": [1.0e-3, 1.0e-2]}}, "n_trials": 4}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, "-m", "routerlab", "study", str(path), "--workers", "2", "--no-progress"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(children(proc.pid)) < 2:
            time.sleep(0.2)
        workers = children(proc.pid)
        assert len(workers) == 2, "the study never started its workers"
        proc.kill()
        proc.wait()
        assert not still_alive(workers, 15), "a study worker outlived its killed parent"
    finally:
        kill_group(proc)


def test_kill_9_of_routerlab_train_then_resume_is_bit_exact(tmp_path):
    """End to end: a real `routerlab train` killed mid-run; its last checkpoint resumes to the same numbers as
    an uninterrupted run, the lock of the dead process is free, and no temporary file is left."""
    overrides = TINY + ["train.steps=100000", "train.checkpoint_every=3", "train.eval_every=100000", f"run.dir={tmp_path / 'runs'}"]
    cmd = [sys.executable, "-m", "routerlab", "train", "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's threads: same float sums
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = tmp_path / "runs" / "r" / "checkpoint.pt"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (path.exists() and load_checkpoint(path)["step"] >= 6):
            time.sleep(0.1)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    step = load_checkpoint(path)["step"]
    assert step >= 6 and step % 3 == 0
    config = load_config(None, overrides)
    resumed = Trainer(config, run_dir=tmp_path / "runs" / "r", resume=path)  # the dead process's lock is free
    assert not list(path.parent.glob(".*.tmp"))
    resumed.fit(until=step + 2)
    resumed.close()
    full = Trainer(config, run_dir=tmp_path / "full", log=False)
    full.fit(until=step + 2)
    assert resumed.losses == full.losses  # every step, the killed ones included


def test_load_histograms_put_each_expert_on_its_integer_index(tmp_path):
    """TensorBoard reads bucket e of load/layer<i> as [e - 0.5, e + 0.5) with expert e's load, dead experts at
    either end included (an old-style histogram dropped those and stretched the outer buckets)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from routerlab.board import Board

    board = Board(tmp_path)
    board.loads([np.array([0.0, 3.0, 5.0, 0.0])], step=7)
    board.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0}).Reload()
    (event,) = acc.Tensors("load/layer0")
    buckets = tensor_util.make_ndarray(event.tensor_proto)
    assert event.step == 7
    assert buckets.tolist() == [[-0.5, 0.5, 0.0], [0.5, 1.5, 3.0], [1.5, 2.5, 5.0], [2.5, 3.5, 0.0]]
    assert acc.summary_metadata["load/layer0"].plugin_data.plugin_name == "histograms"
