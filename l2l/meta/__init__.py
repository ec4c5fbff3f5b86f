"""How optimizers are run and trained: the batched unroll, truncated-BPTT meta-training, evaluation."""

from l2l.meta.evaluate import benchmark, evaluate, format_table, summarize, tune_learning_rate
from l2l.meta.stopping import StopRequest, TrainingInterrupted, stop_on_signals
from l2l.meta.train import MetaTrainer, NonFiniteError, TrainResult, meta_train
from l2l.meta.unroll import UnrollCarry, detach_carry, run, start, unroll, value_and_grad

__all__ = [
    "MetaTrainer",
    "NonFiniteError",
    "StopRequest",
    "TrainResult",
    "TrainingInterrupted",
    "UnrollCarry",
    "benchmark",
    "detach_carry",
    "evaluate",
    "format_table",
    "meta_train",
    "run",
    "start",
    "stop_on_signals",
    "summarize",
    "tune_learning_rate",
    "unroll",
    "value_and_grad",
]
