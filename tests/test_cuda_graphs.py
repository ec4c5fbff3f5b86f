"""GraphedTruncation: the eager fallback equals the meta-training loop; on CUDA, graph replays equal eager truncations."""

import pytest
import torch
from torch import nn

from l2l.kernels import fused
from l2l.meta.graphs import GraphedTruncation, graph_unsupported_reason
from l2l.meta.unroll import detach_carry, start, unroll
from l2l.optimizers import CoordinateWiseLSTM
from l2l.tasks import QuadraticFamily

from gpu import CUDA, needs_cuda


def manual_truncations(rule, optimizer, task, weights, truncations, steps):
    """What MetaTrainer.train_epoch does per truncation, written out."""
    carry = start(rule, task)
    meta_losses = []
    for _ in range(truncations):
        losses, carry = unroll(rule, task, carry, steps)
        meta_loss = (weights[:steps, None] * losses).sum(0).mean()
        optimizer.zero_grad(set_to_none=True)
        meta_loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(rule.parameters(), 1.0)
        if bool(torch.isfinite(meta_loss) & torch.isfinite(grad_norm)):
            optimizer.step()
        meta_losses.append(meta_loss.detach())
        carry = detach_carry(carry)
    return torch.stack(meta_losses), carry


def graphed_truncations(rule, optimizer, task, weights, truncations, steps, **options):
    runner = GraphedTruncation(rule, optimizer, task, weights, 1.0, **options)
    carry = start(rule, task)
    meta_losses = []
    for _ in range(truncations):
        result = runner(carry, steps)
        meta_losses.append(result.meta_loss.clone())
        carry = result.carry
    return torch.stack(meta_losses), carry, runner


def test_eager_fallback_off_cuda_equals_the_training_loop():
    task = QuadraticFamily().sample(8, torch.Generator().manual_seed(0))
    weights = torch.linspace(0.5, 1.0, 5)
    results = []
    for runner in (manual_truncations, graphed_truncations):
        rule = CoordinateWiseLSTM(seed=1)
        optimizer = torch.optim.Adam(rule.parameters(), lr=1e-2)
        out = runner(rule, optimizer, task, weights, 3, 5)
        results.append((out[0], out[1], [p.detach().clone() for p in rule.parameters()]))
    (losses, carry, params), (g_losses, g_carry, g_params) = results
    assert torch.equal(losses, g_losses)
    assert torch.equal(carry.params, g_carry.params) and carry.step == g_carry.step == 15
    for p, q in zip(params, g_params):
        assert torch.equal(p, q)


def test_graphs_are_refused_with_a_reason_off_cuda():
    task = QuadraticFamily().sample(2, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM()
    optimizer = torch.optim.Adam(rule.parameters())
    assert "CUDA" in graph_unsupported_reason(task, optimizer, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA graph"):
        GraphedTruncation(rule, optimizer, task, torch.ones(3), 1.0, use_graph=True)
    assert not GraphedTruncation(rule, optimizer, task, torch.ones(3), 1.0).use_graph


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_cuda_graph_replays_equal_eager_truncations(kernel):
    if kernel == "fused" and not fused.fused_available(CUDA):
        pytest.skip("the fused kernel needs Triton")
    task = QuadraticFamily().sample(128, torch.Generator().manual_seed(0), CUDA)
    weights = torch.ones(20, device=CUDA)
    results = []
    for use_graph in (False, True):
        rule = CoordinateWiseLSTM(seed=2, kernel=kernel).to(CUDA)
        optimizer = torch.optim.Adam(rule.parameters(), lr=1e-3, capturable=True)
        losses, carry, runner = graphed_truncations(rule, optimizer, task, weights, 5, 20, use_graph=use_graph)
        assert runner.use_graph == use_graph
        results.append((losses, carry.params.clone(), [p.detach().clone() for p in rule.parameters()]))
    (losses, params, weights_eager), (g_losses, g_params, weights_graph) = results
    torch.testing.assert_close(g_losses, losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_params, params, rtol=1e-5, atol=1e-6)
    for a, b in zip(weights_graph, weights_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_new_task_new_length_and_lr_change():
    family = QuadraticFamily()
    tasks = [family.sample(16, torch.Generator().manual_seed(k), CUDA) for k in range(2)]
    weights = torch.ones(20, device=CUDA)
    outcomes = []
    for use_graph in (False, True):
        rule = CoordinateWiseLSTM(seed=3).to(CUDA)
        optimizer = torch.optim.Adam(rule.parameters(), lr=1e-3, capturable=True)
        runner = GraphedTruncation(rule, optimizer, tasks[0], weights, 1.0, use_graph=use_graph)
        losses = []
        for epoch, task in enumerate(tasks):
            if epoch:
                runner.load_task(task)
                for group in optimizer.param_groups:
                    group["lr"] = 5e-4  # a schedule step: recaptured
            carry = start(rule, runner.task)
            for steps in (20, 20, 7):  # a shorter last truncation: its own graph
                result = runner(carry, steps)
                losses.append(result.meta_loss.clone())
                carry = result.carry
        outcomes.append((torch.stack(losses), [p.detach().clone() for p in rule.parameters()]))
    torch.testing.assert_close(outcomes[1][0], outcomes[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outcomes[1][1], outcomes[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
