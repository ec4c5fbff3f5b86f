"""Runs any update rule on a batch of optimizee instances for T steps (the hot path).

Every coordinate of every instance goes through the rule in one call per step. Nothing in
the loop synchronises with the host, so on CUDA the whole unroll is queued asynchronously.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from l2l.optimizers.base import UpdateRule, detach_state
from l2l.tasks.base import Task, check_batch_generator


class UnrollCarry(NamedTuple):
    """What one truncation hands to the next.

    The loss and gradient at ``params`` are carried too, so each step costs exactly one
    forward and one backward pass of the optimizee.
    """

    params: Tensor  # [K, n]
    opt_state: Any
    loss: Tensor  # [K], loss at params
    grad: Tensor  # [K, n], gradient of loss at params
    step: int  # optimizee steps taken so far


def value_and_grad(task: Task, params: Tensor, batch: Any = None, *, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Per-instance losses and gradients of ``task`` at ``params``.

    If ``params`` is part of an autograd graph (it depends on a learned optimizer's weights
    during meta-training), the returned loss stays in that graph so the meta-loss can be
    differentiated through it. The gradient is an input to the optimizer: it is detached
    unless ``create_graph`` asks for second derivatives. Without ``create_graph`` a task's
    closed form (:meth:`~l2l.tasks.base.Task.loss_and_grad`) replaces the autograd pass.

    Args:
        task: the optimizee instances.
        params: ``[K, n]``.
        batch: data from ``task.sample_batch`` (None for deterministic tasks).
        create_graph: keep the gradient differentiable (second-order meta-gradients).

    Returns:
        ``(loss [K], grad [K, n])``.
    """
    with torch.enable_grad():
        in_graph = params.requires_grad
        # A closed form, where the task has one, gives autograd's gradient without an autograd pass.
        closed_form = None if create_graph else task.loss_and_grad(params, batch)
        if closed_form is not None:
            loss, grad = closed_form
        else:
            if not in_graph:
                params = params.detach().requires_grad_(True)
            loss = task.loss(params, batch)
        if loss.shape != (task.num_instances,):
            raise ValueError(
                f"{type(task).__name__}.loss must return one loss per instance, shape [{task.num_instances}], "
                f"got {list(loss.shape)}"
            )
        if closed_form is None:
            (grad,) = torch.autograd.grad(loss.sum(), params, retain_graph=in_graph or create_graph, create_graph=create_graph)
    if not in_graph:
        loss = loss.detach()
    if not create_graph:
        grad = grad.detach()
    return loss, grad


def start(rule: UpdateRule, task: Task, *, generator: torch.Generator | None = None, params: Tensor | None = None) -> UnrollCarry:
    """The carry before the first step: initial parameters, fresh optimizer state, loss and gradient.

    Args:
        rule: the update rule.
        task: the optimizee instances.
        generator: draws the first minibatch; lives on ``task.device``. Required for tasks that draw
            minibatches (a ValueError otherwise), which it then makes a function of its seed.
        params: start from these ``[K, n]`` instead of ``task.init_params()``.
    """
    check_batch_generator(task, generator)
    params = task.init_params() if params is None else params
    loss, grad = value_and_grad(task, params, task.sample_batch(generator))
    return UnrollCarry(params, init_rule_state(rule, task, params), loss, grad, 0)


def init_rule_state(rule: UpdateRule, task: Task, params: Tensor) -> Any:
    """The rule's state for all ``K * n`` coordinates of ``params``; per-group rules get the task's groups."""
    group_names = getattr(rule, "group_names", None)
    if group_names:
        if not hasattr(task, "coordinate_groups"):
            raise ValueError(f"a per-group optimizer ({', '.join(group_names)}) needs a task with parameter groups; "
                             f"{type(task).__name__} has none")
        return rule.init_state(
            params.numel(), device=params.device, dtype=params.dtype, groups=task.coordinate_groups(group_names)
        )
    return rule.init_state(params.numel(), device=params.device, dtype=params.dtype)


def unroll(
    rule: UpdateRule,
    task: Task,
    carry: UnrollCarry,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    second_order: bool = False,
) -> tuple[Tensor, UnrollCarry]:
    """Applies ``rule`` for ``steps`` optimizee steps.

    Differentiable with respect to the rule's weights when grad mode is on: the returned
    losses are functions of them through the parameter updates. Optimizee gradients enter
    the rule as constants unless ``second_order=True``.

    Args:
        rule: the update rule, ``update, state = rule(grad [N], state)`` with ``N = K * n``.
        task: the optimizee instances.
        carry: from :func:`start` or a previous unroll (see :func:`detach_carry`).
        steps: T, the number of updates.
        generator: draws each step's minibatch; required for tasks that draw minibatches (see :func:`start`).
        second_order: differentiate through the optimizee gradients too (refused for tasks
            whose ``second_order_problem`` says why it would be wrong).

    Returns:
        ``(losses, carry)``: ``losses[t]`` is the loss of every instance after update ``t + 1``,
        shape ``[T, K]``; the carry is ready for the next unroll.
    """
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"unroll: steps must be a non-negative integer, got {steps!r}")
    if second_order and task.second_order_problem:
        raise ValueError(f"second_order=True is not available for {type(task).__name__}: {task.second_order_problem}")
    check_batch_generator(task, generator)
    params, opt_state, _, grad, step = carry
    shape = params.shape
    losses = []
    for _ in range(steps):
        update, opt_state = rule(grad.reshape(-1), opt_state)
        params = params + update.view(shape)
        loss, grad = value_and_grad(task, params, task.sample_batch(generator), create_graph=second_order)
        losses.append(loss)
    stacked = torch.stack(losses) if losses else carry.loss.new_zeros((0, task.num_instances))
    return stacked, UnrollCarry(params, opt_state, losses[-1] if losses else carry.loss, grad, step + steps)


def detach_carry(carry: UnrollCarry) -> UnrollCarry:
    """The carry cut from the autograd graph: the truncation in truncated BPTT."""
    params, opt_state, loss, grad, step = carry
    return UnrollCarry(params.detach(), detach_state(opt_state), loss.detach(), grad.detach(), step)


def run(
    rule: UpdateRule, task: Task, steps: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, UnrollCarry]:
    """Runs ``rule`` from the task's initial parameters without tracking meta-gradients.

    ``generator`` draws the minibatches; required for tasks that draw them (see :func:`start`).

    Returns:
        ``(losses, carry)`` with ``losses: [steps + 1, K]`` including the initial loss.
    """
    with torch.no_grad():
        carry = start(rule, task, generator=generator)
        initial_loss = carry.loss
        losses, carry = unroll(rule, task, carry, steps, generator=generator)
    return torch.cat([initial_loss.unsqueeze(0), losses]), carry
