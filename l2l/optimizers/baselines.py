"""Hand-designed update rules (SGD, momentum, NAG, RMSProp, Adam) in the update-rule interface.

Each rule follows ``torch.optim``'s arithmetic exactly (tests check them step for step), but
is pure and out of place: ``update, state = rule(grad, state)`` with ``grad, update: [N]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


def _check_lr(lr: float) -> None:
    # A bool is an int to Python: True would be a learning rate of 1.
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"Invalid learning rate: {lr} (must be a positive finite number)")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")


def _check_eps(eps: float) -> None:
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")


def _zeros(num_coords: int, device, dtype) -> Tensor:
    if num_coords < 0:
        raise ValueError(f"num_coords must be >= 0, got {num_coords}")
    return torch.zeros(num_coords, device=device, dtype=dtype)


class SGDState(NamedTuple):
    """Plain gradient descent keeps no state."""


@dataclass(frozen=True)
class SGD:
    """Gradient descent: ``update = -lr * g``."""

    lr: float = 0.01

    def __post_init__(self):
        _check_lr(self.lr)

    def init_state(self, num_coords: int, *, device=None, dtype=torch.float32) -> SGDState:
        del num_coords, device, dtype  # Unused.
        return SGDState()

    def __call__(self, grad: Tensor, state: SGDState) -> tuple[Tensor, SGDState]:
        return -self.lr * grad, state


class MomentumState(NamedTuple):
    """Velocity buffer, shape ``[N]``."""

    velocity: Tensor


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball momentum as ``torch.optim.SGD(momentum=beta)``: ``v = beta v + g``, ``update = -lr v``."""

    lr: float = 0.01
    beta: float = 0.9

    def __post_init__(self):
        _check_lr(self.lr)
        _check_unit_interval("momentum value", self.beta)

    def init_state(self, num_coords: int, *, device=None, dtype=torch.float32) -> MomentumState:
        return MomentumState(_zeros(num_coords, device, dtype))

    def __call__(self, grad: Tensor, state: MomentumState) -> tuple[Tensor, MomentumState]:
        velocity = state.velocity * self.beta + grad
        return -self.lr * velocity, MomentumState(velocity)


@dataclass(frozen=True)
class NAG:
    """Nesterov momentum as ``torch.optim.SGD(momentum=beta, nesterov=True)``.

    ``v = beta v + g``, ``update = -lr (g + beta v)``: Sutskever et al.'s form, which needs
    only the gradient at the current parameters.
    """

    lr: float = 0.01
    beta: float = 0.9

    def __post_init__(self):
        _check_lr(self.lr)
        _check_unit_interval("momentum value", self.beta)

    def init_state(self, num_coords: int, *, device=None, dtype=torch.float32) -> MomentumState:
        return MomentumState(_zeros(num_coords, device, dtype))

    def __call__(self, grad: Tensor, state: MomentumState) -> tuple[Tensor, MomentumState]:
        velocity = state.velocity * self.beta + grad
        return -self.lr * (grad + self.beta * velocity), MomentumState(velocity)


class RMSPropState(NamedTuple):
    """Running mean of squared gradients, shape ``[N]``."""

    square_avg: Tensor


@dataclass(frozen=True)
class RMSProp:
    """RMSProp as ``torch.optim.RMSprop``: ``s = a s + (1-a) g^2``, ``update = -lr g / (sqrt(s) + eps)``."""

    lr: float = 0.01
    alpha: float = 0.99
    eps: float = 1e-8

    def __post_init__(self):
        _check_lr(self.lr)
        _check_unit_interval("alpha value", self.alpha)
        _check_eps(self.eps)

    def init_state(self, num_coords: int, *, device=None, dtype=torch.float32) -> RMSPropState:
        return RMSPropState(_zeros(num_coords, device, dtype))

    def __call__(self, grad: Tensor, state: RMSPropState) -> tuple[Tensor, RMSPropState]:
        square_avg = state.square_avg * self.alpha + (1.0 - self.alpha) * grad * grad
        return -self.lr * grad / (square_avg.sqrt() + self.eps), RMSPropState(square_avg)


class AdamState(NamedTuple):
    """Step count and the first and second moment estimates, each ``[N]``."""

    count: int
    mu: Tensor
    nu: Tensor


@dataclass(frozen=True)
class Adam:
    """Adam as ``torch.optim.Adam`` (bias-corrected moments, eps outside the square root)."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        _check_lr(self.lr)
        _check_unit_interval("beta parameter at index 0", self.beta1)
        _check_unit_interval("beta parameter at index 1", self.beta2)
        _check_eps(self.eps)

    def init_state(self, num_coords: int, *, device=None, dtype=torch.float32) -> AdamState:
        return AdamState(0, _zeros(num_coords, device, dtype), _zeros(num_coords, device, dtype))

    def __call__(self, grad: Tensor, state: AdamState) -> tuple[Tensor, AdamState]:
        count = state.count + 1
        mu = torch.lerp(state.mu, grad, 1.0 - self.beta1)
        nu = state.nu * self.beta2 + (1.0 - self.beta2) * grad * grad
        step_size = self.lr / (1.0 - self.beta1**count)
        denom = nu.sqrt() / math.sqrt(1.0 - self.beta2**count) + self.eps
        return -step_size * mu / denom, AdamState(count, mu, nu)


BASELINES = {"sgd": SGD, "momentum": Momentum, "nag": NAG, "rmsprop": RMSProp, "adam": Adam}


def get_baseline(name: str, lr: float):
    """Builds the hand-designed rule ``name`` (one of ``BASELINES``) with learning rate ``lr``."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline optimizer {name!r}; choose from {', '.join(BASELINES)}")
    return BASELINES[name](lr=lr)
