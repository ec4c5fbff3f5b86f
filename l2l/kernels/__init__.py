"""Compute kernels behind the learned optimizers: the plain-PyTorch reference (the definition of correctness)."""

from l2l.kernels.reference import LSTMWeights, coordinatewise_lstm

__all__ = ["LSTMWeights", "coordinatewise_lstm"]
