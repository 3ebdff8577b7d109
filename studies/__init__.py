"""Optuna studies over routerlab: search spaces as YAML (defs/, spaces/), a runner whose objective is
the one Trainer, and a report. Optuna is imported lazily, inside functions. See docs/studies.md."""
