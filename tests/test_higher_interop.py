"""higher interop: innerloop_ctx unrolls LearnedOptimizer exactly, and its meta-gradients equal finite differences."""

import copy
import re
import runpy
import sys
from pathlib import Path

import higher
import numpy as np
import pytest
import torch
from torch import nn

from l2l import LearnedOptimizer
from l2l.higher_interop import DifferentiableLearnedOptimizer
from l2l.optimizers.grouped import PerGroupRule
from helpers import sensitive_rule

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    # At most 30 coordinates a step: a second thread only adds hand-offs (10x slower on busy cores).
    torch.set_num_threads(1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=generator, dtype=F64), torch.randn(8, 2, generator=generator, dtype=F64)


def mse(model, x, y, **kwargs):
    return nn.functional.mse_loss(model(x, **kwargs), y)


class Net(nn.Module):
    """Two layers and the parameters the drop-in skips: a frozen one, an unused one, and one used every other step.

    The last makes a bucket change membership between steps, so state kept by position within a
    bucket (rather than within the group) lands on the wrong parameter.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
        self.unused = nn.Parameter(torch.randn(3))
        self.sometimes = nn.Parameter(torch.randn(2))
        self.double()

    def forward(self, x, use_sometimes=True):
        out = self.second(torch.tanh(self.first(x))) + self.frozen
        return out * self.sometimes.sum().sin() if use_sometimes else out


def two_groups(net):
    """Two param groups with different lrs, each optimized by its own LSTM of a PerGroupRule."""
    return [
        {"params": [net.frozen, net.sometimes, net.first.weight, net.first.bias], "lr": 0.5, "chunk_size": 5, "rule_group": "a"},
        {"params": [net.second.weight, net.unused, net.second.bias], "lr": 1.25, "rule_group": "b"},
    ]


def two_lstms(hidden_b=20):
    return PerGroupRule({"a": sensitive_rule(seed=0, dtype=F64), "b": sensitive_rule(seed=1, dtype=F64, hidden_size=hidden_b)})


def apply_override(groups, override):
    """What higher does with an override, on the drop-in's groups: one value for all groups, or one each."""
    for key, values in (override or {}).items():
        for index, group in enumerate(groups):
            value = values[0] if len(values) == 1 else values[index]
            group[key] = value.item() if isinstance(value, torch.Tensor) else value


def test_registered_with_higher():
    assert higher.optim._opt_mapping[LearnedOptimizer] is DifferentiableLearnedOptimizer


USES = (True, False, True, True)  # Whether each inner step uses Net.sometimes.
STEP_CASES = {
    "tracked": ({}, {}),
    "test mode": ({"track_higher_grads": False}, {}),
    # Tensor lrs (0-d, and a [1] float32 one: the meta-learned lr's forms), then per-step overrides.
    "overrides": (
        {"override": {"lr": [torch.tensor(0.25, dtype=F64, requires_grad=True), torch.tensor([0.75])]}},
        {1: {"lr": [2.0], "maximize": [False, True]}, 2: {"rule_group": ["b", "a"]}},
    ),
    "test mode, overrides": (
        {"track_higher_grads": False, "override": {"lr": [0.75, 0.25], "rule_group": ["b", "a"]}},
        {2: {"maximize": [True]}},
    ),
}


