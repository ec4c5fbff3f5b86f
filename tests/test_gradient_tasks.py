"""mnist-gp, mnist-grl and tangent-1d: K instances equal each instance's module computed directly."""

import pytest
import torch
from torch import nn

from l2l.config import ConfigError, TrainConfig
from l2l.meta.train import MetaTrainer
from l2l.meta.unroll import run, start, unroll, value_and_grad
from l2l.objectives import adversarial_example, input_gradient_penalty
from l2l.optimizers import Adam, CoordinateWiseLSTM
from l2l.tasks import get_task
from l2l.tasks.gradient_tasks import TangentPropObjective, TwoHeadNet, two_head_loss, zero_composites
from l2l.tasks.mnist import mlp


def instance_module(module_factory, params, k):
    module = module_factory()
    nn.utils.vector_to_parameters(params[k].detach().clone(), module.parameters())
    return module


def direct_loss_and_grad(module, objective):
    loss = objective(module)
    grads = torch.autograd.grad(loss, list(module.parameters()), materialize_grads=True)
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


def perturbed_params(task, scale=0.05):
    return task.init_params() + scale * torch.randn(task.init_params().shape, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------
# tangent-1d (no dataset needed)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_tangent_1d_loss_is_squared_error_plus_weighted_squared_slope(activation):
    family = get_task("tangent-1d", activation=activation, weight=0.5)
    task = family.sample(3, torch.Generator().manual_seed(0))
    params = perturbed_params(task)
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    assert batch[0].shape == (3, 5, 1) and torch.equal(batch[0], task.sample_batch(None)[0])
    loss, grad = value_and_grad(task, params, batch)
    x = torch.linspace(0, 1, 5).unsqueeze(1)
    for k in range(3):
        module = instance_module(lambda: mlp(20, 1, activation, 1, 1), params, k)

        def explicit(m):
            xr = x.clone().requires_grad_(True)
            out = m(xr)
            (slope,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
            return (out - x).pow(2).mean() + 0.5 * slope.pow(2).mean()

        direct, direct_grad = direct_loss_and_grad(module, explicit)
        torch.testing.assert_close(loss[k], direct, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[k], direct_grad, rtol=1e-4, atol=1e-6)


def test_tangent_1d_metrics_report_fit_and_slope_and_adam_reduces_the_loss():
    task = get_task("tangent-1d").sample(4, torch.Generator().manual_seed(0))
    losses, carry = run(Adam(lr=0.03), task, 60)
    assert losses[-1].mean() < 0.5 * losses[0].mean()
    metrics = task.metrics(carry.params)
    x = torch.linspace(0, 1, 5).unsqueeze(1)
    module = instance_module(lambda: mlp(20, 1, "tanh", 1, 1), carry.params, 2)
    xr = x.clone().requires_grad_(True)
    out = module(xr)
    (slope,) = torch.autograd.grad(out.sum(), xr)
    torch.testing.assert_close(metrics["fit_mse"][2], (out - x).pow(2).mean().detach())
    torch.testing.assert_close(metrics["mean_abs_slope"][2], slope.abs().mean())


def test_family_options_are_validated_and_round_trip():
    with pytest.raises(ValueError, match=r"Invalid weight: -1 \(must be >= 0\)"):
        get_task("tangent-1d", weight=-1)
    with pytest.raises(ValueError, match=r"Invalid eps: -0.5 \(must be >= 0\)"):
        get_task("mnist-gp", eps=-0.5)
    with pytest.raises(ValueError, match=r"Invalid norm: 'l7'"):
        get_task("mnist-gp", norm="l7")
    with pytest.raises(ValueError, match="activation"):
        get_task("mnist-grl", activation="gelu")
    for name in ("tangent-1d", "mnist-gp", "mnist-grl"):
        family = get_task(name)
        assert get_task(name, **family.config()).config() == family.config()


# ---------------------------------------------------------------------------------------------
# mnist-grl


def test_zero_composites_follow_the_documented_construction():
    # Each fake "digit" image is filled with its class, so a composite's halves reveal its digits.
    labels = torch.arange(200) % 10
    images = labels.view(-1, 1, 1, 1).float().expand(-1, 1, 28, 28)
    x, y = zero_composites(images, labels, 1000, torch.Generator().manual_seed(0))
    assert x.shape == (1000, 1, 28, 56) and y.shape == (1000, 2)
    left, right = x[:, 0, 0, 0].long(), x[:, 0, 0, 28].long()
    assert torch.equal(y[:, 0], ((left == 0) | (right == 0)).long())
    assert not ((left == 0) & (right == 0)).any()
    positive = y[:, 0] == 1
    torch.testing.assert_close(y[positive, 1] + 1, torch.maximum(left, right)[positive])
    assert (y[~positive, 1] == -1).all()
    assert 0.45 < positive.double().mean() < 0.55
    assert 0.4 < (positive & (left == 0)).double().sum() / positive.sum() < 0.6  # Zeros on both sides.


@pytest.mark.parametrize("adversary_hidden", [0, 5])
def test_two_head_loss_reverses_the_adversary_gradient_into_the_features(adversary_hidden):
    torch.manual_seed(0)
    net = TwoHeadNet(hidden=6, coeff=0.4, adversary_hidden=adversary_hidden)
    x = torch.rand(10, 1, 28, 56)
    y = torch.stack([torch.tensor([1, 0] * 5), torch.tensor([3, -1] * 5)], dim=1)
    features, adversary = net.features[1].weight, list(net.adversary_head.parameters())[0]
    reversed_grad, adversary_grad_in_game = torch.autograd.grad(two_head_loss(net, x, y), (features, adversary))
    logits = torch.cat([net.label_head(net.features(x)), net.adversary_head(net.features(x))], dim=-1)
    label_loss = nn.functional.cross_entropy(logits[:, :2], y[:, 0])
    adversary_loss = nn.functional.cross_entropy(logits[::2, 2:], y[::2, 1])
    torch.testing.assert_close(two_head_loss(net, x, y), label_loss + adversary_loss)
    (label_grad,) = torch.autograd.grad(label_loss, features, retain_graph=True)
    adversary_grad, own_grad = torch.autograd.grad(adversary_loss, (features, adversary))
    torch.testing.assert_close(reversed_grad, label_grad - 0.4 * adversary_grad)  # Features: reversed.
    torch.testing.assert_close(adversary_grad_in_game, own_grad)  # The adversary itself: plain descent.


def test_mnist_grl_instances_equal_their_modules_and_metrics_report_both_heads(real_data):
    family = get_task("mnist-grl", train_examples=600, eval_examples=300, batch_size=32)
    task = family.sample(2, torch.Generator().manual_seed(0))
    assert task.data.x_train.shape == (600, 1, 28, 56) and task.data.x_test.shape == (300, 1, 28, 56)
    params = perturbed_params(task)
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    loss, grad = value_and_grad(task, params, batch)
    metrics = task.metrics(params)
    for k in range(2):
        module = instance_module(TwoHeadNet, params, k)
        direct, direct_grad = direct_loss_and_grad(module, lambda m: two_head_loss(m, batch[0][k], batch[1][k]))
        torch.testing.assert_close(loss[k], direct, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[k], direct_grad, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            logits = module(task.data.x_test)
        y = task.data.y_test
        has_zero = y[:, 1] >= 0
        torch.testing.assert_close(metrics["test_accuracy"][k], (logits[:, :2].argmax(1) == y[:, 0]).double().mean())
        torch.testing.assert_close(metrics["adversary_test_accuracy"][k],
                                   (logits[has_zero, 2:].argmax(1) == y[has_zero, 1]).double().mean())
        torch.testing.assert_close(metrics["test_loss"][k], nn.functional.cross_entropy(logits[:, :2], y[:, 0]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# mnist-gp


def test_mnist_gp_instances_equal_the_penalty_on_their_modules(real_data):
    family = get_task("mnist-gp", eps=0.5, norm="linf", train_examples=1000, eval_examples=300, batch_size=32)
    task = family.sample(2, torch.Generator().manual_seed(0))
    params = perturbed_params(task)
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    loss, grad = value_and_grad(task, params, batch)
    metrics = task.metrics(params)
    x_test, y_test = task.data.x_test[:300], task.data.y_test[:300]
    for k in range(2):
        module = instance_module(lambda: mlp(20, 1, "sigmoid"), params, k)
        direct, direct_grad = direct_loss_and_grad(module, lambda m: input_gradient_penalty(m, batch[0][k], batch[1][k], 0.5, "linf"))
        torch.testing.assert_close(loss[k], direct, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[k], direct_grad, rtol=1e-4, atol=1e-6)
        attacked = adversarial_example(module, x_test, y_test, 0.5, "linf")
        with torch.no_grad():
            accuracy = (module(attacked).argmax(1) == y_test).double().mean()
            clean = (module(x_test).argmax(1) == y_test).double().mean()
        torch.testing.assert_close(metrics["test_adversarial_accuracy"][k], accuracy)
        torch.testing.assert_close(metrics["test_accuracy"][k], clean)


@pytest.mark.parametrize("task_name, options", [
    ("mnist-gp", {"train_examples": 500, "eval_examples": 100, "batch_size": 16}),
    ("mnist-grl", {"train_examples": 300, "eval_examples": 100, "batch_size": 16}),
    ("tangent-1d", {}),
])
def test_meta_gradients_flow_through_the_gradient_objectives(real_data, task_name, options):
    config = TrainConfig(task=task_name, task_options=options, instances=1, epochs=1, optimizee_steps=4, unroll=2,
                         hidden_size=4, val_every=100, val_problems=1, device="cpu")
    trainer = MetaTrainer(config)
    before = [p.detach().clone() for p in trainer.rule.parameters()]
    meta_loss = trainer.train_epoch()
    assert torch.isfinite(meta_loss) and trainer.skipped == 0
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.rule.parameters()))


def test_second_order_meta_gradients_through_gradient_reversal_are_refused(real_data):
    # Checked against finite differences in review: differentiating a gradient taken through the
    # reversal layer scales the cross term by -coeff, so the second-order meta-gradient is wrong.
    config = TrainConfig(task="mnist-grl", task_options={"train_examples": 300, "eval_examples": 100}, instances=1, epochs=1,
                         optimizee_steps=4, unroll=2, hidden_size=4, val_problems=1, second_order=True, device="cpu")
    with pytest.raises(ConfigError, match=r"--second-order is not available for task mnist-grl: .*gradient reversal layer"):
        MetaTrainer(config)
    task = get_task("mnist-grl", train_examples=300, eval_examples=100).sample(1, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM(hidden_size=4)
    batches = torch.Generator().manual_seed(1)
    with pytest.raises(ValueError, match="second_order=True is not available for TwoHeadTask"):
        unroll(rule, task, start(rule, task, generator=batches), 1, generator=batches, second_order=True)


def test_second_order_is_refused_for_any_module_task_with_a_reversal_layer():
    from l2l.objectives import GradReverse
    from l2l.tasks.module import ModuleFamily, SupervisedData

    def data(device="cpu"):
        x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
        return SupervisedData(x[:20], (x[:20, 0] > 0).long(), x[20:], (x[20:, 0] > 0).long())

    rule = CoordinateWiseLSTM(hidden_size=4)
    batches = torch.Generator().manual_seed(1)
    reversed_task = ModuleFamily(lambda: nn.Sequential(nn.Linear(3, 4), GradReverse(0.5), nn.Linear(4, 2)), data, batch_size=4).sample(
        1, torch.Generator().manual_seed(0)
    )
    with pytest.raises(ValueError, match="second_order=True is not available for ModuleTask: its module has a GradReverse layer"):
        unroll(rule, reversed_task, start(rule, reversed_task, generator=batches), 1, generator=batches, second_order=True)
    plain_task = ModuleFamily(lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), data, batch_size=4).sample(
        1, torch.Generator().manual_seed(0)
    )
    assert plain_task.second_order_problem is None
    losses, _ = unroll(rule, plain_task, start(rule, plain_task, generator=batches), 1, generator=batches, second_order=True)
    assert losses.shape == (1, 1)


def test_tangent_objective_of_weight_zero_is_plain_least_squares_exactly():
    # 0 * slope**2 was NaN where the slope is infinite (sqrt at 0), and the fit came from the
    # JVP's primal output, which may differ from the forward in the last float32 bits.
    torch.manual_seed(0)
    net = mlp(20, 1, "tanh", 1, 1)
    x = torch.linspace(0, 1, 5).unsqueeze(1)
    forward = lambda v: net(v.sqrt())  # noqa: E731
    value = TangentPropObjective(0.0)(forward, x, x)
    assert torch.equal(value, (forward(x) - x).pow(2).mean())
