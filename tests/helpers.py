"""Shared test helpers: a learned rule whose updates depend visibly on its inputs, a task that draws minibatches, a tiny MLP."""

import math

import torch

from torch import nn

from l2l.optimizers import CoordinateWiseLSTM
from l2l.tasks import QuadraticFamily, QuadraticTask, register_task
from l2l.tasks.module import ModuleFamily, SupervisedData


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


class NaNAfterFamily(QuadraticFamily):
    """Quadratics whose loss turns NaN once the parameters move far enough from 0."""

    name = "test-nan-after"

    def __init__(self, threshold: float = 0.0):
        super().__init__(dim=4)
        self.threshold = threshold

    def sample(self, num_instances, generator, device="cpu"):
        base = super().sample(num_instances, generator, device)
        threshold = self.threshold

        class Task(QuadraticTask):
            def loss(self, params, batch=None):
                loss = super().loss(params)
                moved = params.abs().sum(-1) > threshold
                return torch.where(moved, loss * math.nan, loss)

        return Task(base.W, base.y)

    def config(self):
        return {"threshold": self.threshold}


register_task("test-nan-after", NaNAfterFamily, replace=True)


def _random_digits(device="cpu"):
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(60, 1, 4, 4, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    return SupervisedData(inputs[:40], labels[:40], inputs[40:], labels[40:])


def _linear_classifier():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


class TinyMLPFamily(ModuleFamily):
    """A fully connected net (no conv layer) on random data, small enough to meta-train in a test."""

    name = "test-tiny-mlp"
    default_steps, default_unroll, default_instances = 4, 2, 4

    def __init__(self):
        super().__init__(_linear_classifier, _random_digits, batch_size=8)


register_task("test-tiny-mlp", TinyMLPFamily, replace=True)
