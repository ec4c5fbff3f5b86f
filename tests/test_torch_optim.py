"""LearnedOptimizer: equals the functional unroll, honours the torch.optim contract, guards non-finite gradients."""

import copy
import io
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import l2l.checkpoint
from l2l import LearnedOptimizer
from l2l.checkpoint import CheckpointError, load_use_checkpoint, save_use_checkpoint
from l2l.meta.unroll import start, unroll
from l2l.optimizers import CoordinateWiseLSTM, PerGroupRule
from l2l.tasks.base import Task
from l2l.tasks.module import ParamLayout

from gpu import CUDA, needs_cuda
from helpers import sensitive_rule


@pytest.fixture
def checkpoint(tmp_path):
    return save_use_checkpoint(tmp_path / "rule.pt", sensitive_rule(), {"task": "test"})


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.BatchNorm1d(4),
        nn.Linear(4, 2),
    )


def batch(dtype=torch.float32, shape=(16, 5), outputs=3):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=generator).to(dtype), torch.randn(shape[0], outputs, generator=generator).to(dtype)


def train(model, optimizer, x, y, steps):
    """Losses before each step and after the last (``steps + 1`` values)."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    with torch.no_grad():
        losses.append(nn.functional.mse_loss(model(x), y))
    return torch.stack(losses)


class ModelTask(Task):
    """One instance of ``model`` on a fixed batch, as the functional unroll sees it: params ``[1, n]``."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.layout = ParamLayout.of(model)
        self.initial = self.layout.flatten(model).unsqueeze(0)

    @property
    def num_instances(self):
        return 1

    @property
    def num_params(self):
        return self.layout.size

    def init_params(self):
        return self.initial.clone()

    def loss(self, params, batch=None):
        weights = {name: value[0] for name, value in self.layout.unflatten(params).items()}
        return nn.functional.mse_loss(functional_call(self.model, weights, (self.x,)), self.y).unsqueeze(0)


