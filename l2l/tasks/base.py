"""The Task/TaskFamily split: a family samples batches of K independent optimizee instances."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import Tensor


class Task(abc.ABC):
    """K independent optimizee instances with ``n`` parameters each, evaluated in one batched call.

    Parameters of all instances form one tensor ``[K, n]``; :meth:`loss` returns one loss per
    instance, so ``loss(params).sum()`` has the per-instance gradients as its gradient.
    """

    # Why differentiating this task's gradients (second-order meta-gradients) gives wrong
    # results, or None where it is correct.
    second_order_problem: str | None = None

    # Whether sample_batch returns the same data whatever the generator (no minibatches, or a
    # full batch), so that a CUDA graph, which replays the data of the step it captured, replays
    # every step's. None: inferred, True unless the class overrides sample_batch.
    fixed_batches: bool | None = None

    @property
    @abc.abstractmethod
    def num_instances(self) -> int:
        """K, the number of instances."""

    @property
    @abc.abstractmethod
    def num_params(self) -> int:
        """n, the number of parameters of one instance."""

    @property
    def device(self) -> torch.device:
        """Where the task's tensors live."""
        return self.init_params().device

    @abc.abstractmethod
    def init_params(self) -> Tensor:
        """Initial parameters ``[K, n]`` (a fresh tensor on every call)."""

    def sample_batch(self, generator: torch.Generator | None) -> Any:
        """Draws the data for one optimizee step (one minibatch per instance).

        Deterministic tasks return None. ``generator`` lives on :attr:`device`.
        """
        del generator  # Unused.
        return None

    @abc.abstractmethod
    def loss(self, params: Tensor, batch: Any = None) -> Tensor:
        """Loss of every instance: ``params [K, n]`` -> ``[K]``."""

    def loss_and_grad(self, params: Tensor, batch: Any = None) -> tuple[Tensor, Tensor] | None:
        """The loss and its gradient in closed form, or None (the default): autograd differentiates :meth:`loss`.

        The unroll takes it for first-order steps, saving an autograd pass per step, so a task
        overrides it only with a gradient that is bit for bit the one autograd computes.

        Args:
            params: ``[K, n]``, in the meta-graph or not.
            batch: data from :meth:`sample_batch`.

        Returns:
            ``(loss [K], grad [K, n])``: the loss as :meth:`loss` computes it (differentiable
            with respect to ``params``), the gradient detached; or None.
        """
        del params, batch  # Unused: no closed form.
        return None

    def metrics(self, params: Tensor) -> dict[str, Tensor]:
        """Extra held-out figures per instance (for example test accuracy), each ``[K]``."""
        del params  # Unused.
        return {}


class TaskFamily(abc.ABC):
    """A distribution over optimizees; :meth:`sample` draws a :class:`Task` of K instances."""

    name: ClassVar[str]
    description: ClassVar[str]
    default_steps: ClassVar[int] = 100  # optimizee steps per meta-training epoch
    default_unroll: ClassVar[int] = 20  # steps per truncation
    default_instances: ClassVar[int] = 128  # optimizee instances per meta-training epoch

    @abc.abstractmethod
    def sample(self, num_instances: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Task:
        """Draws ``num_instances`` instances.

        Args:
            num_instances: K.
            generator: a CPU generator; the instances depend only on its state, whatever ``device``.
            device: where the task's tensors live.
        """

    def config(self) -> dict[str, Any]:
        """Options that rebuild this family with ``get_task(name, **config)``.

        Checkpoints and reports record them, so the values must be JSON data (str, int, float,
        bool, None, and lists and str-keyed dicts of them): ``get_task`` refuses a family whose
        config holds anything else.
        """
        return {}


def batches_are_fixed(task: Task) -> bool:
    """Whether ``task.sample_batch`` returns the same data at every step (:attr:`Task.fixed_batches`)."""
    declared = getattr(type(task), "fixed_batches", None)  # a duck-typed task need not subclass Task
    return type(task).sample_batch is Task.sample_batch if declared is None else declared


def check_batch_generator(task: Task, generator: torch.Generator | None) -> None:
    """Raises a ValueError if ``task`` draws minibatches and ``generator`` is None.

    None would draw them (and the dropout masks that follow them) from torch's global RNG: a run
    would not follow any seed, and the caller's random stream, which l2l never touches, would move.
    """
    if generator is None and not batches_are_fixed(task):
        device = task.device
        raise ValueError(
            f"{type(task).__name__} draws a new minibatch every step (its sample_batch), so it needs a generator: "
            f"pass generator=torch.Generator(device={str(device)!r}).manual_seed(0) (any seed; a generator on the task's "
            "device), so the run follows that seed; without one the minibatches would come from torch's global RNG. "
            "A task whose sample_batch returns the same data every step says so with fixed_batches = True"
        )


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is a positive integer (or None, if ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        kind = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_variant(variant: TaskFamily, family: str, option: str, value: Any) -> None:
    """Raises a ValueError unless ``variant`` (``family`` with ``option`` fixed to ``value``) has that value.

    A variant given its defining option with another value would build another family under the
    variant's name (``mnist-40`` with ``hidden=20`` is ``mnist``), which checkpoints and reports
    would then record. Its own value is accepted: ``config()`` records it, and a checkpoint
    rebuilds the family from that.
    """
    given = getattr(variant, option)
    if given != value:
        raise VariantContradiction(variant.name, family, option, value, given)


class VariantContradiction(ValueError):
    """A variant given its defining option with another value (see :func:`check_variant`).

    ``get_task`` names the task as registered (:meth:`named`): the variant's constructor knows only
    its class's name, and ``register_task("m40", MNIST40Family)`` is typed as ``m40``.
    """

    def __init__(self, task: str, family: str, option: str, value: Any, given: Any):
        self.task, self.family, self.option, self.value, self.given = task, family, option, value, given
        super().__init__(
            f"task {task!r} is {family!r} with {option}={value!r}; {option}={given!r} contradicts it: "
            f"use --task {family} --task-option {option}={given} (get_task({family!r}, {option}={given!r}))"
        )

    def named(self, task: str) -> VariantContradiction:
        """The same contradiction, said of the task called ``task``."""
        return VariantContradiction(task, self.family, self.option, self.value, self.given)


def check_num_instances(num_instances: int) -> None:
    """Raises a ValueError unless ``num_instances`` is a positive integer."""
    check_positive_int("num_instances", num_instances)


def check_generator(generator: Any) -> None:
    """Raises a ValueError unless ``generator`` is a CPU ``torch.Generator``.

    None would draw the instances from torch's global RNG: they would not follow the run's seed,
    and the global RNG, which l2l never touches, would move.
    """
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            "generator must be a CPU torch.Generator (for example torch.Generator().manual_seed(0)): the instances "
            f"depend only on its state, whatever the task's device; got {generator!r}"
        )


def check_params(task: Task, params: Tensor) -> None:
    """Raises a ValueError naming the expected shape if ``params`` is not ``[K, n]``."""
    expected = (task.num_instances, task.num_params)
    if tuple(params.shape) != expected:
        raise ValueError(
            f"{type(task).__name__}.loss expects params of shape [K, n] = {list(expected)}, got {list(params.shape)}"
        )
