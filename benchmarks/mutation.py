"""Mutation testing of the core, the routers, the trainer and the reports, one pass per part (docs/reliability.md).

    python benchmarks/mutation.py moe            # or routers, trainer, reports; several names run one after another
    python benchmarks/mutation.py moe --keep DIR # reuse DIR (a rerun continues, survivors named on the command line rerun)
    python benchmarks/mutation.py routers --only routerlab/routers/oracle.py --tests "tests/test_router_definitions.py --deselect tests/test_router_definitions.py::test_x"
                                                 # one file of a pass, with a narrower test selection (faster)

Each pass copies this checkout into its own folder (mutmut writes `mutants/` there), sets `[tool.mutmut]` to the
pass's modules and its fast, targeted tests, runs `mutmut run --max-children 1` under `nice -n 10` and prints
killed / survived / timeout per module and the score (killed + timeout over all mutants with tests). Only lines
the selected tests cover are mutated; a line no test reaches is reported by coverage, not here.
Not mutated: routerlab/moe/triton_*.py and moe/parallel.py (GPU kernels and torch.distributed; their CPU
fallbacks in moe/kernels.py are), routers/rl.py (needs a trained stable-baselines3 policy; tests/test_rl.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUTERS = sorted(f"routerlab/routers/{p.name}" for p in (ROOT / "routerlab" / "routers").glob("*.py") if p.name not in ("__init__.py", "rl.py"))
PASSES = {
    "moe": {
        "only_mutate": [f"routerlab/moe/{m}.py" for m in ("layer", "backends", "experts", "kernels", "shared", "stats")],
        "tests": ["tests/test_moe_core.py", "tests/test_core_definitions.py", "tests/test_mutation_targets.py",
                  "tests/test_properties.py::test_plan_dispatch_matches_the_loop_reference",
                  "tests/test_definitions.py::test_router_weight_gradient_matches_plain_pytorch",
                  "tests/test_definitions.py::test_load_cv_is_std_over_mean_and_a_load_of_one_is_not_dead",
                  # registers a plugin backend for the whole process: the clean run after the stats run fails on it
                  "--deselect", "tests/test_moe_core.py::test_an_expert_backend_is_one_class_registered_by_name"],
    },
    "trainer": {
        "only_mutate": ["routerlab/train.py"],
        "tests": ["tests/test_trainer_definitions.py",
                  "tests/test_definitions.py::test_evaluation_uses_the_validation_split",
                  "tests/test_definitions.py::test_the_lr_schedule_steps_cosine_to_ten_percent",
                  "tests/test_definitions.py::test_grad_clip_bounds_the_gradient_norm",
                  "tests/test_reliability.py::test_a_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint",
                  "tests/test_reliability.py::test_skip_drops_the_non_finite_update_and_trains_on",
                  "tests/test_reliability.py::test_a_cuda_index_this_machine_lacks_is_bad_input",
                  "tests/test_reliability.py::test_an_unwritable_run_dir_fails_before_any_work",
                  "tests/test_trainer_pins.py", "tests/test_step_graph.py"],  # the fused optimizer's path, on the CPU
    },
    "routers": {
        "only_mutate": ROUTERS,
        "tests": ["tests/test_router_definitions.py", "tests/test_router_zoo.py", "tests/test_routers_foundation.py",
                  "tests/test_router_options.py", "tests/test_balancing.py", "tests/test_adversarial.py", "tests/test_router_pins_a.py",
                  "tests/test_router_pins_b.py",
                  "tests/test_definitions.py::test_top2_weights_are_the_renormalized_top2_softmax",
                  "tests/test_definitions.py::test_expert_choice_takes_each_experts_highest_scoring_tokens",
                  "tests/test_definitions.py::test_sinkhorn_iterations_balance_the_plan_as_the_textbook_algorithm",
                  "--deselect", "tests/test_routers_foundation.py::test_a_plugin_file_registers_a_router"],  # one registration per process
    },
    "reports": {
        "only_mutate": ["studies/report.py", "routerlab/ablate/report.py"],
        "tests": ["tests/test_report_definitions.py", "tests/test_mutation_targets.py",
                  "tests/test_definitions.py::test_summary_std_is_over_one_routers_seeds",
                  "tests/test_definitions.py::test_best_config_comes_from_the_pareto_front_end_best_on_the_first_objective",
                  "tests/test_report_pins.py"],
    },
}
# mutmut.stats.status_by_exit_code (3.8), without importing mutmut here (it reads its config on import)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 2: "interrupted", None: "not checked", 33: "no tests",
          34: "skipped", 35: "suspicious", 36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout",
          152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault"}
DETECTED = ("killed", "timeout", "segfault", "caught by type check")
NOT_COUNTED = ("no tests", "not checked", "skipped", "interrupted")


def mutmut_block(spec: dict) -> str:
    fields = {"source_paths": ["routerlab/", "studies/"], "only_mutate": spec["only_mutate"],
              "pytest_add_cli_args_test_selection": spec["tests"],
              "also_copy": ["tests/", "environments/", "federated/", "configs/", "pyproject.toml"],
              "mutate_only_covered_lines": True}
    return "[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())


def scores(folder: Path) -> dict[str, Counter]:
    per: dict[str, Counter] = defaultdict(Counter)
    for meta in sorted((folder / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(folder / "mutants"))[: -len(".py.meta")].replace("/", ".")
        for code in json.loads(meta.read_text())["exit_code_by_key"].values():
            per[module][STATUS.get(code, "suspicious")] += 1
    return per


def run_pass(name: str, keep: Path | None, names: list[str], only: list[str], tests: list[str]) -> dict[str, Counter]:
    folder = keep or Path(tempfile.mkdtemp(prefix=f"mutation-{name}-"))
    folder.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns(".git", "mutants", "runs", "results", "__pycache__", ".venv")
    shutil.copytree(ROOT, folder, ignore=ignore, dirs_exist_ok=True)
    if (folder / "mutants" / "tests").is_dir():  # a rerun sees the current tests
        shutil.copytree(ROOT / "tests", folder / "mutants" / "tests", dirs_exist_ok=True)
    pyproject = folder / "pyproject.toml"
    text = re.sub(r"\[tool\.mutmut\]\n(?:[^\[].*\n|\n)*", "", pyproject.read_text())
    spec = {"only_mutate": only or PASSES[name]["only_mutate"], "tests": tests or PASSES[name]["tests"]}
    pyproject.write_text(text.rstrip() + "\n\n" + mutmut_block(spec))
    subprocess.run(["nice", "-n", "10", sys.executable, "-m", "mutmut", "run", "--max-children", "1", *names], cwd=folder,
                   env={**os.environ, "PYTHONPATH": str(folder)}, check=False)
    return scores(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("passes", nargs="+", choices=sorted(PASSES))
    parser.add_argument("--keep", type=Path, help="folder of the pass (one pass): reuse it")
    parser.add_argument("--mutants", nargs="*", default=[], help="mutant names to rerun")
    parser.add_argument("--only", nargs="+", default=[], help="files to mutate instead of the pass's (one pass)")
    parser.add_argument("--tests", type=shlex.split, default=[],
                        help="pytest arguments selecting the tests instead of the pass's, in one quoted string ('--deselect X' too)")
    args = parser.parse_args()
    for name in args.passes:
        per = run_pass(name, args.keep, args.mutants, args.only, args.tests)
        print(f"pass {name}:")
        for module, counts in sorted(per.items()):
            tested = sum(v for k, v in counts.items() if k not in NOT_COUNTED)
            good = sum(counts[k] for k in DETECTED)
            print(f"  {module}: {good}/{tested} = {100 * good / max(tested, 1):.1f}%  {dict(counts)}")


if __name__ == "__main__":
    main()
