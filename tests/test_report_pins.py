"""Pins for what the ablation and study reports show a reader (the survivors of the reports' mutation pass,
docs/reliability.md): numbers and lines read back from the written files and figures, checked against hand
computations; the commit line against a real git repository made here."""
import csv
import io
import math
import subprocess
import sys

import pytest

from routerlab.ablate import expand, parse_spec
from routerlab.ablate import report
from test_report_definitions import plan_and_table, study_with


# ---- routerlab/ablate/report.py ---------------------------------------------------------------------
def test_csv_files_end_lines_with_a_newline_only(tmp_path):
    plan, table = plan_and_table(tmp_path)
    report.write_csv(tmp_path / "results.csv", plan, table)
    report.write_summary_csv(tmp_path / "summary.csv", plan, report.group_stats(plan, table, ["loss"]))
    for name in ("results.csv", "summary.csv"):
        data = (tmp_path / name).read_bytes()
        assert b"\r" not in data and data.endswith(b"\n") and data.count(b"\n") > 1


def test_summary_csv_rows_hold_n_and_the_interval(tmp_path):
    plan, table = plan_and_table(tmp_path)
    report.write_summary_csv(tmp_path / "s.csv", plan, report.group_stats(plan, table, ["loss"]))
    rows = {(r["row"], r["metric"]): r for r in csv.DictReader(io.StringIO((tmp_path / "s.csv").read_text()))}
    a = rows[("a", "loss")]
    mean, sd = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 df), from a table
    assert a["n"] == "3" and float(a["ci95_low"]) == pytest.approx(mean - half) and float(a["ci95_high"]) == pytest.approx(mean + half)
    assert rows[("c", "loss")]["n"] == "1" and rows[("c", "loss")]["pairs"] == "1"


def git_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "tracked.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "tracked.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    return repo, (repo / ".git" / "refs" / "heads" / "main").read_text().strip()


def test_the_commit_line_reads_the_checkout_the_report_module_sits_in(tmp_path, monkeypatch):
    repo, head = git_repo(tmp_path)
    monkeypatch.setattr(report, "__file__", str(repo / "report.py"))  # the module's folder is the checkout asked
    assert len(head) == 40 and report._git_commit() == head
    (repo / "untracked.txt").write_text("new")  # untracked files do not make the tree dirty
    assert report._git_commit() == head
    (repo / "tracked.py").write_text("x = 2\n")
    assert report._git_commit() == head + " (with uncommitted changes)"
    monkeypatch.setattr(report, "__file__", str(tmp_path / "elsewhere" / "report.py"))
    (tmp_path / "elsewhere").mkdir()
    assert report._git_commit() == "unknown (not a git checkout)"


def test_provenance_names_each_data_checksum_by_its_task_label(tmp_path):
    spec = parse_spec({"name": "t", "base": {"task": {"name": "clusters"}},
                       "axes": {"task": [{"name": "clusters", "label": "cl"}], "seed": [0]}})
    plan = expand(spec, tmp_path / "runs")
    assert report.provenance(plan, {})["data sha256"] == f"cl: {plan.cells[0].data_checksum[:16]}"


def test_summary_markdown_paragraphs_are_separated_by_blank_lines(tmp_path):
    plan, table = plan_and_table(tmp_path)
    plan.spec.description = "Why this grid."
    plan.skipped.append(({"router": "x", "seed": "0"}, "needs token ids"))
    lines = report.summary_markdown(plan, report.group_stats(plan, table, ["loss"]), {}, "cmd").splitlines()
    assert lines[:4] == ["# Ablation `s`", "", "Why this grid.", ""]
    assert lines[4].startswith("9 runs (3 settings") and lines[5] == "" and lines[6].startswith("Scale: ") and lines[7] == ""
    assert lines[8] == "| router | n | loss |"
    i = next(i for i, line in enumerate(lines) if line.startswith("Paired difference"))
    assert lines[i - 1] == "" and lines[i + 1] == "" and lines[i + 2] == "| row | pairs | loss |"
    j = lines.index("Skipped (cannot run):")
    assert lines[j - 1:j + 3] == ["", "Skipped (cannot run):", "", "- x / 0: needs token ids"]


