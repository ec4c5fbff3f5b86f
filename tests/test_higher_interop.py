"""higher interop: innerloop_ctx unrolls LearnedOptimizer exactly, and its meta-gradients equal finite differences."""

import copy
import runpy
import sys
from pathlib import Path

import higher
import pytest
import torch
from torch import nn

from l2l import LearnedOptimizer
from l2l.higher_interop import DifferentiableLearnedOptimizer
from helpers import sensitive_rule


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=generator, dtype=torch.float64), torch.randn(8, 2, generator=generator, dtype=torch.float64)


def mse(model, x, y, **kwargs):
    return nn.functional.mse_loss(model(x, **kwargs), y)


def test_registered_with_higher():
    assert higher.optim._opt_mapping[LearnedOptimizer] is DifferentiableLearnedOptimizer


@pytest.mark.parametrize("maximize", [False, True])
def test_innerloop_continues_the_learned_optimizer_step_for_step(maximize):
    x, y = data()
    model = mlp()
    optimizer = LearnedOptimizer(model.parameters(), sensitive_rule(dtype=torch.float64), chunk_size=5, maximize=maximize)
    for _ in range(2):  # The inner loop must start from these hidden states.
        optimizer.zero_grad()
        mse(model, x, y).backward()
        optimizer.step()
    reference_model, reference = copy.deepcopy((model, optimizer))
    expected = []
    for _ in range(3):
        reference.zero_grad()
        loss = mse(reference_model, x, y)
        loss.backward()
        reference.step()
        expected.append(loss.detach())
    with higher.innerloop_ctx(model, optimizer) as (fmodel, diffopt):
        losses = []
        for _ in range(3):
            loss = mse(fmodel, x, y)
            diffopt.step(loss)
            losses.append(loss.detach())
        final = [p.detach() for p in fmodel.parameters()]
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-12, atol=1e-14)
    for p, q in zip(final, reference_model.parameters()):
        torch.testing.assert_close(p, q.detach(), rtol=1e-12, atol=1e-14)


def meta_loss(rule, model, lr_scale, x, y, steps=3):
    optimizer = LearnedOptimizer(model.parameters(), rule)
    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=False, override={"lr": [lr_scale]}) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            diffopt.step(mse(fmodel, x, y))
        return mse(fmodel, x, y)


def test_meta_gradient_matches_central_finite_differences():
    x, y = data()
    rule, model = sensitive_rule(dtype=torch.float64), mlp()
    lr_scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    named = {**{f"rule.{k}": v for k, v in rule.named_parameters()}, **{f"model.{k}": v for k, v in model.named_parameters()}}
    names = ["rule.weight_out", "rule.bias_l0", "rule.weight_ih_l0", "rule.weight_hh_l1", "model.0.weight", "model.2.bias"]
    tensors = [named[name] for name in names] + [lr_scale]
    grads = torch.autograd.grad(meta_loss(rule, model, lr_scale, x, y), tensors)
    generator = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name, tensor, grad in zip([*names, "lr_scale"], tensors, grads):
        for _ in range(2):
            index = tuple(torch.randint(0, size, (1,), generator=generator).item() for size in tensor.shape)
            original = tensor[index].item()
            values = []
            for shift in (eps, -eps):
                with torch.no_grad():
                    tensor[index] = original + shift
                values.append(meta_loss(rule, model, lr_scale, x, y).item())  # higher needs grad mode inside.
            with torch.no_grad():
                tensor[index] = original
            numeric = (values[0] - values[1]) / (2 * eps)
            assert grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9), (name, index)
        assert grad.abs().sum() > 0, name


def test_nonfinite_gradients_are_masked_and_meta_gradients_stay_finite():
    x, y = data()
    rule, model = sensitive_rule(dtype=torch.float64), mlp()
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


def test_test_mode_keeps_no_graph():
    x, y = data()
    model = mlp()
    optimizer = LearnedOptimizer(model.parameters(), sensitive_rule(dtype=torch.float64))
    with higher.innerloop_ctx(model, optimizer, track_higher_grads=False) as (fmodel, diffopt):
        for _ in range(2):
            diffopt.step(mse(fmodel, x, y))
        states = [state["h"] for group_state in diffopt.state for state in group_state.values()]
    assert states and all(h.grad_fn is None for h in states)


def test_example_runs(monkeypatch, capsys):
    example = Path(__file__).resolve().parents[1] / "examples" / "higher_meta_learning.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--outer-steps", "2", "--inner-steps", "3"])
    runpy.run_path(str(example), run_name="__main__")
    assert "held-out final loss after meta-training" in capsys.readouterr().out
