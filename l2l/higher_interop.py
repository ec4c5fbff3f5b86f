"""higher interop: a differentiable LearnedOptimizer, so ``higher.innerloop_ctx`` unrolls it with meta-gradients.

Importing :mod:`l2l.torch_optim` (or ``l2l``) registers :class:`DifferentiableLearnedOptimizer`
with higher, after which::

    opt = l2l.LearnedOptimizer(model.parameters(), rule)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))
        meta_loss = loss_fn(fmodel(x_val), y_val)
    meta_loss.backward()   # gradients reach the rule's weights and the model's initial weights
"""

from __future__ import annotations

from typing import Any, Callable

import higher
import torch
from higher.optim import DifferentiableOptimizer
from torch import Tensor

from l2l.optimizers.lstm import CoordinateWiseLSTM, LSTMState
from l2l.torch_optim import (
    LearnedOptimizer,
    RuleFn,
    bucket_key,
    check_grad,
    check_options,
    check_state_fits,
    group_rule,
    learned_step,
    lr_factor,
    real_view,
    state_dtype_of,
    zero_state,
)


def rule_on(rule: CoordinateWiseLSTM, device: torch.device) -> RuleFn:
    """The rule as a function on ``device``; a copy of the weights there stays differentiable."""
    if rule.weight_out.device == device:
        return rule
    weights = {name: weight.to(device) for name, weight in rule.named_parameters()}
    return lambda grad, state: torch.func.functional_call(rule, weights, (grad, state))


class DifferentiableLearnedOptimizer(DifferentiableOptimizer):
    """The differentiable twin of :class:`~l2l.torch_optim.LearnedOptimizer` for higher.

    Updates are out of place and tracked by autograd, so a loss after the inner loop is
    differentiable with respect to the learned rule's weights (the optimizer's live module, not
    a copy), to the initial parameters and to tensor overrides of ``lr``. It starts from
    the LearnedOptimizer's hidden states and applies the same kernel
    (:func:`~l2l.torch_optim.learned_step`); non-finite gradient coordinates are masked as in
    the drop-in but not counted (counting would synchronise with the device).

    Overrides (``innerloop_ctx(..., override=...)`` and ``step(..., override=...)``) are checked
    as the drop-in checks its options (a tensor ``lr`` off the CPU is not read: that would
    synchronise the device at every step); an invalid one raises and leaves the options as they were. A
    ``rule_group`` override is honoured from the next step on, as the drop-in honours a changed
    ``group["rule_group"]``; the group's hidden state is carried over, so the new LSTM must have
    the same layers and hidden size. ``chunk_size`` is checked but not used: autograd keeps
    every coordinate's activations whatever the chunking, so the twin steps a bucket in one call.
    Parameters frozen (``requires_grad=False``) when the inner loop starts are never updated, in
    test mode too (where higher hands every parameter back requiring grad).
    """

    def __init__(self, other: LearnedOptimizer, reference_params, **kwargs: Any) -> None:
        self._rule = other.rule  # Set first: the base class applies the overrides, which are checked against it.
        # With track_higher_grads=False higher hands back every parameter as
        # p.detach().requires_grad_(), so from the second step a frozen one would get a gradient:
        # remember which were frozen, as the drop-in skips them (they never get a .grad).
        self._frozen = [[not p.requires_grad for p in group["params"]] for group in other.param_groups]
        super().__init__(other, reference_params, **kwargs)
        self._check_states_fit()  # The override above was applied before the states were copied.

    def _check_states_fit(self) -> None:
        """Raises if a group's hidden state does not fit the LSTM its (overridden) ``rule_group`` names."""
        for index, group in enumerate(self.param_groups):
            rule = group_rule(self._rule, group)
            for state in self.state[index].values():
                if "h" in state:
                    check_state_fits(index, group, rule, state["h"])  # the drop-in's check and message

    def _apply_override(self, override: dict[str, list[Any]]) -> None:
        options = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        try:
            super()._apply_override(override)
            for group in self.param_groups:
                check_options(self._rule, group, read_device_lr=False)  # per step: no device sync
            self._check_states_fit()
        except ValueError:
            # A refused override must not stay behind for the next step (which has none to check).
            for group, kept in zip(self.param_groups, options):
                params = group["params"]
                group.clear()
                group.update(kept, params=params)
            raise

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        del kwargs  # Unused.
        for index, (group, grads, frozen) in enumerate(zip(self.param_groups, grouped_grads, self._frozen)):
            rule = group_rule(self._rule, group)  # Per step: a rule_group override takes effect.
            grads = [None if is_frozen else grad for grad, is_frozen in zip(grads, frozen)]
            by_key: dict[tuple, list[int]] = {}
            for position, (param, grad) in enumerate(zip(group["params"], grads)):
                if grad is not None:
                    check_grad(grad)
                    by_key.setdefault(bucket_key(param), []).append(position)
            for (device, dtype), positions in by_key.items():
                self._update_bucket(index, group, grads, positions, rule_on(rule, device), rule, dtype)

    def _update_bucket(
        self,
        index: int,
        group: dict[str, Any],
        grads: list[Tensor | None],
        positions: list[int],
        rule_fn: Callable,
        rule: CoordinateWiseLSTM,
        dtype: torch.dtype,
    ) -> None:
        params = [group["params"][i] for i in positions]
        sizes = [real_view(p).numel() for p in params]
        grad = torch.cat([real_view(grads[i]).reshape(-1) for i in positions])
        if group["maximize"]:
            grad = -grad
        states = [self.state[index][i] for i in positions]
        fresh = zero_state(rule, sum(sizes), grad.device, state_dtype_of(group, rule, dtype))
        fresh_h, fresh_c = fresh.h.split(sizes, dim=2), fresh.c.split(sizes, dim=2)
        h = torch.cat([s["h"].to(fresh.h) if "h" in s else z for s, z in zip(states, fresh_h)], dim=2)
        c = torch.cat([s["c"].to(fresh.c) if "c" in s else z for s, z in zip(states, fresh_c)], dim=2)
        update, new_state = learned_step(
            rule_fn, grad, LSTMState(h, c), lr_scale=lr_factor(group["lr"]), finite=torch.isfinite(grad)
        )
        if not self._track_higher_grads:
            new_state = LSTMState(new_state.h.detach(), new_state.c.detach())
        for i, param, piece, h_piece, c_piece in zip(
            positions, params, update.split(sizes), new_state.h.split(sizes, dim=2), new_state.c.split(sizes, dim=2)
        ):
            if param.is_complex():
                new_param = param + torch.view_as_complex(piece.view(*param.shape, 2))
            else:
                new_param = param + piece.view(param.shape)
            group["params"][i] = new_param
            self.state[index][i] = {"h": h_piece, "c": c_piece}


higher.register_optim(LearnedOptimizer, DifferentiableLearnedOptimizer)