@pytest.mark.parametrize("chunk_size", [7, None], ids=["chunks-across-tensors", "default-chunk"])
def test_equals_functional_unroll_step_for_step(checkpoint, chunk_size):
    x, y = batch(torch.float64)
    model = mlp(torch.float64)
    task = ModelTask(copy.deepcopy(model), x, y)
    rule = load_use_checkpoint(checkpoint).rule.double()  # float64 throughout, so rounding cannot hide a mismatch
    with torch.no_grad():
        expected, carry = unroll(rule, task, start(rule, task), 6)
    optimizer = LearnedOptimizer(model.parameters(), rule, chunk_size=chunk_size)
    losses = train(model, optimizer, x, y, 6)
    torch.testing.assert_close(losses[1:], expected[:, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(task.layout.flatten(model), carry.params[0], rtol=1e-12, atol=1e-14)
    # The hidden states too: optimizer.state[p] holds [layers, hidden, numel] views in parameter order.
    h = torch.cat([optimizer.state[p]["h"] for p in model.parameters()], dim=2)
    torch.testing.assert_close(h, carry.opt_state.h, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "dtype, state_dtype", [(torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_state_dict_round_trip_continues_bit_for_bit(checkpoint, dtype, state_dtype):
    x, y = batch(dtype)
    model = mlp(dtype)
    optimizer = LearnedOptimizer(model.parameters(), checkpoint, state_dtype=state_dtype, chunk_size=11)
    train(model, optimizer, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    expected = train(model, optimizer, x, y, 4)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = mlp(dtype, seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = LearnedOptimizer(resumed_model.parameters(), sensitive_rule(seed=9), chunk_size=11)
    resumed.load_state_dict(saved["optimizer"])
    # torch.optim would cast the state to the parameters' dtype; the LSTM state keeps its own.
    first = next(resumed_model.parameters())
    assert resumed.state[first]["h"].dtype == (state_dtype or dtype)
    assert torch.equal(train(resumed_model, resumed, x, y, 4), expected)
    # The rule's weights came with the state (the optimizer was built with another seed).
    assert torch.equal(resumed.rule.weight_out, optimizer.rule.weight_out)


def test_sequential_of_conv_batchnorm_linear_with_param_groups(checkpoint):
    x, y = batch(shape=(8, 1, 6, 6), outputs=2)
    model, reference = conv_net(), conv_net()
    conv, linear = list(model[:2].parameters()), list(model[4:].parameters())
    optimizer = LearnedOptimizer([{"params": conv, "lr": 0.5}, {"params": linear}], checkpoint, lr=2.0)
    assert [group["lr"] for group in optimizer.param_groups] == [0.5, 2.0]
    reference_optimizer = LearnedOptimizer(reference.parameters(), checkpoint)
    before = [p.detach().clone() for p in model.parameters()]
    for optim, net in ((optimizer, model), (reference_optimizer, reference)):
        net.train()
        nn.functional.mse_loss(net(x), y).backward()
        optim.step()
    scales = [0.5] * len(conv) + [2.0] * len(linear)
    for p, q, p0, scale in zip(model.parameters(), reference.parameters(), before, scales):
        torch.testing.assert_close(p - p0, scale * (q - p0), rtol=1e-5, atol=1e-7)
        assert not torch.equal(p, p0)


def test_step_returns_the_closure_loss_and_zero_grad_clears(checkpoint):
    x, y = batch()
    model = mlp()
    optimizer = LearnedOptimizer(model.parameters(), checkpoint)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert optimizer.step() is None
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_parameters_without_gradients_are_skipped_and_keep_their_state(checkpoint):
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 2))
    alone_a, alone_b = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    together = LearnedOptimizer([a, b], checkpoint, chunk_size=4)
    opt_a, opt_b = LearnedOptimizer([alone_a], checkpoint), LearnedOptimizer([alone_b], checkpoint)
    generator = torch.Generator().manual_seed(0)
    for has_b in (True, False, False, True, True):
        grad_a, grad_b = torch.randn(5, generator=generator), torch.randn(3, 2, generator=generator)
        a.grad, alone_a.grad = grad_a.clone(), grad_a.clone()
        b.grad = grad_b.clone() if has_b else None
        alone_b.grad = grad_b.clone()
        before_b = b.detach().clone()
        together.step()
        opt_a.step()
        if has_b:
            opt_b.step()
        else:
            assert torch.equal(b, before_b)
            # b left the flat buffer: it keeps its own state, not the whole buffer alive.
            assert together.state[b]["h"].untyped_storage().nbytes() == 2 * 20 * 6 * 4
    # The LSTM is coordinatewise, so stepping together equals stepping each parameter alone.
    torch.testing.assert_close(a, alone_a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, alone_b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(together.state[b]["h"], opt_b.state[alone_b]["h"], rtol=1e-6, atol=1e-7)
    never = nn.Parameter(torch.randn(2))
    optimizer = LearnedOptimizer([never], checkpoint)
    optimizer.step()
    assert never not in optimizer.state


def test_sparse_gradients_are_rejected(checkpoint):
    embedding = nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    optimizer = LearnedOptimizer(embedding.parameters(), checkpoint)
    with pytest.raises(RuntimeError, match="LearnedOptimizer does not support sparse gradients"):
        optimizer.step()


def test_mixed_dtypes_equal_each_parameter_alone(checkpoint):
    generator = torch.Generator().manual_seed(0)
    shapes_dtypes = [((4, 3), torch.float32), ((5,), torch.float64), ((2, 3), torch.bfloat16), ((3,), torch.complex64)]
    params = [nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape, dtype in shapes_dtypes]
    alone = [nn.Parameter(p.detach().clone()) for p in params]
    together = LearnedOptimizer(params, checkpoint)
    separate = [LearnedOptimizer([p], checkpoint) for p in alone]
    for _ in range(3):
        for p, q in zip(params, alone):
            grad = torch.randn(p.shape, generator=generator).to(p.dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        together.step()
        for optimizer in separate:
            optimizer.step()
    for p, q in zip(params, alone):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert together.state[params[3]]["h"].shape == (2, 20, 6)  # complex: real and imaginary coordinates


@pytest.mark.cuda
@needs_cuda
def test_cpu_and_cuda_parameters_in_one_group(checkpoint):
    cpu, cuda = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6, device=CUDA))
    cuda.data.copy_(cpu.data)
    optimizer = LearnedOptimizer([cpu, cuda], checkpoint)
    for step in range(3):
        grad = torch.randn(6)
        grad[step] = float("nan")
        cpu.grad, cuda.grad = grad.clone(), grad.to(CUDA)
        optimizer.step()
    torch.testing.assert_close(cuda.cpu(), cpu.detach(), rtol=1e-5, atol=1e-6)
    assert optimizer.nonfinite_steps == 3


def test_nonfinite_gradients_leave_coordinates_unchanged_and_are_counted(checkpoint):
    p = nn.Parameter(torch.randn(6))
    good = torch.tensor([True, True, False, True, False, True])
    reference = nn.Parameter(p.detach()[good].clone())
    optimizer = LearnedOptimizer([p], checkpoint, chunk_size=4)
    reference_optimizer = LearnedOptimizer([reference], checkpoint)
    start_value = p.detach().clone()
    grad = torch.randn(6)
    grad[2], grad[4] = float("nan"), float("inf")
    p.grad, reference.grad = grad, grad[good].clone()
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        optimizer.step()
    reference_optimizer.step()
    assert torch.equal(p.detach()[~good], start_value[~good])
    torch.testing.assert_close(p.detach()[good], reference.detach(), rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(optimizer.state[p]["h"][:, :, ~good]) == 0
    assert optimizer.nonfinite_steps == 1
    p.grad = torch.ones(6)
    optimizer.step()
    p.grad = torch.full((6,), float("-inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Only the first occurrence warns.
        optimizer.step()
    assert optimizer.nonfinite_steps == 2
    assert optimizer.state_dict()["nonfinite_steps"] == 2


def test_lr_and_maximize(checkpoint):
    base, scaled, maximized = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0])
    base.grad, scaled.grad, maximized.grad = grad.clone(), grad.clone(), -grad
    LearnedOptimizer([base], checkpoint).step()
    LearnedOptimizer([scaled], checkpoint, lr=0.25).step()
    LearnedOptimizer([maximized], checkpoint, maximize=True).step()
    torch.testing.assert_close(scaled, 0.25 * base, rtol=1e-6, atol=0)
    torch.testing.assert_close(maximized, base, rtol=1e-6, atol=0)


def test_bfloat16_state_halves_the_memory(checkpoint):
    p, q = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(10))
    p.grad, q.grad = torch.randn(10), torch.randn(10)
    full, half = LearnedOptimizer([p], checkpoint), LearnedOptimizer([q], checkpoint, state_dtype=torch.bfloat16)
    full.step(), half.step()
    nbytes = [sum(t.numel() * t.element_size() for t in opt.state[x].values()) for opt, x in ((full, p), (half, q))]
    assert nbytes == [10 * 320, 10 * 160]


def test_state_dtype_precedence_and_buffers_kept_across_steps():
    rule = CoordinateWiseLSTM(seed=0, state_dtype=torch.bfloat16)
    p, q = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    optimizer = LearnedOptimizer([{"params": [p], "state_dtype": torch.float32}, {"params": [q]}], rule)
    p.grad, q.grad = torch.randn(4), torch.randn(4)
    optimizer.step()
    h = optimizer.state[p]["h"]
    optimizer.step()
    assert optimizer.state[p]["h"] is h  # the flat buffer is reused, not rebuilt every step
    assert (h.dtype, optimizer.state[q]["h"].dtype) == (torch.float32, torch.bfloat16)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lr": -1.0}, ValueError, r"Invalid learning rate: -1.0 \(expected a finite number >= 0"),
        ({"lr": float("nan")}, ValueError, r"Invalid learning rate: nan"),
        ({"lr": True}, ValueError, r"Invalid learning rate: True"),
        ({"lr": "1"}, ValueError, r"Invalid learning rate: '1'"),
        ({"chunk_size": 0}, ValueError, r"Invalid chunk_size: 0 \(expected None or a positive int\)"),
        ({"chunk_size": "4"}, ValueError, r"Invalid chunk_size: '4'"),
        ({"state_dtype": torch.int32}, ValueError, r"Invalid state_dtype: torch.int32 \(expected None or one of torch.float16"),
        ({"state_dtype": "bfloat16"}, ValueError, r"Invalid state_dtype: 'bfloat16'"),
        ({"state_dtype": torch.float8_e4m3fn}, ValueError, r"Invalid state_dtype: torch.float8_e4m3fn"),
        ({"maximize": 1}, ValueError, r"Invalid maximize: 1 \(expected True or False\)"),
        ({"maximize": "True"}, ValueError, r"Invalid maximize: 'True'"),
        ({"rule_group": "conv"}, ValueError, r"rule_group='conv' given, but the checkpoint holds a single"),
        ({"checkpoint": 3}, TypeError, r"checkpoint must be a shipped checkpoint name, a path"),
        ({"checkpoint": "no-such-checkpoint"}, CheckpointError, r"no shipped checkpoint of that name"),
    ],
)
def test_constructor_validates_every_argument(checkpoint, kwargs, error, message):
    kwargs = {"checkpoint": checkpoint, **kwargs}
    with pytest.raises(error, match=message):
        LearnedOptimizer([nn.Parameter(torch.zeros(2))], **kwargs)


def test_add_param_group_validates_and_new_parameters_get_state(checkpoint):
    first, second = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    optimizer = LearnedOptimizer([first], checkpoint)
    with pytest.raises(ValueError, match="Invalid learning rate: -2"):
        optimizer.add_param_group({"params": [second], "lr": -2})
    assert len(optimizer.param_groups) == 1
    first.grad = torch.randn(3)
    optimizer.step()
    optimizer.add_param_group({"params": [second], "lr": 0.5})
    first.grad, second.grad = torch.randn(3), torch.randn(4)
    optimizer.step()
    assert optimizer.state[second]["h"].shape == (2, 20, 4)
    assert optimizer.param_groups[1]["state_dtype"] is None


@pytest.mark.parametrize("bad", [[], None, "state.pt"])
def test_loading_something_other_than_a_state_dict_names_what_it_got(checkpoint, bad):
    p = nn.Parameter(torch.randn(3))
    optimizer = LearnedOptimizer([p], checkpoint)
    with pytest.raises(TypeError, match=f"expects the dict that LearnedOptimizer.state_dict\\(\\) returns, got a {type(bad).__name__}"):
        optimizer.load_state_dict(bad)
    with pytest.raises(ValueError, match="has no 'param_groups' entry: it is not an optimizer state_dict"):
        optimizer.load_state_dict({"state": {}})
    hooked = LearnedOptimizer([p], checkpoint)
    hooked.register_load_state_dict_pre_hook(lambda opt, state: [])
    p.grad = torch.randn(3)
    hooked.step()
    with pytest.raises(TypeError, match="got a list"):
        hooked.load_state_dict(hooked.state_dict())


def test_loading_a_state_of_another_rule_config_raises(checkpoint, tmp_path):
    p = nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    small = LearnedOptimizer([p], CoordinateWiseLSTM(hidden_size=8, preprocess="none"))
    small.step()
    optimizer = LearnedOptimizer([p], checkpoint)
    with pytest.raises(ValueError, match=r"different learned rule: hidden_size: saved 8, this optimizer 20; "
                                         r"preprocess: saved 'none', this optimizer 'log_sign'"):
        optimizer.load_state_dict(small.state_dict())
    with pytest.raises(ValueError, match="not saved by a LearnedOptimizer"):
        optimizer.load_state_dict(torch.optim.SGD([p], lr=0.1).state_dict())
    other = LearnedOptimizer([nn.Parameter(torch.randn(5))], checkpoint)
    other.param_groups[0]["params"][0].grad = torch.randn(5)
    other.step()
    with pytest.raises(ValueError, match=r"expected \(2, 20, 3\) for a parameter of shape \(3,\)"):
        optimizer.load_state_dict(other.state_dict())


def test_loading_a_non_finite_state_raises_and_leaves_the_optimizer_as_it_was(checkpoint):
    # A NaN hidden state or rule weight, once loaded, would turn parameters into NaN while no
    # gradient was ever non-finite, so nothing would count or warn.
    p = nn.Parameter(torch.randn(3))
    optimizer = LearnedOptimizer([p], checkpoint)
    p.grad = torch.randn(3)
    optimizer.step()
    good = copy.deepcopy(optimizer.state_dict())
    damaged_state = copy.deepcopy(good)
    damaged_state["state"][0]["c"][1, 4, 2] = float("nan")
    with pytest.raises(ValueError, match="saved LSTM state of parameter 0 holds NaN or infinite values"):
        optimizer.load_state_dict(damaged_state)
    damaged_rule = copy.deepcopy(good)
    damaged_rule["learned_rule"]["state_dict"]["bias_out"].fill_(float("inf"))
    with pytest.raises(ValueError, match="learned rule is corrupt: weights bias_out hold NaN or infinite values"):
        optimizer.load_state_dict(damaged_rule)
    assert all(torch.equal(value, good["state"][0][key]) for key, value in optimizer.state[p].items() if key in ("h", "c"))
    assert all(bool(torch.isfinite(value).all()) for value in optimizer.rule.state_dict().values())


def test_shipped_names_resolve(checkpoint, monkeypatch):
    monkeypatch.setattr(l2l.checkpoint, "_shipped_directories", lambda: [checkpoint.parent])
    p = nn.Parameter(torch.randn(3))
    optimizer = LearnedOptimizer([p], "rule")
    assert optimizer.metadata["task"] == "test"
    assert LearnedOptimizer([p], load_use_checkpoint(checkpoint)).metadata["task"] == "test"


def test_per_group_rule_checkpoint_applies_each_lstm_to_its_group():
    rules = {"conv": sensitive_rule(seed=1), "fc": sensitive_rule(seed=2)}
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    grad = torch.randn(3)
    a.grad, b.grad = grad.clone(), grad.clone()
    optimizer = LearnedOptimizer(
        [{"params": [a], "rule_group": "conv"}, {"params": [b], "rule_group": "fc"}], PerGroupRule(rules)
    )
    optimizer.step()
    for p, rule in ((a, rules["conv"]), (b, rules["fc"])):
        torch.testing.assert_close(p.detach(), rule(grad, rule.init_state(3))[0].detach())
    with pytest.raises(ValueError, match=r"one LSTM per parameter group \(conv, fc\); give each param group"):
        LearnedOptimizer([a], PerGroupRule(rules))


def test_deepcopy_continues_identically(checkpoint):
    x, y = batch()
    model = mlp()
    optimizer = LearnedOptimizer(model.parameters(), checkpoint)
    train(model, optimizer, x, y, 2)
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))  # one memo: the copies share parameters
    assert torch.equal(train(model_copy, optimizer_copy, x, y, 3), train(model, optimizer, x, y, 3))


def test_lr_schedulers_scale_the_learned_update(checkpoint):
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0])
    base, scheduled = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    base_optimizer, optimizer = LearnedOptimizer([base], checkpoint), LearnedOptimizer([scheduled], checkpoint)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    deltas = []
    for _ in range(2):
        before = base.detach().clone(), scheduled.detach().clone()
        base.grad, scheduled.grad = grad.clone(), grad.clone()
        base_optimizer.step(), optimizer.step()
        scheduler.step()
        deltas.append((base.detach() - before[0], scheduled.detach() - before[1]))
    assert optimizer.param_groups[0]["lr"] == 0.25
    torch.testing.assert_close(deltas[0][1], deltas[0][0], rtol=1e-6, atol=0)  # lr 1
    torch.testing.assert_close(deltas[1][1], 0.5 * deltas[1][0], rtol=1e-5, atol=1e-7)  # lr 0.5, same state
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=0)
    plateau.step(1.0), plateau.step(2.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_a_rule_with_non_finite_weights_is_refused():
    rule = sensitive_rule()
    with torch.no_grad():
        rule.weight_out[0] = float("nan")
    with pytest.raises(ValueError, match="the learned rule cannot be used: weights weight_out hold NaN or infinite"):
        LearnedOptimizer([nn.Parameter(torch.zeros(3))], rule)


def test_the_non_finite_warning_points_at_the_callers_step(checkpoint):
    p = nn.Parameter(torch.zeros(3))
    optimizer = LearnedOptimizer([p], checkpoint)
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.warns(RuntimeWarning, match="non-finite gradients") as record:
        optimizer.step()
    assert record[0].filename == __file__


def test_a_parameter_listed_twice_is_refused(checkpoint):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lists a parameter more than once"):
        LearnedOptimizer([p, p], checkpoint)
    optimizer = LearnedOptimizer([nn.Parameter(torch.zeros(2))], checkpoint)
    with pytest.raises(ValueError, match="lists a parameter more than once"):
        optimizer.add_param_group({"params": iter([p, p])})
    assert len(optimizer.param_groups) == 1


def test_load_state_dict_checks_group_options_runs_hooks_and_restores_metadata(checkpoint, tmp_path):
    p = nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    source = LearnedOptimizer([p], save_use_checkpoint(tmp_path / "other.pt", sensitive_rule(seed=3), {"task": "other"}))
    source.step()
    saved = source.state_dict()
    optimizer = LearnedOptimizer([p], checkpoint)
    for option, value, message in (("lr", -5.0, "Invalid learning rate: -5.0"), ("chunk_size", 0, "Invalid chunk_size: 0"),
                                   ("maximize", "yes", "Invalid maximize: 'yes'")):
        damaged = copy.deepcopy(saved)
        damaged["param_groups"][0][option] = value
        with pytest.raises(ValueError, match=f"param group options are invalid: {message}"):
            optimizer.load_state_dict(damaged)
    # A pre-hook's returned state_dict is what gets checked and loaded; post-hooks see the loaded state.
    seen = {}

    def zero_h(opt, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["h"].zero_()
        return state_dict

    optimizer.register_load_state_dict_pre_hook(zero_h)
    optimizer.register_load_state_dict_post_hook(lambda opt: seen.update(h=opt.state[p]["h"].clone()))
    optimizer.load_state_dict(saved)
    assert torch.count_nonzero(optimizer.state[p]["h"]) == 0 and torch.count_nonzero(seen["h"]) == 0
    assert torch.count_nonzero(optimizer.state[p]["c"]) > 0
    # The weights are the source's, and so is their description.
    assert optimizer.metadata["task"] == "other"
    assert torch.equal(optimizer.rule.weight_out, source.rule.weight_out)


def test_state_dict_post_hooks_see_and_may_replace_the_whole_state_dict(checkpoint):
    # torch.optim runs them last, on the finished state dict: a hook that converts or wraps it
    # for saving must see the learned rule too, and what it returns is what state_dict returns.
    p = nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    optimizer = LearnedOptimizer([p], checkpoint)
    optimizer.step()
    seen = []
    optimizer.register_state_dict_post_hook(lambda opt, state_dict: seen.append(sorted(state_dict)))
    optimizer.register_state_dict_post_hook(lambda opt, state_dict: {"wrapped": state_dict})
    state_dict = optimizer.state_dict()
    assert seen == [["learned_rule", "nonfinite_steps", "param_groups", "state"]]
    assert list(state_dict) == ["wrapped"]
    optimizer.register_load_state_dict_pre_hook(lambda opt, state_dict: state_dict["wrapped"])
    optimizer.load_state_dict(state_dict)


@pytest.mark.parametrize(
    "option, value",
    [("weight_decay", 0.01), ("momentum", 0.9), ("dampening", 0.1), ("nesterov", True), ("amsgrad", True),
     ("centered", True), ("betas", (0.9, 0.999)), ("eps", 1e-8), ("differentiable", True),
     # The other hand-designed optimizers' (Adagrad, RMSprop, Adadelta, NAdam, Rprop, ASGD, Adafactor, Adam).
     ("lr_decay", 0.01), ("initial_accumulator_value", 0.1), ("alpha", 0.9), ("rho", 0.9), ("momentum_decay", 0.004),
     ("etas", (0.5, 1.2)), ("step_sizes", (1e-6, 50)), ("lambd", 1e-4), ("t0", 1e6), ("beta2_decay", -0.8),
     ("decoupled_weight_decay", True)],
)
def test_torch_optim_options_the_rule_lacks_are_refused_not_ignored(checkpoint, option, value):
    # Code that swaps Adam for the drop-in may keep per-group options such as weight decay; left in,
    # they would be silently ignored and the model would train without them.
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=rf"LearnedOptimizer has no {option} option \(got {option}="):
        LearnedOptimizer([{"params": [p], option: value}], checkpoint)
    optimizer = LearnedOptimizer([p], checkpoint)
    with pytest.raises(ValueError, match=rf"has no {option} option"):
        optimizer.add_param_group({"params": [q], option: value})
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{option}'"):
        LearnedOptimizer([q], checkpoint, **{option: value})


def test_torch_optim_options_at_their_off_value_are_accepted(checkpoint):
    # Weight-decay groups built for AdamW put weight_decay=0 on biases; that asks for nothing we lack.
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    groups = [{"params": [p], "weight_decay": 0.0, "momentum": 0, "nesterov": False, "differentiable": False}, {"params": [q]}]
    optimizer = LearnedOptimizer(groups, checkpoint)
    optimizer.load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("option", ["foreach", "fused", "capturable"])
def test_torch_optims_implementation_flags_name_themselves_in_a_type_error(checkpoint, option):
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{option}'"):
        LearnedOptimizer([nn.Parameter(torch.zeros(2))], checkpoint, **{option: True})


def test_one_cycle_and_cyclic_lr_scale_the_update_without_momentum_cycling(checkpoint):
    # The learned rule has no momentum or betas to cycle: torch's own error (as for Adagrad) unless
    # cycle_momentum=False, and then the schedule's lr scales the update as any lr does.
    p, base = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    optimizer = LearnedOptimizer([p], checkpoint)
    with pytest.raises(ValueError, match="optimizer must support momentum or beta1 with `cycle_momentum`"):
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.4, total_steps=10)
    with pytest.raises(ValueError, match="optimizer must support momentum or beta1 with `cycle_momentum`"):
        torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0.1, max_lr=0.4)
    torch.optim.lr_scheduler.CyclicLR(LearnedOptimizer([base], checkpoint), base_lr=0.1, max_lr=0.4, cycle_momentum=False)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.4, total_steps=10, cycle_momentum=False)
    lr = optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(0.4 / 25)  # max_lr / div_factor
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0])
    p.grad, base.grad = grad.clone(), grad.clone()
    optimizer.step()
    scheduler.step()
    LearnedOptimizer([base], checkpoint).step()
    torch.testing.assert_close(p.detach(), lr * base.detach(), rtol=1e-5, atol=1e-8)
    assert optimizer.param_groups[0]["lr"] > lr


