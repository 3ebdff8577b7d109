"""Tasks: `clusters`, `chars`, `digits`, `stdlib`, `text`, `tokens`. Synthetic, bundled or the user's own data only."""
from routerlab.tasks.base import Batch, Task, build_task, describe_tasks, parse_task_params, register_task, task_names

__all__ = ["Batch", "Task", "build_task", "describe_tasks", "parse_task_params", "register_task", "task_names"]
