"""CUDA-graph capture of one truncated-BPTT meta-training step (unroll, meta-loss, backward, clip, Adam) for static shapes.

A truncation of the paper's quadratic setting (128 x 10 coordinates, 20 steps) launches about
1,500 small kernels forward and backward; replaying them as one CUDA graph removes the launch
overhead that otherwise dominates. :class:`GraphedTruncation` computes exactly what one pass
of ``MetaTrainer.train_epoch``'s loop computes and falls back to running it eagerly off CUDA,
for tasks that draw minibatches (their generators are not captured; a task whose batch is the
same every step declares ``fixed_batches = True``), or for a meta-optimizer that is not ``capturable``.

Two graphs are captured per unroll length: (1) unroll + meta-loss + backward + gradient
clipping + the finiteness test + copying the new carry into the static input carry, and (2)
the meta-optimizer's step. Between them the host reads the finiteness flag (the one
synchronisation per meta-step that eager training also makes), so a non-finite meta-step is
skipped exactly as in eager training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from l2l.meta.unroll import UnrollCarry, detach_carry, unroll
from l2l.optimizers.base import map_tensors, tensors_of
from l2l.tasks.base import Task, batches_are_fixed, check_positive_int

# Optimizers whose lazily created state (at their first step) is all zeros, so that the state a
# capture's warm-up creates can be reset to a fresh optimizer's. NAdam (mu_product = 1) and ASGD
# (eta = lr, mu = 1) start elsewhere: they are graphed only once they have stepped.
ZERO_INITIAL_STATE = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adadelta,
)


@dataclass
class TruncationResult:
    """What one truncation produced. With graphs, the tensors are static buffers: overwritten by the next call."""

    meta_loss: Tensor  # [], the weighted meta-loss of the truncation
    grad_norm: Tensor  # [], the meta-gradient norm before clipping
    stepped: bool  # False: non-finite loss or gradient, the meta-optimizer did not step
    carry: UnrollCarry  # detached, ready for the next truncation


def graph_unsupported_reason(
    task: Task, meta_optimizer: torch.optim.Optimizer | None, device: torch.device
) -> str | None:
    """Why a truncation on ``task`` cannot be captured as a CUDA graph, or None if it can.

    ``meta_optimizer=None`` leaves it out (it is built ``capturable`` once graphs are chosen).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"CUDA graphs need a CUDA device (the task is on {device})"
    if not batches_are_fixed(task):
        return (
            f"{type(task).__name__} draws a new minibatch every step (its sample_batch) and a graph would replay the "
            "captured one; train it eagerly (cuda_graphs 'auto' or 'off'), or, if its sample_batch returns the same data "
            "whatever the generator, set fixed_batches = True on the class"
        )
    if meta_optimizer is None:
        return None
    for group in meta_optimizer.param_groups:
        if not group.get("capturable", False):
            return "the meta-optimizer must be built with capturable=True (e.g. torch.optim.Adam(..., capturable=True))"
    fresh = any(p not in meta_optimizer.state for group in meta_optimizer.param_groups for p in group["params"])
    if fresh and type(meta_optimizer) not in ZERO_INITIAL_STATE:
        return (
            f"a fresh {type(meta_optimizer).__name__}'s state does not start at zero, which the capture's warm-up "
            f"relies on; use one of {', '.join(t.__name__ for t in ZERO_INITIAL_STATE)}, or step it once first"
        )
    return None


def task_tensors(task: Task) -> dict[str, Tensor]:
    """The tensors a task instance holds, by attribute (``name[i]`` inside tuples, lists and dicts).

    A captured graph reads them at fixed addresses.
    """
    found = {}
    for name, value in vars(task).items():
        if isinstance(value, Tensor):
            found[name] = value
        else:
            found.update({f"{name}[{i}]": tensor for i, tensor in enumerate(tensors_of(value))})
    return found


def _plain_settings(task: Task) -> dict[str, Any]:
    """A task's attributes that are plain values (numbers, strings, None): they must match for a load."""
    return {name: value for name, value in vars(task).items() if value is None or isinstance(value, (bool, int, float, str))}