def test_scheduler_and_optimizer_state_dicts_resume_together_from_a_weights_only_file(checkpoint):
    x, y = batch()

    def setup(seed):
        model = mlp(seed=seed)
        optimizer = LearnedOptimizer(model.parameters(), checkpoint)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=3)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
        return model, optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[3])

    def run(model, optimizer, scheduler, steps):
        losses = []
        for _ in range(steps):
            losses.append(train(model, optimizer, x, y, 1)[0])
            scheduler.step()
        return torch.stack(losses)

    model, optimizer, scheduler = setup(0)
    run(model, optimizer, scheduler, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    expected = run(model, optimizer, scheduler, 3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, optimizer, scheduler = setup(1)
    model.load_state_dict(saved["model"])
    scheduler.load_state_dict(saved["scheduler"])
    optimizer.load_state_dict(saved["optimizer"])  # after the scheduler, as torch.optim asks
    assert torch.equal(run(model, optimizer, scheduler, 3), expected)


def test_grad_scaler_unscales_clips_and_skips_steps_with_inf_gradients(checkpoint):
    x, y = batch()
    model, reference = mlp(), mlp()
    optimizer, reference_optimizer = LearnedOptimizer(model.parameters(), checkpoint), LearnedOptimizer(reference.parameters(), checkpoint)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    scaler.step(optimizer)
    scaler.update()
    nn.functional.mse_loss(reference(x), y).backward()
    nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    reference_optimizer.step()
    # Scaling by a power of two is exact, so the scaled step is the plain one.
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    h = optimizer.state[model[0].weight]["h"].clone()
    optimizer.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    # The scaler skipped the step: nothing moved, and the optimizer never saw a non-finite gradient.
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), before))
    assert torch.equal(optimizer.state[model[0].weight]["h"], h)
    assert optimizer.nonfinite_steps == 0 and scaler.get_scale() == 2.0**9


