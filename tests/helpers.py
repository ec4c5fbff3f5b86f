"""Shared test helpers: a learned rule whose updates depend visibly on its inputs, a task that draws minibatches."""

import torch

from l2l.optimizers import CoordinateWiseLSTM
from l2l.tasks import QuadraticFamily, QuadraticTask, register_task


def sensitive_rule(seed: int = 0, dtype: torch.dtype = torch.float32, **options) -> CoordinateWiseLSTM:
    """A seeded LSTM with its weights scaled up: its updates depend visibly on the gradient and the state.

    (Freshly initialised, the LSTM writes nearly the same small update whatever its input, which
    would let wrong gradients, states or couplings pass a comparison within float32 tolerance.)
    """
    rule = CoordinateWiseLSTM(seed=seed, **options).to(dtype)
    with torch.no_grad():
        for weight in rule.parameters():
            weight.mul_(4)
    return rule


class NoisyQuadraticFamily(QuadraticFamily):
    """Quadratics observed through a noisy target each step: a task that draws minibatches."""

    name = "test-noisy-quadratic"

    def sample(self, num_instances, generator, device="cpu"):
        base = super().sample(num_instances, generator, device)

        class Task(QuadraticTask):
            def sample_batch(self, generator):
                return torch.randn(self.y.shape, generator=generator, device=self.device)

            def loss(self, params, batch=None):
                return QuadraticTask(self.W, self.y + 0.1 * batch).loss(params)

        return Task(base.W, base.y)


register_task("test-noisy-quadratic", NoisyQuadraticFamily, replace=True)
