"""Training objectives that contain gradients: gradient reversal, gradient penalties, tangent prop, gradient supervision.

Every function takes the network as a callable ``forward(x [B, ...]) -> outputs [B, ...]`` (an
``nn.Module``, or the per-instance ``forward`` that :class:`l2l.tasks.module.ModuleTask` hands
to its objective) and computes input gradients and Jacobian-vector products with
``torch.func`` (``grad``, ``jvp``), never with ``torch.autograd.grad`` on the inputs. So one
implementation serves both places:

* in an ordinary training loop, the results are differentiable with respect to the module's
  parameters (the ``torch.func`` equivalent of ``create_graph=True``): call ``.backward()``;
* inside the ``vmap`` over K optimizee instances of a ``ModuleTask`` objective, where
  ``torch.autograd.grad`` on the inputs is not available.

Input gradients are taken of the *sum* of per-example losses, so row ``i`` of the gradient is
``∇_{x_i} L_i`` exactly when example ``i``'s output depends on ``x_i`` alone (no batch-norm in
training mode, no attention across the batch). Tensor shapes: ``B`` examples, ``K`` instances,
``T`` tangent directions.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap
from torch.utils._pytree import tree_leaves

__all__ = [
    "GradReverse",
    "adversarial_example",
    "directional_derivatives",
    "grad_reverse",
    "gradient_supervision_loss",
    "image_tangents",
    "input_gradient_penalty",
    "parameter_gradient_penalty",
    "per_example_cross_entropy",
    "reversal_coefficient",
    "tangent_penalty",
]

Forward = Callable[[Tensor], Tensor]
PerExampleLoss = Callable[[Tensor, Tensor], Tensor]
NORMS = ("l1", "l2", "linf")
REDUCTIONS = ("mean", "sum", "none")


def _is_plain_tensor(value: Tensor) -> bool:
    """A tensor whose value can be read: not traced or batched by torch.func, nor on an accelerator (a sync)."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return value.device.type == "cpu" and not (wrapped is not None and wrapped(value))


def _check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        # A schedule's tensor is checked where reading it is free; a value traced or batched by
        # torch.func, or on an accelerator, cannot be read without a sync: its caller owns its range.
        if _is_plain_tensor(value):
            values = value.detach().reshape(-1)
            if values.numel() == 1:
                _check_nonnegative(name, float(values[0]))
            else:  # per-feature or per-example values: every one in range
                bad = values[~(torch.isfinite(values) & (values >= 0))]
                if bad.numel():
                    raise ValueError(f"Invalid {name}: a tensor holding {float(bad[0])!r} (every element must be finite and >= 0)")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real: numpy scalars too
        raise ValueError(f"Invalid {name}: {value!r} (must be a number >= 0, got {type(value).__name__})")
    if math.isinf(value) and value > 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    if not value >= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= 0)")


def _cpu_values(value: Tensor) -> Tensor | None:
    """The plain CPU tensor that holds ``value``'s values (under torch.func: its batches, unwrapped), or None.

    Reading a CPU tensor costs nothing, inside torch.func's transforms too (vmap and grad wrap
    the tensor that holds the values; :func:`torch._C._functorch.get_unwrapped` gives it back).
    An accelerator's tensor is None: reading it would stop the host until the device catches up.
    """
    functorch = torch._C._functorch
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    unwrap = getattr(functorch, "get_unwrapped", None)
    while wrapped is not None and wrapped(value):
        if unwrap is None:
            return None  # a torch without the unwrapping: unread, as on an accelerator
        value = unwrap(value)
    return value if value.device.type == "cpu" else None