def test_named_parameters_give_param_names_as_in_torch_optim(checkpoint):
    model = mlp()
    optimizer = LearnedOptimizer(model.named_parameters(), checkpoint)
    train(model, optimizer, *batch(), 1)
    adam = torch.optim.Adam(model.named_parameters())
    state_dict = optimizer.state_dict()
    assert state_dict["param_groups"][0]["param_names"] == adam.state_dict()["param_groups"][0]["param_names"]
    assert state_dict["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    resumed = LearnedOptimizer(mlp().named_parameters(), checkpoint)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["param_names"] == state_dict["param_groups"][0]["param_names"]


def test_a_compiled_training_step_runs_the_step_eagerly(checkpoint):
    # torch.compile graph-breaks at step (its chunk loop and non-finite checks read values on the
    # host), so a compiled training step is the eager one; fullgraph=True says why it cannot be.
    x, y = batch()
    models = mlp(), mlp()
    optimizers = [LearnedOptimizer(model.parameters(), checkpoint) for model in models]

    def training_step(model, optimizer, nan):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if nan:
            model[0].bias.grad[1] = float("nan")
        optimizer.step()

    compiled = torch.compile(training_step, backend="eager")
    with pytest.warns(RuntimeWarning, match="non-finite gradients") as record:
        for step in range(3):
            compiled(models[0], optimizers[0], step == 1)
            training_step(models[1], optimizers[1], step == 1)
    # Dynamo traced nothing of step, so it did not warn about the builtins step calls.
    assert [warning.category for warning in record] == [RuntimeWarning, RuntimeWarning]
    assert all(torch.equal(p, q) for p, q in zip(*(model.parameters() for model in models)))
    assert optimizers[0].nonfinite_steps == 1
    # (A function of its own: dynamo would reuse training_step's graph-broken code for fullgraph too.)
    def step_only(optimizer):
        optimizer.step()

    with pytest.raises(torch._dynamo.exc.Unsupported, match="LearnedOptimizer.step runs eagerly"):
        torch.compile(step_only, backend="eager", fullgraph=True)(optimizers[0])


def test_a_state_saved_in_float32_continues_on_the_model_moved_to_float64(checkpoint):
    # model.double() between saving and loading: the float32 LSTM state is loaded as saved and
    # widened to the parameters' dtype at the next step (where torch.optim casts at loading).
    x, y = batch()
    model = mlp()
    optimizer = LearnedOptimizer(model.parameters(), checkpoint)
    train(model, optimizer, x, y, 2)
    widened = copy.deepcopy(model).double()
    resumed = LearnedOptimizer(widened.parameters(), sensitive_rule(seed=9))
    resumed.load_state_dict(optimizer.state_dict())
    train(model, optimizer, x, y, 1)
    train(widened, resumed, x.double(), y.double(), 1)
    for p, q in zip(model.parameters(), widened.parameters()):
        assert q.dtype == resumed.state[q]["h"].dtype == torch.float64
        torch.testing.assert_close(q.float(), p.detach(), rtol=1e-5, atol=1e-6)


def stepped_mlp_optimizer(checkpoint):
    model = mlp()
    optimizer = LearnedOptimizer(model.parameters(), checkpoint)
    train(model, optimizer, *batch(), 1)
    return model, optimizer


def test_a_state_entry_left_empty_by_reading_optimizer_state_loads_as_no_state(checkpoint):
    # optimizer.state is a defaultdict (as in torch.optim): reading the state of a parameter that
    # never had a gradient leaves {} behind, which state_dict saves and Adam loads as no state.
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    optimizer = LearnedOptimizer([a, b], checkpoint)
    a.grad = torch.randn(3)
    optimizer.step()
    assert optimizer.state[b].get("h") is None
    saved = optimizer.state_dict()
    assert saved["state"][1] == {}
    resumed = LearnedOptimizer([a, b], checkpoint)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.state[a]["h"], optimizer.state[a]["h"]) and "h" not in resumed.state[b]
    b.grad = torch.randn(2)
    resumed.step()
    assert resumed.state[b]["h"].shape == (2, 20, 2)



