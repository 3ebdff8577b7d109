"""Tasks: `clusters`, `chars`, `digits`, `stdlib`, `text`, `tokens`; one file each in this package, found
automatically. Synthetic, bundled or the user's own data only."""
from routerlab.tasks.base import (
    TASKS,
    Batch,
    ClassificationTask,
    Task,
    TaskParams,
    build_task,
    describe_tasks,
    parse_task,
    parse_task_params,
    register_task,
    task_names,
)

__all__ = ["TASKS", "Batch", "ClassificationTask", "Task", "TaskParams", "build_task", "describe_tasks", "parse_task",
           "parse_task_params", "register_task", "task_names"]
