"""The ablation and study reports against hand computations: paired differences by seed, the printed
values and intervals, the summary files' rows; the study's best trial, its config file, the trials and
Pareto tables. In-memory studies and plans, no training: fast. The mutation run of the reports selects it."""
import csv
import io
import math
import statistics

import pytest
from scipy import stats as scipy_stats

from routerlab.ablate import expand, parse_spec
from routerlab.ablate import report
from routerlab.config import load_config

LOSS = {("a", 0): 1.0, ("a", 1): 2.0, ("a", 2): 4.0, ("b", 0): 1.5, ("b", 1): 2.0, ("b", 2): 5.0, ("c", 0): 3.0}


def plan_and_table(tmp_path, baseline="a"):
    spec = parse_spec({"name": "s", "base": {"task": {"name": "clusters"}}, "baseline": baseline,
                       "axes": {"router": [{"name": "softmax_topk", "label": "a"}, {"name": "switch", "label": "b"}, {"name": "hash_position", "label": "c"}], "seed": [0, 1, 2]},
                       "metrics": ["loss", "load_cv", "tokens_per_s"]})
    plan = expand(spec, tmp_path / "runs")
    table = []
    for c in plan.cells:
        key = (c.labels["router"], c.seed)
        if key in LOSS:  # router c has one finished seed
            table.append({"cell": c.id, "router": c.labels["router"], "seed": c.seed, "loss": LOSS[key], "load_cv": 0.1 * c.seed,
                          "tokens_per_s": 1000.0 + c.seed, "loss_se": 0.01})
    return plan, table


def test_paired_differences_pair_by_seed(tmp_path):
    plan, table = plan_and_table(tmp_path)
    stats = report.group_stats(plan, table, ["loss", "load_cv"])
    diffs = {d["row"]: d for d in report.paired_differences(stats, "a", ["loss", "load_cv"])}
    assert set(diffs) == {"b", "c"}
    d = [LOSS[("b", s)] - LOSS[("a", s)] for s in range(3)]  # [0.5, 0, 1]
    assert diffs["b"]["loss"].mean == pytest.approx(statistics.mean(d))
    assert diffs["b"]["loss"].std == pytest.approx(statistics.stdev(d))
    assert diffs["b"]["loss"].half == pytest.approx(scipy_stats.t.ppf(0.975, 2) * statistics.stdev(d) / math.sqrt(3))
    assert diffs["b"]["n"] == 3 and diffs["c"]["n"] == 1 and diffs["c"]["loss"].mean == pytest.approx(2.0)
    assert diffs["b"]["load_cv"].mean == pytest.approx(0.0)
    assert report.paired_differences(stats, "nobody", ["loss"]) == []


def test_printed_values_and_intervals():
    s = report.summarize([1.0, 2.0, 4.0])
    half = scipy_stats.t.ppf(0.975, 2) * statistics.stdev([1.0, 2.0, 4.0]) / math.sqrt(3)
    assert report.fmt_value("loss", s) == f"{7 / 3:.4f} ± {half:.4f} (sd {statistics.stdev([1.0, 2.0, 4.0]):.4f})"
    assert report.fmt_value("load_cv", s, compact=True) == f"{7 / 3:.3f} ± {half:.3f}"
    assert report.fmt_value("dead_experts", s, compact=True) == f"{7 / 3:.2f} ± {half:.2f}"
    assert report.fmt_value("tokens_per_s", report.summarize([1234.4, 1234.6])) == "1,234"
    assert report.fmt_value("loss_se", report.summarize([0.01, 0.03])) == "0.0200"
    assert report.fmt_value("load_cv", report.summarize([0.5])) == "0.500"
    assert report.fmt_diff("loss", report.summarize([0.5])) == "+0.5000 (1 pair)"
    inside = report.summarize([-0.1, 0.2, 0.1])
    assert report.fmt_diff("load_cv", inside) == f"{inside.mean:+.3f} [{inside.low:+.3f}, {inside.high:+.3f}]"
    outside = report.summarize([1.0, 1.1, 0.9])
    assert report.fmt_diff("load_cv", outside).endswith(" *") and outside.excludes_zero
    assert report.summarize([-1.0, -1.1, -0.9]).excludes_zero and not inside.excludes_zero
    assert not report.summarize([1.0]).excludes_zero
    assert (outside.low, outside.high) == (pytest.approx(1.0 - outside.half), pytest.approx(1.0 + outside.half))
    assert report.header("load_cv_as_trained") == "load CV (train mode)" and report.header("odd") == "odd"