def test_a_metric_a_row_lacks_shows_a_dash(tmp_path):
    plan, table = plan_and_table(tmp_path)
    for row in table:
        if row["router"] == "c":
            row["load_cv"] = float("nan")  # no finite value: no summary for c
    lines = report.summary_markdown(plan, report.group_stats(plan, table, ["loss", "load_cv"]), {}, "cmd").splitlines()
    assert "| c | 1 | 3.0000 | - |" in lines  # the table of values
    assert "| c | 1 | +2.0000 (1 pair) | - |" in lines  # the paired differences


def test_provenance_lists_the_checksum_of_every_task(tmp_path):
    spec = parse_spec({"name": "t", "axes": {"task": [{"name": "clusters", "label": "cl"}, {"name": "clusters", "label": "cl2", "set": {"train.batch_size": 16}}],
                                             "seed": [0]}})
    plan = expand(spec, tmp_path / "runs")
    sums = {c.labels["task"]: c.data_checksum[:16] for c in plan.cells}
    assert report.provenance(plan, {})["data sha256"] == f"cl: {sums['cl']}; cl2: {sums['cl2']}"


def stats_with(tmp_path, metrics, extra):
    plan, table = plan_and_table(tmp_path)
    plan.spec.metrics = metrics
    for row in table:
        row.update(extra)
    return plan, report.group_stats(plan, table, sorted({*metrics, *extra, "loss"}))


def test_a_listed_test_loss_or_twin_is_shown_once_and_none_is_invented(tmp_path):
    plan, stats = stats_with(tmp_path, ["loss", "test_loss", "load_cv", "load_cv_as_trained"], {"test_loss": 1.0, "load_cv_as_trained": 0.2})
    assert report.shown_metrics(plan, stats) == ["loss", "test_loss", "load_cv", "load_cv_as_trained"]
    plan, stats = stats_with(tmp_path / "b", ["accuracy", "dead_experts"], {"test_loss": 1.0, "dead_experts_as_trained": 1.0, "accuracy": 0.5, "dead_experts": 0.0})
    assert report.shown_metrics(plan, stats) == ["accuracy", "dead_experts"]  # no loss to follow; dead experts have no twin


def test_the_summary_shows_task_and_router_and_every_axis_that_varies(tmp_path):
    spec = parse_spec({"name": "t", "axes": {"task": ["clusters"], "router": ["switch"], "model.num_experts": [2, 4],
                                             "train.lr": [0.01], "seed": [0]}})
    plan = expand(spec, tmp_path / "runs")
    table = [{"cell": c.id, **c.labels, "seed": c.seed, "loss": 1.0} for c in plan.cells]
    names, _ = report.summary_columns(plan, report.group_stats(plan, table, ["loss"]))
    assert names == ["task", "router", "model.num_experts"]


# ---- studies/report.py ------------------------------------------------------------------------------
def test_importances_are_per_objective_and_rounded_to_four_places(monkeypatch):
    import optuna

    from studies.report import importances

    spec, study = study_with([[1.0, 0.5], [2.0, 0.25]], ["minimize", "minimize"])
    seen = []

    def fake(study_, target):  # what optuna would compute; here the target each objective is scored by
        seen.append([target(t) for t in study_.get_trials()])
        return {"train.lr": 0.123456 * len(seen), "model.num_experts": 0.5}

    optuna.importance.get_param_importances  # noqa: B018 (loads the lazily imported module: patch the module itself)
    monkeypatch.setattr(sys.modules["optuna.importance"], "get_param_importances", fake)
    assert importances(spec, study) == {"loss": {"train.lr": 0.1235, "model.num_experts": 0.5},
                                        "load_cv": {"train.lr": 0.2469, "model.num_experts": 0.5}}
    assert seen == [[1.0, 2.0], [0.5, 0.25]]


