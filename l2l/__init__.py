"""l2l: learned optimizers in PyTorch (Andrychowicz et al., 2016, and beyond)."""

from l2l.checkpoint import CheckpointError, load_optimizer, load_use_checkpoint, shipped_checkpoints
from l2l.config import BenchConfig, ConfigError, TrainConfig
from l2l.meta import NonFiniteError, benchmark, evaluate, meta_train, run, start, unroll
from l2l.objectives import (
    GradReverse,
    grad_reverse,
    gradient_supervision_loss,
    input_gradient_penalty,
    parameter_gradient_penalty,
    tangent_penalty,
)
from l2l.optimizers import NAG, SGD, Adam, CoordinateWiseLSTM, LSTMState, Momentum, RMSProp, UpdateRule, log_and_sign
from l2l.tasks import QuadraticFamily, Task, TaskFamily, get_task, list_tasks, register_task
from l2l.torch_optim import LearnedOptimizer
from l2l.version import __version__

__all__ = [
    "NAG",
    "SGD",
    "Adam",
    "BenchConfig",
    "CheckpointError",
    "ConfigError",
    "CoordinateWiseLSTM",
    "GradReverse",
    "LearnedOptimizer",
    "LSTMState",
    "Momentum",
    "NonFiniteError",
    "QuadraticFamily",
    "RMSProp",
    "Task",
    "TaskFamily",
    "TrainConfig",
    "UpdateRule",
    "__version__",
    "benchmark",
    "evaluate",
    "get_task",
    "grad_reverse",
    "gradient_supervision_loss",
    "input_gradient_penalty",
    "list_tasks",
    "load_optimizer",
    "load_use_checkpoint",
    "log_and_sign",
    "meta_train",
    "parameter_gradient_penalty",
    "register_task",
    "run",
    "shipped_checkpoints",
    "start",
    "tangent_penalty",
    "unroll",
]