@pytest.mark.parametrize("ctx_kwargs, step_overrides", STEP_CASES.values(), ids=STEP_CASES.keys())
def test_innerloop_continues_the_learned_optimizer_step_for_step(ctx_kwargs, step_overrides):
    x, y = data()
    net = Net()
    optimizer = LearnedOptimizer(two_groups(net), two_lstms())
    for use in (True, False):  # The inner loop must start from these hidden states.
        optimizer.zero_grad()
        mse(net, x, y, use_sometimes=use).backward()
        optimizer.step()
    reference_net, reference = copy.deepcopy((net, optimizer))
    apply_override(reference.param_groups, ctx_kwargs.get("override"))
    expected = []
    for step, use in enumerate(USES):
        apply_override(reference.param_groups, step_overrides.get(step))
        reference.zero_grad()
        loss = mse(reference_net, x, y, use_sometimes=use)
        loss.backward()
        reference.step()
        expected.append(loss.detach())
    with higher.innerloop_ctx(net, optimizer, **ctx_kwargs) as (fnet, diffopt):
        losses = []
        for step, use in enumerate(USES):
            loss = mse(fnet, x, y, use_sometimes=use)
            diffopt.step(loss, override=step_overrides.get(step))
            losses.append(loss.detach())
        final = list(fnet.parameters())
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-12, atol=1e-14)
    for p, q in zip(final, reference_net.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
    # The hidden states too: the frozen and the unused parameter have none, the others the drop-in's.
    for index, (group, reference_group) in enumerate(zip(optimizer.param_groups, reference.param_groups)):
        for position, (p, q) in enumerate(zip(group["params"], reference_group["params"])):
            state, expected_state = diffopt.state[index].get(position, {}), reference.state.get(q, {})
            assert state.keys() == expected_state.keys(), (index, position)
            for key in expected_state:
                # (Looser: the drop-in steps group 0 in chunks of 5, the twin in one call; the rounding differs.)
                torch.testing.assert_close(state[key], expected_state[key], rtol=1e-10, atol=1e-12)
                # Test mode keeps no graph; the tracked states stay differentiable in the rule's weights.
                assert (state[key].grad_fn is None) == (ctx_kwargs.get("track_higher_grads") is False)


def bad_options():
    """(key, value) pairs the drop-in refuses, each with an override of the twin."""
    return [
        ("lr", -1.0),
        ("lr", float("nan")),
        ("lr", "0.1"),
        ("lr", True),
        ("maximize", "no"),
        ("state_dtype", torch.int32),
        ("chunk_size", -5),
        ("rule_group", "conv"),  # The rule is a single LSTM.
    ]


@pytest.mark.parametrize("key, value", bad_options())
def test_invalid_overrides_are_refused_with_the_drop_ins_message(key, value):
    x, y = data()
    model = mlp()
    with pytest.raises(ValueError) as refused:
        LearnedOptimizer(model.parameters(), sensitive_rule(dtype=F64), **{key: value})
    message = re.escape(str(refused.value))
    optimizer = LearnedOptimizer(model.parameters(), sensitive_rule(dtype=F64))
    with pytest.raises(ValueError, match=message):
        with higher.innerloop_ctx(model, optimizer, override={key: [value]}):
            pass
    with higher.innerloop_ctx(model, optimizer) as (fmodel, diffopt):
        options = lambda: {k: v for k, v in diffopt.param_groups[0].items() if k != "params"}  # noqa: E731
        before = options()
        with pytest.raises(ValueError, match=message):
            diffopt.step(mse(fmodel, x, y), override={key: [value]})
        assert options() == before  # Refused, not left behind for the next step.
        diffopt.step(mse(fmodel, x, y))


@pytest.mark.parametrize(
    "lr, message",
    [
        (torch.tensor([0.1, 0.2], dtype=F64), "Tensor lr must be 1-element, got shape [2]"),
        (torch.tensor(-1.0, dtype=F64), "Invalid learning rate: -1.0"),
        (torch.tensor(float("nan")), "Invalid learning rate: nan"),
        (torch.tensor(True), "Invalid learning rate: tensor(True)"),
        (torch.tensor(1j), "Invalid learning rate: tensor(0.+1.j)"),
    ],
    ids=["two elements", "negative", "nan", "bool", "complex"],
)
def test_invalid_tensor_lrs_are_refused_with_the_drop_ins_message(lr, message):
    model = mlp()
    optimizer = LearnedOptimizer(model.parameters(), sensitive_rule(dtype=F64))
    expected = f"{message} (expected a finite number >= 0 or a one-element real tensor holding one"
    with pytest.raises(ValueError, match=re.escape(expected)):
        with higher.innerloop_ctx(model, optimizer, override={"lr": [lr]}):
            pass
    with pytest.raises(ValueError, match=re.escape(expected)):
        LearnedOptimizer(model.parameters(), sensitive_rule(dtype=F64), lr=lr)


def test_a_tensor_lr_off_the_cpu_is_not_read_by_the_twins_check():
    from l2l.torch_optim import check_options

    model = mlp()
    optimizer = LearnedOptimizer(model.parameters(), sensitive_rule(dtype=F64))
    group = dict(optimizer.param_groups[0], lr=torch.tensor(-1.0, device="meta"))  # .item() on meta raises
    check_options(optimizer.rule, group, read_device_lr=False)  # reading a CUDA lr would sync at every step
    with pytest.raises(ValueError, match="Invalid learning rate"):
        check_options(optimizer.rule, dict(group, lr=torch.tensor(-1.0)), read_device_lr=False)


def test_one_element_tensor_lrs_act_as_their_number():
    x, y = data()
    finals = []
    lrs = (0.75, torch.tensor(0.75, dtype=F64), torch.tensor([0.75]), torch.tensor([[0.75]], dtype=F64), np.float32(0.75))
    for lr in lrs:
        model = mlp()
        optimizer = LearnedOptimizer(model.parameters(), sensitive_rule(dtype=F64))
        with higher.innerloop_ctx(model, optimizer, override={"lr": [lr]}) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(mse(fmodel, x, y))
            finals.append([p.detach() for p in fmodel.parameters()])
    for final in finals[1:]:
        for p, q in zip(final, finals[0]):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lr", [torch.tensor(2), np.int64(2), np.array(2.0), torch.tensor([2.0])], ids=["int tensor", "np.int64", "0-d ndarray", "[1] tensor"])
def test_the_twin_starts_from_any_lr_the_drop_in_takes_as_its_number(lr):
    x, y = data()
    finals = []
    for given in (2.0, lr):
        model = mlp()
        optimizer = LearnedOptimizer(model.parameters(), sensitive_rule(dtype=F64), lr=given)
        with higher.innerloop_ctx(model, optimizer) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(mse(fmodel, x, y))
            finals.append([p.detach() for p in fmodel.parameters()])
    for p, q in zip(*finals):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_rule_group_override_to_an_lstm_of_another_shape_is_refused():
    x, y = data()
    net = Net()
    optimizer = LearnedOptimizer(two_groups(net), two_lstms(hidden_b=5))
    optimizer.zero_grad()
    mse(net, x, y).backward()
    optimizer.step()  # Group 0 now holds 2 x 20 states, which the 2 x 5 LSTM "b" cannot take.
    expected = "param group 0's LSTM state is 2 layers x 20 units, but rule_group 'b' is 2 x 5"
    with pytest.raises(ValueError, match=re.escape(expected)):
        with higher.innerloop_ctx(net, optimizer, override={"rule_group": ["b"]}):
            pass
    with higher.innerloop_ctx(net, optimizer) as (fnet, diffopt):
        with pytest.raises(ValueError, match=re.escape(expected)):
            diffopt.step(mse(fnet, x, y), override={"rule_group": ["b", "b"]})
        assert [group["rule_group"] for group in diffopt.param_groups] == ["a", "b"]


def test_a_torch_optim_option_the_rule_lacks_is_refused_as_an_override():
    model = mlp()
    with pytest.raises(ValueError) as refused:
        LearnedOptimizer([{"params": list(model.parameters()), "weight_decay": 0.1}], sensitive_rule(dtype=F64))
    optimizer = LearnedOptimizer(model.parameters(), sensitive_rule(dtype=F64))
    with pytest.raises(ValueError, match=re.escape(str(refused.value))):
        with higher.innerloop_ctx(model, optimizer, override={"weight_decay": [0.1]}):
            pass


def test_sparse_gradients_get_the_drop_ins_message():
    torch.manual_seed(0)
    embedding = nn.Embedding(5, 3, sparse=True).double()
    optimizer = LearnedOptimizer(embedding.parameters(), sensitive_rule(dtype=F64))
    embedding(torch.tensor([1, 2])).pow(2).sum().backward()
    with pytest.raises(RuntimeError) as refused:
        optimizer.step()
    with higher.innerloop_ctx(embedding, optimizer) as (fembedding, diffopt):
        with pytest.raises(RuntimeError, match=re.escape(str(refused.value))):
            diffopt.step(fembedding(torch.tensor([1, 2])).pow(2).sum())


def meta_loss(rule, model, lr_scale, x, y, steps=3):
    optimizer = LearnedOptimizer(model.parameters(), rule)
    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=False, override={"lr": [lr_scale]}) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            diffopt.step(mse(fmodel, x, y))
        return mse(fmodel, x, y)


