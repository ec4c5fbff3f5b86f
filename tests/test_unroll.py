"""The batched unroll: K instances equal K separate runs; meta-gradients equal finite differences."""

import pytest
import torch

from l2l.meta.unroll import detach_carry, run, start, unroll, value_and_grad
from l2l.optimizers import Adam, CoordinateWiseLSTM
from l2l.tasks import QuadraticFamily, QuadraticTask
from l2l.tasks.base import Task

from gpu import CUDA, needs_cuda


def test_k_instances_equal_k_separate_unrolls():
    lstm = CoordinateWiseLSTM(seed=1).double()
    task = QuadraticFamily(dim=6).sample(5, torch.Generator().manual_seed(3))
    task = QuadraticTask(task.W.double(), task.y.double())
    losses, carry = run(lstm, task, 15)
    assert losses.shape == (16, 5)
    for k in range(5):
        alone = QuadraticTask(task.W[k : k + 1], task.y[k : k + 1])
        alone_losses, alone_carry = run(lstm, alone, 15)
        torch.testing.assert_close(losses[:, k], alone_losses[:, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(carry.params[k], alone_carry.params[0], rtol=1e-10, atol=1e-12)


def test_truncations_compose_into_one_long_unroll(lstm, quadratics):
    whole, _ = run(lstm, quadratics, 12)
    with torch.no_grad():
        carry = start(lstm, quadratics)
        parts = []
        for _ in range(3):
            losses, carry = unroll(lstm, quadratics, carry, 4)
            parts.append(losses)
            assert torch.equal(carry.loss, losses[-1])  # the loss at the carried params
            carry = detach_carry(carry)
    torch.testing.assert_close(torch.cat([whole[:1], *parts]), whole)
    assert carry.step == 12


def test_a_truncation_hands_on_a_carry_cut_from_the_graph(lstm, quadratics):
    """Truncated BPTT: the next truncation's meta-gradient must not reach back through this one's state."""
    losses, carry = unroll(lstm, quadratics, start(lstm, quadratics), 3)
    assert losses.requires_grad
    detached = detach_carry(carry)
    assert type(detached.opt_state) is type(carry.opt_state)
    for tensor in (detached.params, *detached.opt_state):
        assert not tensor.requires_grad and tensor.grad_fn is None
    assert carry.opt_state.h.requires_grad  # what was cut


def test_value_and_grad_matches_closed_form(quadratics):
    params = torch.randn(8, 10)
    loss, grad = value_and_grad(quadratics, params)
    residual = torch.bmm(quadratics.W, params[..., None]).squeeze(-1) - quadratics.y
    torch.testing.assert_close(loss, residual.pow(2).sum(-1))
    torch.testing.assert_close(grad, 2 * torch.bmm(quadratics.W.transpose(1, 2), residual[..., None]).squeeze(-1))


class AutogradQuadratic(QuadraticTask):
    """The same quadratic without a closed-form gradient: autograd differentiates its loss."""

    def loss(self, params, batch=None):
        return super().loss(params, batch)


def _check_closed_form_is_autograds(k, d, dtype, device="cpu"):
    # The unroll takes the closed form instead of an autograd pass per step: it must not change a bit.
    task = QuadraticFamily(dim=d).sample(k, torch.Generator().manual_seed(d), device)
    task = QuadraticTask(task.W.to(dtype), task.y.to(dtype))
    params = torch.randn(k, d, dtype=dtype, generator=torch.Generator().manual_seed(k)) * 3
    params[0, 0] = -0.0
    leaf = params.to(device).requires_grad_()
    loss, grad = task.loss_and_grad(leaf)
    expected_loss = AutogradQuadratic(task.W, task.y).loss(leaf)
    (expected_grad,) = torch.autograd.grad(expected_loss.sum(), leaf)
    assert torch.equal(loss, expected_loss) and torch.equal(grad, expected_grad)
    assert not grad.requires_grad and loss.requires_grad  # the loss stays in the meta-graph, the gradient does not
    assert AutogradQuadratic(task.W, task.y).loss_and_grad(leaf) is None  # a changed loss is differentiated by autograd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,d", [(128, 10), (7, 3), (1, 1), (5, 33)])
def test_the_quadratics_closed_form_gradient_is_autograds_bit_for_bit(dtype, k, d):
    _check_closed_form_is_autograds(k, d, dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_quadratics_closed_form_gradient_is_autograds_bit_for_bit_on_cuda(dtype):
    for k, d in ((128, 10), (5, 33)):
        _check_closed_form_is_autograds(k, d, dtype, CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_order_training_is_the_same_with_or_without_the_closed_form(dtype):
    task = QuadraticFamily().sample(6, torch.Generator().manual_seed(0))
    tasks = [cls(task.W.to(dtype), task.y.to(dtype)) for cls in (QuadraticTask, AutogradQuadratic)]
    results = []
    for task in tasks:
        lstm = CoordinateWiseLSTM(seed=2).to(dtype)
        losses, carry = unroll(lstm, task, start(lstm, task), 8)
        losses.sum(0).mean().backward()
        results.append([losses, carry.params, carry.grad, *carry.opt_state, *(p.grad for p in lstm.parameters())])
    for closed_form, autograd in zip(*results):
        assert torch.equal(closed_form, autograd)


def test_a_subclass_that_changes_the_loss_gets_the_gradient_of_its_own_loss(quadratics):
    class Scaled(QuadraticTask):
        def loss(self, params, batch=None):
            return 3 * super().loss(params, batch)

    params = torch.randn(8, 10)
    _, grad = value_and_grad(Scaled(quadratics.W, quadratics.y), params)
    _, unscaled = value_and_grad(quadratics, params)
    torch.testing.assert_close(grad, 3 * unscaled)


def _meta_loss(lstm, task, steps, second_order):
    carry = start(lstm, task)
    losses, _ = unroll(lstm, task, carry, steps, second_order=second_order)
    return losses.sum(0).mean()


def _finite_difference_check(lstm, task, steps, second_order, names=("weight_out", "bias_l0", "weight_ih_l0")):
    loss = _meta_loss(lstm, task, steps, second_order)
    grads = torch.autograd.grad(loss, [dict(lstm.named_parameters())[n] for n in names])
    eps = 1e-6
    generator = torch.Generator().manual_seed(0)
    for name, grad in zip(names, grads):
        parameter = dict(lstm.named_parameters())[name]
        for _ in range(3):
            index = tuple(torch.randint(0, s, (1,), generator=generator).item() for s in parameter.shape)
            with torch.no_grad():
                original = parameter[index].item()
                parameter[index] = original + eps
                plus = _meta_loss(lstm, task, steps, second_order).item()
                parameter[index] = original - eps
                minus = _meta_loss(lstm, task, steps, second_order).item()
                parameter[index] = original
            numeric = (plus - minus) / (2 * eps)
            assert grad[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-7), (name, index)


def test_second_order_meta_gradient_matches_finite_differences():
    lstm = CoordinateWiseLSTM(hidden_size=6, seed=2, output_scale=0.1).double()
    sample = QuadraticFamily(dim=4).sample(3, torch.Generator().manual_seed(4))
    task = QuadraticTask(sample.W.double(), sample.y.double())
    _finite_difference_check(lstm, task, steps=5, second_order=True)


class LinearTask(Task):
    """f(theta) = a . theta: its gradient does not depend on theta, so first order is exact."""

    def __init__(self, a):
        self.a = a

    num_instances = property(lambda self: self.a.shape[0])
    num_params = property(lambda self: self.a.shape[1])

    def init_params(self):
        return torch.zeros_like(self.a)

    def loss(self, params, batch=None):
        return (self.a * params).sum(-1)


def test_first_order_meta_gradient_matches_finite_differences_when_exact():
    lstm = CoordinateWiseLSTM(hidden_size=6, seed=2).double()
    task = LinearTask(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    _finite_difference_check(lstm, task, steps=5, second_order=False)


def test_first_order_meta_gradient_is_that_of_the_meta_loss_with_the_optimizee_gradients_held_fixed():
    """The paper's assumption (section 2.1): the gradients fed to the LSTM do not depend on its weights."""
    lstm = CoordinateWiseLSTM(hidden_size=4, seed=2).double()
    sample = QuadraticFamily(dim=3).sample(2, torch.Generator().manual_seed(4))
    task = QuadraticTask(sample.W.double(), sample.y.double())
    fed = []
    forward = lstm.forward

    def recording(grad, state):
        fed.append(grad)
        return forward(grad, state)

    lstm.forward = recording
    meta_loss = _meta_loss(lstm, task, 4, second_order=False)
    del lstm.forward
    assert len(fed) == 4 and not any(grad.requires_grad for grad in fed)

    def held_fixed():  # the same unroll, each step's gradient the recorded constant
        params, state, total = task.init_params(), lstm.init_state(task.num_instances * task.num_params), 0.0
        for grad in fed:
            update, state = lstm(grad, state)
            params = params + update.view(params.shape)
            total = total + task.loss(params)
        return total.mean()

    assert held_fixed().item() == pytest.approx(meta_loss.item(), rel=1e-12)
    names = ("weight_out", "bias_l1", "weight_hh_l0")
    parameters = dict(lstm.named_parameters())
    grads = torch.autograd.grad(meta_loss, [parameters[name] for name in names])
    eps = 1e-6
    for name, grad in zip(names, grads):
        parameter = parameters[name]
        for index in [(0,) * parameter.dim(), tuple(s - 1 for s in parameter.shape)]:
            with torch.no_grad():
                original = parameter[index].item()
                parameter[index] = original + eps
                plus = held_fixed().item()
                parameter[index] = original - eps
                minus = held_fixed().item()
                parameter[index] = original
            assert grad[index].item() == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-8), (name, index)


def test_first_order_differs_from_second_order_on_curved_tasks():
    lstm = CoordinateWiseLSTM(hidden_size=6, seed=2).double()
    sample = QuadraticFamily(dim=4).sample(3, torch.Generator().manual_seed(4))
    task = QuadraticTask(sample.W.double(), sample.y.double())
    first = torch.autograd.grad(_meta_loss(lstm, task, 5, False), lstm.weight_out)[0]
    second = torch.autograd.grad(_meta_loss(lstm, task, 5, True), lstm.weight_out)[0]
    assert not torch.allclose(first, second)


def test_unroll_works_for_baselines_and_under_no_grad(quadratics):
    losses, carry = run(Adam(lr=0.1), quadratics, 50)
    assert losses.shape == (51, 8)
    assert (losses[-1] < losses[0]).all()
    assert carry.step == 50 and not carry.params.requires_grad


def test_bad_loss_shape_is_reported(quadratics):
    class Broken(QuadraticTask):
        def loss(self, params, batch=None):
            return super().loss(params).sum()

    with pytest.raises(ValueError, match=r"one loss per instance, shape \[8\], got \[\]"):
        run(Adam(), Broken(quadratics.W, quadratics.y), 1)


def test_bad_param_shape_is_reported(quadratics):
    with pytest.raises(ValueError, match=r"params of shape \[K, n\] = \[8, 10\], got \[8, 9\]"):
        quadratics.loss(torch.zeros(8, 9))


def test_a_task_that_draws_minibatches_refuses_to_run_without_a_generator_and_leaves_the_global_rng_alone():
    # generator=None drew every step's minibatch (and dropout masks) from torch's global RNG: two
    # identical calls gave different losses and the caller's random stream moved, though every
    # other l2l entry point follows a seed and leaves the global RNG alone.
    from helpers import TinyMLPFamily

    task = TinyMLPFamily().sample(2, torch.Generator().manual_seed(0))
    rule = Adam(lr=0.1)
    before = torch.random.get_rng_state()
    needs = r"ModuleTask draws a new minibatch every step.*pass generator=torch\.Generator\(device='cpu'\)\.manual_seed\(0\)"
    with pytest.raises(ValueError, match=needs):
        run(rule, task, 2)
    with pytest.raises(ValueError, match=needs):
        start(rule, task)
    carry = start(rule, task, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=needs):
        unroll(rule, task, carry, 1)
    assert torch.equal(torch.random.get_rng_state(), before)
    # With a generator a run is a function of its seed; tasks without minibatches need none.
    first, _ = run(rule, task, 2, generator=torch.Generator().manual_seed(1))
    again, _ = run(rule, task, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    run(rule, QuadraticFamily(dim=3).sample(2, torch.Generator().manual_seed(0)), 2)
