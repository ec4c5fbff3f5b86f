"""Chooses the kernel of a coordinatewise LSTM step: the plain-PyTorch reference or the fused Triton path.

``kernel="auto"`` (the default) takes the fused path for CUDA tensors when Triton is importable
and the rule's configuration is covered (1-2 layers, float32/float64 weights, hidden size up to
29 with log/sign inputs: tiles padded to at most 32, the GPU-tested width), else the reference; ``"reference"`` always takes the reference; ``"fused"`` takes the fused path or
raises :class:`~l2l.kernels.fused.FusedUnavailableError` saying why it cannot. The choice is a
runtime setting of a module (``rule.kernel``), not part of its trained configuration.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from l2l.kernels import fused

KERNELS = ("auto", "reference", "fused")


def check_kernel(kernel: str) -> str:
    """Returns ``kernel`` if it is one of :data:`KERNELS`, else raises a ValueError naming them."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    return kernel


def select_kernel(kernel: str, rule: Any, device: torch.device) -> str:
    """``"reference"`` or ``"fused"``: which path ``rule`` takes for coordinates on ``device``.

    Raises:
        FusedUnavailableError: ``kernel == "fused"`` where the fused path cannot run.
    """
    if kernel == "reference":
        return "reference"
    if kernel == "fused":
        fused.check_available(device, rule)
        return "fused"
    if kernel != "auto":
        check_kernel(kernel)
    # auto: never the CPU interpreter (a test tool), only real CUDA.
    if device.type == "cuda" and fused.unavailable_reason(device, rule) is None and fused.auto_problem(rule) is None:
        return "fused"
    return "reference"


def lstm_modules(module: nn.Module) -> Iterator[nn.Module]:
    """The coordinatewise LSTMs inside ``module``: itself, or a per-group rule's."""
    return (sub for sub in module.modules() if hasattr(sub, "kernel") and hasattr(sub, "hidden_size"))


def set_kernel(module: nn.Module, kernel: str) -> nn.Module:
    """Sets ``kernel`` on every coordinatewise LSTM inside ``module`` (itself, or a per-group rule's); returns it."""
    check_kernel(kernel)
    for sub in lstm_modules(module):
        sub.kernel = kernel
    return module


def kernels_taken(module: nn.Module, device: torch.device) -> set[str]:
    """The paths (``"reference"``, ``"fused"``) the LSTMs inside ``module`` take on ``device``.

    Raises:
        FusedUnavailableError: one asks for ``"fused"`` where it cannot run.
    """
    return {select_kernel(sub.kernel, sub, device) for sub in lstm_modules(module)}