@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda rule: rule.update(weight_out=torch.zeros(5)), r"weight_out has shape \(5,\), expected \(20,\)"),
        (lambda rule: rule.pop("weight_out"), r"missing weight_out"),
        (lambda rule: rule.update(weight_extra=torch.zeros(2)), r"unexpected weight_extra"),
        (lambda rule: rule.update(bias_out=torch.tensor(1)), r"bias_out are torch.int64, not dense real floating-point"),
    ],
    ids=["wrong shape", "missing", "extra", "integer"],
)
def test_rule_weights_that_do_not_fit_raise_a_value_error_and_load_nothing(checkpoint, damage, message):
    model, optimizer = stepped_mlp_optimizer(checkpoint)
    saved = copy.deepcopy(optimizer.state_dict())
    damage(saved["learned_rule"]["state_dict"])
    resumed = LearnedOptimizer(mlp(seed=1).parameters(), sensitive_rule(seed=9))
    weights = copy.deepcopy(resumed.rule.state_dict())
    with pytest.raises(ValueError, match=rf"learned rule is corrupt: .*{message}"):
        resumed.load_state_dict(saved)
    assert len(resumed.state) == 0  # nothing half-loaded: no hidden states without their weights
    assert all(torch.equal(value, weights[key]) for key, value in resumed.rule.state_dict().items())

