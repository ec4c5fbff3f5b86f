"""The learned optimizer as a ``torch.optim.Optimizer`` drop-in: train any model with a shipped checkpoint."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.optimizer import Optimizer

from l2l.checkpoint import UseCheckpoint, load_use_checkpoint, non_finite_keys, rule_spec, weights_problem
from l2l.kernels import dispatch, fused
from l2l.optimizers import LEARNED_RULES
from l2l.optimizers.grouped import PerGroupRule
from l2l.optimizers.lstm import STATE_DTYPES, CoordinateWiseLSTM, LSTMState, check_state_dtype, clamp_to_range

# Coordinates per LSTM call: on a CPU a chunk's ~1 KiB/coordinate of temporaries should stay
# cache-sized (2**14 ran 1.6x faster than 2**18 and 3x faster than 2**20 at 1e6 parameters); an
# accelerator needs large batches to amortise kernel launches.
CPU_CHUNK_SIZE = 2**14
ACCELERATOR_CHUNK_SIZE = 2**20

ParamsT = Union[Iterable[Tensor], Iterable[dict[str, Any]]]  # (torch.optim's own alias is newer than torch 2.1)
RuleFn = Callable[[Tensor, LSTMState], "tuple[Tensor, LSTMState]"]

# Options of torch.optim's hand-designed optimizers that the learned rule has no counterpart for,
# with the value that asks for nothing (None: there is none). Kept in a param group by code that
# swapped Adam for the drop-in, they would be silently ignored and the model trained without them.
FOREIGN_OPTIONS: dict[str, Any] = {
    "weight_decay": 0, "momentum": 0, "dampening": 0, "nesterov": False, "amsgrad": False, "centered": False,
    "betas": None, "eps": None,
    # Adagrad, RMSprop, Adadelta, NAdam, Rprop, ASGD, Adafactor, Adam(W):
    "lr_decay": 0, "initial_accumulator_value": 0, "decoupled_weight_decay": False,
    "alpha": None, "rho": None, "momentum_decay": None, "etas": None, "step_sizes": None, "lambd": None, "t0": None,
    "beta2_decay": None,
    "differentiable": False,  # torch.optim's __setstate__ puts differentiable=False into the defaults
}
FOREIGN_HINTS = {
    "weight_decay": "; for weight decay, add the penalty to the loss",
    "differentiable": "; to differentiate through the steps, unroll them with higher.innerloop_ctx",
}

COMPILE_REASON = (
    "LearnedOptimizer.step runs eagerly (its chunk loop and non-finite checks read values on the host): "
    "compile the forward and backward without fullgraph=True, or call optimizer.step() outside the compiled function"
)


def eager_under_compile(step: Callable) -> Callable:
    """``step``, run eagerly when ``torch.compile`` meets it: a graph break, an error under ``fullgraph=True``.

    Dynamo is imported at the first call rather than with l2l (it takes over a second).
    """
    disabled = None

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            try:
                disabled = torch.compiler.disable(step, reason=COMPILE_REASON)
            except TypeError:  # torch before 2.7 takes no reason
                disabled = torch.compiler.disable(step)
        return disabled(*args, **kwargs)

    return wrapper


def learned_step(
    rule: RuleFn,
    grad: Tensor,
    state: LSTMState,
    *,
    lr_scale: float | Tensor = 1.0,
    finite: Tensor | None = None,
) -> tuple[Tensor, LSTMState]:
    """One step of a learned rule on flat coordinates; masked-out coordinates are left unchanged.

    The functional kernel behind :class:`LearnedOptimizer` (in place, under ``no_grad``) and
    :class:`l2l.higher_interop.DifferentiableLearnedOptimizer` (out of place, differentiable).

    Args:
        rule: ``update, state = rule(grad [N], state)``, a :class:`CoordinateWiseLSTM`.
        grad: gradient coordinates, ``[N]``.
        state: recurrent state, ``h, c: [layers, hidden, N]``.
        lr_scale: factor on the rule's update (a float, or a tensor to differentiate through).
        finite: ``[N]`` bool, False where the gradient is not finite; those coordinates get a zero
            update and keep their state. None means every coordinate is finite.

    Returns:
        ``(update [N], state)``: the update to add to the parameters and the new state.
    """
    if finite is not None:
        # Zero the bad inputs rather than only masking the outputs: a NaN inside the LSTM would
        # turn the masked-out gradient of torch.where (0 * NaN) into NaN for the rule's weights.
        grad = grad.masked_fill(~finite, 0)
    update, new_state = rule(grad, state)
    if not (isinstance(lr_scale, float) and lr_scale == 1.0):
        update = update * lr_scale
    if finite is not None:
        update = update.masked_fill(~finite, 0)
        new_state = LSTMState(torch.where(finite, new_state.h, state.h), torch.where(finite, new_state.c, state.c))
    return update, new_state


def resolve_rule(checkpoint: str | os.PathLike | UseCheckpoint | nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The learned rule and metadata of a shipped checkpoint name, a path, a loaded checkpoint or a rule."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_use_checkpoint(checkpoint)
    if isinstance(checkpoint, UseCheckpoint):
        return checkpoint.rule, dict(checkpoint.metadata)
    if isinstance(checkpoint, tuple(LEARNED_RULES.values())):
        problem = weights_problem(checkpoint.state_dict())
        if problem:
            raise ValueError(f"the learned rule cannot be used: {problem}")
        return checkpoint, {}
    raise TypeError(
        "checkpoint must be a shipped checkpoint name, a path, a UseCheckpoint or a learned rule "
        f"({', '.join(LEARNED_RULES)}), got {type(checkpoint).__name__}"
    )


def _caller_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first frame outside l2l and torch: the user's line."""
    internal = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