def _check_classes(name: str, labels: Tensor, classes: int) -> None:
    """Raises a ValueError naming the first label of ``labels`` outside ``0 .. classes - 1`` and the valid range.

    Labels on the CPU are checked, under vmap and grad too (every batch of them); labels on an
    accelerator are not, since reading them is a host synchronisation on every call: an
    out-of-range one there meets torch's own index check (on CUDA a device-side assert).
    """
    values = _cpu_values(labels)
    if values is None:
        return
    bad = torch.nonzero((values < 0) | (values >= classes))
    if bad.shape[0]:
        where = f"at pair {int(bad[0, 0])}" if values is labels else "in a batch of pairs under torch.func"
        raise ValueError(
            f"{name} holds class {int(values[tuple(bad[0])])} ({where}), but forward returns logits for "
            f"{classes} classes: labels must be from 0 to {classes - 1}"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {', '.join(map(repr, choices))})")


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def per_example_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each example: logits ``[B, C]``, int64 labels ``[B]`` -> ``[B]``."""
    return nn.functional.cross_entropy(logits, labels, reduction="none")


# --------------------------------------------------------------------------------------------
# Gradient reversal (Ganin & Lempitsky, 2015)


class _GradReverse(torch.autograd.Function):
    generate_vmap_rule = True  # Works inside torch.func.vmap / grad (ModuleTask's K instances).

    @staticmethod
    def forward(x: Tensor, coeff: float | Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        coeff = inputs[1]
        # The value at the forward, as the docs say: a schedule changing the tensor in place before
        # backward must not change this gradient.
        ctx.coeff = coeff.detach().clone() if isinstance(coeff, Tensor) else coeff

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return -ctx.coeff * grad_output, None

    @staticmethod
    def jvp(ctx, x_tangent: Tensor, coeff_tangent: Any) -> Tensor:
        # Forward mode sees the forward function, the identity; only reverse mode is reversed.
        # A view, as the forward's output is one (dual tensors of torch.autograd.forward_ad insist).
        return x_tangent.view_as(x_tangent)


def grad_reverse(x: Tensor, coeff: float | Tensor = 1.0) -> Tensor:
    """The gradient reversal layer: identity forward, ``-coeff *`` the incoming gradient backward.

    Placed between a feature extractor and an adversarial head, the head minimises its loss
    while the features receive the negated gradient, so they maximise it (domain-adversarial
    training). ``coeff`` gets no gradient. Forward-mode derivatives (``torch.func.jvp``,
    ``torch.autograd.forward_ad``) are those of the identity.

    A gradient computed through the layer is not the gradient of any function, so it has no
    correct derivative: differentiating it again (``create_graph=True``, second-order
    meta-gradients) applies the reversal to the forward path as well and gives wrong results.
    ``l2l train --second-order`` refuses ``mnist-grl`` for this reason.

    Args:
        x: any tensor ``[...]``.
        coeff: the reversal strength λ >= 0 (a float, or a tensor for schedules, see
            :func:`reversal_coefficient`; a tensor of several elements must broadcast to ``x``'s shape).

    Returns:
        ``x`` unchanged ``[...]`` (a view), whose backward multiplies gradients by ``-coeff``.
    """
    _check_nonnegative("coeff", coeff)
    if isinstance(coeff, Tensor) and coeff.dim():
        # The forward is the identity, so a coeff broadcasting past x goes unnoticed there; in
        # backward autograd sums the too-large gradient back to x's shape.
        try:
            fits = torch.broadcast_shapes(coeff.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"coeff of shape {list(coeff.shape)} does not broadcast to the input's shape {list(x.shape)}: "
                "use a number, a 0-d tensor or one that broadcasts to the input (per-feature [F], per-example [B, 1])"
            )
    return _GradReverse.apply(x, coeff)


class GradReverse(nn.Module):
    """:func:`grad_reverse` as a module; set ``.coeff`` during training to follow a schedule.

    Args:
        coeff: the reversal strength λ >= 0.
    """

    def __init__(self, coeff: float = 1.0):
        super().__init__()
        _check_nonnegative("coeff", coeff)
        self.coeff = coeff

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}"


def reversal_coefficient(progress: float, gamma: float = 10.0) -> float:
    """Ganin & Lempitsky's schedule for λ: ``2 / (1 + exp(-gamma * progress)) - 1``.

    It rises from 0 at the start of training to about 1 (0.99991 at ``gamma = 10``), so the
    adversarial signal is suppressed while the heads are still noisy.

    Args:
        progress: the fraction of training done, in [0, 1].
        gamma: the steepness (paper: 10).
    """
    if isinstance(progress, bool) or not isinstance(progress, numbers.Real):
        raise ValueError(f"Invalid progress: {progress!r} (must be a number in [0, 1], got {type(progress).__name__})")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"Invalid progress: {progress!r} (must be in [0, 1])")
    _check_nonnegative("gamma", gamma)
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


# --------------------------------------------------------------------------------------------
# Input-gradient penalty: first-order adversarial training


_IMPURE_FORWARD = (
    "the network changes a buffer in place during its forward pass (batch norm in training mode "
    "updating its running statistics?), which input gradients and Jacobian-vector products cannot "
    "differentiate: call .eval(), build the batch norm with track_running_stats=False, or apply "
    "torch.func.replace_all_batch_norm_modules_(model)"
)


def _transform(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a torch.func transform), with torch.func's in-place-buffer error replaced by one naming the fix."""

    def wrapped(*args: Any) -> Any:
        try:
            return function(*args)
        except RuntimeError as error:
            if "mutate a captured Tensor" in str(error):
                raise ValueError(_IMPURE_FORWARD) from error
            raise

    return wrapped


def _is_zero(weight: Any) -> bool:
    """Whether ``weight`` is the number 0: its term is skipped, so the result is the plain loss exactly.

    ``0 * penalty`` is not: it is NaN where the penalty is infinite (an infinite input gradient
    at a finite loss, sqrt at 0), and the penalty would still cost its double backward.
    Tensors are not read (under torch.func or on an accelerator that would trace or sync).
    """
    return not isinstance(weight, Tensor) and weight == 0


def _per_example_losses(forward: Forward, inputs: Tensor, labels: Tensor, loss: PerExampleLoss) -> Tensor:
    """``loss(forward(inputs), labels)``, checked to be one loss per example ``[B]``."""
    per_example = loss(forward(inputs), labels)
    if per_example.shape != (inputs.shape[0],):
        raise ValueError(
            f"loss must return one loss per example, shape [{inputs.shape[0]}], got {list(per_example.shape)}: "
            "use reduction='none' (as per_example_cross_entropy does) and reshape the result to [B]"
        )
    return per_example


def _check_inputs(inputs: Tensor) -> None:
    """Inputs to differentiate: ``[B, ...]`` and floating point (torch's own error names neither)."""
    if inputs.dim() == 0:
        raise ValueError("inputs must be [B, ...] (one row per example), got a 0-d tensor")
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point, got {inputs.dtype}: convert them first (inputs.float() / 255 for bytes)")


def _check_like_inputs(name: str, tensor: Tensor, inputs: Tensor) -> None:
    """``tensor`` of ``inputs``' dtype and device: promotion would hide bytes beside [0, 1] floats."""
    if tensor.dtype != inputs.dtype or tensor.device != inputs.device:
        raise ValueError(
            f"{name} must have the inputs' dtype {inputs.dtype} and device {inputs.device}, "
            f"got {tensor.dtype} on {tensor.device}: convert them with {name}.to(inputs)"
        )


def _losses_and_input_gradients(forward: Forward, inputs: Tensor, labels: Tensor, loss: PerExampleLoss) -> tuple[Tensor, Tensor]:
    """Per-example losses ``[B]`` and their input gradients ``[B, ...]`` (differentiable)."""
    _check_inputs(inputs)

    def summed(x: Tensor) -> tuple[Tensor, Tensor]:
        per_example = _per_example_losses(forward, x, labels, loss)
        return per_example.sum(), per_example

    gradients, per_example = _transform(grad(summed, has_aux=True))(inputs)
    return per_example, gradients


def _rows(tensor: Tensor, leading: int = 1) -> Tensor:
    """``tensor`` with its first ``leading`` dims kept and the rest flattened (``[B, ...] -> [B, n]``; ``B = 0`` too)."""
    return tensor.reshape(*tensor.shape[:leading], math.prod(tensor.shape[leading:]))


def _dual_norm(gradients: Tensor, norm: str) -> Tensor:
    """``max_{||δ|| <= 1} <g_i, δ>`` per example: ``[B, ...] -> [B]`` (the dual of ``norm``)."""
    flat = _rows(gradients)
    dual_order = {"l1": math.inf, "l2": 2.0, "linf": 1.0}[norm]
    return torch.linalg.vector_norm(flat, ord=dual_order, dim=1)


def _unit_rows(flat: Tensor) -> Tensor:
    """Each row of ``[B, n]`` divided by its L2 norm; zero rows give 0, with zero gradient.

    Rows are first divided by their largest magnitude, so tiny gradients (saturated units: norms
    that square to below the dtype's smallest normal number) keep their direction. That scale
    is detached: the result does not depend on it, so its derivative is unchanged. A zero row
    (a dead ReLU net's input gradient) has no direction and no derivative; clamped denominators
    there would backpropagate ``1 / tiny**2 = inf`` and, through the zero Jacobian behind it, NaN.
    """
    largest = flat.detach().abs().amax(dim=1, keepdim=True)
    nonzero = largest != 0  # NaN rows stay NaN
    scaled = flat / torch.where(nonzero, largest, 1.0)
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)  # >= 1 on nonzero rows
    return torch.where(nonzero, scaled / torch.where(nonzero, norm, 1.0), 0.0)