@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state: state[0].update(h=state[0]["h"].round().long()), r"saved LSTM state h of parameter 0 is torch.int64, expected a floating-point"),
        (lambda state: state[0].update(c=state[0]["c"].to(torch.complex64)), r"saved LSTM state c of parameter 0 is torch.complex64"),
        (lambda state: state.update({17: copy.deepcopy(state[0])}), r"parameter 17, which no param group lists"),
        (lambda state: state[2].update(exp_avg=torch.zeros(4, 3)), r"parameter 2 has unexpected entries \['exp_avg'\]"),
    ],
    ids=["integer h", "complex c", "extra parameter", "extra entry"],
)
def test_hidden_states_of_another_kind_or_for_no_parameter_raise_a_value_error(checkpoint, damage, message):
    # torch.optim would cast an integer state silently (and a complex one with a warning) and carry
    # entries for parameters it does not have along forever.
    model, optimizer = stepped_mlp_optimizer(checkpoint)
    saved = copy.deepcopy(optimizer.state_dict())
    damage(saved["state"])
    resumed = LearnedOptimizer(mlp(seed=1).parameters(), checkpoint)
    with pytest.raises(ValueError, match=message):
        resumed.load_state_dict(saved)
    assert len(resumed.state) == 0


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda saved: saved["param_groups"][0].pop("lr"), r"param group 0 has no lr option"),
        (lambda saved: saved["param_groups"][0].pop("state_dtype"), r"param group 0 has no state_dtype option"),
        (lambda saved: saved.update(nonfinite_steps="3"), r"nonfinite_steps is '3', expected an int >= 0"),
        (lambda saved: saved.update(nonfinite_steps=-1), r"nonfinite_steps is -1, expected an int >= 0"),
    ],
    ids=["no lr", "no state_dtype", "string count", "negative count"],
)
def test_a_state_dict_without_a_group_option_or_with_a_bad_count_raises_before_loading(checkpoint, damage, message):
    # The options were checked merged over this optimizer's, but torch.optim loads the saved group
    # alone: without lr, the next step was a KeyError.
    model, optimizer = stepped_mlp_optimizer(checkpoint)
    saved = copy.deepcopy(optimizer.state_dict())
    damage(saved)
    resumed = LearnedOptimizer(mlp(seed=1).parameters(), checkpoint)
    with pytest.raises(ValueError, match=message):
        resumed.load_state_dict(saved)
    assert len(resumed.state) == 0 and resumed.param_groups[0]["lr"] == 1.0


