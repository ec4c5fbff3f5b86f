"""Gradient-level objectives against explicit formulas, autograd references and finite differences."""

import math
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from l2l.meta.unroll import value_and_grad
from l2l.objectives import (
    GradReverse,
    adversarial_example,
    directional_derivatives,
    grad_reverse,
    gradient_supervision_loss,
    image_tangents,
    input_gradient_penalty,
    parameter_gradient_penalty,
    per_example_cross_entropy,
    reversal_coefficient,
    tangent_penalty,
)
from l2l.tasks.module import ModuleFamily, SupervisedData


def tanh_net(inputs=5, classes=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, 7), nn.Tanh(), nn.Linear(7, classes)).to(dtype)


def batch(examples=6, inputs=5, classes=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(examples, inputs, generator=g, dtype=dtype), torch.randint(0, classes, (examples,), generator=g)


def input_gradients(model, x, y):
    """Reference: per-example input gradients by ordinary autograd, create_graph=True."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(per_example_cross_entropy(model(x), y).sum(), x, create_graph=True)
    return g


# ---------------------------------------------------------------------------------------------
# Gradient reversal


@pytest.mark.parametrize("coeff", [0.0, 0.3, 2.0, torch.tensor(0.7)])
def test_grad_reverse_is_identity_forward_and_negated_scaled_gradient_backward(coeff):
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = grad_reverse(x, coeff)
    assert torch.equal(y, x)
    (gx,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(gx, -float(coeff) * upstream)


def test_grad_reverse_gives_no_gradient_to_coeff_and_composes_with_vmap_and_module():
    coeff = torch.tensor(0.5, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    gx, gc = torch.autograd.grad((grad_reverse(x, coeff) * 2).sum(), (x, coeff), allow_unused=True)
    assert gc is None and torch.equal(gx, torch.full((3,), -1.0))
    layer = GradReverse(0.25)
    batched = torch.func.vmap(torch.func.grad(lambda v: layer(v).pow(2).sum()))(x.detach().expand(4, 3))
    torch.testing.assert_close(batched, -0.25 * 2 * x.detach().expand(4, 3))
    assert "coeff=0.25" in repr(layer)


def test_reversal_coefficient_is_the_papers_schedule_and_arguments_are_validated():
    assert reversal_coefficient(0.0) == 0.0
    assert reversal_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert reversal_coefficient(0.25) == pytest.approx(2 / (1 + math.exp(-2.5)) - 1)
    with pytest.raises(ValueError, match=r"^Invalid progress: 1.5 \(must be in \[0, 1\]\)$"):
        reversal_coefficient(1.5)
    with pytest.raises(ValueError, match=r"^Invalid coeff: -1.0 \(must be >= 0\)$"):
        grad_reverse(torch.zeros(1), -1.0)
    with pytest.raises(ValueError, match=r"^Invalid eps: -1.0 \(must be >= 0\)$"):
        input_gradient_penalty(nn.Identity(), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), -1.0)
    with pytest.raises(ValueError, match=r"^Invalid norm: 'l3' \(must be one of 'l1', 'l2', 'linf'\)$"):
        adversarial_example(nn.Identity(), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 0.1, "l3")
    with pytest.raises(ValueError, match=r"^Invalid lr: nan \(must be >= 0\)$"):
        parameter_gradient_penalty(lambda p: p.sum(), torch.zeros(2), float("nan"))
    with pytest.raises(ValueError, match=r"loss_fn must return a tensor computed from its parameters, got float"):
        parameter_gradient_penalty(lambda p: 1.0, torch.zeros(2), 0.1)


# ---------------------------------------------------------------------------------------------
# Input-gradient penalty


@pytest.mark.parametrize("norm, dual", [("l2", 2.0), ("linf", 1.0), ("l1", math.inf)])
def test_input_gradient_penalty_is_loss_plus_eps_times_the_dual_norm_of_the_input_gradient(norm, dual):
    model = tanh_net()
    x, y = batch()
    eps = 0.3
    penalized = input_gradient_penalty(model, x, y, eps, norm, reduction="none")
    expected = per_example_cross_entropy(model(x), y) + eps * torch.linalg.vector_norm(input_gradients(model, x, y), ord=dual, dim=1)
    torch.testing.assert_close(penalized, expected)
    torch.testing.assert_close(input_gradient_penalty(model, x, y, eps, norm), expected.mean())


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
def test_input_gradient_penalty_is_the_first_order_loss_at_the_adversarial_example(norm):
    model = tanh_net()
    x, y = batch()
    errors = []
    for eps in (1e-1, 1e-2, 1e-3):
        x_adv = adversarial_example(model, x, y, eps, norm)
        perturbation = torch.linalg.vector_norm(x_adv - x, ord={"l2": 2.0, "linf": math.inf, "l1": 1.0}[norm], dim=1)
        torch.testing.assert_close(perturbation, torch.full((6,), eps, dtype=torch.float64))
        with torch.no_grad():
            actual = per_example_cross_entropy(model(x_adv), y)
        errors.append((actual - input_gradient_penalty(model, x, y, eps, norm, reduction="none")).abs().max().item())
    # The remainder is second order: each tenfold smaller eps shrinks it about a hundredfold.
    assert errors[1] < errors[0] / 30 and errors[2] < errors[1] / 30, errors


def test_input_gradient_penalty_trains_like_the_create_graph_reference():
    model = tanh_net()
    x, y = batch()
    input_gradient_penalty(model, x, y, 0.5).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = per_example_cross_entropy(model(x), y) + 0.5 * input_gradients(model, x, y).norm(dim=1)
    reference.mean().backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_adversarial_example_raises_the_loss_on_a_trained_direction():
    model = tanh_net()
    x, y = batch()
    x_adv = adversarial_example(model, x, y, 0.2)
    assert not x_adv.requires_grad
    with torch.no_grad():
        assert (per_example_cross_entropy(model(x_adv), y) > per_example_cross_entropy(model(x), y)).all()


# ---------------------------------------------------------------------------------------------
# Parameter-gradient penalty


def test_parameter_penalty_gradient_equals_autograd_of_the_explicit_formula():
    model = tanh_net()
    x, y = batch()
    params = dict(model.named_parameters())
    lr = 0.3
    objective = parameter_gradient_penalty(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y), params, lr)
    ours = torch.autograd.grad(objective, list(params.values()))
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    explicit = loss + lr / 4 * sum(g.pow(2).sum() for g in grads)
    torch.testing.assert_close(objective, explicit)
    for a, b in zip(ours, torch.autograd.grad(explicit, list(params.values()))):
        torch.testing.assert_close(a, b)


def test_parameter_penalty_matches_finite_differences():
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def loss_fn(t):
        return torch.log1p((a @ t).pow(2)).sum()

    def explicit(t):
        gradient = 2 * a.T @ ((a @ t) / (1 + (a @ t).pow(2)))
        return loss_fn(t) + 0.1 / 4 * gradient.pow(2).sum()

    (ours,) = torch.autograd.grad(parameter_gradient_penalty(loss_fn, theta, 0.1), theta)
    h = 1e-6
    basis = torch.eye(4, dtype=torch.float64)
    numeric = torch.stack([(explicit(theta.detach() + h * e) - explicit(theta.detach() - h * e)) / (2 * h) for e in basis])
    torch.testing.assert_close(ours, numeric, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Tangent prop


def test_tangent_penalty_equals_the_explicit_jacobian_times_the_tangents():
    model = tanh_net()
    x, _ = batch()
    tangents = torch.randn(2, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outputs, derivatives = directional_derivatives(model, x, tangents)
    torch.testing.assert_close(outputs, model(x))
    for i in range(x.shape[0]):
        jacobian = torch.autograd.functional.jacobian(model, x[i])  # [classes, inputs]
        for t in range(2):
            torch.testing.assert_close(derivatives[t, i], jacobian @ tangents[t, i])
    explicit = torch.stack([
        sum((torch.autograd.functional.jacobian(model, x[i]) @ tangents[t, i]).pow(2).sum() for t in range(2))
        for i in range(x.shape[0])
    ])
    torch.testing.assert_close(tangent_penalty(model, x, tangents, reduction="none"), explicit)
    torch.testing.assert_close(tangent_penalty(model, x, tangents[0]), explicit.new_tensor(
        [(torch.autograd.functional.jacobian(model, x[i]) @ tangents[0, i]).pow(2).sum() for i in range(6)]).mean())


def test_tangent_penalty_trains_like_double_backward():
    model = tanh_net()
    x, _ = batch()
    tangent = torch.randn_like(x)
    params = list(model.parameters())
    ours = torch.autograd.grad(tangent_penalty(model, x, tangent), params, materialize_grads=True)
    # Double-backward JVP: J t = d/du <u, J t>, with <u, J t> = (J^T u) . t from reverse mode.
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    u = torch.zeros_like(out, requires_grad=True)
    (vjp,) = torch.autograd.grad(out, xr, u, create_graph=True)
    (jvp_out,) = torch.autograd.grad((vjp * tangent).sum(), u, create_graph=True)
    reference = torch.autograd.grad(jvp_out.pow(2).sum(1).mean(), params, materialize_grads=True)
    assert reference[-1].abs().max() == 0  # The last bias does not move the slope.
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


def smooth_images():
    v, u = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((u - 9.0) ** 2 + (v - 6.0) ** 2) / 8.0) + 0.5 * torch.exp(-((u - 4.0) ** 2 + (v - 10.0) ** 2) / 5.0)
    return torch.stack([blob, blob.flip(1)]).unsqueeze(1).double()  # [2, 1, 16, 16]


def test_image_tangents_match_finite_differences_of_shifted_and_rotated_images():
    images = smooth_images()
    tx, ty, rot = image_tangents(images, sigma=0.0)

    def warp(shift_x=0.0, shift_y=0.0, angle=0.0):
        # Output pixel p samples the input at R(-angle) p - shift: the image moved by +shift, rotated by +angle.
        c, s = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[c, s, -shift_x * 2 / 15], [-s, c, -shift_y * 2 / 15]], dtype=torch.float64)
        grid = nn.functional.affine_grid(theta.expand(2, 2, 3), list(images.shape), align_corners=True)
        return nn.functional.grid_sample(images, grid, align_corners=True, padding_mode="zeros")

    h = 1e-3
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(tx[inner], ((warp(shift_x=h) - warp(shift_x=-h)) / (2 * h))[inner], atol=1e-6, rtol=0)
    torch.testing.assert_close(ty[inner], ((warp(shift_y=h) - warp(shift_y=-h)) / (2 * h))[inner], atol=1e-6, rtol=0)
    torch.testing.assert_close(rot[inner], ((warp(angle=h) - warp(angle=-h)) / (2 * h))[inner], atol=2e-3, rtol=0)
    assert min(tx.abs().max(), ty.abs().max(), rot.abs().max()) > 0.2  # The comparisons are not vacuous.
    assert image_tangents(images, ("rotate",), sigma=1.0).shape == (1, 2, 1, 16, 16)


# ---------------------------------------------------------------------------------------------
# Gradient supervision


def test_gradient_supervision_is_zero_when_aligned_two_when_opposite_per_pair():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3, bias=True).double()  # The input gradient of logit c is linear.weight[c] everywhere.
    x = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1])
    w = linear.weight.detach()[labels]
    orthogonal = torch.linalg.svd(w[2:3], full_matrices=True).Vh[1]
    # Differences of very different sizes: one cosine over the whole batch would not give these values.
    counterfactuals = x + torch.stack([1000.0 * w[0], -0.01 * w[1], orthogonal])
    per_pair = gradient_supervision_loss(linear, x, counterfactuals, labels, reduction="none")
    torch.testing.assert_close(per_pair, torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(gradient_supervision_loss(linear, x, counterfactuals, labels), per_pair.mean())


def test_gradient_supervision_equals_autograd_per_pair_on_a_nonlinear_net():
    model = tanh_net()
    x, labels = batch()
    counterfactuals = x + torch.randn_like(x)
    ours = gradient_supervision_loss(model, x, counterfactuals, labels, reduction="none")
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[0, labels[i]], xi)
        expected = 1 - nn.functional.cosine_similarity(g.flatten(), (counterfactuals[i] - x[i]).flatten(), dim=0)
        torch.testing.assert_close(ours[i], expected)


# ---------------------------------------------------------------------------------------------
# All of them inside a K-instance ModuleTask (vmap over instances, gradients w.r.t. params [K, n])


def small_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def fake_data(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 2, 3, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return SupervisedData(x[:30], y[:30], x[30:], y[30:])


def with_reversal():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), GradReverse(0.7), nn.Linear(5, 3))


def two_tangents(x):
    """Two tangent directions per example, ``[2, B, ...]``: all ones, and -0.5 times that."""
    return torch.ones_like(x).expand(2, *x.shape) * x.new_tensor([1.0, -0.5]).view(2, *[1] * x.dim())


OBJECTIVES = {
    "input-gradient-penalty": (small_net, lambda f, x, y: input_gradient_penalty(f, x, y, 0.3, "linf")),
    "tangent-penalty": (small_net, lambda f, x, y: nn.functional.cross_entropy(f(x), y) + tangent_penalty(f, x, two_tangents(x))),
    "gradient-supervision": (small_net, lambda f, x, y: gradient_supervision_loss(f, x, x.flip(0), y.flip(0))),
    "grad-reverse": (with_reversal, lambda f, x, y: nn.functional.cross_entropy(f(x), y)),
}


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objectives_in_k_instance_tasks_equal_each_instance_computed_directly(name, vectorize):
    factory, objective = OBJECTIVES[name]
    family = ModuleFamily(factory, fake_data, batch_size=8, objective=objective, vectorize=vectorize)
    task = family.sample(3, torch.Generator().manual_seed(1))
    params = task.init_params()
    inputs, labels, _ = task.sample_batch(torch.Generator().manual_seed(2))
    loss, grad = value_and_grad(task, params, (inputs, labels))
    for k in range(3):
        module = factory()
        nn.utils.vector_to_parameters(params[k].clone(), module.parameters())
        direct = objective(module, inputs[k], labels[k])
        direct_grads = torch.autograd.grad(direct, list(module.parameters()), materialize_grads=True)
        torch.testing.assert_close(loss[k], direct.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[k], torch.cat([g.reshape(-1) for g in direct_grads]), rtol=1e-4, atol=1e-6)


def test_parameter_penalty_over_k_instances_penalizes_each_instance_by_its_own_gradient():
    task = ModuleFamily(small_net, fake_data, batch_size=8).sample(3, torch.Generator().manual_seed(1))
    params = task.init_params().requires_grad_(True)
    batch_ = task.sample_batch(torch.Generator().manual_seed(2))
    penalized = parameter_gradient_penalty(lambda p: task.loss(p, batch_), params, 0.5)
    assert penalized.shape == (3,)
    (gradient,) = torch.autograd.grad(penalized.sum(), params)
    for k in range(3):
        module = small_net()
        named = dict(module.named_parameters())
        flat = params[k].detach().clone().requires_grad_(True)
        pieces = dict(zip(named, (t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in named.values()]), named.values()))))
        loss = nn.functional.cross_entropy(functional_call(module, pieces, (batch_[0][k],)), batch_[1][k])
        (g,) = torch.autograd.grad(loss, flat, create_graph=True)
        explicit = loss + 0.5 / 4 * g.pow(2).sum()
        torch.testing.assert_close(penalized[k], explicit, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gradient[k], torch.autograd.grad(explicit, flat)[0], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input and edge cases: clear errors, no silent wrong values


def test_a_loss_that_is_not_one_value_per_example_is_refused():
    model, (x, y) = tanh_net(), batch()
    with pytest.raises(ValueError, match=r"loss must return one loss per example, shape \[6\], got \[\].*reduction='none'"):
        input_gradient_penalty(model, x, y, 0.5, loss=nn.functional.cross_entropy)
    regression = nn.Linear(5, 1).double()
    with pytest.raises(ValueError, match=r"shape \[6\], got \[6, 1\]"):
        input_gradient_penalty(regression, x, torch.zeros(6, 1, dtype=torch.float64), 0.5, loss=lambda out, t: (out - t) ** 2)


def test_one_feature_per_example_inputs_and_outputs_are_accepted():
    net = nn.Sequential(nn.Unflatten(0, (-1, 1)), nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))  # [B] -> [B]
    x = torch.linspace(-1, 1, 5)
    value = input_gradient_penalty(net, x, torch.zeros(5), 0.1, loss=lambda out, t: (out - t) ** 2)
    assert value.shape == ()
    slopes = tangent_penalty(net, x, torch.ones(5), reduction="none")
    torch.testing.assert_close(slopes, torch.func.vmap(torch.func.grad(lambda v: net(v.view(1))[0]))(x) ** 2)


def test_the_l2_attack_keeps_its_radius_when_the_input_gradient_is_tiny():
    # Saturated sigmoid units: the input gradient is ~1e-24 per pixel, whose squares underflow float32.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 8), nn.Sigmoid(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].bias.fill_(-55.0)
    x, y = torch.rand(4, 20), torch.tensor([0, 1, 2, 0])
    gradients, _ = torch.func.grad_and_value(lambda v: per_example_cross_entropy(net(v), y).sum())(x)
    assert 0 < gradients.abs().max() < 1e-18
    moved = adversarial_example(net, x, y, eps=1.0, norm="l2")
    torch.testing.assert_close(torch.linalg.vector_norm(moved - x, dim=1), torch.ones(4))


def test_batch_norm_in_training_mode_gets_an_error_naming_the_fixes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = batch()
    for call in (lambda: input_gradient_penalty(net, x, y, 0.5),
                 lambda: tangent_penalty(net, x, torch.randn(2, 6, 5, dtype=torch.float64)),
                 lambda: gradient_supervision_loss(net, x, x + 1, y)):
        with pytest.raises(ValueError, match=r"changes a buffer in place.*\.eval\(\).*track_running_stats=False"):
            call()
    net.eval()
    assert torch.isfinite(input_gradient_penalty(net, x, y, 0.5))


def test_tangents_see_the_outputs_dropout_mask():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.5), nn.Linear(5, 3, bias=False)).double()  # linear: f(x) = J x with the mask in J
    x = torch.randn(6, 5, dtype=torch.float64)
    outputs, derivatives = directional_derivatives(net, x, torch.stack([x, x, 2 * x]))
    torch.testing.assert_close(derivatives[0], outputs)  # the derivative along x is f(x) under the same mask
    torch.testing.assert_close(derivatives[2], 2 * outputs)


def test_gradient_supervision_checks_its_labels_and_is_scale_invariant_for_tiny_gradients():
    linear = nn.Linear(4, 3).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"counterfactual_labels must be integer classes, one per pair, shape \[3\]"):
        gradient_supervision_loss(linear, x, x + 1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="got torch.float64"):
        gradient_supervision_loss(linear, x, x + 1, torch.zeros(3, dtype=torch.float64))
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        linear.weight.mul_(1e-12)  # input gradients of norm ~1e-12: F.cosine_similarity's floor is 1e-8
    aligned = x + linear.weight.detach()[labels] * 1e12
    torch.testing.assert_close(gradient_supervision_loss(linear, x, aligned, labels, reduction="none"), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 3, 1], "counterfactual_labels holds class 3 (at pair 1), but forward returns logits for 3 classes: "
                    "labels must be from 0 to 2"),
        ([0, -1, 2], "counterfactual_labels holds class -1 (at pair 1), but forward returns logits for 3 classes: "
                     "labels must be from 0 to 2"),
    ],
    ids=["too large", "negative"],
)
def test_gradient_supervision_names_a_label_out_of_range_and_the_valid_range(labels, message):
    linear = nn.Linear(4, 3).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        gradient_supervision_loss(linear, x, x + 1, torch.tensor(labels))


@pytest.mark.parametrize("nesting", ["vmap", "vmap of vmap", "grad"])
def test_gradient_supervision_names_a_label_out_of_range_under_torch_func_on_the_cpu(nesting):
    # Under vmap (a ModuleTask objective's K instances) the labels are batched tensors: torch's raw
    # "index 3 is out of bounds for dimension 1 with size 3" came instead, naming no argument.
    linear = nn.Linear(4, 3).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2], [2, 3, 0]])
    if nesting == "vmap":
        call = lambda: vmap(lambda x, y: gradient_supervision_loss(linear, x, x + 1, y))(x, labels)  # noqa: E731
    elif nesting == "vmap of vmap":
        per_pair = lambda x, y: gradient_supervision_loss(linear, x[None], x[None] + 1, y[None])  # noqa: E731
        call = lambda: vmap(vmap(per_pair))(x, labels)  # noqa: E731
    else:  # labels traced by an outer grad over a function of them: the values are still the ones given
        call = lambda: grad(lambda w: gradient_supervision_loss(  # noqa: E731
            lambda v: linear(v) * w, x[1], x[1] + 1, labels[1] + 0 * w.long()))(torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^counterfactual_labels holds class 3 \((at pair 1|in a batch of pairs under "
                                         r"torch\.func)\), but forward returns logits for 3 classes: labels must be from 0 to 2$"):
        call()
    good = labels.clamp(max=2)
    torch.testing.assert_close(vmap(lambda x, y: gradient_supervision_loss(linear, x, x + 1, y, reduction="none"))(x, good),
                               torch.stack([gradient_supervision_loss(linear, x[k], x[k] + 1, good[k], reduction="none") for k in range(2)]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_gradient_supervision_takes_labels_of_any_integer_dtype(dtype):
    # MNIST's files hold uint8 labels; gather itself takes only int64 (and int32).
    linear = nn.Linear(4, 3).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1])
    expected = gradient_supervision_loss(linear, x, x + 1, labels, reduction="none")
    torch.testing.assert_close(gradient_supervision_loss(linear, x, x + 1, labels.to(dtype), reduction="none"), expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda: grad_reverse(torch.ones(2), torch.tensor(-2.0)),
        lambda: grad_reverse(torch.ones(2), torch.tensor(float("nan"))),
        lambda: input_gradient_penalty(tanh_net(), *batch(), eps=torch.tensor(-1.0)),
        lambda: parameter_gradient_penalty(lambda p: p.pow(2).sum(), torch.ones(2), lr=torch.tensor(-4.0)),
    ],
    ids=["negative-coeff", "nan-coeff", "negative-eps", "negative-lr"],
)
def test_hyperparameters_given_as_plain_tensors_are_checked(call):
    with pytest.raises(ValueError, match=r"Invalid (coeff|eps|lr): .*must be >= 0"):
        call()


def test_the_reversal_uses_the_coefficient_of_the_forward_pass():
    coeff = torch.tensor(1.0)
    x = torch.ones(3, requires_grad=True)
    y = grad_reverse(x, coeff).sum()
    coeff.fill_(5.0)  # a schedule stepping before backward
    (gx,) = torch.autograd.grad(y, x)
    assert torch.equal(gx, -torch.ones(3))


def test_per_instance_parameter_penalty_needs_one_row_per_instance_in_every_leaf():
    params = {"rows": torch.randn(3, 2), "shared": torch.randn(1, 2)}
    with pytest.raises(ValueError, match=r"3 per-instance losses, so every parameter leaf must be \[3, \.\.\.\].*\[1, 2\]"):
        parameter_gradient_penalty(lambda p: (p["rows"] * p["shared"]).sum(1), params, lr=0.1)


def test_gradient_supervision_of_a_zero_input_gradient_is_one_and_trains_the_other_pairs():
    # Example 0 switches every ReLU off, so its logit gradient is exactly zero: no direction to
    # align. Its pair scores 1 and must not turn the other pairs' parameter gradient into NaN.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
    x = torch.tensor([[-1.0, -2.0], [1.0, 0.5], [0.3, 2.0]], dtype=torch.float64)
    counterfactuals = x + torch.randn(3, 2, dtype=torch.float64)
    labels = torch.tensor([1, 2, 0])
    per_pair = gradient_supervision_loss(net, x, counterfactuals, labels, reduction="none")
    assert per_pair[0] == 1.0
    params = list(net.parameters())
    ours = torch.autograd.grad(per_pair.sum(), params, materialize_grads=True)
    live = gradient_supervision_loss(net, x[1:], counterfactuals[1:], labels[1:], reduction="sum")
    for a, b in zip(ours, torch.autograd.grad(live, params, materialize_grads=True)):
        torch.testing.assert_close(a, b)


def test_grad_reverse_forward_mode_is_the_identity_in_torch_func_and_dual_tensors():
    import torch.autograd.forward_ad as fwAD

    x, tangent = torch.randn(3, 4), torch.randn(3, 4)
    _, ours = torch.func.jvp(lambda v: grad_reverse(v, 0.5), (x,), (tangent,))
    assert torch.equal(ours, tangent)
    with fwAD.dual_level():
        dual = grad_reverse(fwAD.make_dual(x, tangent), torch.tensor(0.5))
        assert torch.equal(fwAD.unpack_dual(dual).tangent, tangent)


def test_hyperparameters_of_the_wrong_type_are_named_as_such_and_numpy_scalars_are_numbers():
    import numpy as np

    model, (x, y) = tanh_net(), batch()
    for value, kind in (("0.5", "str"), (True, "bool"), ([1.0], "list")):
        with pytest.raises(ValueError, match=rf"^Invalid eps: .* \(must be a number >= 0, got {kind}\)$"):
            input_gradient_penalty(model, x, y, value)
    with pytest.raises(ValueError, match=r"^Invalid coeff: inf \(must be finite\)$"):
        GradReverse(math.inf)
    torch.testing.assert_close(input_gradient_penalty(model, x, y, np.float32(0.5)), input_gradient_penalty(model, x, y, 0.5))
    assert reversal_coefficient(np.float32(0.5)) == pytest.approx(reversal_coefficient(0.5))
    with pytest.raises(ValueError, match=r"^Invalid progress: '0.5' \(must be a number in \[0, 1\], got str\)$"):
        reversal_coefficient("0.5")


def test_gradient_supervision_does_not_hide_non_finite_inputs():
    linear = nn.Linear(4, 3).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    counterfactuals = x + 1
    counterfactuals[1, 2] = float("nan")
    counterfactuals[2, 0] = float("inf")
    per_pair = gradient_supervision_loss(linear, x, counterfactuals, torch.tensor([0, 1, 2]), reduction="none")
    assert torch.isfinite(per_pair[0]) and per_pair[1:].isnan().all()
    # The input-gradient side goes through the same normalisation: NaN rows stay NaN, zero rows 0.
    from l2l.objectives import _unit_rows

    rows = _unit_rows(torch.tensor([[float("nan"), 1.0], [0.0, 0.0], [3.0, 4.0], [float("inf"), 1.0]]))
    assert rows[0].isnan().all() and rows[3].isnan().all()
    torch.testing.assert_close(rows[1:3], torch.tensor([[0.0, 0.0], [0.6, 0.8]]))


def test_mismatched_tangents_images_and_logits_get_errors_naming_the_problem():
    model, (x, y) = tanh_net(), batch()
    with pytest.raises(ValueError, match=r"tangents must have the inputs' dtype torch.float64 and device cpu, got torch.float32 on cpu: convert them with tangents.to\(inputs\)"):
        tangent_penalty(model, x, torch.randn(6, 5))
    with pytest.raises(ValueError, match=r"tangents must have the inputs' dtype torch.float64 and device cpu, got torch.float32 on cpu: convert them with tangents.to\(inputs\)"):
        directional_derivatives(model, x, torch.randn(2, 6, 5))
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"kinds must be a sequence of tangent names, got the string 'rotate': use \('rotate',\)"):
        image_tangents(images, "rotate")
    with pytest.raises(ValueError, match=r"kinds must name at least one tangent"):
        image_tangents(images, ())
    with pytest.raises(ValueError, match=r"images must be floating point, got torch.uint8"):
        image_tangents((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"counterfactual_labels must be integer classes.*got torch.bool"):
        gradient_supervision_loss(model, x, x + 1, torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"forward must return logits \[B, C\] = \[6, C\], got shape \[6\]"):
        gradient_supervision_loss(lambda v: model(v).sum(1), x, x + 1, y)


def test_hyperparameter_tensors_of_several_elements_are_checked_elementwise():
    model, (x, y) = tanh_net(), batch()
    with pytest.raises(ValueError, match=r"^Invalid coeff: a tensor holding -1.0 \(every element must be finite and >= 0\)$"):
        grad_reverse(torch.ones(3, 4), torch.tensor([0.5, -1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"^Invalid eps: a tensor holding nan"):
        input_gradient_penalty(model, x, y, torch.tensor([0.1, 0.2, float("nan"), 0.1, 0.1, 0.1], dtype=torch.float64))


def test_an_empty_batch_gives_empty_or_zero_penalties():
    # E.g. a minibatch that happens to hold no counterfactual pairs: summed, it adds nothing.
    model, (x, y) = tanh_net(), batch()
    empty_x, empty_y = x[:0], y[:0]
    total = gradient_supervision_loss(model, empty_x, empty_x + 1, empty_y, reduction="sum")
    total = total + input_gradient_penalty(model, empty_x, empty_y, 0.5, reduction="sum")
    total = total + tangent_penalty(model, empty_x, torch.ones(2, 0, 5, dtype=torch.float64), reduction="sum")
    assert total == 0
    total.backward()
    assert gradient_supervision_loss(model, empty_x, empty_x, empty_y, reduction="none").shape == (0,)
    assert adversarial_example(model, empty_x, empty_y, 0.5, "l1").shape == (0, 5)


def sqrt_net():
    """A net on sqrt(x): at a zero input its loss is finite and its input gradient infinite."""
    net = tanh_net()
    return net, lambda v: net(v.sqrt())


def test_a_zero_weight_is_the_plain_loss_exactly_even_where_a_gradient_is_infinite():
    # 0 * ||inf|| was NaN: eps = 0 (the "plain training" point of an eps sweep) returned NaN.
    net, forward = sqrt_net()
    x, y = batch()
    x = x.abs()
    x[0, 0] = 0.0
    plain = per_example_cross_entropy(forward(x), y)
    assert torch.isfinite(plain).all()
    penalized = input_gradient_penalty(forward, x, y, 0.0, reduction="none")
    assert torch.equal(penalized, plain)
    ours = torch.autograd.grad(penalized.mean(), list(net.parameters()))
    for a, b in zip(ours, torch.autograd.grad(plain.mean(), list(net.parameters()))):
        assert torch.equal(a, b)
    theta = torch.tensor([0.0, 4.0], dtype=torch.float64)
    assert parameter_gradient_penalty(lambda p: p.sqrt().sum(), theta, 0.0) == 2.0
    with pytest.raises(ValueError, match=r"loss must return one loss per example, shape \[6\], got \[\]"):
        input_gradient_penalty(forward, x, y, 0.0, loss=nn.functional.cross_entropy)


def test_byte_counterfactuals_and_integer_inputs_get_errors_naming_the_conversion():
    # uint8 counterfactuals beside float inputs were promoted silently: x_cf - x then mixed 0..255
    # with 0..1, a wrong direction and a wrong loss.
    model, (x, y) = tanh_net(), batch()
    images = (x.abs() * 100).clamp(max=255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"^counterfactuals must have the inputs' dtype torch.float64 and device cpu, "
                                         r"got torch.uint8 on cpu: convert them with counterfactuals.to\(inputs\)"):
        gradient_supervision_loss(model, x, images, y)
    with pytest.raises(ValueError, match=r"counterfactuals must have the inputs' dtype torch.float64 .* got torch.float32"):
        gradient_supervision_loss(model, x, x.float(), y)
    for call in (lambda: input_gradient_penalty(model, images, y, 0.5), lambda: adversarial_example(model, images, y, 0.5),
                 lambda: tangent_penalty(model, images, images), lambda: gradient_supervision_loss(model, images, images, y)):
        with pytest.raises(ValueError, match=r"^inputs must be floating point, got torch.uint8: convert them first "
                                             r"\(inputs.float\(\) / 255 for bytes\)$"):
            call()


def test_a_reversal_coefficient_that_would_broadcast_beyond_its_input_is_refused():
    # coeff [4, 2, 3] on x [2, 3]: backward broadcast the gradient to [4, 2, 3] and autograd summed
    # it back, a silent 4x reversal; per-feature and per-example coefficients still broadcast.
    x = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"^coeff of shape \[4, 2, 3\] does not broadcast to the input's shape \[2, 3\]"):
        grad_reverse(x, torch.ones(4, 2, 3))
    with pytest.raises(ValueError, match=r"coeff of shape \[3, 1\] does not broadcast"):
        grad_reverse(x, torch.ones(3, 1))
    (gx,) = torch.autograd.grad(grad_reverse(x, torch.tensor([[1.0], [2.0]])).sum(), x)
    assert torch.equal(gx, -torch.tensor([[1.0] * 3, [2.0] * 3]))


def test_no_tangent_directions_give_the_outputs_and_a_zero_penalty():
    # [0, B, ...] tangents (an empty list of directions stacked) raised "index 0 is out of bounds".
    model, (x, _) = tanh_net(), batch()
    outputs, derivatives = directional_derivatives(model, x, x.new_zeros(0, *x.shape))
    assert torch.equal(outputs, model(x)) and derivatives.shape == (0, 6, 3)
    assert torch.equal(tangent_penalty(model, x, x.new_zeros(0, *x.shape), reduction="none"), x.new_zeros(6))