def _steepest_direction(gradients: Tensor, norm: str) -> Tensor:
    """The unit-``norm`` direction δ_i that attains the dual norm: ``<g_i, δ_i> = ||g_i||_*``."""
    flat = _rows(gradients)
    if norm == "l2":
        direction = _unit_rows(flat)
    elif norm == "linf":
        direction = flat.sign()
    else:  # l1: all the budget on the largest coordinate(s); ties share it, which keeps <g, δ> exact.
        magnitude = flat.abs()
        top = (magnitude == magnitude.amax(dim=1, keepdim=True)).to(flat.dtype)
        direction = flat.sign() * top / top.sum(dim=1, keepdim=True)
    return direction.view_as(gradients)


def input_gradient_penalty(
    forward: Forward,
    inputs: Tensor,
    labels: Tensor,
    eps: float,
    norm: str = "l2",
    *,
    loss: PerExampleLoss = per_example_cross_entropy,
    reduction: str = "mean",
) -> Tensor:
    """The first-order adversarial loss ``L_i + eps * ||∇_{x_i} L_i||_*`` per example.

    To first order in ``eps``, this is the loss at the worst perturbation of each input in the
    ``norm`` ball of radius ``eps`` (:func:`adversarial_example`): the penalty uses the dual
    norm (L2 for ``"l2"``, L1 of the gradient for ``"linf"``, L∞ for ``"l1"``). The gradient is
    computed with ``torch.func.grad`` and stays differentiable, so the result trains the
    network (and works inside ``vmap``).

    Args:
        forward: the network, ``[B, ...] -> outputs [B, ...]``.
        inputs: ``[B, ...]``.
        labels: ``[B, ...]``, passed to ``loss``.
        eps: the perturbation radius, >= 0. The number 0 gives the plain loss exactly, without
            the input gradient.
        norm: the norm of the perturbation ball: ``"l1"``, ``"l2"`` or ``"linf"``.
        loss: per-example loss, ``loss(outputs, labels) -> [B]`` (default: cross-entropy).
        reduction: ``"mean"`` (default) or ``"sum"`` over examples, or ``"none"`` for ``[B]``.

    Returns:
        The penalized loss: a scalar, or ``[B]`` with ``reduction="none"``.
    """
    _check_nonnegative("eps", eps)
    _check_choice("norm", norm, NORMS)
    _check_choice("reduction", reduction, REDUCTIONS)
    if _is_zero(eps):
        _check_inputs(inputs)
        return _reduce(_per_example_losses(forward, inputs, labels, loss), reduction)
    per_example, gradients = _losses_and_input_gradients(forward, inputs, labels, loss)
    return _reduce(per_example + eps * _dual_norm(gradients, norm), reduction)


