"""Ablations at scale: statistics (intervals, paired differences, evaluation SE, train-mode balance), cells
keyed by data content, seeds that reach hash tables, failed cells, GPU placement (fake devices), Ray."""
from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from routerlab.ablate import expand, parse_spec, run_ablation
from routerlab.ablate.measure import heldout, routing_as_trained
from routerlab.ablate.report import paired_differences, summarize
from routerlab.ablate.runner import DevicePool, device_slots, schedule
from routerlab.ablate.spec import Cell
from routerlab.config import make_config
from routerlab.errors import ConfigError
from routerlab.train import Trainer

TINY_TASK = {"name": "clusters", "train_size": 512, "val_size": 128, "num_clusters": 4}
TINY_MODEL = {"d_model": 16, "n_layers": 1, "num_experts": 4, "expert_hidden": 16}


def test_interval_and_paired_difference_match_hand_computation():
    s = summarize([1.0, 2.0, 4.0])
    # mean 7/3, sample sd sqrt(7/3), t(0.975, df 2) = 4.302653 (table)
    assert s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(math.sqrt(7 / 3))
    assert s.half == pytest.approx(4.302653 * math.sqrt(7 / 3) / math.sqrt(3), rel=1e-5)
    rows = {"a": {0: 1.0, 1: 2.0, 2: 3.0}, "b": {0: 1.5, 1: 2.4, 2: 3.8, 3: 9.0}}  # seed 3 has no pair
    stats = [{"row": r, "seeds": {seed: {"loss": v} for seed, v in vals.items()}} for r, vals in rows.items()]
    (d,) = paired_differences(stats, "a", ["loss"])
    diffs = [0.5, 0.4, 0.8]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d["row"] == "b" and d["loss"].n == 3 and d["loss"].mean == pytest.approx(mean)
    assert d["loss"].low == pytest.approx(mean - 4.302653 * sd / math.sqrt(3), rel=1e-5)
    assert d["loss"].excludes_zero  # all three pairs agree in sign and the spread is small


def test_eval_se_test_split_and_train_mode_balance():
    config = make_config({
        "task": {**TINY_TASK, "test_size": 96}, "model": TINY_MODEL, "router": {"name": "noisy_topk", "k": 1},
        "train": {"steps": 6, "batch_size": 32, "eval_every": 6, "eval_batches": 3}, "run": {"checkpoint": False},
    })
    trainer = Trainer(config, log=False)
    metrics = trainer.fit()
    # independent: per-example cross-entropy of the model's logits on the same batches, SE over examples
    trainer.model.eval()
    with torch.no_grad():
        per_example = torch.cat([F.cross_entropy(trainer.model(b.inputs, None).float(), b.targets, reduction="none") for b in trainer.eval_set])
    assert metrics["loss"] == pytest.approx(float(per_example.mean()), rel=1e-5)
    assert metrics["loss_se"] == pytest.approx(float(per_example.std() / math.sqrt(96)), rel=1e-5)
    test = heldout(trainer, "test")
    assert set(test) == {"test_loss", "test_loss_se", "test_accuracy"} and test["test_loss"] != metrics["loss"]
    rng = torch.get_rng_state()
    noisy = routing_as_trained(trainer)
    assert torch.equal(rng, torch.get_rng_state())  # measuring never moves what training draws next
    assert noisy == routing_as_trained(trainer)  # its noise is a fixed draw
    assert noisy["load_cv_as_trained"] != metrics["load_cv"]  # the gate noise changes the routing
    # a router without noise routes the same in both modes
    plain = Trainer(make_config({**config.model_dump(), "router": {"name": "softmax_topk", "k": 1}}), log=False)
    plain.fit()
    assert routing_as_trained(plain)["load_cv_as_trained"] == pytest.approx(plain.last_eval["load_cv"])


def _chars_spec(corpus: str, router: dict | None = None) -> dict:
    return {
        "base": {"task": {"name": "chars", "block_size": 8, "corpus": corpus}, "model": {**TINY_MODEL, "n_heads": 2},
                 "train": {"steps": 2, "batch_size": 4}},
        "axes": {"router": [router or {"name": "hash"}], "seed": [0, 1]},
    }


def test_cell_id_follows_data_content_not_path_and_hash_seed_follows_run_seed(tmp_path, monkeypatch):
    text = "the quick brown fox jumps over the lazy dog. " * 40
    ids = {}
    for folder, content in (("a", text), ("b", text.upper()), ("c", text)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "corpus.txt").write_text(content)
        monkeypatch.chdir(tmp_path / folder)  # the same relative path, other directories
        plan = expand(parse_spec(_chars_spec("corpus.txt")), "runs")
        ids[folder] = [c.id for c in plan.cells]
        if folder == "a":
            assert [c.config.router["seed"] for c in plan.cells] == [0, 1]  # the hash table follows the run seed
    assert ids["a"] == ids["c"]  # same text, other folder: the same cells (results are reused)
    assert not set(ids["a"]) & set(ids["b"])  # other text at the same path: other cells
    pinned = expand(parse_spec(_chars_spec("corpus.txt", {"name": "hash", "seed": 7})), "runs")
    assert [c.config.router["seed"] for c in pinned.cells] == [7, 7]


