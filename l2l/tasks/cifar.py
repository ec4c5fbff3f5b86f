"""The paper's CIFAR families: a small conv net with batch norm on CIFAR-10 and its 5- and 2-class subsets."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from l2l.data.base import DataError, data_dir, device_key
from l2l.data.cifar import load_cifar10
from l2l.tasks.base import check_positive_int, check_variant
from l2l.tasks.module import ModuleFamily, SupervisedData, first_examples, fixed_shuffle


@functools.lru_cache(maxsize=4)
def cifar_tensors(directory: str, device: str, classes: int, train_examples: int | None) -> SupervisedData:
    """CIFAR-10 images ``[N, 3, 32, 32]`` standardised per channel (training statistics), labels < ``classes``."""
    raw = load_cifar10(directory)

    def subset(x, y, split):
        keep = y < classes
        if not keep.any():
            raise DataError(
                f"CIFAR-10 in {directory} has no {split} images of classes 0..{classes - 1}: "
                "use a dataset that has them (the official one has all ten classes in both splits)"
            )
        return x[keep], y[keep]

    x_train, y_train = fixed_shuffle(*subset(raw.x_train, raw.y_train, "training"))
    x_test, y_test = fixed_shuffle(*subset(raw.x_test, raw.y_test, "test"))
    what = f"classes 0..{classes - 1} of CIFAR-10 in {directory}"
    x_train, y_train = first_examples(x_train, y_train, train_examples, what)
    train = x_train.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)

    def images(x):
        return ((x.permute(0, 3, 1, 2).to(torch.float32) / 255.0 - mean) / std).contiguous().to(device)

    return SupervisedData(images(x_train), y_train.to(device), images(x_test), y_test.to(device))


def conv_net(classes: int = 10, channels: int = 16, hidden: int = 32) -> nn.Sequential:
    """Three conv layers (5x5, 3x3, 3x3) each with batch norm, ReLU and 2x2 max-pooling, then a
    fully connected layer of ``hidden`` units with batch norm and ReLU, then the classifier."""

    def block(cin, cout, kernel):
        return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, channels, 5),
        *block(channels, channels, 3),
        *block(channels, channels, 3),
        nn.Flatten(),
        nn.Linear(channels * 4 * 4, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


class CIFAR10Family(ModuleFamily):
    """The paper's CIFAR-10 optimizee (section 3.3), each instance with its own init and minibatches.

    Args:
        classes: keep the first N classes (10, or 5 and 2 for the paper's subsets).
        channels: channels of every conv layer.
        hidden: units of the fully connected layer (paper: 32).
        batch_size: examples per minibatch (paper: 128).
        train_examples: use only the first N training images (after the class subset; more than
            it has is a ValueError at ``sample``).
        eval_examples: the first N test images for test loss/accuracy (None: all; more than the split
            holds, after the class subset, is a ValueError at ``sample``).
    """

    name = "cifar10"
    description = "CIFAR-10 conv net: 3 conv layers (BN, ReLU, max-pool), FC 32, batch 128"
    default_steps = 100
    default_unroll = 20
    default_instances = 4

    def __init__(
        self,
        classes: int = 10,
        channels: int = 16,
        hidden: int = 32,
        batch_size: int = 128,
        train_examples: int | None = None,
        eval_examples: int | None = 2000,
    ):
        if not (isinstance(classes, int) and 2 <= classes <= 10):
            raise ValueError(f"classes must be an integer from 2 to 10, got {classes!r}")
        check_positive_int("channels", channels)
        check_positive_int("hidden", hidden)
        check_positive_int("train_examples", train_examples, optional=True)
        # Batch norm in training mode needs two examples to normalise over.
        for name, value in (("batch_size", batch_size), ("train_examples", train_examples)):
            if isinstance(value, int) and not isinstance(value, bool) and value < 2:
                raise ValueError(f"{name} must be at least 2 (the conv net's batch norm needs two examples per batch), got {value}")
        self.classes, self.channels, self.hidden = classes, channels, hidden
        self.train_examples = train_examples
        super().__init__(
            functools.partial(conv_net, classes, channels, hidden), self._data, batch_size=batch_size, eval_examples=eval_examples
        )

    def _data(self, device: torch.device) -> SupervisedData:
        return cifar_tensors(str(data_dir()), device_key(device), self.classes, self.train_examples)

    def config(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "channels": self.channels,
            "hidden": self.hidden,
            "batch_size": self.batch_size,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
        }


class CIFAR5Family(CIFAR10Family):
    name = "cifar5"
    description = "the CIFAR-10 conv net on the first 5 classes (paper's CIFAR-5)"

    def __init__(self, classes: int = 5, **options):
        super().__init__(classes=classes, **options)
        check_variant(self, CIFAR10Family.name, "classes", 5)


class CIFAR2Family(CIFAR10Family):
    name = "cifar2"
    description = "the CIFAR-10 conv net on the first 2 classes (paper's CIFAR-2)"

    def __init__(self, classes: int = 2, **options):
        super().__init__(classes=classes, **options)
        check_variant(self, CIFAR10Family.name, "classes", 2)
