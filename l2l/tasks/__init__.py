"""What is optimized: task families that sample batches of optimizee instances."""

from l2l.tasks.base import Task, TaskFamily
from l2l.tasks.module import Minibatch, ModuleFamily, ModuleTask, SupervisedData
from l2l.tasks.quadratic import QuadraticFamily, QuadraticTask
from l2l.tasks.registry import get_task, list_tasks, register_task

__all__ = [
    "Minibatch",
    "ModuleFamily",
    "ModuleTask",
    "QuadraticFamily",
    "QuadraticTask",
    "SupervisedData",
    "Task",
    "TaskFamily",
    "get_task",
    "list_tasks",
    "register_task",
]