def assert_gradients_match_central_differences(loss, named, samples=1):
    """``loss()``'s gradient in each of ``named`` ({name: tensor}) equals central differences at ``samples`` random entries."""
    tensors = list(named.values())
    grads = torch.autograd.grad(loss(), tensors)
    generator = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name, tensor, grad in zip(named, tensors, grads):
        for _ in range(samples):
            index = tuple(torch.randint(0, size, (1,), generator=generator).item() for size in tensor.shape)
            original = tensor[index].item()
            values = []
            for shift in (eps, -eps):
                with torch.no_grad():
                    tensor[index] = original + shift
                values.append(loss().item())  # higher needs grad mode inside.
            with torch.no_grad():
                tensor[index] = original
            numeric = (values[0] - values[1]) / (2 * eps)
            assert grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, index)
        assert grad.abs().sum() > 0, name


def test_meta_gradient_matches_central_finite_differences():
    x, y = data()
    rule, model = sensitive_rule(dtype=F64), mlp()
    lr_scale = torch.tensor(0.7, dtype=F64, requires_grad=True)
    named = {**{f"rule.{k}": v for k, v in rule.named_parameters()}, **{f"model.{k}": v for k, v in model.named_parameters()}}
    names = ["rule.weight_out", "rule.bias_l0", "rule.weight_ih_l0", "rule.weight_hh_l1", "model.0.weight", "model.2.bias"]
    assert_gradients_match_central_differences(
        lambda: meta_loss(rule, model, lr_scale, x, y), {**{name: named[name] for name in names}, "lr_scale": lr_scale}, samples=2
    )


