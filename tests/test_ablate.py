"""Ablations: outputs of a tiny grid, resume after a rerun and after a kill, validation before running."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from routerlab.ablate import expand, parse_spec, run_ablation
from routerlab.cli import app
from routerlab.errors import ConfigError
from routerlab.routers import router_names

TINY = {
    "name": "tiny",
    "base": {
        "task": {"name": "clusters", "train_size": 1024, "val_size": 256, "num_clusters": 4},
        "model": {"d_model": 16, "n_layers": 2, "num_experts": 4, "expert_hidden": 16},
        "train": {"steps": 24, "batch_size": 64, "eval_every": 12, "eval_batches": 2, "log_every": 6},
    },
    "axes": {"router": ["softmax_topk", {"name": "switch", "label": "switch-t"}], "seed": [0, 1]},
}
STABLE_COLUMNS = ("router", "seed", "loss", "accuracy", "load_cv", "max_vio", "dead_experts", "router_entropy", "specialization", "fluctuation")


def write_spec(tmp_path: Path, spec: dict, name: str = "tiny") -> Path:
    spec = {**spec, "base": {**spec["base"], "run": {"dir": str(tmp_path / "runs")}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def stable(rows: list[dict[str, str]]) -> list[tuple]:
    """The columns that must not depend on timing (tokens/s and wall time do)."""
    return sorted(tuple(r[c] for c in STABLE_COLUMNS) for r in rows)


ONE_WORKER = pytest.mark.xdist_group("test_ablate.finished")  # `make test` (xdist): the fixture's users run in one worker, so it runs once


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    path = write_spec(tmp, TINY)
    report = run_ablation(path, out=tmp / "results" / "tiny", workers=2)
    return tmp, path, report


@pytest.mark.slow
@ONE_WORKER
def test_tiny_ablation_writes_csv_summary_and_plots(finished):
    tmp, path, report = finished
    out = tmp / "results" / "tiny"
    assert report.ran == 4 and not report.errors
    rows = read_csv(out / "results.csv")
    assert sorted((r["router"], r["seed"]) for r in rows) == [("softmax_topk", "0"), ("softmax_topk", "1"), ("switch-t", "0"), ("switch-t", "1")]
    assert all(float(r["loss"]) < 1.6 and 0 <= float(r["load_cv"]) for r in rows)  # trained, 4 classes: chance is ln 4 = 1.39
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("| softmax_topk") or line.startswith("| switch-t")]
    assert len(table) == 2 and all(" ± " in line for line in table)  # mean ± std over the two seeds
    assert f"routerlab ablate {path} --out {out}" in summary and report.plan.spec.config_hash() in summary
    for png in ("quality_vs_balance.png", "loads.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_dirs = [p for p in (tmp / "runs" / "tiny").iterdir() if p.name != ".routerlab.lock"]  # the lock of --runs
    assert sorted(p.name for p in run_dirs) == sorted(c.id for c in report.plan.cells)
    assert all(any(d.glob("events.out.tfevents.*")) for d in run_dirs)


@ONE_WORKER
def test_rerun_skips_every_finished_cell(finished):
    tmp, path, report = finished
    out = tmp / "results" / "tiny"
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    before = read_csv(out / "results.csv")
    again = run_ablation(path, out=out, workers=2)
    assert again.ran == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps
    assert read_csv(out / "results.csv") == before  # the table is rebuilt from the same cells


@pytest.mark.slow
def test_killed_ablation_resumes_to_the_same_table(tmp_path):
    # one in-process worker here (the fixture covers spawned workers): cheap, and the same thread count
    # for the killed, the resumed and the uninterrupted run, so their numbers must agree exactly
    path = write_spec(tmp_path, TINY)
    out = tmp_path / "results" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "routerlab", "ablate", str(path), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "cells").glob("*.json")) and proc.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # mid-way, with no chance to clean up
        proc.wait()
    done = list((out / "cells").glob("*.json"))
    assert 1 <= len(done) < 4, "the kill should land after the first cell and before the last"
    assert all(json.loads(p.read_text())["metrics"] for p in done)  # what looks finished is finished
    assert not (out / "summary.md").exists() and not (out / "results.csv").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = run_ablation(path, out=out, workers=1)
        assert resumed.ran == 4 - len(done)
        uninterrupted = run_ablation(path, out=tmp_path / "results" / "whole", runs=tmp_path / "runs" / "whole", workers=1)
    finally:
        torch.set_num_threads(threads)
    assert uninterrupted.ran == 4
    assert stable(read_csv(out / "results.csv")) == stable(read_csv(tmp_path / "results" / "whole" / "results.csv"))


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"axes": {"router": ["softmax_topk", "nope_router"]}}, ["unknown router 'nope_router'", "softmax_topk", "switch"]),
        ({"axes": {"task": ["clusters", "nope_task"]}}, ["unknown task 'nope_task'", "chars", "digits"]),
        ({"axes": {"model.nope": [1, 2]}}, ["unknown config key 'model.nope'", "num_experts", "d_model"]),
        ({"axes": {"router.nope": [1]}}, ["has no parameter nope", "valid:"]),
        ({"metrics": ["loss", "nope_metric"]}, ["unknown metric", "load_cv"]),
    ],
)
def test_invalid_ablation_fails_before_anything_runs(tmp_path, change, expected):
    spec = {**TINY, **{k: v for k, v in change.items() if k != "axes"}, "axes": {**TINY["axes"], **change.get("axes", {})}}
    path = write_spec(tmp_path, spec)
    result = CliRunner().invoke(app, ["ablate", str(path), "--out", str(tmp_path / "results")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for piece in expected:
        assert piece in text
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


def test_all_routers_enter_and_incompatible_ones_are_skipped_with_reason(tmp_path):
    spec = parse_spec({**TINY, "axes": {"router": ["all"]}, "exclude": ["random"]})
    plan = expand(spec, tmp_path / "runs")
    ran = {c.labels["router"] for c in plan.cells}
    skipped = {labels["router"]: reason for labels, reason in plan.skipped}
    assert ran | set(skipped) == set(router_names()) - {"random"}
    assert "hash" in skipped and "no token ids" in skipped["hash"]  # clusters has no token ids
    assert {"softmax_topk", "noisy_topk", "switch", "expert_choice"} <= ran


def test_cell_ids_follow_the_config(tmp_path):
    plan = expand(parse_spec(TINY), tmp_path / "runs")
    longer = expand(parse_spec({**TINY, "base": {**TINY["base"], "train": {**TINY["base"]["train"], "steps": 25}}}), tmp_path / "runs")
    assert [c.id for c in plan.cells] == [c.id for c in expand(parse_spec(TINY), tmp_path / "runs").cells]
    assert not {c.id for c in plan.cells} & {c.id for c in longer.cells}
    assert len({c.id for c in plan.cells}) == 4


def test_duplicate_cells_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="same label"):
        expand(parse_spec({**TINY, "axes": {"router": ["switch", "switch"]}}), tmp_path / "runs")