def real_view(tensor: Tensor) -> Tensor:
    """Complex tensors as their real and imaginary coordinates (``[..., 2]``), others unchanged."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def group_rule(rule: nn.Module, group: dict[str, Any]) -> CoordinateWiseLSTM:
    """The LSTM that optimizes ``group``: the rule itself, or the sub-rule named by ``rule_group``."""
    name = group.get("rule_group")
    if isinstance(rule, PerGroupRule):
        if name not in rule.group_names:
            raise ValueError(
                f"this checkpoint holds one LSTM per parameter group ({', '.join(rule.group_names)}); "
                f"give each param group a 'rule_group' naming one (got {name!r})"
            )
        return rule.rules[name]
    if name is not None:
        raise ValueError(f"rule_group={name!r} given, but the checkpoint holds a single {type(rule).__name__}")
    return rule


def check_state_fits(index: int, group: dict[str, Any], rule: CoordinateWiseLSTM, state: Tensor) -> None:
    """Raises a ValueError if a hidden state ``[layers, hidden, N]`` of param group ``index`` does not fit ``rule``.

    The state carries over when a group's ``rule_group`` changes, so the LSTM it names must have
    the same layers and hidden size.
    """
    found, expected = tuple(state.shape[:2]), (rule.num_layers, rule.hidden_size)
    if found != expected:
        raise ValueError(
            f"param group {index}'s LSTM state is {found[0]} layers x {found[1]} units, but rule_group "
            f"{group.get('rule_group')!r} is {expected[0]} x {expected[1]}: a new rule_group must name an LSTM "
            "of the same shape (the hidden state carries over)"
        )


def state_dtype_of(group: dict[str, Any], rule: CoordinateWiseLSTM, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a group's recurrent state: the group's option, else the rule's, else the parameters'."""
    return group["state_dtype"] or rule.state_dtype or param_dtype


def zero_state(rule: CoordinateWiseLSTM, num_coords: int, device: torch.device, dtype: torch.dtype) -> LSTMState:
    """Zero recurrent state ``[layers, hidden, N]`` in exactly ``dtype`` (``init_state`` prefers the rule's)."""
    shape = (rule.num_layers, rule.hidden_size, num_coords)
    return LSTMState(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


def bucket_key(param: Tensor) -> tuple[torch.device, torch.dtype]:
    """Parameters sharing a device and a (real) dtype are stepped together in one flat batch."""
    return param.device, (param.real.dtype if param.is_complex() else param.dtype)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device``, so the rule computes in its own dtype as in meta-training.

    A step called inside the forward pass's autocast block would otherwise run the LSTM's
    matmuls in bfloat16 or float16. Device types autocast does not know (meta) get a no-op.
    """
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def check_mapping(state_dict: Any) -> None:
    """Raises unless ``state_dict`` is a mapping, as every optimizer state_dict is."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_state_dict expects the dict that LearnedOptimizer.state_dict() returns, "
            f"got a {type(state_dict).__name__}"
        )