def adversarial_example(
    forward: Forward,
    inputs: Tensor,
    labels: Tensor,
    eps: float,
    norm: str = "l2",
    *,
    loss: PerExampleLoss = per_example_cross_entropy,
) -> Tensor:
    """The one-step adversarial example ``x + eps * δ``, δ the steepest unit-``norm`` ascent direction.

    For ``"l2"`` δ = ∇ₓL / ||∇ₓL||₂ (the fast gradient method); for ``"linf"`` δ = sign(∇ₓL)
    (FGSM); for ``"l1"`` the whole budget goes to the largest gradient coordinate. No clipping
    to a valid input range: this is the point at which :func:`input_gradient_penalty` is the
    first-order expansion of the loss. The result is detached.

    Args:
        forward: the network, ``[B, ...] -> outputs [B, ...]``.
        inputs: ``[B, ...]``.
        labels: ``[B, ...]``, passed to ``loss``.
        eps: the perturbation radius, >= 0.
        norm: ``"l1"``, ``"l2"`` or ``"linf"``.
        loss: per-example loss, ``loss(outputs, labels) -> [B]``.

    Returns:
        Perturbed inputs ``[B, ...]``.
    """
    _check_nonnegative("eps", eps)
    _check_choice("norm", norm, NORMS)
    _, gradients = _losses_and_input_gradients(forward, inputs, labels, loss)
    return (inputs + eps * _steepest_direction(gradients, norm)).detach()


