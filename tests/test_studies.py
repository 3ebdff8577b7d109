"""Optuna studies: resume, pruning, retry of a killed worker's trial, two workers on real storages
(PostgreSQL, SQLite, journal), the report's best config trains, bad input fails before any trial."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from routerlab.cli import app
from routerlab.config import load_config

optuna = pytest.importorskip("optuna")

from studies.runner import run_worker  # noqa: E402
from studies.space import available_studies, load_study, validate_router_library  # noqa: E402
from studies.storage import open_storage  # noqa: E402

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

TINY_BASE = {
    "seed": 0,
    "task": {"name": "clusters", "num_clusters": 4, "input_dim": 8, "num_classes": 2, "train_size": 512, "val_size": 128},
    "model": {"d_model": 16, "n_layers": 1, "num_experts": 4, "expert_hidden": 16},
    "router": {"name": "softmax_topk", "k": 2},
    "train": {"steps": 3, "batch_size": 32, "eval_every": 3, "eval_batches": 1, "log_every": 1},
}


def write_spec(tmp_path, name=None, **fields):
    name = name or f"s{uuid.uuid4().hex[:8]}"  # unique: the PostgreSQL database outlives a test run
    spec = {"name": name, "base": {**TINY_BASE, "run": {"dir": str(tmp_path / "runs")}}, "sampler": {"seed": 0},
            "space": {"train.lr": {"float": [1.0e-3, 3.0e-2], "log": True}}, "routers": ["softmax_topk"],
            "router_space": {"softmax_topk": {"k": {"int": [1, 2]}, "z_loss": {"float": [1.0e-4, 1.0e-1], "log": True}}}}
    spec.update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def states(study):
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def study_cli(*args, timeout=400):
    return subprocess.run([sys.executable, "-m", "routerlab", "study", *map(str, args), "--no-progress"], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ---- a real PostgreSQL: .ci/run's, else a throwaway one, else skip with the reason ------------------------
def reachable(url):
    import psycopg2

    try:
        psycopg2.connect(url, connect_timeout=5).close()
        return None
    except psycopg2.Error as err:
        return str(err).strip().splitlines()[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_throwaway_postgres(reasons):
    """initdb + pg_ctl on a free loopback port; as root the server runs as the `postgres` user (it refuses root)."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if found is None:
        reasons.append("no initdb binary (install Debian's postgresql, or run .ci/run)")
        return None, None
    bindir = Path(os.path.realpath(found)).parent
    prefix = []
    datadir = Path(tempfile.mkdtemp(prefix="routerlab-pg-"))
    if os.geteuid() == 0:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            reasons.append("running as root and there is no 'postgres' user to run a server as")
            return None, None
        os.chown(datadir, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    try:
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(datadir / "data"), "-A", "trust", "-U", "routerlab", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(datadir / "data"), "-l", str(datadir / "log"), "-w", "-t", "60",
                        "-o", f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as err:
        detail = getattr(err, "stderr", b"") or b""
        reasons.append(f"throwaway server did not start: {err} {detail.decode(errors='replace').strip()[-300:]}")
        shutil.rmtree(datadir, ignore_errors=True)
        return None, None
    stop = lambda: (subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(datadir / "data"), "-m", "immediate", "stop"],  # noqa: E731
                                   capture_output=True, timeout=60), shutil.rmtree(datadir, ignore_errors=True))
    return f"postgresql://routerlab@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="module")