def test_failed_cell_is_recorded_with_reason_and_the_grid_goes_on(tmp_path):
    spec = {
        "name": "fails", "base": {"task": TINY_TASK, "model": TINY_MODEL, "run": {"dir": str(tmp_path / "runs")},
                                  "train": {"steps": 6, "batch_size": 32, "eval_every": 6, "eval_batches": 1, "grad_clip": None}},
        "axes": {"train.lr": [3.0e-3, 1.0e30]}, "baseline": "0.003",
    }
    path = tmp_path / "fails.yaml"
    path.write_text(yaml.safe_dump(spec))
    report = run_ablation(path, out=tmp_path / "out", workers=1)
    assert len(report.results) == 1 and len(report.errors) == 1
    (reason,) = report.errors.values()
    # the trainer stops a run at its first non-finite step (step 1 trains from the initial weights)
    assert ("not finite" in reason or "non-finite" in reason) and "step 2" in reason
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Failed" in summary and "torch" in summary and "data sha256" in summary and "working directory" in summary
    with pytest.raises(ConfigError, match="baseline 'nope' is not a row"):
        expand(parse_spec({**spec, "baseline": "nope"}), tmp_path / "runs")


@pytest.mark.parametrize("per_gpu", [1, 2])
def test_placement_on_two_fake_gpus(per_gpu):
    # the scheduling the CUDA path uses, with fake device names and sleeping cells in threads
    assert device_slots(2, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    pool = DevicePool(["cuda:0", "cuda:1"], per_gpu)
    log, lock = [], threading.Lock()

    def fake_cell(cell, device):
        start = time.perf_counter()
        time.sleep(0.15)
        with lock:
            log.append((device, start, time.perf_counter()))
        return cell.id

    cells = [Cell(f"c{i}", {}, 0, None) for i in range(8)]
    done = []
    with ThreadPoolExecutor(8) as threads:
        schedule(cells, lambda c, d: threads.submit(fake_cell, c, d), pool.slots, pool, on_done=lambda c, r: done.append(r))
    assert sorted(done) == sorted(c.id for c in cells)

    def most_at_once(entries):
        return max(sum(1 for _, s, e in entries if s <= t < e) for _, t, _ in entries)

    for device in ("cuda:0", "cuda:1"):
        mine = [e for e in log if e[0] == device]
        assert len(mine) == 4 and most_at_once(mine) == per_gpu  # each GPU takes its share, per_gpu at a time
    assert most_at_once(log) == 2 * per_gpu  # both GPUs busy at once
    assert pool.busy == {"cuda:0": 0, "cuda:1": 0}


def test_study_workers_spread_over_fake_gpus():
    from studies.runner import worker_devices

    assert worker_devices("cuda", 4, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_devices("cuda", 3, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices("cpu", 2, 2) == [None, None]  # CPU studies keep the config's device


ROOT = Path(__file__).resolve().parents[1]
FINDINGS_MIN_TOKENS = {"collapse": 20e6, "hash_vs_learned": 20e6, "zloss": 5e6, "specialization": 5e6,
                       "zloss_25m": 5e6, "specialization_25m": 5e6, "collapse_25m": 20e6, "hash_vs_learned_25m": 20e6}  # issue 16's floors


@pytest.mark.parametrize("name", sorted(FINDINGS_MIN_TOKENS))
def test_gpu_findings_files_train_at_least_their_minimum_with_three_seeds(name):
    spec = yaml.safe_load((ROOT / f"configs/ablations/gpu/{name}.yaml").read_text())
    train, block = spec["base"]["train"], spec["base"]["task"]["block_size"]
    assert train["steps"] * train["batch_size"] * block >= FINDINGS_MIN_TOKENS[name]
    assert len(spec["axes"]["seed"]) >= 3
    assert train.get("precision") in ("bf16-pure", "bf16-mixed") and "dtype" not in train  # says what it means


def test_gpu_findings_refuses_a_grid_below_its_minimum_and_writes_nothing(tmp_path):
    spec = yaml.safe_load((ROOT / "configs/ablations/gpu/hash_vs_learned.yaml").read_text())
    spec["base"]["train"]["steps"] = 301  # 9.9M tokens: what the first planner cut it to
    (tmp_path / "hash_vs_learned.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_findings.py"), "--configs", str(tmp_path),
                           "--grids", "hash_vs_learned", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "9,863,168 tokens per run, below its minimum 20,000,000" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
