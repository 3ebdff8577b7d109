"""Routing ablations: a grid of training runs from one YAML file, run in parallel, resumable, summarised.

    from routerlab.ablate import run_ablation
    report = run_ablation("configs/ablations/demo.yaml", workers=2)

See docs/ablations.md. The CLI is `routerlab ablate FILE [--workers N] [--out results/NAME]`.
Attributes are imported lazily, so registering the CLI command does not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "AblationReport": "study", "run_ablation": "study", "plan_ablation": "study",
    "AblationSpec": "spec", "Cell": "spec", "Plan": "spec", "expand": "spec", "load_spec": "spec", "parse_spec": "spec",
    "run_plan": "runner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"routerlab.ablate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'routerlab.ablate' has no attribute {name!r}")
