"""One learned rule per parameter group (the paper's separate LSTMs for conv and fully connected layers)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from l2l.optimizers.lstm import CoordinateWiseLSTM


class GroupedState(NamedTuple):
    """Which coordinates belong to each group (``[N_g]`` indices into ``[N]``) and each group's state."""

    index: tuple[Tensor, ...]
    states: tuple[Any, ...]


class PerGroupRule(nn.Module):
    """Applies a separate learned rule to each group of coordinates.

    The groups are fixed when the state is built: ``init_state(N, groups={name: index [N_g]})``,
    where the index tensors partition ``range(N)``. Tasks provide them with
    ``task.coordinate_groups(rule.group_names)``.

    Args:
        rules: one rule per group name, e.g. ``{"conv": CoordinateWiseLSTM(), "fc": CoordinateWiseLSTM()}``.
    """

    def __init__(self, rules: dict[str, nn.Module]):
        super().__init__()
        if not rules:
            raise ValueError("PerGroupRule needs at least one group")
        self.rules = nn.ModuleDict(rules)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(self.rules.keys())

    def config(self) -> dict[str, Any]:
        return {"groups": {name: rule.config() for name, rule in self.rules.items()}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PerGroupRule":
        return cls({name: CoordinateWiseLSTM.from_config(sub) for name, sub in config["groups"].items()})

    def init_state(self, num_coords: int, *, device=None, dtype=None, groups: dict[str, Tensor] | None = None) -> GroupedState:
        """Builds each group's state.

        Args:
            num_coords: N.
            device: where the states and indices are put (None: each state on its LSTM's device,
                the indices where they are).
            dtype: passed to each LSTM's ``init_state`` (its ``state_dtype``, if set, wins).
            groups: ``{name: index [N_g]}`` for every group of this rule, partitioning ``range(N)``.

        Raises:
            ValueError: a group is missing or the groups do not partition the N coordinates.
        """
        if groups is None or set(groups) != set(self.group_names):
            raise ValueError(
                f"PerGroupRule needs the coordinates of groups {', '.join(self.group_names)}; got "
                f"{', '.join(groups) if groups else 'none'} (tasks give them with task.coordinate_groups(...))"
            )
        for name in self.group_names:
            given = groups[name]
            if given.dim() != 1 or given.dtype.is_floating_point or given.dtype.is_complex or given.dtype == torch.bool:
                # Caught here, not at the first step (index_copy takes only int64, a [1, N_g] index
                # hands the rule a [1, N_g] gradient), and never cast from floats or masks.
                raise ValueError(
                    f"group {name!r}: indices must be a 1-D integer tensor, got shape {tuple(given.shape)} and {given.dtype}"
                )
        sizes = {name: int(groups[name].numel()) for name in self.group_names}
        if sum(sizes.values()) != num_coords:
            raise ValueError(f"the groups cover {sum(sizes.values())} coordinates ({sizes}), but there are {num_coords}")
        index = tuple(groups[name].to(device=device, dtype=torch.long) for name in self.group_names)
        # Once per trajectory, not per step: overlapping groups would leave some coordinates
        # frozen and write others twice, with no error anywhere else.
        covered = torch.cat([i.reshape(-1) for i in index]).sort().values
        if not torch.equal(covered, torch.arange(num_coords, device=covered.device, dtype=covered.dtype)):
            raise ValueError(f"the groups' indices must partition range({num_coords}): some coordinates are repeated or out of range")
        states = tuple(
            self.rules[name].init_state(sizes[name], device=device, dtype=dtype) for name in self.group_names
        )
        return GroupedState(index, states)

    def forward(self, grad: Tensor, state: GroupedState) -> tuple[Tensor, GroupedState]:
        update = torch.zeros_like(grad)
        new_states = []
        for rule, index, group_state in zip(self.rules.values(), state.index, state.states):
            if index.numel() == 0:  # a group the task does not have (a conv,fc rule on an MLP)
                new_states.append(group_state)
                continue
            group_update, group_state = rule(grad[index], group_state)
            update = update.index_copy(0, index, group_update)
            new_states.append(group_state)
        return update, GroupedState(state.index, tuple(new_states))