def test_changing_rule_group_to_an_lstm_of_another_shape_names_the_problem():
    # The hidden state carries over when group["rule_group"] changes (README), so the new LSTM must
    # have its shape; the LSTM's own error advised "build it with init_state(4)", which a user of
    # the drop-in cannot do, and a parameter rejoining its bucket got a broadcasting RuntimeError.
    rule = PerGroupRule({"a": sensitive_rule(seed=0), "b": sensitive_rule(seed=1, hidden_size=5)})
    p, q = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    optimizer = LearnedOptimizer([{"params": [p, q], "rule_group": "a"}], rule)
    p.grad, q.grad = torch.randn(4), torch.randn(3)
    optimizer.step()
    optimizer.param_groups[0]["rule_group"] = "b"
    expected = "param group 0's LSTM state is 2 layers x 20 units, but rule_group 'b' is 2 x 5"
    with pytest.raises(ValueError, match=expected):
        optimizer.step()  # the cached bucket
    q.grad = None
    with pytest.raises(ValueError, match=expected):
        optimizer.step()  # a bucket rebuilt from the parameters' states
    optimizer.param_groups[0]["rule_group"] = "a"
    optimizer.step()


def adam_accepts(lr) -> bool:
    """Whether torch.optim.Adam builds with ``lr`` and steps with it (its ValueError is its refusal)."""
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    try:
        torch.optim.Adam([p], lr=lr).step()
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    "lr, number",
    [
        (np.float64(0.25), 0.25),
        (np.float32(0.25), 0.25),
        (np.int64(2), 2.0),
        (np.array(0.25), 0.25),
        (torch.tensor(0.25), 0.25),
        (torch.tensor([0.25]), 0.25),
        (torch.tensor([[0.25]], dtype=torch.float64), 0.25),
        (torch.tensor(2), 2.0),
    ],
    ids=["np.float64", "np.float32", "np.int64", "0-d ndarray", "0-d tensor", "[1] tensor", "[1, 1] float64 tensor", "int tensor"],
)
def test_learning_rates_torch_optim_adam_accepts_act_as_their_number(checkpoint, lr, number):
    assert adam_accepts(lr)
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0])
    expected, given = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    expected_optimizer = LearnedOptimizer([expected], checkpoint, lr=number)
    optimizer = LearnedOptimizer([given], checkpoint, lr=lr)
    for _ in range(2):
        expected.grad, given.grad = grad.clone(), grad.clone()
        expected_optimizer.step(), optimizer.step()
    torch.testing.assert_close(given, expected, rtol=1e-6, atol=0)
    assert optimizer.param_groups[0]["lr"] is lr  # kept as given, as torch.optim keeps it (schedulers write into a tensor)


def test_a_tensor_lr_is_scheduled_in_place_as_torch_optim_schedules_adams(checkpoint):
    lr = torch.tensor(1.0)
    optimizer = LearnedOptimizer([nn.Parameter(torch.zeros(4))], checkpoint, lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(4)
    optimizer.step(), scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.5
    state = copy.deepcopy(optimizer.state_dict())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(optimizer.param_groups[0]["lr"], torch.tensor(0.5))


@pytest.mark.parametrize(
    "lr, torch_message",
    [
        (-1.0, "Invalid learning rate: -1.0"),
        (float("nan"), "Invalid learning rate: nan"),
        (np.float32(-1.0), "Invalid learning rate: -1.0"),
        (torch.tensor(-1.0), "Invalid learning rate: -1.0"),
        (torch.tensor(float("nan")), "Invalid learning rate: nan"),
        (torch.tensor([0.1, 0.2]), "Tensor lr must be 1-element"),
    ],
    ids=["negative", "nan", "negative np.float32", "negative tensor", "nan tensor", "two elements"],
)
def test_learning_rates_torch_optim_adam_refuses_are_refused_with_its_message(checkpoint, lr, torch_message):
    with pytest.raises(ValueError, match=f"^{re.escape(torch_message)}$"):
        torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=lr)
    with pytest.raises(ValueError, match=f"^{re.escape(torch_message)}" + r"\b.*the factor on the learned update"):
        LearnedOptimizer([nn.Parameter(torch.zeros(2))], checkpoint, lr=lr)