def test_meta_gradient_with_param_groups_matches_central_finite_differences():
    """Two groups, each with its own LSTM and tensor lr; a frozen, an unused and a sometimes-used parameter."""
    x, y = data()
    rule, net = two_lstms(), Net()
    with torch.no_grad():
        net.sometimes[0] += 0.4  # Its sum starts near pi/2, where its gradient is ~0: too sharp for differences.
    lrs = [torch.tensor(0.5, dtype=F64, requires_grad=True), torch.tensor(1.25, dtype=F64, requires_grad=True)]

    def loss():
        optimizer = LearnedOptimizer(two_groups(net), rule)
        with higher.innerloop_ctx(net, optimizer, copy_initial_weights=False, override={"lr": lrs}) as (fnet, diffopt):
            for use in (True, False, True):
                diffopt.step(mse(fnet, x, y, use_sometimes=use))
            return mse(fnet, x, y)

    named = {**{f"rule.{k}": v for k, v in rule.named_parameters()}, **dict(net.named_parameters())}
    names = ["rule.rules.a.weight_out", "rule.rules.a.weight_hh_l1", "rule.rules.b.bias_l0", "rule.rules.b.weight_ih_l0",
             "first.weight", "second.bias", "sometimes"]
    assert_gradients_match_central_differences(loss, {**{name: named[name] for name in names}, "lr a": lrs[0], "lr b": lrs[1]})


def test_nonfinite_gradients_are_masked_and_meta_gradients_stay_finite():
    x, y = data()
    rule, model = sensitive_rule(dtype=F64), mlp()
    optimizer = LearnedOptimizer(model.parameters(), rule)

    def poison(grads):
        grads = list(grads)
        grads[1] = torch.where(torch.arange(4) == 2, torch.full_like(grads[1], float("nan")), grads[1])
        return grads

    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=False) as (fmodel, diffopt):
        before = list(fmodel.parameters())[1].detach().clone()
        diffopt.step(mse(fmodel, x, y), grad_callback=poison)
        after = list(fmodel.parameters())[1].detach()
        loss = mse(fmodel, x, y)
    assert after[2] == before[2]
    assert not torch.equal(after, before)
    grads = torch.autograd.grad(loss, list(rule.parameters()))
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_example_runs(monkeypatch, capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "higher_meta_learning.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--outer-steps", "2", "--inner-steps", "3"])
    runpy.run_path(str(example), run_name="__main__")
    assert "held-out final loss after meta-training" in capsys.readouterr().out