def test_summary_markdown_and_csv_hold_the_numbers(tmp_path):
    plan, table = plan_and_table(tmp_path)
    stats = report.group_stats(plan, table, ["loss", "load_cv", "tokens_per_s", "loss_se"])
    assert report.shown_metrics(plan, stats) == ["loss", "loss_se", "load_cv", "tokens_per_s"]
    text = report.summary_markdown(plan, stats, {"x": "boom"}, "routerlab ablate s.yaml")
    a = report.summarize([1.0, 2.0, 4.0])
    row_a = next(line for line in text.splitlines() if line.startswith("| a |"))
    assert f"| 3 | {report.fmt_value('loss', a)} |" in row_a
    d = report.summarize([0.5, 0.0, 1.0])
    assert f"| b | 3 | {report.fmt_diff('loss', d)} |" in text  # the paired-difference table
    assert "- x: boom" in text and "**Incomplete: 2 of 9 runs have no result yet.**" in text
    assert "9 runs (3 settings x seeds 0, 1, 2)" in text and "routerlab ablate s.yaml" in text
    report.write_summary_csv(tmp_path / "summary.csv", plan, stats)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    loss_b = next(r for r in rows if r["row"] == "b" and r["metric"] == "loss")
    assert float(loss_b["mean"]) == pytest.approx(8.5 / 3) and float(loss_b["std"]) == pytest.approx(statistics.stdev([1.5, 2.0, 5.0]))
    assert float(loss_b["diff_vs_baseline"]) == pytest.approx(0.5) and loss_b["pairs"] == "3"
    assert float(loss_b["diff_ci95_low"]) == pytest.approx(d.low) and float(loss_b["diff_ci95_high"]) == pytest.approx(d.high)
    assert float(loss_b["ci95_low"]) == pytest.approx(8.5 / 3 - report.summarize([1.5, 2.0, 5.0]).half)
    assert next(r for r in rows if r["row"] == "a" and r["metric"] == "loss")["diff_vs_baseline"] == ""
    report.write_csv(tmp_path / "results.csv", plan, table)
    lines = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert len(lines) == 7 and list(lines[0])[:3] == ["cell", "router", "seed"] and float(lines[1]["loss"]) == 2.0


def test_rows_flatten_finished_cells_in_plan_order(tmp_path):
    plan, _ = plan_and_table(tmp_path)
    first, second = plan.cells[0], plan.cells[4]
    results = {second.id: {"metrics": {"loss": 2.0, "layer0/loss": 9.0}, "wall_s": 3.0},
               first.id: {"metrics": {"loss": 1.0}, "wall_s": 1.0, "train_tokens": 64, "cpu_s": 2.0}}
    table = report.rows(plan, results)
    assert [r["cell"] for r in table] == [first.id, second.id]
    assert table[0] == {"cell": first.id, **first.labels, "seed": first.seed, "loss": 1.0, "train_tokens": 64, "wall_s": 1.0, "cpu_s": 2.0}
    assert "layer0/loss" not in table[1] and math.isnan(table[1]["train_tokens"]) and math.isnan(table[1]["cpu_s"])


