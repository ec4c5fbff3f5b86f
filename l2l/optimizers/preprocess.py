"""Gradient preprocessing for learned optimizers (the paper's log/sign encoding)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREPROCESSORS = ("log_sign", "none")
# exp(p) must stay finite and exp(-p) a normal number in float32 (exp(88.7) is its largest value).
MAX_P = 80.0


def check_p(p: float) -> float:
    """Returns ``p`` if it is a valid cut-off exponent (finite, 0 < p <= MAX_P), else raises a ValueError."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and 0 < p <= MAX_P):
        raise ValueError(f"Invalid preprocess_p: {p!r} (must be a number in (0, {MAX_P:g}]: exp(p) must be finite in float32)")
    return p


def log_and_sign(grad: Tensor, p: float = 10.0) -> Tensor:
    """Encodes each gradient coordinate as two numbers of moderate size.

    Andrychowicz et al. (2016), appendix A::

        (log|g| / p, sign g)   if |g| >= exp(-p)
        (-1, exp(p) * g)       otherwise

    Both branches are evaluated on clamped inputs, so the result (and its gradient, when
    second derivatives are asked for) is finite for every finite ``g``, including 0.

    Args:
        grad: gradient coordinates, shape ``[N]``.
        p: the cut-off exponent, in ``(0, MAX_P]``.

    Returns:
        Tensor of shape ``[2, N]`` (feature-major, as the kernels take it).
    """
    check_p(p)
    if grad.dtype in (torch.float16, torch.bfloat16):
        # exp(-p) and exp(p) are float32 numbers: in float16, exp(-p) rounds to 0 for p > 16.6
        # (log|0| = -inf) and exp(p) overflows for p > 11.1. Computed in float32, rounded once.
        return log_and_sign(grad.float(), p).to(grad.dtype)
    magnitude = grad.abs()
    threshold = math.exp(-p)
    large = magnitude >= threshold
    log_part = torch.where(large, magnitude.clamp_min(threshold).log() / p, -torch.ones_like(grad))
    sign_part = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack((log_part, sign_part))


def identity(grad: Tensor) -> Tensor:
    """The raw gradient as a single input feature: ``[N] -> [1, N]``."""
    return grad.unsqueeze(0)


def input_size(name: str) -> int:
    """Number of input features the preprocessor ``name`` produces per coordinate."""
    return {"log_sign": 2, "none": 1}[check_name(name)]


def check_name(name: str) -> str:
    """Returns ``name`` if it is a known preprocessor, else raises a ValueError naming the choices."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESSORS)}")
    return name


def preprocess(grad: Tensor, name: str, p: float = 10.0) -> Tensor:
    """Applies the preprocessor ``name`` (``"log_sign"`` or ``"none"``): ``[N] -> [F, N]``."""
    if check_name(name) == "log_sign":
        return log_and_sign(grad, p)
    return identity(grad)
