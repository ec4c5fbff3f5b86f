"""Task families by name: get_task and list_tasks."""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable

from l2l.config import did_you_mean, options_problem
from l2l.tasks.base import TaskFamily, VariantContradiction
from l2l.tasks.cifar import CIFAR2Family, CIFAR5Family, CIFAR10Family
from l2l.tasks.gradient_tasks import MNISTGradientPenaltyFamily, MNISTGradientReversalFamily, Tangent1DFamily
from l2l.tasks.mnist import MNIST2LayerFamily, MNIST40Family, MNISTFamily, MNISTReLUFamily
from l2l.tasks.quadratic import QuadraticFamily

_REGISTRY: dict[str, Callable[..., TaskFamily]] = {}


def register_task(name: str, factory: Callable[..., TaskFamily], *, replace: bool = False) -> None:
    """Makes ``factory(**options)`` available as ``get_task(name, **options)``.

    Constructing a family must be cheap (load data lazily, on ``sample``): ``list_tasks``
    builds every registered family with its default options. Each call must return a new
    family: ``get_task(name)`` sets the family's ``name`` to ``name`` (the one its reports and
    checkpoints record), so one factory may be registered under several names.

    Raises:
        ValueError: ``name`` is taken (unless ``replace``), empty, not a string, or holds
            whitespace or ``/`` (it is typed as ``--task NAME`` and names the default ``runs/NAME``);
            ``factory`` is not callable or needs arguments (``l2l tasks`` could no longer list
            any family).
    """
    if not isinstance(name, str) or not name or "/" in name or any(char.isspace() for char in name):
        raise ValueError(f"a task name must be a non-empty string without spaces or '/', got {name!r}")
    if not callable(factory):
        raise ValueError(f"the factory of task {name!r} must be callable (a TaskFamily subclass, say), got {factory!r}")
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): trusted as documented
        parameters = []
    named = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [p.name for p in parameters if p.default is p.empty and p.kind in named]
    if required:
        raise ValueError(
            f"the factory of task {name!r} must build the family without arguments (list_tasks and `l2l tasks` "
            f"build every family with its defaults): give {', '.join(required)} a default"
        )
    if name in _REGISTRY and not replace:
        raise ValueError(f"a task named {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = factory


def check_task_name(name: str) -> None:
    """Raises a ValueError naming the nearest registered name and all of them unless ``name`` is registered."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown task {name!r}{did_you_mean(name, _REGISTRY)}; available tasks: {', '.join(sorted(_REGISTRY))} "
            "(see `l2l tasks`)"
        )


def get_task(name: str, **options) -> TaskFamily:
    """The task family ``name`` built with ``options`` (for example ``get_task("quadratic", dim=10)``).

    Raises:
        ValueError: ``name`` is not registered, or an option is not one of the family's (both
            name the nearest registered name); or an option's value is invalid (the family's own
            message).
    """
    check_task_name(name)
    try:
        return _build(name, **options)
    except TypeError as error:
        # Only Python's own refusal of a keyword the factory (or a constructor it passes options
        # on to) lacks is the user's: any other TypeError is a bug in the family and goes up as it is.
        unexpected = re.search(r"got an unexpected keyword argument '(\w+)'", str(error))
        if unexpected is None or unexpected.group(1) not in options:
            raise
        known = list(_REGISTRY[name]().config())
        option = unexpected.group(1)
        if option in known:
            raise ValueError(
                f"task {name!r} lists option {option!r} in its config() but its factory does not take it: "
                "config() must return the keyword arguments that rebuild the family (checkpoints and reports "
                "record them); fix the family's __init__ or its config()"
            ) from None
        raise ValueError(
            f"task {name!r} has no option {option!r}{did_you_mean(option, known)}; its options are "
            f"{', '.join(known) or 'none'} (see `l2l tasks`)"
        ) from None


def task_names() -> list[str]:
    """The registered names, sorted (none of the families is built)."""
    return sorted(_REGISTRY)


def list_tasks() -> dict[str, TaskFamily]:
    """Every registered family, built with its default options, by name.

    Raises:
        ValueError: a family cannot be built with its defaults (see :func:`get_task`);
            ``l2l tasks`` lists the others and marks that one.
    """
    return {name: _build(name) for name in task_names()}


def _build(name: str, **options) -> TaskFamily:
    """``_REGISTRY[name](**options)``, named ``name``.

    A factory registered under another name than its family's (``register_task("alias",
    QuadraticFamily)``) gives families named as registered: reports and checkpoints record
    ``family.name`` beside ``family.config()``, and ``get_task`` must rebuild the family from the two.
    The instance's name is set, not the class's, which keeps its own name where it is registered too;
    a variant that refuses its options (:func:`check_variant`) is named so too.

    Raises:
        ValueError: the family's ``config()`` is not JSON data (see :func:`check_config`).
    """
    try:
        family = _REGISTRY[name](**options)
    except VariantContradiction as error:
        if error.task == name:
            raise
        raise error.named(name) from None
    if family.name != name:
        family.name = name
    check_config(name, family.config())
    return family


def check_config(name: str, config: Any) -> None:
    """Raises a ValueError naming the option and the fix unless ``config`` (task ``name``'s ``config()``) is JSON data.

    Checkpoints record ``config()`` and are read back with ``torch.load(weights_only=True)``,
    reports write it as JSON, and ``--task-option`` reads its values as JSON. Anything else fails
    late (a tensor: writing ``bench.json`` after the whole comparison; a path: every checkpoint
    is written and then unreadable) or comes back as another value (a tuple as a list), so it is
    refused when the family is built, before any work.
    """
    problem = options_problem(config, "config()", "config() must return")
    if problem is not None:
        raise ValueError(f"task {name!r}: {problem} and the family's __init__ take it back")


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
