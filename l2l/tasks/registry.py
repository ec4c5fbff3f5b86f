"""Task families by name: get_task and list_tasks."""

from __future__ import annotations

from typing import Callable

from l2l.tasks.base import TaskFamily
from l2l.tasks.cifar import CIFAR2Family, CIFAR5Family, CIFAR10Family
from l2l.tasks.gradient_tasks import MNISTGradientPenaltyFamily, MNISTGradientReversalFamily, Tangent1DFamily
from l2l.tasks.mnist import MNIST2LayerFamily, MNIST40Family, MNISTFamily, MNISTReLUFamily
from l2l.tasks.quadratic import QuadraticFamily

_REGISTRY: dict[str, Callable[..., TaskFamily]] = {}


def register_task(name: str, factory: Callable[..., TaskFamily], *, replace: bool = False) -> None:
    """Makes ``factory(**options)`` available as ``get_task(name, **options)``.

    Constructing a family must be cheap (load data lazily, on ``sample``): ``list_tasks``
    builds every registered family with its default options.
    """
    if name in _REGISTRY and not replace:
        raise ValueError(f"a task named {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = factory


def get_task(name: str, **options) -> TaskFamily:
    """The task family ``name`` built with ``options`` (for example ``get_task("quadratic", dim=10)``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(sorted(_REGISTRY))} (see `l2l tasks`)")
    try:
        return _REGISTRY[name](**options)
    except TypeError as error:
        known = ", ".join(_REGISTRY[name]().config()) or "none"
        raise ValueError(f"bad options for task {name!r}: {error}; its options are {known} (see `l2l tasks --json`)") from None


def list_tasks() -> dict[str, TaskFamily]:
    """Every registered family, built with its default options, by name."""
    return {name: factory() for name, factory in sorted(_REGISTRY.items())}


for _family in (
    QuadraticFamily,
    MNISTFamily,
    MNIST40Family,
    MNIST2LayerFamily,
    MNISTReLUFamily,
    CIFAR10Family,
    CIFAR5Family,
    CIFAR2Family,
    MNISTGradientPenaltyFamily,
    MNISTGradientReversalFamily,
    Tangent1DFamily,
):
    register_task(_family.name, _family)