@pytest.mark.parametrize(
    "lr",
    [float("inf"), True, torch.tensor(True), torch.tensor(1j), "0.1", None, np.array([0.25])],
    ids=["inf", "bool", "bool tensor", "complex tensor", "str", "None", "[1] ndarray"],
)
def test_learning_rates_that_are_not_a_finite_real_number_are_refused(checkpoint, lr):
    # Stricter than torch.optim.Adam, which takes inf and True (a factor of inf makes every
    # updated parameter inf or nan; True is a flag in the wrong place) and fails on a string,
    # None or a [1] ndarray with a TypeError from inside its checks or its step.
    with pytest.raises(ValueError, match=r"^Invalid learning rate: .* \(expected a finite number >= 0 or a one-element real tensor"):
        LearnedOptimizer([nn.Parameter(torch.zeros(2))], checkpoint, lr=lr)


@pytest.mark.cuda
@needs_cuda
def test_a_cuda_tensor_lr_scales_the_update_of_cpu_and_cuda_parameters(checkpoint):
    grad = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for device in ("cpu", CUDA):
        expected, given = nn.Parameter(torch.zeros(4, device=device)), nn.Parameter(torch.zeros(4, device=device))
        expected.grad, given.grad = grad.to(device), grad.to(device)
        LearnedOptimizer([expected], checkpoint, lr=0.25).step()
        LearnedOptimizer([given], checkpoint, lr=torch.tensor(0.25, device=CUDA)).step()
        torch.testing.assert_close(given, expected, rtol=1e-6, atol=0)


def test_a_step_refused_in_a_later_group_leaves_every_group_unstepped(checkpoint):
    # A sparse gradient or a misfitting rule_group in group 1 was found only after group 0 had
    # been stepped: the retry the error asks for then gave group 0 a second update.
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    reference = nn.Parameter(a.detach().clone())
    optimizer = LearnedOptimizer([{"params": [a]}, {"params": [b]}], checkpoint)
    a.grad = torch.randn(4)
    reference.grad = a.grad.clone()
    b.grad = torch.randn(3).to_sparse()
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        optimizer.step()
    assert torch.equal(a, before) and "h" not in optimizer.state[a]
    b.grad = b.grad.to_dense()
    optimizer.step()
    LearnedOptimizer([reference], checkpoint).step()
    assert torch.equal(a, reference)

    rule = PerGroupRule({"x": sensitive_rule(seed=0), "y": sensitive_rule(seed=1, hidden_size=5)})
    p, q = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    optimizer = LearnedOptimizer([{"params": [p], "rule_group": "x"}, {"params": [q], "rule_group": "x"}], rule)
    p.grad, q.grad = torch.randn(4), torch.randn(3)
    optimizer.step()
    optimizer.param_groups[1]["rule_group"] = "y"
    before, h = p.detach().clone(), optimizer.state[p]["h"].clone()
    with pytest.raises(ValueError, match="param group 1's LSTM state is 2 layers x 20 units"):
        optimizer.step()
    assert torch.equal(p, before) and torch.equal(optimizer.state[p]["h"], h)
    optimizer.param_groups[1]["rule_group"] = "nope"
    with pytest.raises(ValueError, match=r"give each param group a 'rule_group' naming one \(got 'nope'\)"):
        optimizer.step()
    assert torch.equal(p, before) and torch.equal(optimizer.state[p]["h"], h)


def test_a_state_dict_of_parameters_on_the_meta_device_loads_as_adams_does(checkpoint):
    # Deferred initialisation builds model and optimizer on the meta device; loading their state
    # read the hidden states' values to check them (Tensor.item() cannot be called on meta tensors).
    model = nn.Linear(3, 2, device="meta")
    optimizer = LearnedOptimizer(model.parameters(), checkpoint)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    optimizer.step()
    resumed = LearnedOptimizer(model.parameters(), checkpoint)
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.state[model.weight]["h"].shape == (2, 20, 6) and resumed.state[model.weight]["h"].is_meta
    resumed.step()


def test_float64_gradients_beyond_the_rules_float32_range_keep_their_sign(checkpoint):
    # The float32 rule read a finite float64 gradient of 1e39 as inf: the saturated LSTM then gave
    # +1e39 and -1e39 the same update. They now read as float32's largest value, sign kept.
    largest = torch.finfo(torch.float32).max
    huge, clamped = nn.Parameter(torch.zeros(4, dtype=torch.float64)), nn.Parameter(torch.zeros(4, dtype=torch.float64))
    huge.grad = torch.tensor([1e39, -1e39, 1e300, -1.0], dtype=torch.float64)
    clamped.grad = torch.tensor([largest, -largest, largest, -1.0], dtype=torch.float64)
    optimizer = LearnedOptimizer([huge], checkpoint)
    optimizer.step()
    LearnedOptimizer([clamped], checkpoint).step()
    assert torch.equal(huge, clamped) and huge[0] != huge[1]
    assert optimizer.nonfinite_steps == 0


def test_a_step_inside_an_autocast_region_runs_the_rule_in_its_own_dtype(checkpoint):
    # Training loops often call optimizer.step() inside the autocast block of the forward pass;
    # the LSTM's matmuls then ran in bfloat16 (float16 on CUDA), not the float32 meta-training saw.
    grad = torch.randn(300, generator=torch.Generator().manual_seed(0))
    plain, autocast = nn.Parameter(torch.zeros(300)), nn.Parameter(torch.zeros(300))
    optimizers = LearnedOptimizer([plain], checkpoint), LearnedOptimizer([autocast], checkpoint)
    for _ in range(2):
        plain.grad, autocast.grad = grad.clone(), grad.clone()
        optimizers[0].step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            optimizers[1].step()
            assert torch.is_autocast_enabled("cpu")  # left on for the caller's code
    assert torch.equal(plain, autocast)
