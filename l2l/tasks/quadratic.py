"""The paper's synthetic family: random 10-d quadratics f(theta) = ||W theta - y||^2."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from l2l.tasks.base import Task, TaskFamily, check_generator, check_num_instances, check_params


class QuadraticTask(Task):
    """K quadratics ``f_k(theta) = ||W_k theta - y_k||^2`` with ``W: [K, d, d]``, ``y: [K, d]``."""

    def __init__(self, W: Tensor, y: Tensor):
        if W.dim() != 3 or W.shape[1] != W.shape[2] or y.shape != W.shape[:2]:
            raise ValueError(f"QuadraticTask needs W [K, d, d] and y [K, d], got {list(W.shape)} and {list(y.shape)}")
        self.W = W
        self.y = y

    @property
    def num_instances(self) -> int:
        return self.W.shape[0]

    @property
    def num_params(self) -> int:
        return self.W.shape[2]

    @property
    def device(self) -> torch.device:
        return self.W.device

    def init_params(self) -> Tensor:
        """theta_0 = 0 (the paper does not say where its runs start)."""
        return torch.zeros_like(self.y)

    def loss(self, params: Tensor, batch: Any = None) -> Tensor:
        del batch  # Unused: the task is deterministic.
        return self._residual(params).pow(2).sum(-1)

    def loss_and_grad(self, params: Tensor, batch: Any = None) -> tuple[Tensor, Tensor] | None:
        """The loss and ``2 W^T (W theta - y)``, computed as autograd computes it (bit for bit), without an autograd pass."""
        del batch  # Unused: the task is deterministic.
        if type(self).loss is not QuadraticTask.loss:
            return None  # a subclass changed the loss: autograd differentiates that one
        residual = self._residual(params)
        with torch.no_grad():
            # autograd's own steps: pow's backward gives 2r exactly (ones * 2 * r), then bmm's
            # backward multiplies by W^T through the same transposed view, so the same kernel runs.
            grad = torch.bmm(self.W.transpose(1, 2), (residual * 2).unsqueeze(-1)).squeeze(-1)
        return residual.pow(2).sum(-1), grad

    def _residual(self, params: Tensor) -> Tensor:
        """``W theta - y``, ``[K, d]``."""
        check_params(self, params)
        return torch.bmm(self.W, params.unsqueeze(-1)).squeeze(-1) - self.y


class QuadraticFamily(TaskFamily):
    """Quadratics with ``W`` and ``y`` drawn IID from N(0, 1) (Andrychowicz et al., 2016, section 3.1)."""

    name = "quadratic"
    description = "f(theta) = ||W theta - y||^2, W [dim, dim] and y [dim] IID N(0,1), theta_0 = 0"
    default_steps = 100
    default_unroll = 20

    def __init__(self, dim: int = 10):
        if isinstance(dim, bool) or not (isinstance(dim, int) and dim > 0):
            raise ValueError(f"QuadraticFamily: dim must be a positive integer, got {dim!r}")
        self.dim = dim

    def sample(self, num_instances: int, generator: torch.Generator, device="cpu") -> QuadraticTask:
        check_num_instances(num_instances)
        check_generator(generator)
        W = torch.randn(num_instances, self.dim, self.dim, generator=generator)
        y = torch.randn(num_instances, self.dim, generator=generator)
        return QuadraticTask(W.to(device), y.to(device))

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}
