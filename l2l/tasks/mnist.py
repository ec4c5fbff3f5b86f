"""The paper's MNIST families: an MLP (20 sigmoid units by default) on MNIST, batch 128."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from l2l.data.base import data_dir, device_key
from l2l.data.mnist import load_mnist
from l2l.tasks.base import check_positive_int, check_variant
from l2l.tasks.module import ModuleFamily, SupervisedData, first_examples, fixed_shuffle

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


@functools.lru_cache(maxsize=4)
def mnist_tensors(directory: str, device: str, train_examples: int | None) -> SupervisedData:
    """MNIST as float images ``[N, 1, 28, 28]`` in [0, 1] and int64 labels on ``device`` (cached)."""
    raw = load_mnist(directory)
    x_train, y_train = fixed_shuffle(raw.x_train, raw.y_train)
    x_test, y_test = fixed_shuffle(raw.x_test, raw.y_test)
    x_train, y_train = first_examples(x_train, y_train, train_examples, f"MNIST in {directory}")

    def images(x):
        return (x.to(torch.float32) / 255.0).unsqueeze(1).to(device)

    return SupervisedData(images(x_train), y_train.to(device), images(x_test), y_test.to(device))


def mlp(hidden: int, layers: int, activation: str, inputs: int = 784, classes: int = 10) -> nn.Sequential:
    """``Flatten -> (Linear(hidden), activation) x layers -> Linear(classes)``."""
    modules: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    modules.append(nn.Linear(width, classes))
    return nn.Sequential(*modules)


class MNISTFamily(ModuleFamily):
    """MNIST MLPs, each instance with its own initialisation and minibatches (paper, section 3.2).

    Args:
        hidden: units per hidden layer (paper: 20).
        layers: hidden layers (paper: 1).
        activation: ``sigmoid`` (paper), ``relu`` or ``tanh``.
        batch_size: examples per minibatch (paper: 128).
        train_examples: use only the first N training images (small, fast runs; more than the
            dataset has is a ValueError at ``sample``); None for all.
        eval_examples: the first N test images for test loss/accuracy (None: all 10,000; more than the
            split holds is a ValueError at ``sample``).
    """

    name = "mnist"
    description = "MNIST MLP, one hidden layer of 20 sigmoid units, cross-entropy, batch 128"
    default_steps = 100
    default_unroll = 20
    default_instances = 16

    def __init__(
        self,
        hidden: int = 20,
        layers: int = 1,
        activation: str = "sigmoid",
        batch_size: int = 128,
        train_examples: int | None = None,
        eval_examples: int | None = None,
    ):
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
        check_positive_int("hidden", hidden)
        check_positive_int("layers", layers)
        check_positive_int("train_examples", train_examples, optional=True)
        self.hidden, self.layers, self.activation = hidden, layers, activation
        self.train_examples = train_examples
        super().__init__(
            functools.partial(mlp, hidden, layers, activation),
            self._data,
            batch_size=batch_size,
            eval_examples=eval_examples,
        )

    def _data(self, device: torch.device) -> SupervisedData:
        return mnist_tensors(str(data_dir()), device_key(device), self.train_examples)

    def config(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "layers": self.layers,
            "activation": self.activation,
            "batch_size": self.batch_size,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
        }


class MNIST40Family(MNISTFamily):
    name = "mnist-40"
    description = "MNIST MLP, one hidden layer of 40 sigmoid units (paper's architecture variant)"

    def __init__(self, hidden: int = 40, **options):
        super().__init__(hidden=hidden, **options)
        check_variant(self, MNISTFamily.name, "hidden", 40)


class MNIST2LayerFamily(MNISTFamily):
    name = "mnist-2layer"
    description = "MNIST MLP, two hidden layers of 20 sigmoid units (paper's architecture variant)"

    def __init__(self, layers: int = 2, **options):
        super().__init__(layers=layers, **options)
        check_variant(self, MNISTFamily.name, "layers", 2)


class MNISTReLUFamily(MNISTFamily):
    name = "mnist-relu"
    description = "MNIST MLP, one hidden layer of 20 ReLU units (where the paper's optimizer failed)"

    def __init__(self, activation: str = "relu", **options):
        super().__init__(activation=activation, **options)
        check_variant(self, MNISTFamily.name, "activation", "relu")
