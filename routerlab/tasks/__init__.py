"""Tasks: `clusters`, `chars`, `digits`. Synthetic or bundled data only."""
from routerlab.tasks.base import Batch, Task, build_task, describe_tasks, parse_task_params, register_task, task_names

__all__ = ["Batch", "Task", "build_task", "describe_tasks", "parse_task_params", "register_task", "task_names"]
