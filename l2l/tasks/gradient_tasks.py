"""Optimizee families whose losses contain gradients: mnist-gp, mnist-grl and tangent-1d (see l2l.objectives).

* ``mnist-gp``: the paper's MNIST MLP trained on the first-order adversarial loss
  ``CE + eps * ||∇ₓ CE||`` (:func:`l2l.objectives.input_gradient_penalty`).
* ``mnist-grl``: composites of two MNIST digits side by side (28 x 56). A label head answers
  "contains a zero?"; an adversarial head behind a gradient reversal layer tries to name the
  other digit of composites that contain a zero (:func:`zero_composites` documents the exact
  construction).
* ``tangent-1d``: fit y = x at x = 0, 0.25, ..., 1 with the slope f'(x) at those points
  penalised (tangent prop, :func:`l2l.objectives.tangent_penalty` with tangent 1).

The optimizer's gradient is the gradient of these losses with respect to the parameters,
which differentiates through the input gradients and JVPs inside them (double backward), and
for ``mnist-grl`` through the reversal layer, so the feature extractor receives the
adversary's gradient negated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from l2l.data.base import data_dir, device_key
from l2l.data.mnist import load_mnist
from l2l.objectives import (
    NORMS,
    GradReverse,
    _check_choice,
    _check_nonnegative,
    _is_zero,
    adversarial_example,
    directional_derivatives,
    input_gradient_penalty,
)
from l2l.tasks.base import check_params, check_positive_int
from l2l.tasks.mnist import ACTIVATIONS, MNISTFamily, mlp
from l2l.tasks.module import Forward, Minibatch, ModuleFamily, ModuleTask, SupervisedData, fixed_shuffle

_CHUNK = 1000  # Test examples per vmapped evaluation call: bounds activation memory.


# --------------------------------------------------------------------------------------------
# mnist-gp


@dataclass(frozen=True)
class InputGradientPenaltyObjective:
    """The per-instance objective of ``mnist-gp``: :func:`~l2l.objectives.input_gradient_penalty` with cross-entropy."""

    eps: float
    norm: str = "l2"

    def __post_init__(self):
        _check_nonnegative("eps", self.eps)
        _check_choice("norm", self.norm, NORMS)

    def __call__(self, forward: Forward, inputs: Tensor, labels: Tensor) -> Tensor:
        return input_gradient_penalty(forward, inputs, labels, self.eps, self.norm)


class InputGradientPenaltyTask(ModuleTask):
    """A module task that also reports accuracy on one-step adversarial test examples.

    Its objective must be an :class:`InputGradientPenaltyObjective`: the attack uses its
    ``eps`` and ``norm``.
    """

    def metrics(self, params: Tensor) -> dict[str, Tensor]:
        """Test loss and accuracy (clean) and ``test_adversarial_accuracy`` at the objective's eps, ``[K]`` each.

        The attack follows the input gradient, so a net whose input gradient vanishes (saturated
        units: the penalty's degenerate minimum) is not moved by it and scores its clean accuracy.
        """
        metrics = super().metrics(params)
        objective: InputGradientPenaltyObjective = self.objective
        buffers = self._estimate_buffers(params)
        x_test, y_test = self.test_split()

        def correct_under_attack(instance_params, instance_buffers, inputs, labels):
            def forward(x: Tensor) -> Tensor:
                return self._call(instance_params, instance_buffers, x)

            attacked = adversarial_example(forward, inputs, labels, objective.eps, objective.norm)
            return (forward(attacked).argmax(-1) == labels).sum()

        self.module.eval()
        try:
            correct = sum(
                vmap(correct_under_attack, in_dims=(0, 0, None, None))(
                    self.layout.unflatten(params.detach()), buffers, x_test[start : start + _CHUNK], y_test[start : start + _CHUNK]
                )
                for start in range(0, x_test.shape[0], _CHUNK)
            )
        finally:
            self.module.train()
        metrics["test_adversarial_accuracy"] = correct.double() / x_test.shape[0]
        return metrics


class MNISTGradientPenaltyFamily(MNISTFamily):
    """The MNIST MLP on the first-order adversarial loss ``CE + eps * ||∇ₓ CE||_*`` per example.

    Args:
        eps: the perturbation radius (inputs are pixels in [0, 1]; an MNIST image has L2 norm about 9).
        norm: the norm of the perturbation ball, ``l2`` (default), ``linf`` or ``l1``.
        **options: as for ``mnist`` (hidden, layers, activation, batch_size, train_examples, eval_examples).
    """

    name = "mnist-gp"
    description = "MNIST MLP (20 sigmoid units) on CE + eps*||grad_x CE||_2 (first-order adversarial), eps 1, batch 128"

    def __init__(self, eps: float = 1.0, norm: str = "l2", **options):
        super().__init__(**options)
        self.objective = InputGradientPenaltyObjective(eps, norm)
        self.task_type = InputGradientPenaltyTask

    def config(self) -> dict[str, Any]:
        return {**super().config(), "eps": self.objective.eps, "norm": self.objective.norm}


# --------------------------------------------------------------------------------------------
# mnist-grl


def side_by_side(left: Tensor, right: Tensor) -> Tensor:
    """Two batches of images ``[N, C, H, W]`` joined along the width: ``[N, C, H, 2W]``."""
    return torch.cat([left, right], dim=-1)


def zero_composites(images: Tensor, labels: Tensor, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Composites of two MNIST digits side by side for the "contains a zero?" task.

    Each composite is, with probability 1/2 each:

    * positive: a 0 and an *other* digit of class 1-9, in random order (left/right);
      labels ``(1, class - 1)``;
    * negative: two digits of classes 1-9, in random order; labels ``(0, -1)`` (no other
      digit to name: the adversary's loss skips negatives).

    Digits are drawn uniformly with replacement within their pools.

    Args:
        images: ``[N, 1, 28, 28]`` float.
        labels: int64 ``[N]`` digit classes.
        count: composites to build.
        generator: a CPU generator (the composites depend only on its state).

    Returns:
        ``(x [count, 1, 28, 56], y [count, 2])``: ``y[:, 0]`` contains a zero (0/1), ``y[:, 1]``
        the other digit's class minus 1 (0-8), or -1 for negatives.
    """
    zeros = torch.nonzero(labels == 0).squeeze(1)
    others = torch.nonzero(labels != 0).squeeze(1)

    def draw(pool: Tensor) -> Tensor:
        return pool[torch.randint(0, len(pool), (count,), generator=generator)]

    positive = torch.rand(count, generator=generator) < 0.5
    first = torch.where(positive, draw(zeros), draw(others)).to(images.device)
    second = draw(others).to(images.device)
    swap = (torch.rand(count, generator=generator) < 0.5).to(images.device).view(-1, 1, 1, 1)
    left = torch.where(swap, images[second], images[first])
    right = torch.where(swap, images[first], images[second])
    other_class = torch.where(positive, labels[second.cpu()] - 1, torch.full_like(labels[second.cpu()], -1))
    return side_by_side(left, right), torch.stack([positive.long(), other_class], dim=1).to(images.device)


class TwoHeadNet(nn.Module):
    """Shared features, a "contains a zero?" head, and an adversarial head behind gradient reversal.

    ``forward`` returns the label head's 2 logits and the adversary's 9 logits (other digit
    1-9) side by side, ``[B, 11]``; :func:`two_head_loss` splits them.

    Args:
        hidden: feature units.
        activation: ``sigmoid``, ``relu`` or ``tanh``.
        coeff: the reversal strength λ (``reverse.coeff``; set it during training for a schedule).
        inputs: input pixels (28 x 56 composites: 1568).
        adversary_hidden: hidden ReLU units of the adversary (0: a linear adversary).
    """

    LABEL_CLASSES = 2
    ADVERSARY_CLASSES = 9

    def __init__(
        self, hidden: int = 20, activation: str = "sigmoid", coeff: float = 1.0, inputs: int = 28 * 56, adversary_hidden: int = 0
    ):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), ACTIVATIONS[activation]())
        self.label_head = nn.Linear(hidden, self.LABEL_CLASSES)
        self.reverse = GradReverse(coeff)
        if adversary_hidden:
            self.adversary_head = nn.Sequential(
                nn.Linear(hidden, adversary_hidden), nn.ReLU(), nn.Linear(adversary_hidden, self.ADVERSARY_CLASSES)
            )
        else:
            self.adversary_head = nn.Linear(hidden, self.ADVERSARY_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return torch.cat([self.label_head(features), self.adversary_head(self.reverse(features))], dim=-1)


def two_head_loss(forward: Forward, inputs: Tensor, labels: Tensor) -> Tensor:
    """Label cross-entropy plus the adversary's cross-entropy on composites that contain a zero.

    Args:
        forward: a :class:`TwoHeadNet`, ``[B, ...] -> [B, 11]``.
        inputs: composites ``[B, 1, 28, 56]``.
        labels: ``[B, 2]`` as made by :func:`zero_composites`.

    Returns:
        The scalar loss. Through the reversal layer, its gradient trains the adversary to
        name the other digit and the features to hide it.
    """
    logits = forward(inputs)
    label_logits, adversary_logits = logits[:, : TwoHeadNet.LABEL_CLASSES], logits[:, TwoHeadNet.LABEL_CLASSES :]
    label_loss = nn.functional.cross_entropy(label_logits, labels[:, 0])
    has_other = labels[:, 1] >= 0
    per_example = nn.functional.cross_entropy(adversary_logits, labels[:, 1].clamp_min(0), reduction="none")
    adversary_loss = (per_example * has_other).sum() / has_other.sum().clamp_min(1)
    return label_loss + adversary_loss


def two_head_accuracies(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Label-head accuracy over all composites and adversary accuracy over those with a zero.

    Args:
        logits: ``[..., B, 11]``.
        labels: ``[B, 2]`` (or broadcastable to ``[..., B, 2]``).

    Returns:
        ``(label_accuracy [...], adversary_accuracy [...])`` as float64.
    """
    labels = labels.expand(*logits.shape[:-1], 2)
    label_right = logits[..., : TwoHeadNet.LABEL_CLASSES].argmax(-1) == labels[..., 0]
    has_other = labels[..., 1] >= 0
    adversary_right = (logits[..., TwoHeadNet.LABEL_CLASSES :].argmax(-1) == labels[..., 1]) & has_other
    return label_right.double().mean(-1), adversary_right.double().sum(-1) / has_other.sum(-1).clamp_min(1)


@functools.lru_cache(maxsize=2)
def zero_composite_tensors(directory: str, device: str, train_examples: int, test_examples: int) -> SupervisedData:
    """``mnist-grl``'s data: training composites from the MNIST training split, test ones from the test split (cached)."""
    raw = load_mnist(directory)
    splits = []
    for x, y, count, seed in ((raw.x_train, raw.y_train, train_examples, 0), (raw.x_test, raw.y_test, test_examples, 1)):
        x, y = fixed_shuffle(x, y)
        images = (x.to(torch.float32) / 255.0).unsqueeze(1)
        splits += zero_composites(images, y, count, torch.Generator().manual_seed(seed))
    return SupervisedData(*(tensor.to(device) for tensor in splits))


class TwoHeadTask(ModuleTask):
    """A :class:`TwoHeadNet` task whose metrics report both heads."""

    second_order_problem = (
        "its gradient passes through a gradient reversal layer, so it is not the gradient of any "
        "function and differentiating it again gives wrong derivatives; train it first-order (the default)"
    )

    @torch.no_grad()
    def metrics(self, params: Tensor) -> dict[str, Tensor]:
        """``test_loss`` and ``test_accuracy`` of the label head and ``adversary_test_accuracy``, ``[K]`` each."""
        x_test, y_test = self.data.x_test, self.data.y_test
        self.module.eval()
        try:
            logits = torch.cat(
                [self.outputs(params, x_test[start : start + _CHUNK], shared_inputs=True) for start in range(0, len(x_test), _CHUNK)],
                dim=1,
            )
        finally:
            self.module.train()
        label_logits = logits[..., : TwoHeadNet.LABEL_CLASSES]  # [K, B, 2]
        losses = nn.functional.cross_entropy(
            label_logits.transpose(1, 2), y_test[:, 0].expand(self.num_instances, -1), reduction="none"
        ).mean(1)
        label_accuracy, adversary_accuracy = two_head_accuracies(logits, y_test)
        return {"test_loss": losses, "test_accuracy": label_accuracy, "adversary_test_accuracy": adversary_accuracy}


class MNISTGradientReversalFamily(ModuleFamily):
    """Two-head nets on "contains a zero?" composites, the adversary behind gradient reversal.

    Args:
        hidden: feature units (default 20, as the paper's MNIST net).
        activation: ``sigmoid`` (default), ``relu`` or ``tanh``.
        coeff: the reversal strength λ, fixed during an optimizee run (the loss is stateless).
        batch_size: composites per minibatch.
        train_examples: training composites built from the MNIST training split.
        eval_examples: test composites built from the MNIST test split.
    """

    name = "mnist-grl"
    description = "MNIST composites 28x56: 'contains a zero?' head + gradient-reversed head naming the other digit, 20 sigmoid units"
    default_instances = 16  # As mnist; steps and unroll are the defaults, 100 and 20.

    def __init__(
        self,
        hidden: int = 20,
        activation: str = "sigmoid",
        coeff: float = 1.0,
        batch_size: int = 128,
        train_examples: int = 20000,
        eval_examples: int = 2000,
    ):
        check_positive_int("hidden", hidden)
        check_positive_int("train_examples", train_examples)
        check_positive_int("eval_examples", eval_examples)
        _check_choice("activation", activation, tuple(ACTIVATIONS))
        _check_nonnegative("coeff", coeff)
        self.hidden, self.activation, self.coeff = hidden, activation, coeff
        self.train_examples = train_examples
        super().__init__(
            functools.partial(TwoHeadNet, hidden, activation, coeff),
            self._data,
            batch_size=batch_size,
            objective=two_head_loss,
            eval_examples=eval_examples,
            task_type=TwoHeadTask,
        )

    def _data(self, device: torch.device) -> SupervisedData:
        return zero_composite_tensors(str(data_dir()), device_key(device), self.train_examples, self.eval_examples)

    def config(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "activation": self.activation,
            "coeff": self.coeff,
            "batch_size": self.batch_size,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
        }


# --------------------------------------------------------------------------------------------
# tangent-1d

TANGENT_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class TangentPropObjective:
    """Squared error plus ``weight`` times the mean squared slope at the data: tangent prop with tangent 1.

    For a scalar function of one input, ``J_f(x) · 1 = f'(x)``, so this is
    ``mean (f(x_i) - y_i)² + weight * mean f'(x_i)²`` (:func:`l2l.objectives.tangent_penalty`);
    weight 0 is plain least squares exactly (no JVP).
    """

    weight: float = 1.0

    def __post_init__(self):
        _check_nonnegative("weight", self.weight)

    def __call__(self, forward: Forward, inputs: Tensor, targets: Tensor) -> Tensor:
        if _is_zero(self.weight):  # plain least squares exactly: no 0 * inf slope, no JVP-primal rounding
            return (forward(inputs) - targets).pow(2).mean()
        outputs, slopes = directional_derivatives(forward, inputs, torch.ones_like(inputs))
        return (outputs - targets).pow(2).mean() + self.weight * slopes.pow(2).mean()


class Tangent1DTask(ModuleTask):
    """The five points as a full batch every step; metrics report the fit and the slopes."""

    fixed_batches = True  # the same full batch every step: a CUDA graph may replay it

    def sample_batch(self, generator: torch.Generator | None) -> Minibatch:
        """The same full batch for every instance: inputs and targets ``[K, 5, 1]`` (no randomness)."""
        del generator  # Deterministic.
        shape = (self.num_instances, *self.data.x_train.shape)
        return Minibatch(self.data.x_train.expand(shape), self.data.y_train.expand(shape))

    @torch.no_grad()
    def metrics(self, params: Tensor) -> dict[str, Tensor]:
        """``fit_mse`` (squared error at the points) and ``mean_abs_slope`` (|f'| at the points), ``[K]`` each."""
        check_params(self, params)
        x, y = self.data.x_test, self.data.y_test

        def fit_and_slope(instance_params, instance_buffers):
            def forward(inputs: Tensor) -> Tensor:
                return self._call(instance_params, instance_buffers, inputs)

            outputs, slopes = directional_derivatives(forward, x, torch.ones_like(x))
            return (outputs - y).pow(2).mean(), slopes.abs().mean()

        fit, slope = vmap(fit_and_slope)(self.layout.unflatten(params), {n: b.clone() for n, b in self.buffers.items()})
        return {"fit_mse": fit, "mean_abs_slope": slope}


def _tangent_data(device: torch.device) -> SupervisedData:
    x = torch.tensor(TANGENT_POINTS, device=device).unsqueeze(1)
    return SupervisedData(x, x.clone(), x, x.clone())


class Tangent1DFamily(ModuleFamily):
    """Fit y = x at 0, 0.25, ..., 1 with a 1-``hidden``-1 net, the slope at the points penalised.

    Args:
        hidden: hidden units.
        activation: ``tanh`` (default), ``relu`` or ``sigmoid``.
        weight: the slope penalty's weight (0: plain least squares).
    """

    name = "tangent-1d"
    description = "tangent prop: 1-20-1 tanh net fits y=x at 5 points, slope f'(x) there penalised (weight 1), full batch"
    default_instances = 64

    def __init__(self, hidden: int = 20, activation: str = "tanh", weight: float = 1.0):
        check_positive_int("hidden", hidden)
        _check_choice("activation", activation, tuple(ACTIVATIONS))
        self.hidden, self.activation = hidden, activation
        super().__init__(
            functools.partial(mlp, hidden, 1, activation, 1, 1),
            _tangent_data,
            batch_size=len(TANGENT_POINTS),
            objective=TangentPropObjective(weight),
            task_type=Tangent1DTask,
        )

    def config(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "activation": self.activation, "weight": self.objective.weight}
