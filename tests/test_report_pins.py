"""Pins for what the ablation and study reports show a reader (the survivors of the reports' mutation pass,
docs/reliability.md): numbers and lines read back from the written files and figures, checked against hand
computations; the commit line against a real git repository made here."""
import csv
import io
import math
import subprocess

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
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
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