def postgres_url():
    reasons = []
    url = os.environ.get("ROUTERLAB_TEST_POSTGRES_URL")
    if url:
        problem = reachable(url)
        if problem is None:
            yield url
            return
        reasons.append(f"ROUTERLAB_TEST_POSTGRES_URL is unreachable: {problem}")
    else:
        reasons.append("ROUTERLAB_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    url, stop = start_throwaway_postgres(reasons)
    if url is None:
        print("PostgreSQL test skipped: " + "; ".join(reasons))
        pytest.skip("no PostgreSQL: " + "; ".join(reasons))
    try:
        yield url
    finally:
        stop()


# ---- tests -------------------------------------------------------------------------------------------------
def test_shipped_spaces_match_the_registry():
    families = validate_router_library()
    assert {"softmax_topk", "noisy_topk", "switch"} <= set(families)
    for name in available_studies():
        spec = load_study(name)
        assert spec.families, name
    multi = load_study("clusters_pareto")
    assert multi.multi_objective and len(multi.families) >= 3


def test_short_study_runs_resumes_and_its_best_config_trains(tmp_path):
    fields = {"baseline": True, "router_space": {"softmax_topk": {"k": {"int": [1, 2]}, "z_loss": {"float": [0.0, 0.1]}}}}
    spec = load_study(str(write_spec(tmp_path, **fields)))
    study = run_worker(spec, n_trials=2)
    assert states(study) == ["COMPLETE", "COMPLETE"]
    first = [(t.number, t.values, t.params) for t in study.get_trials()]
    assert first[0][2] == {"train.lr": 3e-3, "router.k": 2, "router.z_loss": 0.0}  # trial 0 is the base config
    assert first[1][2] != first[0][2]

    study = run_worker(load_study(str(write_spec(tmp_path, name=spec.name, **fields))), n_trials=4)  # a rerun continues
    trials = study.get_trials()
    assert states(study) == ["COMPLETE"] * 4
    assert [(t.number, t.values, t.params) for t in trials[:2]] == first  # finished trials kept as they were
    runs = tmp_path / "runs" / "studies" / spec.name
    assert sorted(p.name for p in runs.glob("trial-*")) == [f"trial-{i}" for i in range(4)]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trial_board = EventAccumulator(str(runs / "trial-3"), size_guidance={"scalars": 0})
    trial_board.Reload()
    assert "eval/loss" in trial_board.Tags()["scalars"] and trial_board.PluginTagToContent("hparams")
    study_best = []
    for events in sorted((runs / "study").glob("events.*")):
        board = EventAccumulator(str(events), size_guidance={"scalars": 0})
        board.Reload()
        study_best += [e.value for e in board.Scalars("study/best_loss")]
    assert len(study_best) == 4 and min(study_best) == pytest.approx(study.best_value)

    out = tmp_path / "report"
    result = runner.invoke(app, ["study-report", str(tmp_path / f"{spec.name}.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG" and (out / "baseline_config.yaml").is_file()
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 1 + 4
    best = load_config(out / "best_config.yaml")
    assert best.router == study.best_trial.user_attrs["config"]["router"] and best.train.lr == study.best_trial.user_attrs["config"]["train"]["lr"]
    result = runner.invoke(app, ["train", "--config", str(out / "best_config.yaml"), "--no-progress", "--set", f"run.dir={tmp_path / 'retrain'}"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "retrain" / f"{spec.name}-best" / "checkpoint.pt").is_file()


def test_multi_objective_study_exports_its_pareto_front(tmp_path):
    path = write_spec(tmp_path, routers=["softmax_topk", "switch", "noisy_topk"], router_space={},
                      objectives=[{"metric": "loss"}, {"metric": "max_vio"}, {"metric": "tokens_per_s", "direction": "maximize"}])
    spec = load_study(str(path))
    study = run_worker(spec, n_trials=4)
    assert states(study) == ["COMPLETE"] * 4 and len(study.best_trials) >= 1
    result = runner.invoke(app, ["study-report", str(path), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "report" / "pareto.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(study.best_trials)
    assert (tmp_path / "report" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    for t in study.get_trials():  # conditional parameters: only the sampled family's
        family = t.params["router.name"]
        assert all(p in ("router.name", "train.lr") or p.startswith(f"{family}.") for p in t.params)


def test_a_trial_with_a_bad_intermediate_value_is_pruned(tmp_path):
    path = write_spec(tmp_path, pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
                      space={"train.lr": {"float": [1.0e-4, 1.0], "log": True}}, routers=[], router_space={},
                      enqueue=[{"train.lr": 3.0e-3}, {"train.lr": 1.0e-3}, {"train.lr": 1.0}])
    spec = load_study(str(path))
    spec.base["train"].update(steps=4, eval_every=1)
    study = run_worker(spec, n_trials=3)
    good, _, bad = study.get_trials()
    assert states(study) == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert bad.params["train.lr"] == 1.0 and max(bad.intermediate_values) < 4  # stopped before the end
    step = max(bad.intermediate_values)
    assert bad.intermediate_values[step] > good.intermediate_values[step]


def test_a_hyperband_study_reports_on_the_step_scale(tmp_path):
    spec = load_study(str(write_spec(tmp_path, pruner={"type": "hyperband"})))
    spec.base["train"].update(steps=4, eval_every=2)
    study = run_worker(spec, n_trials=2)
    assert set(states(study)) <= {"COMPLETE", "PRUNED"} and len(states(study)) == 2
    assert list(study.trials[0].intermediate_values) == [2, 4]

@pytest.mark.slow
def test_a_killed_workers_trial_is_retried(tmp_path):
    path = write_spec(tmp_path)
    name = path.stem
    common = ["--heartbeat", "1", "--n-trials", "1"]
    slow = subprocess.Popen([sys.executable, "-m", "routerlab", "study", str(path), *common, "--no-progress",
                             "--set", "train.steps=1000000", "--set", "train.eval_every=1000000"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"sqlite:///{tmp_path / 'runs' / 'studies' / name / 'study.db'}"
    deadline = time.time() + 90
    running = False
    while time.time() < deadline and not running:
        time.sleep(0.5)
        if Path(url.removeprefix("sqlite:///")).is_file():
            try:
                running = states(optuna.load_study(study_name=name, storage=open_storage(url, 1))) == ["RUNNING"]
            except KeyError:
                pass
    assert running, "the first worker never started its trial"
    time.sleep(1.5)  # at least one heartbeat is recorded
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    time.sleep(3.5)  # past the grace period (3 heartbeats)
    done = study_cli(path, *common, "--set", "train.steps=3")
    assert done.returncode == 0, done.stderr[-2000:]
    killed, retry = optuna.load_study(study_name=name, storage=open_storage(url, 1)).get_trials()
    assert (killed.state.name, retry.state.name) == ("FAIL", "COMPLETE")
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == killed.params


def test_workers_started_together_on_a_new_sqlite_file_all_open_it(tmp_path):
    # every process tries to create Optuna's tables at the same instant; the losers must open the winner's schema
    url = f"sqlite:///{tmp_path / 'new' / 'study.db'}"
    ready = tmp_path / "ready"
    ready.mkdir()
    # a barrier: each process imports optuna and SQLAlchemy, says so with a file, and waits (sleeping) for all four
    code = ("import sys, time; from pathlib import Path; from optuna.storages import RDBStorage; from studies.storage import open_storage\n"
            "ready = Path(sys.argv[2]); (ready / sys.argv[3]).touch(); deadline = time.time() + 100\n"
            "while len(list(ready.iterdir())) < 4 and time.time() < deadline: time.sleep(0.001)\n"
            "open_storage(sys.argv[1], 1)")
    workers = [subprocess.Popen([sys.executable, "-c", code, url, str(ready), str(i)], env=ENV, stderr=subprocess.PIPE, text=True)
               for i in range(4)]
    errors = [w.communicate(timeout=120)[1] for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, "\n".join(e[-500:] for e in errors if e)
    optuna.create_study(study_name="after", storage=open_storage(url, 1)).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "sqlite", "journal"])
def test_two_workers_trials_add_up(tmp_path, kind, request):
    path = write_spec(tmp_path)
    name = path.stem
    url = {"sqlite": None, "journal": f"journal:{tmp_path / 'study.log'}"}.get(kind) or request.getfixturevalue("postgres_url")
    args = [path, "--workers", "2", "--n-trials", "6", "--set", "train.steps=12", "--set", "train.eval_every=12"] + (["--storage", url] if url else [])
    result = study_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    url = url or f"sqlite:///{tmp_path / 'runs' / 'studies' / name / 'study.db'}"
    trials = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    n = len(trials)
    assert 6 <= n <= 7  # two workers may each finish a trial after the sixth: at most one extra
    assert [t.number for t in trials] == list(range(n))
    assert all(t.state.name == "COMPLETE" for t in trials)  # none lost (RUNNING, FAIL) or left WAITING
    assert len({t.user_attrs["run_dir"] for t in trials}) == n
    assert len(list((tmp_path / "runs" / "studies" / name).glob("trial-*"))) == n
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials


@pytest.mark.parametrize("fields, message", [
    ({"routers": ["no_such_router"]}, "unknown router 'no_such_router'; valid routers: .*softmax_topk"),
    ({"router_space": {"softmax_topk": {"nope": {"int": [1, 2]}}}}, "router 'softmax_topk' has no parameter 'nope'; valid: .*z_loss"),
    ({"space": {"train.lr": {"float": [0.1, 0.01]}}}, "low 0.1 is above high 0.01"),
    ({"space": {"train.lr": {"float": [0.0, 0.01], "log": True}}}, "a log scale needs low > 0"),
    ({"space": {"model.nope": {"int": [1, 2]}}}, "space key 'model.nope' is not a config key"),
    ({"space": {"model.num_experts": {"choice": [1, 4]}}}, "k reaches 2 but there may be only 1 experts"),
    ({"objectives": [{"metric": "lossy"}]}, "unknown objective metric 'lossy'"),
    ({"objectives": [{"metric": "loss"}, {"metric": "max_vio"}], "pruner": {"type": "median"}}, "pruning works with one objective only"),
    ({"space": {"train.lr": {"float": [1.0e-5, 1.0e-4]}}, "baseline": True}, "baseline: the base value train.lr=0.003 lies outside"),
])
def test_an_invalid_space_fails_before_any_trial(tmp_path, fields, message):
    import re

    path = write_spec(tmp_path, **fields)
    result = runner.invoke(app, ["study", str(path), "--n-trials", "1", "--no-progress"])
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("storage, message", [
    ("study.db", "is not a storage URL; valid: sqlite:///"),
    ("nosuchdb://x/y", "cannot open storage 'nosuchdb://x/y'"),
    ("postgresql://someone:secret@127.0.0.1:{port}/db", "cannot open storage 'postgresql://someone:\\*\\*\\*@127.0.0.1"),
    ("sqlite:///:memory:", "in-memory SQLite database cannot be shared"),
])
def test_an_invalid_storage_fails_before_any_trial(tmp_path, storage, message):
    import re

    path = write_spec(tmp_path)
    result = runner.invoke(app, ["study", str(path), "--storage", storage.format(port=free_port()), "--no-progress"])
    assert result.exit_code == 2 and re.search(message, " ".join(result.output.split())), result.output
    assert "secret" not in result.output and not (tmp_path / "runs").exists()

