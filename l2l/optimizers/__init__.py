"""Update rules: the learned coordinatewise LSTM and hand-designed baselines, one interface."""

from l2l.optimizers.base import UpdateRule, detach_state, map_tensors
from l2l.optimizers.baselines import (
    BASELINES,
    NAG,
    SGD,
    Adam,
    AdamState,
    Momentum,
    MomentumState,
    RMSProp,
    RMSPropState,
    SGDState,
    get_baseline,
)
from l2l.optimizers.grouped import GroupedState, PerGroupRule
from l2l.optimizers.lstm import CoordinateWiseLSTM, LSTMState
from l2l.optimizers.preprocess import log_and_sign

LEARNED_RULES = {"CoordinateWiseLSTM": CoordinateWiseLSTM, "PerGroupRule": PerGroupRule}

__all__ = [
    "BASELINES",
    "LEARNED_RULES",
    "NAG",
    "SGD",
    "Adam",
    "AdamState",
    "CoordinateWiseLSTM",
    "GroupedState",
    "PerGroupRule",
    "LSTMState",
    "Momentum",
    "MomentumState",
    "RMSProp",
    "RMSPropState",
    "SGDState",
    "UpdateRule",
    "detach_state",
    "get_baseline",
    "log_and_sign",
    "map_tensors",
]