@pytest.fixture
def figures(monkeypatch):
    """The figures the report draws, kept open (pyplot.close is recorded instead) so their data can be read back."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig))
    yield closed
    for fig in closed:
        close(fig)


def legend_labels(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_pareto_figure_shows_every_pair_of_objectives_and_counts_the_trials(tmp_path, figures):
    import optuna

    from studies.report import pareto_png
    from studies.space import StudySpec

    spec, study = study_with([[3.0, 0.2], [1.0, 0.5], [2.0, 0.3], [1.5, 0.6], None], ["minimize", "minimize"])
    pareto_png(spec, study, tmp_path / "p.png")
    (fig,) = figures
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert fig._suptitle.get_text() == "study s: Pareto front of 4 complete trials"  # the failed trial is not counted
    (ax,) = fig.axes
    assert legend_labels(ax) == ["dominated", "front: softmax_topk"]
    # three objectives: three panels, one per pair, each labelled with its two objectives
    figures.clear()
    config = study.trials[0].user_attrs["config"]
    spec3 = StudySpec(name="three", objectives=[{"metric": m, "direction": d} for m, d in
                                                [("loss", "minimize"), ("load_cv", "minimize"), ("tokens_per_s", "maximize")]])
    study3 = optuna.create_study(directions=["minimize", "minimize", "maximize"])
    for values in ([1.0, 0.5, 10.0], [2.0, 0.1, 20.0], [3.0, 0.6, 5.0]):
        study3.add_trial(optuna.trial.create_trial(values=values, user_attrs={"config": config}))
    pareto_png(spec3, study3, tmp_path / "p3.png")
    (fig,) = figures
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
    assert labels == [("loss (minimize)", "load_cv (minimize)"), ("loss (minimize)", "tokens_per_s (maximize)"),
                      ("load_cv (minimize)", "tokens_per_s (maximize)")]
    points = {tuple(p) for c in fig.axes[1].collections for p in c.get_offsets().tolist()}
    assert points == {(1.0, 10.0), (2.0, 20.0), (3.0, 5.0)}  # trial 2 is dominated by trial 0: still drawn, in grey
    assert legend_labels(fig.axes[0]) == ["dominated", "front: softmax_topk"] and fig.axes[1].get_legend() is None


def test_the_history_figure_steps_the_best_so_far_after_each_trial(tmp_path, figures):
    from studies.report import history_png

    spec, study = study_with([[0.9], [0.95], [0.4], None, [0.6]], ["minimize"])
    history_png(spec, study, tmp_path / "h.png")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_title() == "study s" and legend_labels(ax) == ["trial", "best so far", "trial 0 (baseline)"]
    best, baseline = ax.lines
    assert best.get_drawstyle() == "steps-post"  # a best value holds from its trial on, not before it
    assert list(best.get_xdata()) == [0, 1, 2, 4] and list(best.get_ydata()) == [0.9, 0.9, 0.4, 0.4]
    assert list(baseline.get_ydata()) == [0.9, 0.9] and baseline.get_linestyle() == "--"
    assert ax.collections[0].get_offsets().tolist() == [[0, 0.9], [1, 0.95], [2, 0.4], [4, 0.6]]


def test_the_report_closes_its_figures(tmp_path):
    import matplotlib.pyplot as plt

    from studies.report import write_report

    spec, study = study_with([[3.0, 0.2], [1.0, 0.5], [2.0, 0.3]], ["minimize", "minimize"])
    before = set(plt.get_fignums())
    write_report(spec, study, tmp_path / "out")
    assert set(plt.get_fignums()) == before  # a long-lived process (the study runner) does not collect open figures


def test_the_scale_line_rounds_millions_of_tokens_and_needs_both_parameter_counts(tmp_path):
    plan, table = plan_and_table(tmp_path)
    for row in table:
        row.update(params_active=1000.0)  # no params_total: no parameter part
    stats = report.group_stats(plan, table, ["params_active", "params_total"])
    same = report.scale_line(plan, stats, {"a": {"train_tokens": 2_005_001}})
    assert "; 2.01M training tokens per run; evaluation:" in same and "parameters" not in same  # 2.005001 -> 2.01
    spread = report.scale_line(plan, stats, {"a": {"train_tokens": 2_005_001}, "b": {"train_tokens": 3_005_001}})
    assert "; 2.01M-3.01M training tokens per run;" in spread


def test_the_best_config_file_names_every_objective_and_keeps_the_config_order(tmp_path):
    import yaml

    from studies.report import best_trial, config_yaml

    spec, study = study_with([[3.0, 0.2], [1.0, 0.5]], ["minimize", "minimize"])
    text = config_yaml(spec, best_trial(study, spec))
    assert text.startswith("# Best trial 1 of study 's' (loss=1, load_cv=0.5).\n")
    config = study.trials[1].user_attrs["config"]
    sections = list(yaml.safe_load(text))
    assert sections == list(config) and sections != sorted(sections)  # in the config's own order, not alphabetical