def check_grad(grad: Tensor) -> None:
    """Raises for gradients the learned optimizer cannot take (sparse ones)."""
    if grad.is_sparse:
        raise RuntimeError(
            "LearnedOptimizer does not support sparse gradients; densify them (grad.to_dense()) "
            "or optimize those parameters with torch.optim.SparseAdam"
        )


LR_EXPECTED = "expected a finite number >= 0 or a one-element real tensor holding one: the factor on the learned update"


def check_lr(lr: Any, *, read_device: bool = True) -> None:
    """Raises ``ValueError`` unless ``lr`` is a learning rate torch.optim.Adam also takes, finite.

    Accepted: real numbers (``float``, ``int``, numpy scalars and 0-d arrays) and one-element
    integer or floating-point tensors, finite and >= 0. The messages start as torch.optim's
    (``Invalid learning rate: -1.0``, ``Tensor lr must be 1-element``). Stricter than Adam: ``inf``
    (it makes every updated parameter inf or nan) and booleans (a flag in the wrong place) are
    refused.

    Args:
        lr: the learning rate.
        read_device: read the value of a tensor off the CPU (a device sync); False leaves it
            unread (the differentiable twin checks its overrides at every step).
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {list(lr.shape)} ({LR_EXPECTED})")
        if lr.dtype == torch.bool or lr.is_complex():
            raise ValueError(f"Invalid learning rate: {lr!r} ({LR_EXPECTED})")
        if lr.device.type != "cpu" and (not read_device or lr.device.type == "meta"):
            return  # unread: reading it would synchronise the device
        value = lr.detach().item()
    elif isinstance(lr, numbers.Real) and not isinstance(lr, (bool, np.bool_)):
        value = float(lr)
    elif isinstance(lr, np.ndarray) and lr.shape == () and lr.dtype.kind in "iuf":
        value = float(lr)
    else:
        raise ValueError(f"Invalid learning rate: {lr!r} ({LR_EXPECTED})")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Invalid learning rate: {lr} ({LR_EXPECTED})")


def lr_factor(lr: Any) -> float | Tensor:
    """A checked ``lr`` as :func:`learned_step` takes it: a float, or a 0-d tensor (kept, so gradients reach it)."""
    if isinstance(lr, Tensor):
        return lr.reshape(())  # A [1] or [1, 1] lr would broadcast the update to another shape.
    return float(lr)


def check_options(rule: nn.Module, group: dict[str, Any], *, read_device_lr: bool = True) -> None:
    """Raises ``ValueError`` naming the first invalid option of a param group (``lr``, ``maximize``, ...).

    Options of torch.optim's hand-designed optimizers that the rule lacks (``weight_decay``,
    ``betas``, ...) are refused unless they ask for nothing (``weight_decay=0``, ``nesterov=False``).

    Args:
        rule: the optimizer's learned rule, which the group's ``rule_group`` must fit.
        group: the param group's options.
        read_device_lr: read a tensor ``lr`` off the CPU to check its value (see :func:`check_lr`).
    """
    check_lr(group["lr"], read_device=read_device_lr)
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"Invalid maximize: {group['maximize']!r} (expected True or False)")
    check_state_dtype(group["state_dtype"])
    chunk_size = group["chunk_size"]
    if chunk_size is not None and not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0):
        raise ValueError(f"Invalid chunk_size: {chunk_size!r} (expected None or a positive int)")
    for key, off in FOREIGN_OPTIONS.items():
        value = group.get(key, off)
        if key in group and not (off is not None and isinstance(value, (bool, int, float)) and value == off):
            raise ValueError(
                f"LearnedOptimizer has no {key} option (got {key}={value!r}): the learned rule replaces the "
                f"update of torch.optim's hand-designed optimizers, so it would be ignored; remove it{FOREIGN_HINTS.get(key, '')}"
            )
    group_rule(rule, group)


@dataclass
class _Bucket:
    """One group's parameters of one device and dtype, with their state in two flat buffers.

    ``h`` and ``c`` are ``[layers, hidden, N]``; ``self.state[p]`` holds views of them.
    """

    params: tuple[Tensor, ...]
    sizes: tuple[int, ...]
    h: Tensor
    c: Tensor
    h_views: tuple[Tensor, ...]
    c_views: tuple[Tensor, ...]


class LearnedOptimizer(Optimizer):
    """A learned (coordinatewise LSTM) optimizer behind the ``torch.optim.Optimizer`` interface.

    Replace ``torch.optim.Adam(model.parameters(), lr=1e-3)`` with
    ``l2l.LearnedOptimizer(model.parameters())``; ``step``, ``zero_grad``, param groups,
    ``state_dict``/``load_state_dict`` and ``add_param_group`` behave as in torch.optim.

    Each step flattens the gradients of all parameters of a group that share a device and dtype
    into one batch, runs the LSTM on it in chunks of ``chunk_size`` coordinates under
    ``torch.no_grad()`` (on each device in the rule's dtype) and adds ``lr`` times its output to
    the parameters in place. Parameters without a gradient are skipped. ``lr`` is a plain
    param-group option, so ``torch.optim.lr_scheduler`` schedulers scale the learned update.
    Options of torch.optim's hand-designed optimizers that the rule lacks (``weight_decay``,
    ``betas``, ...) are refused in param groups rather than ignored. Under ``torch.compile``,
    ``step`` runs eagerly (a graph break).

    Memory: the recurrent state is ``2 (h, c) x layers x hidden`` numbers per parameter, 320 bytes
    in float32 for the paper's 2 x 20 LSTM (Adam: 8 bytes), 160 bytes with
    ``state_dtype=torch.bfloat16``. A step also allocates a flat copy of the gradients and, per
    chunk, about 1 KiB of temporaries per coordinate (16 MiB on the CPU, 1 GiB on accelerators
    with the default ``chunk_size``).

    Non-finite gradients: their coordinates keep their parameter and state, and every step with
    at least one is counted in :attr:`nonfinite_steps`. On the CPU the first such step warns; on
    accelerators the count stays on the device (no host sync per step) and the warning comes
    when :attr:`nonfinite_steps` is read.

    Args:
        params: the parameters, or param group dicts (per-group options override the defaults).
        checkpoint: a shipped checkpoint name (``"mnist"``), a path to a use checkpoint, a loaded
            :class:`~l2l.checkpoint.UseCheckpoint` or a learned rule (used as is, not copied).
        lr: factor on the learned update (1 reproduces meta-training); named ``lr`` so that
            learning-rate schedulers can change it. As for torch.optim.Adam, a number (numpy
            scalars too) or a one-element tensor, which schedulers then change in place (see
            :func:`check_lr`); the fused CUDA step reads a tensor's value on the host every step.
        maximize: maximize the objective instead of minimizing it.
        state_dtype: dtype of the recurrent state (``torch.bfloat16`` halves it); None keeps the
            rule's ``state_dtype``, else the parameters' dtype.
        chunk_size: coordinates per LSTM call, bounding the temporary memory; None picks 2**14
            on the CPU (cache-sized) and 2**20 on accelerators.
        rule_group: for checkpoints with one LSTM per parameter group (``PerGroupRule``), which
            LSTM optimizes the group (for example ``"conv"``); set it per param group.
    """

    def __init__(
        self,
        params: ParamsT,
        checkpoint: str | os.PathLike | UseCheckpoint | nn.Module = "mnist",
        lr: float = 1.0,
        *,
        maximize: bool = False,
        state_dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
        rule_group: str | None = None,
    ):
        self.rule, self.metadata = resolve_rule(checkpoint)
        self._buckets: dict[tuple[int, torch.device, torch.dtype], _Bucket] = {}
        self._device_rules: dict[tuple[int, torch.device], tuple[tuple[int, ...], nn.Module]] = {}
        self._nonfinite_host = 0
        self._nonfinite_device: Tensor | None = None
        self._warned_nonfinite = False
        defaults = dict(
            lr=lr, maximize=maximize, state_dtype=state_dtype, chunk_size=chunk_size, rule_group=rule_group
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group; its options are validated before it joins (see torch.optim)."""
        if isinstance(param_group, dict):
            check_options(self.rule, {**self.defaults, **param_group})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*duplicate parameters")  # refused below instead
            super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len({id(p) for p in params}) != len(params):
            # torch.optim only warns; here the parameter would get two learned updates per step.
            self.param_groups.pop()
            raise ValueError("a param group lists a parameter more than once; pass each parameter once")

    @property
    def nonfinite_steps(self) -> int:
        """Steps in which some gradient coordinate was NaN or infinite (those coordinates were skipped).

        Reading it synchronises with the accelerator where the count is kept on the device.
        """
        count = self._nonfinite_count()
        if count and not self._warned_nonfinite:
            self._warn_nonfinite()
        return count

    def _nonfinite_count(self) -> int:
        device_count = 0 if self._nonfinite_device is None else int(self._nonfinite_device.item())
        return self._nonfinite_host + device_count

    def _warn_nonfinite(self) -> None:
        self._warned_nonfinite = True
        warnings.warn(
            "LearnedOptimizer: non-finite gradients; the parameters and LSTM state of those coordinates "
            "were left unchanged (steps affected are counted in optimizer.nonfinite_steps)",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )

    def _rule_on(self, rule: CoordinateWiseLSTM, device: torch.device) -> CoordinateWiseLSTM:
        """The rule on ``device``: itself, or a copy made once and refreshed when its weights change."""
        if rule.weight_out.device == device:
            return rule
        versions = tuple(weight._version for weight in rule.parameters())
        cached = self._device_rules.get((id(rule), device))
        if cached is None or cached[0] != versions:
            cached = (versions, copy.deepcopy(rule).to(device).requires_grad_(False))
            self._device_rules[(id(rule), device)] = cached
        return cached[1]

    def _bucket(self, index: int, key: tuple, params: list[Tensor], group: dict[str, Any], rule: CoordinateWiseLSTM) -> _Bucket:
        """The cached bucket for these parameters, rebuilt when its membership or ``self.state`` changed.

        ``load_state_dict`` replaces ``self.state`` and a parameter may gain or lose its gradient:
        then the per-parameter state (views of the old buffers, or loaded tensors) is copied into
        new flat buffers once, instead of concatenating per-parameter states every step.
        """
        device, dtype = key
        state_dtype = state_dtype_of(group, rule, dtype)
        bucket = self._buckets.get((index, *key))
        if bucket is not None and bucket.h.dtype == state_dtype and len(bucket.params) == len(params) and all(
            p is q and self.state.get(p, {}).get("h") is h and self.state[p].get("c") is c
            for p, q, h, c in zip(params, bucket.params, bucket.h_views, bucket.c_views)
        ):
            check_state_fits(index, group, rule, bucket.h)  # group["rule_group"] may have changed
            return bucket
        for p in params:
            if "h" in self.state.get(p, {}):
                check_state_fits(index, group, rule, self.state[p]["h"])
        sizes = tuple(real_view(p).numel() for p in params)
        h, c = zero_state(rule, sum(sizes), device, state_dtype)
        h_views, c_views = h.split(sizes, dim=2), c.split(sizes, dim=2)
        for p, h_view, c_view in zip(params, h_views, c_views):
            state = self.state[p]
            if "h" in state:
                h_view.copy_(state["h"])
                c_view.copy_(state["c"])
            state["h"], state["c"] = h_view, c_view
        if bucket is not None:
            # A parameter that left the bucket keeps its state, but not the whole old buffer alive.
            members = {id(p) for p in params}
            for p, h_view in zip(bucket.params, bucket.h_views):
                state = self.state.get(p, {})
                if id(p) not in members and state.get("h") is h_view:
                    state["h"], state["c"] = state["h"].clone(), state["c"].clone()
        bucket = _Bucket(tuple(params), sizes, h, c, h_views, c_views)
        self._buckets[(index, *key)] = bucket
        return bucket

    @eager_under_compile
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every group is checked and bucketed before any is stepped: an error in a later group
        # (a sparse gradient, a rule_group that does not fit) must not leave earlier groups
        # stepped, or the retry the error asks for would step them twice.
        planned: list[tuple[int, dict[str, Any], CoordinateWiseLSTM, list[tuple[tuple, list[Tensor]]]]] = []
        for index, group in enumerate(self.param_groups):
            rule = group_rule(self.rule, group)
            by_key: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_grad(p.grad)
                by_key.setdefault(bucket_key(p), []).append(p)
            planned.append((index, group, rule, list(by_key.items())))
        used: dict[tuple, _Bucket] = {}
        for index, group, rule, buckets in planned:
            for key, params in buckets:
                used[(index, *key)] = self._bucket(index, key, params, group, rule)
        host_bad = False
        device_flags: list[Tensor] = []
        for index, group, rule, buckets in planned:
            for key, _ in buckets:
                with autocast_off(key[0]):
                    bad = self._step_bucket(used[(index, *key)], group, self._rule_on(rule, key[0]))
                if isinstance(bad, Tensor) and not bad.is_meta:  # a meta flag holds no value to count
                    device_flags.append(bad)
                host_bad = host_bad or bad is True
        self._buckets = used
        self._count_nonfinite(host_bad, device_flags)
        return loss

    def _step_bucket(self, bucket: _Bucket, group: dict[str, Any], rule: CoordinateWiseLSTM) -> bool | Tensor:
        """Steps one bucket in place; returns whether a gradient was non-finite (a device flag off the CPU)."""
        views = [real_view(p) for p in bucket.params]
        # One flat copy of the gradients; each chunk's update overwrites its gradients once read.
        flat = torch.cat([real_view(p.grad).reshape(-1) for p in bucket.params])
        if group["maximize"]:
            flat.neg_()
        on_cpu = flat.device.type == "cpu"
        bad: bool | Tensor = False
        chunk = group["chunk_size"] or (CPU_CHUNK_SIZE if on_cpu else ACCELERATOR_CHUNK_SIZE)
        lr = lr_factor(group["lr"])
        if isinstance(lr, Tensor) and lr.device.type != "cpu" and lr.device != flat.device:
            lr = lr.to(flat.device)  # a 0-d CPU tensor multiplies tensors anywhere; an accelerator's only its own
        starts = range(0, flat.numel(), chunk)
        if dispatch.select_kernel(rule.kernel, rule, flat.device) == "fused":
            # One fused kernel for the whole bucket (it needs no temporaries, so no chunks): the
            # state is updated in place, the update overwrites the gradients, non-finite
            # coordinates are masked and flagged on the device.
            flag = torch.zeros(1, dtype=torch.int32, device=flat.device)
            flat = clamp_to_range(flat, rule.weight_out.dtype)  # as the reference path's forward does
            fused.lstm_step_(rule, flat, bucket.h, bucket.c, out=flat, lr_scale=float(group["lr"]), nonfinite_flag=flag)
            bad, starts = (bool(flag.item()) if on_cpu else flag[0] > 0), range(0)
        for start in starts:
            grad = flat[start : start + chunk]
            h, c = bucket.h[:, :, start : start + chunk], bucket.c[:, :, start : start + chunk]
            finite = torch.isfinite(grad)
            # On the CPU the check is free and skips the masking; on an accelerator it would cost a
            # host sync per chunk, so the mask is always applied and the flag stays on the device.
            if on_cpu:
                all_finite = bool(finite.all())
                bad = bad or not all_finite
                if all_finite:
                    finite = None
            else:
                flag = ~finite.all()
                bad = flag if isinstance(bad, bool) else bad | flag
            update, new_state = learned_step(rule, grad, LSTMState(h, c), lr_scale=lr, finite=finite)
            h.copy_(new_state.h)
            c.copy_(new_state.c)
            grad.copy_(update)
        updates = flat.split(bucket.sizes)
        torch._foreach_add_(views, [update.view(view.shape) for update, view in zip(updates, views)])
        return bad

    def _count_nonfinite(self, host_bad: bool, device_flags: list[Tensor]) -> None:
        if host_bad:
            self._nonfinite_host += 1
            if not self._warned_nonfinite:
                self._warn_nonfinite()
        elif device_flags:
            flag = device_flags[0]
            for other in device_flags[1:]:
                flag = flag | other.to(flag.device, non_blocking=True)
            if self._nonfinite_device is None:
                self._nonfinite_device = torch.zeros((), dtype=torch.int64, device=flag.device)
            self._nonfinite_device += flag.to(self._nonfinite_device.device, non_blocking=True)

    @contextlib.contextmanager
    def _hooks_held(self, *names: str) -> Iterator[OrderedDict]:
        """Hands out torch.optim's hook dicts ``names``, empty inside, so the caller runs them itself.

        torch.optim's ``state_dict`` and ``load_state_dict`` run their hooks around their own
        work; ours adds work after it (the rule's weights, the LSTM state), which the post-hooks
        must see and pre-hooks must precede.
        """
        held = [getattr(self, name) for name in names]
        for name in names:
            setattr(self, name, OrderedDict())
        try:
            yield held
        finally:
            for name, hooks in zip(names, held):
                setattr(self, name, hooks)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (per parameter: ``h``, ``c`` of ``[layers, hidden, numel]``).

        Also holds the learned rule (class, config and weights) and the non-finite step count;
        state-dict post-hooks run on the whole of it, as in torch.optim.
        """
        with self._hooks_held("_optimizer_state_dict_post_hooks") as (post_hooks,):
            state_dict = super().state_dict()
        state_dict["learned_rule"] = {
            **rule_spec(self.rule),
            "state_dict": {key: value.detach().cpu().clone() for key, value in self.rule.state_dict().items()},
            "metadata": copy.deepcopy(self.metadata),
        }
        state_dict["nonfinite_steps"] = self._nonfinite_count()
        for post_hook in post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a :meth:`state_dict`: hidden states, group options, the rule's weights and the counter.

        Raises:
            ValueError: the state was saved with a learned rule of another class or config
                (preprocessing, hidden size, layers, ...); its hidden states do not fit the
                parameters (shape, dtype, entries other than ``h`` and ``c``, a parameter no group
                lists); its rule weights do not fit the rule; a group lacks an option or has an
                invalid one; or hidden states or weights hold NaN or infinite values. Nothing is
                loaded then.
        """
        check_mapping(state_dict)
        # torch.optim's pre-hooks may rewrite the state_dict: check and load what they return.
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                check_mapping(result)
                state_dict = dict(result)
        missing = [key for key in ("state", "param_groups") if key not in state_dict]
        if missing:
            raise ValueError(f"this state_dict has no {missing[0]!r} entry: it is not an optimizer state_dict")
        saved_rule = state_dict.get("learned_rule")
        if not isinstance(saved_rule, dict):
            raise ValueError("this state_dict was not saved by a LearnedOptimizer (it has no 'learned_rule' entry)")
        differences = rule_differences(saved_rule, rule_spec(self.rule))
        if differences:
            raise ValueError(
                "cannot load an optimizer state saved with a different learned rule: " + "; ".join(differences)
            )
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        pairs: list[tuple[Any, Tensor, dict[str, Any]]] = []
        if len(groups) == len(saved_groups) and all(len(g["params"]) == len(s["params"]) for g, s in zip(groups, saved_groups)):
            for index, (group, saved_group) in enumerate(zip(groups, saved_groups)):
                # torch.optim loads the saved group as it is, not merged over this one's options.
                missing = [key for key in self.defaults if key not in FOREIGN_OPTIONS and key not in saved_group]
                if missing:
                    raise ValueError(f"this state_dict's param group {index} has no {missing[0]} option: the state_dict is corrupt")
                try:
                    check_options(self.rule, {**group, **saved_group})
                except ValueError as error:
                    raise ValueError(f"this state_dict's param group options are invalid: {error}") from None
            pairs = [
                (saved_id, p, {**group, **saved_group})
                for group, saved_group in zip(groups, saved_groups)
                for saved_id, p in zip(saved_group["params"], group["params"])
            ]
        # torch.optim carries state of parameters no group lists along as it is; here it is damage.
        listed = {saved_id for saved_id, _, _ in pairs}
        unlisted = [saved_id for saved_id in state_dict["state"] if saved_id not in listed]
        if pairs and unlisted:
            raise ValueError(
                f"this state_dict holds state for parameter {unlisted[0]}, which no param group lists: "
                "it is corrupt or was edited"
            )
        for saved_id, p, group in pairs:
            saved = state_dict["state"].get(saved_id)
            if not saved:  # None, or {} (reading optimizer.state[p], a defaultdict, leaves {} behind): no state
                continue
            if not isinstance(saved, dict):
                raise ValueError(f"saved state of parameter {saved_id} is a {type(saved).__name__}, expected a dict of h and c")
            extra = [key for key in saved if key not in ("h", "c")]
            if extra:
                raise ValueError(
                    f"saved state of parameter {saved_id} has unexpected entries {extra}: a LearnedOptimizer keeps "
                    "only the LSTM state h and c (was it saved by another optimizer, or edited?)"
                )
            rule = group_rule(self.rule, group)
            expected = (rule.num_layers, rule.hidden_size, real_view(p).numel())
            shapes = [tuple(saved[key].shape) if isinstance(saved.get(key), Tensor) else None for key in ("h", "c")]
            if shapes != [expected, expected]:
                raise ValueError(
                    f"saved LSTM state of parameter {saved_id} has shapes h {shapes[0]}, c {shapes[1]}; "
                    f"expected {expected} for a parameter of shape {tuple(p.shape)}"
                )
            for key in ("h", "c"):
                if saved[key].dtype not in STATE_DTYPES:
                    raise ValueError(
                        f"saved LSTM state {key} of parameter {saved_id} is {saved[key].dtype}, expected a floating-point "
                        f"dtype ({', '.join(map(str, STATE_DTYPES))}): the state_dict is corrupt"
                    )
            # Non-finite gradients are kept out of the state, so a non-finite saved state is damage;
            # loaded, it would turn its parameter into NaN with no non-finite step ever counted.
            if non_finite_keys({key: saved[key] for key in ("h", "c")}):
                raise ValueError(f"saved LSTM state of parameter {saved_id} holds NaN or infinite values: the state_dict is corrupt")
        count = state_dict.get("nonfinite_steps", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"this state_dict's nonfinite_steps is {count!r}, expected an int >= 0: the state_dict is corrupt")
        problem = weights_problem(saved_rule.get("state_dict")) or weights_fit_problem(saved_rule["state_dict"], self.rule)
        if problem:
            raise ValueError(f"this state_dict's learned rule is corrupt: {problem}")
        # The pre-hooks ran above; the post-hooks run once the LSTM state and weights are in place.
        with self._hooks_held("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict(state_dict)
        # torch.optim casts floating state to each parameter's dtype; the LSTM state keeps its own.
        for saved_id, p, _ in pairs:
            saved = state_dict["state"].get(saved_id)
            if saved:
                self.state[p]["h"] = saved["h"].to(p.device, copy=True)
                self.state[p]["c"] = saved["c"].to(p.device, copy=True)
        self.rule.load_state_dict(saved_rule["state_dict"])
        self._nonfinite_host = count
        self._nonfinite_device = None
        self._warned_nonfinite = self._nonfinite_host > 0  # The saving run warned already.
        self._buckets = {}
        # The weights are the saving optimizer's: so is the description of where they came from.
        metadata = saved_rule.get("metadata")
        self.metadata = dict(metadata) if isinstance(metadata, dict) else {}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(rule=self.rule, metadata=self.metadata, nonfinite=self._nonfinite_count(), warned=self._warned_nonfinite)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "rule" in state:  # Unpickling (torch.optim's load_state_dict passes only state and param_groups).
            self.rule, self.metadata = state.pop("rule"), state.pop("metadata")
            self._nonfinite_host, self._warned_nonfinite = state.pop("nonfinite"), state.pop("warned")
            self._nonfinite_device = None
            self._buckets, self._device_rules = {}, {}
        super().__setstate__(state)


def weights_fit_problem(weights: dict[str, Tensor], rule: nn.Module) -> str | None:
    """What keeps ``weights`` from loading into ``rule`` (missing, unexpected or misshapen tensors), or None.

    Checked before :meth:`LearnedOptimizer.load_state_dict` loads anything, where the module's
    own check would raise only after the hidden states were in place; after
    :func:`~l2l.checkpoint.weights_problem`, which refuses tensors that are not floating point.
    """
    expected = rule.state_dict()
    problems = [f"missing {key}" for key in expected if key not in weights]
    problems += [f"unexpected {key}" for key in weights if key not in expected]
    for key, value in weights.items():
        if key not in expected:
            continue
        if value.shape != expected[key].shape:
            problems.append(f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    return "weights " + "; ".join(problems) if problems else None


def rule_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two :func:`~l2l.checkpoint.rule_spec` outputs, as ``"key: saved X, here Y"``."""
    if saved.get("class") != current["class"]:
        return [f"rule class: saved {saved.get('class')}, this optimizer {current['class']}"]

    def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(config, dict):
            return {prefix: config}
        return {k: v for key, value in config.items() for k, v in flatten(value, f"{prefix}{key}.").items()}

    old, new = flatten(saved.get("config", {})), flatten(current["config"])
    return [
        f"{key.rstrip('.')}: saved {old.get(key)!r}, this optimizer {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


# Registers the differentiable version with higher (higher.innerloop_ctx(model, LearnedOptimizer(...))).
from l2l import higher_interop as _higher_interop  # noqa: E402,F401  (at the end: it imports this module)
