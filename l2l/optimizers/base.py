"""The update-rule interface shared by learned and hand-designed optimizers.

An update rule maps a flat batch of gradient coordinates and its state to an update and
a new state, purely and out of place::

    state = rule.init_state(num_coords, device=device, dtype=dtype)
    update, state = rule(grad, state)      # grad, update: [N]
    params = params + update

Learned rules are ``nn.Module``s (their weights are meta-trained); hand-designed rules are
frozen dataclasses. Both are coordinatewise, so the N coordinates may come from any number
of tensors and optimizee instances.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

State = Any


@runtime_checkable
class UpdateRule(Protocol):
    """What the unroll, the evaluator and the drop-in optimizer expect of an optimizer."""

    def init_state(
        self, num_coords: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> State:
        """Returns the state for ``num_coords`` coordinates before the first step."""
        ...

    def __call__(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        """Maps gradients ``[N]`` and state to updates ``[N]`` (added to the parameters) and a new state."""
        ...


def map_tensors(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Applies ``fn`` to every tensor in a nest of NamedTuples, tuples, lists and dicts.

    Leaves that are not tensors (step counts, None) are returned unchanged.
    """
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_tensors(fn, leaf) for leaf in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(fn, leaf) for leaf in tree)
    if isinstance(tree, dict):
        return {key: map_tensors(fn, value) for key, value in tree.items()}
    return tree


def detach_state(state: State) -> State:
    """The same state cut from the autograd graph (used between truncated unrolls)."""
    return map_tensors(Tensor.detach, state)


def tensors_of(tree: Any) -> list[Tensor]:
    """The tensors of a nest of NamedTuples, tuples, lists and dicts, in a fixed order."""
    found: list[Tensor] = []

    def collect(tensor: Tensor) -> Tensor:
        found.append(tensor)
        return tensor

    map_tensors(collect, tree)
    return found