def _tensor_mismatch(name: str, static: Tensor, new: Tensor) -> str | None:
    for what, a, b in (("shape", list(static.shape), list(new.shape)), ("dtype", static.dtype, new.dtype),
                       ("device", static.device, new.device)):
        if a != b:
            return f"{name} has {what} {b}, the captured one {a}"
    return None


def truncation_weights(loss_weights: Tensor, steps: int) -> Tensor:
    """The ``[steps]`` weights of a truncation of ``steps`` steps.

    Args:
        loss_weights: a ``[T, T]`` table whose row ``L - 1`` weighs a truncation of ``L`` steps
            (:func:`l2l.meta.train.loss_weight_table`), or ``[T]`` weights of which a shorter
            truncation takes the first ``steps``.
    """
    return loss_weights[steps - 1, :steps] if loss_weights.dim() == 2 else loss_weights[:steps]


class GraphedTruncation:
    """One meta-training truncation, replayed from CUDA graphs where possible.

    Equivalent to one iteration of ``MetaTrainer.train_epoch``::

        losses, carry = unroll(rule, task, carry, steps, second_order=second_order)
        meta_loss = (truncation_weights(loss_weights, steps)[:, None] * losses).sum(0).mean()
        meta_optimizer.zero_grad(set_to_none=True); meta_loss.backward()
        grad_norm = clip_grad_norm_(rule.parameters(), clip_grad_norm)
        if finite(meta_loss) and finite(grad_norm): meta_optimizer.step()

    The graphs read ``task``'s tensors and the rule's weights at fixed addresses: give new
    instances with :meth:`load_task` (copies into them), and keep the rule's parameters (they
    are updated in place by the captured step). The meta-optimizer's float hyperparameters,
    the clipping, ``second_order`` and the rule's kernel choice are baked into the graphs;
    changing one recaptures (use a tensor ``lr`` to change the learning rate for free).

    Args:
        rule: the learned rule (its weights get the meta-gradients).
        meta_optimizer: the optimizer of ``rule``'s weights.
        task: the optimizee instances (static for the graphs).
        loss_weights: weights of the per-step losses (on the task's device): ``[T_max, T_max]``, row
            ``L - 1`` for a truncation of ``L`` steps, or ``[T_max]`` (see :func:`truncation_weights`).
        clip_grad_norm: meta-gradient norm clipping.
        second_order: differentiate through the optimizee gradients.
        use_graph: ``"auto"`` (graphs where supported, else eager), True (raise where not) or False.
        warmup: eager iterations on a side stream before capture (compiles kernels, creates state).
    """

    def __init__(
        self,
        rule: nn.Module,
        meta_optimizer: torch.optim.Optimizer,
        task: Task,
        loss_weights: Tensor,
        clip_grad_norm: float,
        *,
        second_order: bool = False,
        use_graph: bool | str = "auto",
        warmup: int = 2,
    ):
        self.rule = rule
        self.meta_optimizer = meta_optimizer
        self.task = task
        self.loss_weights = loss_weights
        self.clip_grad_norm = clip_grad_norm
        self.second_order = second_order
        check_positive_int("warmup", warmup)  # the warm-up creates the state a capture must not allocate
        self.warmup = warmup
        if loss_weights.device != task.device:
            raise ValueError(f"loss_weights are on {loss_weights.device}, the task on {task.device}: put them on the task's device")
        if loss_weights.dim() not in (1, 2):
            raise ValueError(f"loss_weights must be [T] or [T, T], got {list(loss_weights.shape)}")
        reason = graph_unsupported_reason(task, meta_optimizer, task.device)
        if use_graph is True and reason is not None:
            raise RuntimeError(f"cannot capture the truncation as a CUDA graph: {reason}")
        self.use_graph = use_graph is not False and reason is None
        self.reason = reason
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph, tuple[Tensor, Tensor, Tensor]]] = {}
        self._pool = None
        self._static: UnrollCarry | None = None
        self._captured_settings: list[Any] | None = None

    # -- eager -------------------------------------------------------------------------------
    def _body(
        self, carry: UnrollCarry, steps: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, UnrollCarry]:
        """Unroll, meta-loss, backward, clip: ``(meta_loss, grad_norm, finite, new carry)`` (no optimizer step)."""
        losses, carry = unroll(self.rule, self.task, carry, steps, generator=generator, second_order=self.second_order)
        meta_loss = (truncation_weights(self.loss_weights, steps)[:, None] * losses).sum(0).mean()
        meta_loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.rule.parameters(), self.clip_grad_norm)
        finite = torch.isfinite(meta_loss) & torch.isfinite(grad_norm)
        return meta_loss.detach(), grad_norm.detach(), finite, detach_carry(carry)

    def _eager(self, carry: UnrollCarry, steps: int, generator: torch.Generator | None) -> TruncationResult:
        self.meta_optimizer.zero_grad(set_to_none=True)
        meta_loss, grad_norm, finite, carry = self._body(carry, steps, generator)
        stepped = bool(finite)  # one host synchronisation per meta-step, as in MetaTrainer
        if stepped:
            self.meta_optimizer.step()
        return TruncationResult(meta_loss, grad_norm, stepped, carry)

    # -- graphs ------------------------------------------------------------------------------
    def load_task(self, task: Task) -> None:
        """Copies new instances' tensors into the static task.

        Raises:
            TypeError: ``task`` is not of the captured task's class.
            ValueError: its tensors differ in name, shape, dtype or device, or its plain settings
                (numbers, strings) differ: a graph replays fixed shapes, so build a new runner.
        """
        if type(task) is not type(self.task):
            raise TypeError(f"load_task: expected a {type(self.task).__name__}, got {type(task).__name__}")
        statics, news = task_tensors(self.task), task_tensors(task)
        problems = []
        if statics.keys() != news.keys():
            problems.append(f"its tensors are {sorted(news)}, the captured task's {sorted(statics)}")
        else:
            problems += [p for name in statics if (p := _tensor_mismatch(name, statics[name], news[name]))]
        captured_settings, settings = _plain_settings(self.task), _plain_settings(task)
        problems += [f"{name} is {settings.get(name)!r}, the captured one {value!r}"
                     for name, value in captured_settings.items() if settings.get(name) != value]
        if problems:
            raise ValueError(f"load_task: the new {type(task).__name__} does not fit the captured one: "
                             f"{'; '.join(problems)}; build a new GraphedTruncation for it")
        for name, static in statics.items():
            if static is not news[name]:
                static.copy_(news[name])

    def _load_carry(self, carry: UnrollCarry) -> UnrollCarry:
        """The static input carry holding ``carry``'s values (allocated on first use)."""
        if self._static is None:
            self._static = map_tensors(lambda t: t.detach().clone(), carry)
        elif carry is not self._static:
            statics, news = tensors_of(self._static), tensors_of(carry)
            if len(statics) != len(news):
                raise ValueError(f"the carry holds {len(news)} tensors, the captured one {len(statics)}: "
                                 "a graph replays one rule on one task; build a new GraphedTruncation")
            for i, (static, new) in enumerate(zip(statics, news)):
                if problem := _tensor_mismatch(f"carry tensor {i}", static, new):
                    raise ValueError(f"{problem}: a graph replays fixed shapes; build a new GraphedTruncation")
            for static, new in zip(statics, news):
                if static is not new:
                    static.copy_(new)
            self._static = self._static._replace(step=carry.step)
        return self._static

    def _optimizer_snapshot(self) -> tuple[list[Tensor], dict[int, dict[str, Tensor]]]:
        params = [p for group in self.meta_optimizer.param_groups for p in group["params"]]
        state = {
            id(p): {key: value.clone() for key, value in self.meta_optimizer.state[p].items() if isinstance(value, Tensor)}
            for p in params if p in self.meta_optimizer.state
        }
        return [p.detach().clone() for p in params], state

    def _restore(self, snapshot: tuple[list[Tensor], dict[int, dict[str, Tensor]]]) -> None:
        weights, state = snapshot
        params = [p for group in self.meta_optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            for p, saved in zip(params, weights):
                p.copy_(saved)
                for key, value in self.meta_optimizer.state.get(p, {}).items():
                    if not isinstance(value, Tensor):
                        continue
                    if id(p) in state:
                        value.copy_(state[id(p)][key])
                    else:
                        value.zero_()  # state created by the warm-up: a fresh one is zeros (ZERO_INITIAL_STATE)

    def _settings(self) -> list[Any]:
        """What a captured graph bakes in: every group's hyperparameters, the clipping, the order, the kernels."""
        groups = [tuple((key, value) for key, value in group.items() if key != "params") for group in self.meta_optimizer.param_groups]
        kernels = tuple(getattr(module, "kernel", None) for module in self.rule.modules())
        return [groups, self.clip_grad_norm, self.second_order, kernels]

    def _settings_changed(self) -> bool:
        if self._captured_settings is None:
            return False

        def same(a: Any, b: Any) -> bool:
            # A tensor hyperparameter (a learning rate) is read at its address: the same object is
            # the same setting whatever its value, and comparing values would sync the GPU.
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                return a is b
            if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
                return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
            return a == b

        return not same(self._settings(), self._captured_settings)

    def _capture(self, steps: int) -> None:
        static = self._static
        snapshot = self._optimizer_snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):  # compiles kernels, creates gradients and optimizer state
                self.meta_optimizer.zero_grad(set_to_none=True)
                self._body(static, steps)
                self.meta_optimizer.step()
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(snapshot)
        self.meta_optimizer.zero_grad(set_to_none=True)  # the graph allocates .grad from its pool
        body_graph, step_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(body_graph, pool=self._pool):
                meta_loss, grad_norm, finite, carry = self._body(static, steps)
                for target, value in zip(tensors_of(static), tensors_of(carry), strict=True):
                    target.copy_(value)
            with torch.cuda.graph(step_graph, pool=self._pool):
                self.meta_optimizer.step()
        except RuntimeError as error:
            # torch's own message ("operation not permitted when stream is capturing") names neither
            # the capture nor a way out; the eager warm-up ran, so only the capture is refused.
            raise RuntimeError(
                f"could not capture {type(self.task).__name__}'s truncation of {steps} steps as a CUDA graph ({error}); "
                "a task or rule whose step synchronises with the host (.item(), a data-dependent shape such as "
                "nonzero or boolean indexing) cannot be replayed: train it eagerly with cuda_graphs='off' "
                "(l2l train --cuda-graphs off)"
            ) from error
        self._graphs[steps] = (body_graph, step_graph, (meta_loss, grad_norm, finite))
        self._captured_settings = self._settings()

    def __call__(self, carry: UnrollCarry, steps: int, *, generator: torch.Generator | None = None) -> TruncationResult:
        """Runs one truncation of ``steps`` optimizee steps from ``carry``.

        Args:
            carry: where the truncation starts (:func:`l2l.meta.unroll.start`, or the last result's).
            steps: optimizee steps, at most the loss weights' length.
            generator: the minibatch stream of a task that draws minibatches (eager runs only:
                such tasks are never graphed).

        Returns:
            The meta-loss, gradient norm, whether the meta-optimizer stepped, and the next carry
            (static buffers when graphed: copy them to keep them past the next call).
        """
        if not 1 <= steps <= self.loss_weights.shape[-1]:
            raise ValueError(f"steps must be between 1 and the loss weights' length {self.loss_weights.shape[-1]}, got {steps}")
        if not self.use_graph:
            return self._eager(carry, steps, generator)
        static = self._load_carry(carry)
        if self._settings_changed():
            self._graphs.clear()  # a changed hyperparameter, clipping or kernel is baked into the captured graphs
        if steps not in self._graphs:
            self._capture(steps)
        body_graph, step_graph, (meta_loss, grad_norm, finite) = self._graphs[steps]
        body_graph.replay()
        stepped = bool(finite)
        if stepped:
            step_graph.replay()
        self._static = static._replace(step=static.step + steps)
        return TruncationResult(meta_loss, grad_norm, stepped, self._static)