# --------------------------------------------------------------------------------------------
# Parameter-gradient penalty: the implicit regulariser of gradient descent


def parameter_gradient_penalty(loss_fn: Callable[[Any], Tensor], params: Any, lr: float) -> Tensor:
    """``L(θ) + (lr / 4) * ||∇_θ L(θ)||²``: the loss that gradient descent with step ``lr`` follows to second order.

    Gradient descent with a finite step size tracks the gradient flow of this modified loss
    more closely than that of ``L`` (Barrett & Dherin, "Implicit gradient regularization",
    2021), so adding the penalty explicitly corrects for (or strengthens) the discretisation
    error. The gradient comes from ``torch.func.grad`` and stays differentiable.

    ``loss_fn`` may return one loss per instance, ``[K]``, for K independent instances whose
    parameters are rows of ``params`` (the leaves are ``[K, ...]`` and loss ``k`` depends on
    rows ``k`` only, as for :class:`l2l.tasks.base.Task`): then each instance gets its own
    penalty.

    Example (an ``nn.Module``; frozen parameters are left out, as they are not trained)::

        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        objective = parameter_gradient_penalty(
            lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y), params, lr=0.1)
        objective.backward()  # gradients land in model's .grad

    Args:
        loss_fn: ``loss_fn(params) -> []`` or ``[K]``.
        params: a tensor or a pytree (dict, list, tuple) of tensors.
        lr: the step size h, >= 0. The number 0 gives ``loss_fn(params)`` exactly, without the
            gradient.

    Returns:
        The penalized loss, shaped like ``loss_fn(params)``.
    """
    _check_nonnegative("lr", lr)

    def checked(p: Any) -> Tensor:
        value = loss_fn(p)
        if not isinstance(value, Tensor):
            raise ValueError(
                f"loss_fn must return a tensor computed from its parameters, got {type(value).__name__}: "
                "return the loss tensor itself (not loss.item() or float(loss))"
            )
        if value.dim() > 1:
            raise ValueError(f"loss_fn must return a scalar or one loss per instance [K], got shape {list(value.shape)}")
        return value

    if _is_zero(lr):
        return checked(params)

    def summed(p: Any) -> tuple[Tensor, Tensor]:
        value = checked(p)
        return value.sum(), value

    gradients, value = grad(summed, has_aux=True)(params)
    leaves = tree_leaves(gradients)
    if value.dim() == 0:
        squared_norm = sum(g.pow(2).sum() for g in leaves)
    else:
        for g in leaves:
            if g.dim() == 0 or g.shape[0] != value.shape[0]:
                raise ValueError(
                    f"loss_fn returned {value.shape[0]} per-instance losses, so every parameter leaf must be "
                    f"[{value.shape[0]}, ...] (one row per instance), got a leaf of shape {list(g.shape)}"
                )
        squared_norm = sum(_rows(g.pow(2)).sum(1) for g in leaves)
    return value + (lr / 4) * squared_norm


# --------------------------------------------------------------------------------------------
# Tangent prop (Simard et al., 1992)