# ---- studies/report.py ------------------------------------------------------------------------------
def study_with(values_list, directions, fixed_first=True):
    import optuna

    from studies.space import StudySpec

    config = load_config(None, ["task.name=clusters"]).model_dump(mode="json")
    spec = StudySpec(name="s", objectives=[{"metric": m, "direction": d} for m, d in zip(["loss", "load_cv"], directions)], baseline=True)
    study = optuna.create_study(directions=directions)
    dist = {"train.lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)}
    for i, values in enumerate(values_list):
        state = optuna.trial.TrialState.FAIL if values is None else optuna.trial.TrialState.COMPLETE
        attrs = {"config": {**config, "train": {**config["train"], "lr": 0.001 * (i + 1)}}, "loss": None if values is None else values[0], "fixed": fixed_first and i == 0}
        study.add_trial(optuna.trial.create_trial(params={"train.lr": 0.001 * (i + 1)}, distributions=dist, values=values, state=state, user_attrs=attrs,
                                                  system_attrs={"failed_trial": 1} if i == 3 else {}))
    return spec, study


def test_single_objective_best_trial_and_its_config_file(tmp_path):
    from studies.report import best_trial, config_yaml

    spec, study = study_with([[0.9], [0.4], None, [0.7]], ["minimize"])
    best = best_trial(study, spec)
    assert best.number == 1
    text = config_yaml(spec, best)
    assert text.startswith("# Best trial 1 of study 's' (loss=0.4).\n")
    assert '# Searched parameters: {"train.lr": 0.002}' in text
    import yaml

    data = yaml.safe_load(text)
    assert data["train"]["lr"] == 0.002 and data["run"] == {"dir": "runs", "name": "s-best", "checkpoint": True}
    spec_max, study_max = study_with([[0.9], [0.4]], ["maximize"])
    assert best_trial(study_max, spec_max).number == 0


def test_a_study_without_complete_trials_has_no_best(tmp_path):
    from routerlab.errors import ConfigError
    from studies.report import best_trial, write_report

    spec, study = study_with([None], ["minimize"])
    with pytest.raises(ConfigError, match="no complete trial yet"):
        best_trial(study, spec)
    import optuna

    with pytest.raises(ConfigError, match="no trials in this storage"):
        write_report(spec, optuna.create_study(), tmp_path / "out")


def test_the_report_files_of_a_two_objective_study(tmp_path):
    from studies.report import write_report

    points = [[3.0, 0.2], [1.0, 0.5], [2.0, 0.3], [1.5, 0.6], None]  # [1.5, 0.6] is dominated by [1.0, 0.5]
    spec, study = study_with(points, ["minimize", "minimize"])
    files = write_report(spec, study, tmp_path / "out")
    assert {"trials", "best_config", "baseline_config", "pareto_csv", "pareto_png", "history_png", "importances"} <= set(files)
    trials = list(csv.DictReader(io.StringIO(files["trials"].read_text())))
    assert [r["number"] for r in trials] == ["0", "1", "2", "3", "4"] and trials[4]["state"] == "FAIL"
    assert (trials[1]["value_loss"], trials[1]["value_load_cv"], trials[1]["train.lr"]) == ("1.0", "0.5", "0.002")
    assert trials[3]["retry_of"] == "1" and trials[0]["retry_of"] == "" and trials[4]["value_loss"] == ""
    assert trials[2]["loss"] == "2.0"
    front = list(csv.DictReader(io.StringIO(files["pareto_csv"].read_text())))
    assert [r["number"] for r in front] == ["0", "1", "2"]
    import yaml

    assert yaml.safe_load(files["best_config"].read_text())["train"]["lr"] == 0.002  # the front's lowest loss
    baseline = files["baseline_config"].read_text()
    assert baseline.startswith("# Baseline trial 0 of study 's'") and yaml.safe_load(baseline)["run"]["name"] == "s-baseline"
    assert files["pareto_png"].read_bytes()[:4] == b"\x89PNG" and files["history_png"].read_bytes()[:4] == b"\x89PNG"


def test_importances_say_why_they_are_missing(monkeypatch):
    import sys

    import optuna.importance  # noqa: F401  (the module itself in sys.modules, not optuna's lazy-import proxy)

    from studies.report import importances

    def refuse(study, target):
        raise RuntimeError("cannot evaluate importances\ndetails")

    spec, study = study_with([[1.0], [2.0]], ["minimize"])
    with monkeypatch.context() as m:
        m.setattr(sys.modules["optuna.importance"], "get_param_importances", refuse)
        assert importances(spec, study) == {"loss": {"unavailable": "cannot evaluate importances"}}
    spec, study = study_with([[1.0], [2.0], [1.5]], ["minimize"])
    assert importances(spec, study) == {"loss": {"train.lr": 1.0}}  # one parameter carries all of it


def test_shown_metrics_add_the_test_loss_the_se_and_the_train_mode_twins(tmp_path):
    plan, table = plan_and_table(tmp_path)
    for row in table:
        row.update(test_loss=1.0, load_cv_as_trained=0.2, max_vio_as_trained=0.3)
    stats = report.group_stats(plan, table, ["loss", "loss_se", "test_loss", "load_cv", "load_cv_as_trained", "max_vio_as_trained", "tokens_per_s"])
    assert report.shown_metrics(plan, stats) == ["loss", "loss_se", "test_loss", "load_cv", "load_cv_as_trained", "tokens_per_s"]
    names, metrics = report.summary_columns(plan, stats)
    assert names == ["router"] and metrics == report.shown_metrics(plan, stats)
    report.write_csv(tmp_path / "r.csv", plan, table)
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert header == ["cell", "router", "seed", "loss", "load_cv", "tokens_per_s", "load_cv_as_trained", "loss_se", "max_vio_as_trained", "test_loss",
                      "train_tokens", "wall_s", "cpu_s"]


def test_the_reproduce_block_names_commit_torch_data_and_cards(tmp_path, monkeypatch):
    import subprocess
    import sys

    import torch

    plan, _ = plan_and_table(tmp_path)
    results = {plan.cells[0].id: {"device_name": "H200", "device": "cuda:0", "host": "gpu1"}, plan.cells[1].id: {}}
    monkeypatch.setenv("ROUTERLAB_COMMIT", "abc123")
    p = report.provenance(plan, results)
    assert p["commit"] == "abc123 (copied tree; named by ROUTERLAB_COMMIT)"
    assert (p["torch"], p["python"]) == (torch.__version__, sys.version.split()[0])
    assert p["data sha256"] == f"clusters: {plan.cells[0].data_checksum[:16]}" and len(plan.cells[0].data_checksum) == 64
    assert p["ran on"] == "? (?) on ?; H200 (cuda:0) on gpu1" and p["working directory"] == str(__import__("os").getcwd())
    monkeypatch.delenv("ROUTERLAB_COMMIT")
    answers = {"rev-parse": "f" * 40 + "\n", "status": " M x.py\n"}

    def fake_git(cmd, **kwargs):
        assert kwargs["cwd"] == report.Path(report.__file__).resolve().parent and kwargs["timeout"] == 10
        return subprocess.CompletedProcess(cmd, 0, answers[cmd[1]], "")

    monkeypatch.setattr(report.subprocess, "run", fake_git)
    assert report.provenance(plan, {})["commit"] == "f" * 40 + " (with uncommitted changes)"
    answers["status"] = ""
    assert report._git_commit() == "f" * 40
    answers["rev-parse"] = ""
    assert report._git_commit() == "unknown (not a git checkout)"

    def no_git(cmd, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(report.subprocess, "run", no_git)
    assert report._git_commit() == "unknown (git not available)"
    assert report.provenance(plan, {})["ran on"] == "-"


def test_the_scale_line(tmp_path):
    plan, table = plan_and_table(tmp_path)
    for row in table:
        row.update(params_active=1000.0 + row["seed"], params_total=5000.0)
    stats = report.group_stats(plan, table, ["params_active", "params_total"])
    cfg = plan.cells[0].config
    same = report.scale_line(plan, stats, {"a": {"train_tokens": 2_000_000}, "b": {"train_tokens": 2_000_000}})
    assert same == (f"{cfg.train.steps} steps x batch {cfg.train.batch_size}; 2.00M training tokens per run; "
                    f"parameters active 1,000-1,001 of total 5,000-5,000; "  # group means: c has seed 0 only
                    f"evaluation: {cfg.train.eval_batches * cfg.train.batch_size} examples (sequences) per run, fixed across runs")
    spread = report.scale_line(plan, [], {"a": {"train_tokens": 1_000_000}, "b": {"train_tokens": 3_500_000}, "c": {}})
    assert "; 1.00M-3.50M training tokens per run; evaluation:" in spread and "parameters" not in spread


def test_summary_markdown_lists_the_description_skipped_cells_and_tensorboard(tmp_path):
    plan, table = plan_and_table(tmp_path)
    plan.spec.description = "Why this grid.\n"
    plan.skipped.append(({"router": "x", "seed": "0"}, "needs token ids"))
    stats = report.group_stats(plan, table, ["loss"])
    text = report.summary_markdown(plan, stats, {}, "cmd", None)
    lines = text.splitlines()
    assert lines[:3] == ["# Ablation `s`", "", "Why this grid."]
    assert "- x / 0: needs token ids" in lines and "Failed" not in text
    assert f"`tensorboard --logdir {plan.cells[0].config.run.dir}`." in text
    assert f"- ablation config hash: `{plan.spec.config_hash()}`" in lines
    assert "| router | n | loss |" in lines and "|---|--:|--:|" in lines
    assert "| row | pairs | loss |" in lines and "|---|--:|--:|" in lines
    complete = [r for r in table if r["router"] != "c"]
    done = report.summary_markdown(plan, report.group_stats(plan, complete, ["loss"]), {}, "cmd")
    assert "Incomplete: 3 of 9" in done


def test_summary_markdown_layout_line_by_line(tmp_path):
    plan, table = plan_and_table(tmp_path)
    stats = report.group_stats(plan, table, ["loss", "loss_se", "load_cv", "tokens_per_s"])
    lines = report.summary_markdown(plan, stats, {"x": "boom"}, "cmd").splitlines()
    assert lines[:2] == ["# Ablation `s`", ""]
    assert "| router | n | loss | eval SE | load CV | tokens/s |" in lines and "|---|--:|--:|--:|--:|--:|" in lines
    assert "| c | 1 | 3.0000 | 0.0100 | 0.000 | 1,000 |" in lines  # one seed: no interval
    assert "| row | pairs | loss | load CV |" in lines and "|---|--:|--:|--:|" in lines  # no counts, no SE compared
    assert "| c | 1 | +2.0000 (1 pair) | +0.000 (1 pair) |" in lines
    i = lines.index("Failed (recorded with the reason; rerun the command to retry):")
    assert lines[i - 1:i + 3] == ["", "Failed (recorded with the reason; rerun the command to retry):", "", "- x: boom"]
    j = lines.index("**Incomplete: 2 of 9 runs have no result yet.**")
    assert lines[j - 1] == "" and lines[j + 1] == ""
    assert lines[j + 2] == f"Plots: `quality_vs_balance.png`, `loads.png`, `curves.png`. Per-run TensorBoard: `tensorboard --logdir {plan.cells[0].config.run.dir}`."
    assert lines[j + 3:j + 7] == ["", "Reproduce:", "", "- command: `cmd`"]
    assert lines[-1].startswith("- ablation config hash:")
    report.write_summary_csv(tmp_path / "s.csv", plan, stats)
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "row,metric,n,mean,std,ci95_low,ci95_high,diff_vs_baseline,diff_ci95_low,diff_ci95_high,pairs"
    plan.spec.baseline = None
    report.write_summary_csv(tmp_path / "n.csv", plan, stats)
    assert all(r["diff_vs_baseline"] == "" for r in csv.DictReader(io.StringIO((tmp_path / "n.csv").read_text())))
    assert "Paired difference" not in report.summary_markdown(plan, stats, {}, "cmd")


def test_pairs_skip_non_finite_values_and_headers_fall_back_to_the_name(tmp_path):
    plan, table = plan_and_table(tmp_path)
    next(r for r in table if r["router"] == "b" and r["seed"] == 1)["loss"] = float("nan")
    stats = report.group_stats(plan, table, ["loss", "nothing"])
    diffs = {d["row"]: d for d in report.paired_differences(stats, "a", ["loss", "nothing"])}
    assert diffs["b"]["loss"].n == 2 and diffs["b"]["loss"].mean == pytest.approx(0.75)  # seeds 0 and 2
    assert "nothing" not in diffs["b"]
    assert report.paired_differences(stats, "a", ["nothing"])[0]["n"] == 0
    assert report.header("odd_as_trained") == "odd_as_trained (train mode)"
    two = report.summarize([1.0, 3.0])
    assert report.fmt_value("load_cv", two) == f"2.000 ± {two.half:.3f} (sd {two.std:.3f})"
    assert report.fmt_diff("load_cv", two) == f"+2.000 [{two.low:+.3f}, {two.high:+.3f}]"


def record_axes(monkeypatch):
    from matplotlib.axes import Axes

    calls = []
    for name in ("scatter", "step", "axhline", "set_xlabel", "set_ylabel"):
        original = getattr(Axes, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Axes, name, spy)
    return calls


def test_history_plot_draws_the_best_so_far_and_the_baseline(tmp_path, monkeypatch):
    from studies.report import history_png

    calls = record_axes(monkeypatch)
    spec, study = study_with([[0.9], [0.95], [0.4], None, [0.6]], ["minimize"])
    history_png(spec, study, tmp_path / "h.png")
    (step,) = [c for c in calls if c[0] == "step"]
    assert list(step[1][0]) == [0, 1, 2, 4] and list(step[1][1]) == [0.9, 0.9, 0.4, 0.4]
    assert [c[1][0] for c in calls if c[0] == "axhline"] == [0.9]  # trial 0 is the baseline
    assert ("set_ylabel", ("loss",), {}) in calls and ("set_xlabel", ("trial",), {}) in calls
    calls.clear()
    spec, study = study_with([[0.9], [0.95], [0.4]], ["maximize"], fixed_first=False)
    history_png(spec, study, tmp_path / "m.png")
    (step,) = [c for c in calls if c[0] == "step"]
    assert list(step[1][1]) == [0.9, 0.95, 0.95] and not [c for c in calls if c[0] == "axhline"]


def test_pareto_plot_colours_the_front_and_greys_the_rest(tmp_path, monkeypatch):
    from studies.report import pareto_png

    calls = record_axes(monkeypatch)
    points = [[3.0, 0.2], [1.0, 0.5], [2.0, 0.3], [1.5, 0.6]]  # [1.5, 0.6] is dominated
    spec, study = study_with(points, ["minimize", "minimize"])
    pareto_png(spec, study, tmp_path / "p.png")
    scatters = [c for c in calls if c[0] == "scatter"]
    grey = [c for c in scatters if c[2].get("label") == "dominated"]
    front = [c for c in scatters if str(c[2].get("label", "")).startswith("front: ")]
    assert [(list(c[1][0]), list(c[1][1])) for c in grey] == [([1.5], [0.6])] and grey[0][2]["c"] == "lightgrey"
    assert len(front) == 1 and front[0][2]["label"] == "front: softmax_topk"
    assert sorted(zip(front[0][1][0], front[0][1][1])) == [(1.0, 0.5), (2.0, 0.3), (3.0, 0.2)]
    assert ("set_xlabel", ("loss (minimize)",), {}) in calls and ("set_ylabel", ("load_cv (minimize)",), {}) in calls


def test_the_report_folder_holds_exactly_the_named_files(tmp_path):
    import json as jsonlib

    from studies.report import importances, write_report

    spec, study = study_with([[3.0, 0.2], [1.0, 0.5], [2.0, 0.3]], ["minimize", "minimize"])
    out = tmp_path / "deep" / "report"  # parents created
    write_report(spec, study, out)
    assert sorted(p.name for p in out.iterdir()) == ["baseline_config.yaml", "best_config.yaml", "history.png", "importances.json",
                                                     "pareto.csv", "pareto.png", "trials.csv"]
    text = (out / "importances.json").read_text()
    assert jsonlib.loads(text) == importances(spec, study) and text.endswith("}\n") and '\n  "' in text  # indent 2
    write_report(spec, study, out)  # a second report over the first
    spec.baseline = False
    again = tmp_path / "plain"
    write_report(spec, study, again)
    assert not (again / "baseline_config.yaml").exists()
    spec.baseline = True
    _, failed_first = study_with([None, [1.0, 0.5], [2.0, 0.3]], ["minimize", "minimize"])
    write_report(spec, failed_first, tmp_path / "f")
    assert not (tmp_path / "f" / "baseline_config.yaml").exists()  # trial 0 did not complete


def test_trials_csv_leaves_missing_params_and_metrics_empty():
    import optuna

    from studies.report import trials_csv

    spec, study = study_with([[1.0]], ["minimize"])
    dist = {"model.num_experts": optuna.distributions.IntDistribution(2, 8)}
    study.add_trial(optuna.trial.create_trial(params={"model.num_experts": 4}, distributions=dist, values=[2.0], user_attrs={}))
    rows = list(csv.DictReader(io.StringIO(trials_csv(spec, study.get_trials(), ("loss", "load_cv")))))
    assert rows[0]["model.num_experts"] == "" and rows[1]["train.lr"] == "" and rows[1]["loss"] == "" and rows[0]["load_cv"] == ""
    assert rows[0]["retry_of"] == "" and rows[1]["model.num_experts"] == "4"