def directional_derivatives(forward: Forward, inputs: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs and their derivatives along tangent vectors, by Jacobian-vector products.

    One forward-mode pass per tangent direction (``torch.func.jvp``, vectorised over the
    directions); the Jacobian is never formed.

    Args:
        forward: the network, ``[B, ...] -> outputs [B, ...]``.
        inputs: ``[B, ...]``.
        tangents: one direction per example ``[B, ...]`` (shaped like ``inputs``) or T of
            them ``[T, B, ...]`` (T = 0: no derivatives, a zero penalty).

    Returns:
        ``(outputs [B, ...], derivatives)``: ``derivatives`` is ``J_f(x_i) t_i`` for every
        example, ``[B, ...out]`` or ``[T, B, ...out]`` like ``tangents``.
    """
    _check_inputs(inputs)
    _check_like_inputs("tangents", tangents, inputs)
    if tangents.shape == inputs.shape:
        return _transform(jvp)(forward, (inputs,), (tangents,))
    if tangents.dim() != inputs.dim() + 1 or tangents.shape[1:] != inputs.shape:
        raise ValueError(f"tangents must be shaped like inputs {list(inputs.shape)} or [T, *that], got {list(tangents.shape)}")
    if tangents.shape[0] == 0:  # no directions: vmap would give no outputs to return
        outputs = forward(inputs)
        return outputs, outputs.new_zeros(0, *outputs.shape)
    # One vmapped call yields the outputs with the derivatives, so a random layer (dropout) uses
    # one mask for the outputs and every direction.
    outputs, derivatives = _transform(vmap(lambda t: jvp(forward, (inputs,), (t,)), randomness="same"))(tangents)
    return outputs[0], derivatives


def tangent_penalty(forward: Forward, inputs: Tensor, tangents: Tensor, *, reduction: str = "mean") -> Tensor:
    """Tangent prop: ``Σ_t ||J_f(x_i) t||²`` per example, the squared output change along each tangent.

    Penalising it makes the network invariant, to first order, to the transformations the
    tangents generate (small translations and rotations: :func:`image_tangents`; for a
    scalar function of a scalar, tangent 1 penalises the slope f'(x)²).

    Args:
        forward: the network, ``[B, ...] -> outputs [B, ...]``.
        inputs: ``[B, ...]``.
        tangents: ``[B, ...]`` (one per example) or ``[T, B, ...]``.
        reduction: ``"mean"`` (default) or ``"sum"`` over examples, or ``"none"`` for ``[B]``.

    Returns:
        The penalty: a scalar, or ``[B]`` with ``reduction="none"``.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    _, derivatives = directional_derivatives(forward, inputs, tangents)
    if tangents.shape == inputs.shape:
        derivatives = derivatives.unsqueeze(0)
    per_example = _rows(derivatives.pow(2), 2).sum(2).sum(0)
    return _reduce(per_example, reduction)


_IMAGE_TANGENTS = ("translate_x", "translate_y", "rotate")


def image_tangents(images: Tensor, kinds: tuple[str, ...] = _IMAGE_TANGENTS, *, sigma: float = 1.0) -> Tensor:
    """Tangent vectors of small image transformations, from the smoothed image's gradient (Simard et al.).

    ``translate_x``/``translate_y``: the change of the image per pixel of shift right/down,
    ``-∂I/∂u`` and ``-∂I/∂v``; ``rotate``: the change per radian of rotation about the
    image centre, ``v ∂I/∂u - u ∂I/∂v`` (``u``, ``v`` the column and row offsets from the
    centre). Derivatives are central differences of the image blurred with a Gaussian of
    standard deviation ``sigma`` pixels (``0`` for none), so the tangents stay meaningful on
    sharp strokes.

    Args:
        images: ``[B, C, H, W]``.
        kinds: which tangents, in order, from ``translate_x``, ``translate_y``, ``rotate``.
        sigma: blur in pixels, >= 0.

    Returns:
        ``[T, B, C, H, W]`` with ``T = len(kinds)`` (the ``tangents`` of :func:`tangent_penalty`).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}: convert them first (images.float() / 255 for bytes)")
    if isinstance(kinds, str):
        raise ValueError(f"kinds must be a sequence of tangent names, got the string {kinds!r}: use ({kinds!r},)")
    if len(kinds) == 0:
        raise ValueError(f"kinds must name at least one tangent of {', '.join(map(repr, _IMAGE_TANGENTS))}")
    for kind in kinds:
        _check_choice("tangent kind", kind, _IMAGE_TANGENTS)
    _check_nonnegative("sigma", sigma)
    batch, channels, height, width = images.shape
    planes = images.reshape(batch * channels, 1, height, width)
    if sigma > 0:
        radius = max(1, math.ceil(3 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        planes = nn.functional.conv2d(planes, kernel.view(1, 1, 1, -1), padding=(0, radius))
        planes = nn.functional.conv2d(planes, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    difference = torch.tensor([-0.5, 0.0, 0.5], dtype=images.dtype, device=images.device)
    d_du = nn.functional.conv2d(planes, difference.view(1, 1, 1, 3), padding=(0, 1)).view_as(images)
    d_dv = nn.functional.conv2d(planes, difference.view(1, 1, 3, 1), padding=(1, 0)).view_as(images)
    u = torch.arange(width, dtype=images.dtype, device=images.device) - (width - 1) / 2
    v = torch.arange(height, dtype=images.dtype, device=images.device)[:, None] - (height - 1) / 2
    fields = {"translate_x": -d_du, "translate_y": -d_dv, "rotate": v * d_du - u * d_dv}
    return torch.stack([fields[kind] for kind in kinds])


# --------------------------------------------------------------------------------------------
# Gradient supervision (Teney et al., 2020)


def gradient_supervision_loss(
    forward: Forward,
    inputs: Tensor,
    counterfactuals: Tensor,
    counterfactual_labels: Tensor,
    *,
    reduction: str = "mean",
) -> Tensor:
    """``1 - cos(g_i, x_cf_i - x_i)`` per pair, ``g_i`` the input gradient of the counterfactual class's logit at ``x_i``.

    For a pair of minimally different inputs with different labels, the step from ``x_i`` to
    its counterfactual ``x_cf_i`` is what changes the label, so the direction in which the
    logit of ``x_cf_i``'s ground-truth class grows fastest at ``x_i`` should point along it
    (Teney, Abbasnejad & van den Hengel, ECCV 2020, eq. 3: ``g_i = ∇ₓ f(x_i) · y_j``). The
    cosine is taken per pair over all input features, never over the whole batch. 0 when
    aligned, 2 when opposite, 1 (with zero gradient) when ``g_i`` or ``x_cf_i - x_i`` is zero;
    add it (weighted) to the task loss. Use both directions of a
    pair by also passing ``(x_cf, x)`` with ``x``'s labels.

    Args:
        forward: the network, ``[B, ...] -> logits [B, C]``.
        inputs: ``x``, ``[B, ...]``.
        counterfactuals: ``x_cf``, ``[B, ...]``, of the inputs' dtype and device.
        counterfactual_labels: integer ``[B]`` (any integer dtype), the ground-truth classes of
            ``x_cf``, each from 0 to C - 1. On the CPU a ValueError names one outside (under
            ``torch.func.vmap`` and ``grad`` too). On an accelerator they are not checked, which
            would stop the host on every call: an out-of-range label meets torch's own index
            check, on CUDA a device-side assert that leaves the process's CUDA context unusable,
            so check them once where they are made (``labels.max() < C``).
        reduction: ``"mean"`` (default) or ``"sum"`` over pairs, or ``"none"`` for ``[B]``.

    Returns:
        The loss: a scalar, or ``[B]`` with ``reduction="none"``.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_inputs(inputs)
    _check_like_inputs("counterfactuals", counterfactuals, inputs)
    if counterfactuals.shape != inputs.shape:
        raise ValueError(f"counterfactuals {list(counterfactuals.shape)} must be shaped like inputs {list(inputs.shape)}")
    if (
        counterfactual_labels.shape != inputs.shape[:1]
        or counterfactual_labels.is_floating_point()
        or counterfactual_labels.is_complex()
        or counterfactual_labels.dtype == torch.bool
    ):
        raise ValueError(
            f"counterfactual_labels must be integer classes, one per pair, shape [{inputs.shape[0]}]; "
            f"got {counterfactual_labels.dtype} of shape {list(counterfactual_labels.shape)}"
        )
    labels = counterfactual_labels.long()  # gather takes int64 indices; labels read from files are often uint8

    def target_logits(x: Tensor) -> Tensor:
        logits = forward(x)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"forward must return logits [B, C] = [{x.shape[0]}, C], got shape {list(logits.shape)}")
        _check_classes("counterfactual_labels", labels, logits.shape[1])
        return logits.gather(1, labels.unsqueeze(1)).sum()

    gradients = _transform(grad(target_logits))(inputs)
    # Not F.cosine_similarity: its norm floor (1e-8) makes tiny aligned gradients score far from 0.
    cosine = (_unit_rows(_rows(gradients)) * _unit_rows(_rows(counterfactuals - inputs))).sum(1)
    return _reduce(1.0 - cosine, reduction)
