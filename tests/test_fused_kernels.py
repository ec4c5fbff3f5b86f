"""The fused Triton LSTM step against the reference: interpreter runs on the CPU, compiled runs on CUDA, and dispatch."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from l2l import LearnedOptimizer
from l2l.config import TrainConfig
from l2l.kernels import dispatch, fused, tensor_cores
from l2l.meta.train import MetaTrainer
from l2l.meta.unroll import detach_carry, start, unroll
from l2l.optimizers import CoordinateWiseLSTM, LSTMState
from l2l.optimizers.grouped import PerGroupRule
from l2l.tasks import QuadraticFamily, QuadraticTask
from l2l.torch_optim import learned_step

from gpu import CUDA, needs_cuda_and_triton

# numpy's overflow/invalid warnings from the interpreter (exp of large values, inf * 0) are expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

needs_triton = pytest.mark.skipif(fused.triton_version() is None, reason="Triton is not installed")

TIGHT = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.fixture
def interpreter():
    """Fused kernels on CPU tensors through Triton's interpreter, with small blocks (several programs per launch)."""
    problem = fused.interpreter_problem()
    if problem is not None:
        pytest.skip(problem)
    # float32 dots round like the compiled kernels' (tf32x3 by default), not exactly as numpy would.
    with fused.interpreter(), tensor_cores.emulated(), fused.configured(block=16, backward_block=16,
                                                                        interpreter_programs=2):
        yield


def edge_gradients(n: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Gradients over many scales, with zero, tiny (1e-30) and huge (+-1e30) entries first."""
    generator = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-9, 4, (n,), generator=generator)
    grad = (torch.randn(n, generator=generator) * scale).to(dtype)
    grad[:5] = torch.tensor([0.0, 1e-30, 1e30, -1e30, -1e-30], dtype=dtype)
    return grad


def random_state(rule, n, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (rule.num_layers, rule.hidden_size, n)
    return torch.randn(shape, generator=generator).to(dtype) * 0.5, torch.randn(shape, generator=generator).to(dtype)


def both_paths(rule, grad, h, c):
    """``(fused outputs, reference outputs)``, each ``(update, h_new, c_new)``."""
    outputs = []
    for kernel in ("fused", "reference"):
        rule.kernel = kernel
        update, state = rule(grad, LSTMState(h, c))
        outputs.append((update, state.h, state.c))
    rule.kernel = "auto"
    return outputs


def all_grads(rule, grad, h, c, weights):
    """Gradients of a random functional of ``(update, h_new, c_new)`` w.r.t. inputs and weights, for both paths."""
    results = []
    for kernel in ("fused", "reference"):
        rule.kernel = kernel
        inputs = [t.detach().clone().requires_grad_() for t in (grad, h, c)]
        update, state = rule(inputs[0], LSTMState(inputs[1], inputs[2]))
        objective = (update * weights[0]).sum() + (state.h * weights[1]).sum() + (state.c * weights[2]).sum()
        results.append(torch.autograd.grad(objective, inputs + list(rule.parameters())))
    rule.kernel = "auto"
    return results


def step_together(models, optimizers, steps=3, nan_step=1):
    """The same random gradients into each model, then each optimizer's step; one NaN at ``nan_step``."""
    for step in range(steps):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        if step == nan_step:
            grads[0].view(-1)[0] = float("nan")
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()


# -- interpreter (CPU) -----------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "n, layers, hidden, preprocess",
    [(37, 2, 20, "log_sign"), (300, 2, 20, "log_sign"), (37, 1, 20, "log_sign"), (21, 2, 8, "none")],
)
def test_forward_matches_reference_float64(interpreter, n, layers, hidden, preprocess):
    rule = CoordinateWiseLSTM(hidden_size=hidden, num_layers=layers, preprocess=preprocess, seed=3).double()
    grad = edge_gradients(n)
    h, c = random_state(rule, n)
    (update, h_new, c_new), (ref_update, ref_h, ref_c) = both_paths(rule, grad, h, c)
    torch.testing.assert_close(update, ref_update, **TIGHT[torch.float64])
    torch.testing.assert_close(h_new, ref_h, **TIGHT[torch.float64])
    torch.testing.assert_close(c_new, ref_c, **TIGHT[torch.float64])


@needs_triton
def test_forward_matches_reference_float32(interpreter):
    rule = CoordinateWiseLSTM(seed=4)
    grad = edge_gradients(53, torch.float32)
    h, c = random_state(rule, 53, torch.float32)
    for ours, reference in zip(*both_paths(rule, grad, h, c)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def forward_error(outputs):
    """Largest error of :func:`both_paths`' fused outputs against the reference's, relative to ``|reference| + 1``."""
    return max(((a - b).abs() / (b.abs() + 1)).max().item() for a, b in zip(*outputs))


def largest_errors(rule, n, seed=0):
    """Largest error of the fused path against the reference: outputs ``(update, h, c)`` and all gradients.

    Output errors are relative to ``|reference| + 1``; each gradient's error to the largest of
    its reference entries (at least 1), as the CUDA tests measure them.
    """
    device = next(rule.parameters()).device
    grad = edge_gradients(n, torch.float32, seed=seed).to(device)
    h, c = (t.to(device) for t in random_state(rule, n, torch.float32, seed=seed + 1))
    generator = torch.Generator().manual_seed(seed + 2)
    weights = [torch.randn(t.shape, generator=generator).to(device) for t in (grad, h, c)]
    forward = forward_error(both_paths(rule, grad, h, c))
    ours, reference = all_grads(rule, grad, h, c, weights)
    backward = max(((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() for a, b in zip(ours, reference))
    return forward, backward


@needs_triton
def test_precision_reaches_every_dot(interpreter):
    """Under tensor-core rounding, tf32x3 and ieee are float32-accurate in every output and gradient; tf32 is not.

    One dot left at Triton's default precision (tf32) would put tf32x3's error at tf32's.
    """
    rule = CoordinateWiseLSTM(seed=21)
    errors = {}
    for precision in fused.PRECISIONS:
        with fused.configured(precision=precision):
            errors[precision] = largest_errors(rule, 96)
    for precision in ("tf32x3", "ieee"):
        forward, backward = errors[precision]
        assert forward < 2e-6 and backward < 2e-6, (precision, errors)
    forward, backward = errors["tf32"]
    assert 1e-5 < forward < 1e-2 and 1e-5 < backward < 1e-2, errors  # ~4e-4 and ~1e-3 measured


@needs_triton
@pytest.mark.parametrize("weight_grads", fused.WEIGHT_GRADS)
@pytest.mark.parametrize("layers, preprocess", [(2, "log_sign"), (1, "none")])
def test_backward_matches_reference_float64(interpreter, layers, preprocess, weight_grads):
    rule = CoordinateWiseLSTM(num_layers=layers, preprocess=preprocess, seed=5).double()
    n = 45  # three blocks of 16 over two programs: one program reduces over two blocks
    grad = edge_gradients(n)
    h, c = random_state(rule, n)
    generator = torch.Generator().manual_seed(9)
    weights = [torch.randn(n, generator=generator).double(), torch.randn(h.shape, generator=generator).double(),
               torch.randn(c.shape, generator=generator).double()]
    with fused.configured(weight_grads=weight_grads):
        ours, reference = all_grads(rule, grad, h, c, weights)
    names = ["grad", "h", "c"] + [name for name, _ in rule.named_parameters()]
    for name, a, b in zip(names, ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"d/d{name}: {m}")


@needs_triton
def test_backward_with_only_the_update_used_float32(interpreter):
    rule = CoordinateWiseLSTM(seed=6)
    n = 40
    grad = edge_gradients(n, torch.float32)
    h, c = random_state(rule, n, torch.float32)
    results = []
    for kernel in ("fused", "reference"):
        rule.kernel = kernel
        update, _ = rule(grad, LSTMState(h.clone().requires_grad_(), c))
        results.append(torch.autograd.grad(update.square().sum(), list(rule.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("n", [0, 9])
def test_the_read_out_weights_get_no_gradient_where_only_the_state_is_used_as_in_the_reference(interpreter, n):
    """The update is all that reads ``w_out, b_out``: a loss of the new state alone leaves their gradients None.

    Zeros instead would not be the same to a meta-optimizer (Adam steps a parameter with a zero
    gradient, its moments carrying it on, and skips one whose gradient is None).
    """
    rule = CoordinateWiseLSTM(hidden_size=4, seed=8).double()
    grad = edge_gradients(n) if n else torch.zeros(0, dtype=torch.float64)
    h, c = random_state(rule, n)
    results = []
    for kernel in ("fused", "reference"):
        rule.kernel = kernel
        _, state = rule(grad, LSTMState(h, c))
        results.append(torch.autograd.grad(state.h.sum() + state.c.sum(), list(rule.parameters()), allow_unused=True))
    names = [name for name, _ in rule.named_parameters()]
    assert [name for name, g in zip(names, results[1]) if g is None] == ["weight_out", "bias_out"]
    for name, a, b in zip(names, *results):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, **TIGHT[torch.float64], msg=lambda m, name=name: f"d/d{name}: {m}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonfinite_gradients_propagate_like_the_reference(interpreter, dtype):
    # float32 runs the dots as tf32x3 (emulated), whose small terms turn an infinity into NaN
    # unless they are masked as the compiled kernels mask them.
    rule = CoordinateWiseLSTM(seed=7).to(dtype)
    grad = edge_gradients(20, dtype)
    grad[[5, 9, 11]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=grad.dtype)
    h, c = random_state(rule, 20, dtype)
    for ours, reference in zip(*both_paths(rule, grad, h, c)):
        torch.testing.assert_close(ours, reference, equal_nan=True, **TIGHT[dtype])


@needs_triton
def test_bfloat16_state_matches_reference(interpreter):
    rule = CoordinateWiseLSTM(seed=8, state_dtype=torch.bfloat16)
    n = 33
    grad = edge_gradients(n, torch.float32)
    h, c = (t.to(torch.bfloat16) for t in random_state(rule, n, torch.float32))
    (update, h_new, c_new), (ref_update, ref_h, ref_c) = both_paths(rule, grad, h, c)
    assert h_new.dtype == c_new.dtype == torch.bfloat16
    torch.testing.assert_close(update, ref_update, rtol=1e-5, atol=1e-6)
    # Both round the same float32 values to bfloat16 to nearest; a last-bit difference of the
    # float32 math can flip a rounding, so allow one bfloat16 ulp, in a few numbers only (a
    # truncating conversion differs in half of them).
    torch.testing.assert_close(h_new.float(), ref_h.float(), rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(c_new.float(), ref_c.float(), rtol=8e-3, atol=1e-5)
    assert (h_new != ref_h).float().mean() < 0.02 and (c_new != ref_c).float().mean() < 0.02
    weights = [torch.ones(n), torch.ones(h.shape, dtype=torch.bfloat16), torch.ones(c.shape, dtype=torch.bfloat16)]
    ours, reference = all_grads(rule, grad, h, c, weights)
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float64_rule_rounds_16_bit_states_and_updates_as_the_reference(interpreter, dtype):
    """A float64 rule with a 16-bit gradient and state: every 16-bit output rounded as torch rounds it.

    A float64 value went to bfloat16 through one conversion, which Triton's interpreter did as
    an integer cast (every new state 0) and which rounds once where torch goes through float32.
    """
    rule = CoordinateWiseLSTM(hidden_size=4, seed=8, state_dtype=dtype).double()
    n = 20
    grad = edge_gradients(n).clamp(-6e4, 6e4).to(dtype)  # finite in float16
    h, c = (t.to(dtype) for t in random_state(rule, n))
    (update, h_new, c_new), (ref_update, ref_h, ref_c) = both_paths(rule, grad, h, c)
    assert update.dtype == h_new.dtype == c_new.dtype == dtype
    # The float64 values agree to ~1e-16, so each rounds to the same 16-bit number.
    for ours, reference in ((update, ref_update), (h_new, ref_h), (c_new, ref_c)):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(t.shape, generator=generator).to(dtype) for t in (grad, h, c)]
    ours, reference = all_grads(rule, grad, h, c, weights)
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **(TIGHT[torch.float64] if a.dtype == torch.float64 else dict(rtol=0, atol=0)))


@needs_triton
@pytest.mark.parametrize("second_order", [False, True])
def test_unroll_meta_gradient_matches_reference(interpreter, second_order):
    """Two truncations of 4 steps on quadratics (N = 40): meta-losses and meta-gradients in float64."""
    family_task = QuadraticFamily(dim=10).sample(4, torch.Generator().manual_seed(0))
    task = QuadraticTask(family_task.W.double(), family_task.y.double())
    results = []
    for kernel in ("fused", "reference"):
        rule = CoordinateWiseLSTM(seed=11, kernel=kernel).double()
        carry = start(rule, task)
        grads, meta_losses = None, []
        for _ in range(2):
            losses, carry = unroll(rule, task, carry, 4, second_order=second_order)
            meta_loss = losses.sum(0).mean()
            step_grads = torch.autograd.grad(meta_loss, list(rule.parameters()))
            grads = step_grads if grads is None else [a + b for a, b in zip(grads, step_grads)]
            meta_losses.append(meta_loss.detach())
            carry = detach_carry(carry)
        results.append((torch.stack(meta_losses), grads, carry.opt_state))
    (losses, grads, state), (ref_losses, ref_grads, ref_state) = results
    torch.testing.assert_close(losses, ref_losses, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(state.h, ref_state.h, rtol=1e-10, atol=1e-12)


@needs_triton
def test_saved_activations_are_the_step_inputs_only(interpreter):
    """A T-step chain saves exactly (4 + 2 L H 4) bytes per coordinate-step: gradient, h and c (324 for 2 x 20)."""
    rule = CoordinateWiseLSTM(seed=12)
    n, steps = 64, 3
    weights = {p.data_ptr() for p in rule.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    h, c = rule.init_state(n)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for _ in range(steps):
            update, h, c = fused.forward(rule, torch.randn(n), h, c)
    assert update.requires_grad
    assert sum(saved.values()) / (n * steps) == 4 + 2 * 2 * 20 * 4 == 324


@needs_triton
def test_in_place_step_masks_nonfinite_and_updates_parameters(interpreter):
    rule = CoordinateWiseLSTM(seed=13)
    n = 50
    grad = edge_gradients(n, torch.float32)
    grad[[7, 8]] = torch.tensor([float("nan"), float("inf")])
    h, c = random_state(rule, n, torch.float32)
    finite = torch.isfinite(grad)
    rule.kernel = "reference"
    ref_update, ref_state = learned_step(rule, grad, LSTMState(h, c), lr_scale=0.5, finite=finite)
    params = torch.randn(n)
    expected_params = params + ref_update
    flag = torch.zeros(1, dtype=torch.int32)
    h_in, c_in = h.clone(), c.clone()
    update = fused.lstm_step_(rule, grad.clone(), h_in, c_in, params=params, lr_scale=0.5, nonfinite_flag=flag)
    torch.testing.assert_close(update, ref_update, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h_in, ref_state.h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_in, ref_state.c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params, expected_params, rtol=1e-6, atol=1e-7)
    assert int(flag) == 1
    assert torch.equal(h_in[:, :, 7], h[:, :, 7]) and update[7] == 0


@needs_triton
@pytest.mark.filterwarnings("ignore:LearnedOptimizer. non-finite gradients:RuntimeWarning")
def test_drop_in_fused_matches_reference(interpreter):
    """LearnedOptimizer on the fused in-place path (whole bucket, no chunks) against the chunked reference."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        LearnedOptimizer(model.parameters(), CoordinateWiseLSTM(seed=14, kernel=kernel), lr=0.7, chunk_size=8)
        for model, kernel in zip(models, ("fused", "reference"))
    ]
    step_together(models, optimizers, nan_step=1)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for a, b in zip(optimizers[0].state.values(), optimizers[1].state.values()):
        torch.testing.assert_close(a["h"], b["h"], rtol=1e-5, atol=1e-6)
    assert optimizers[0].nonfinite_steps == optimizers[1].nonfinite_steps == 1



@needs_triton
@pytest.mark.filterwarnings("ignore:LearnedOptimizer. non-finite gradients:RuntimeWarning")
def test_drop_in_fused_reads_float64_gradients_beyond_float32_as_the_reference_does(interpreter):
    """A float64 gradient of 1e39 is finite: clamped to the float32 rule's range, not cast to inf and skipped."""
    grad = torch.tensor([1e39, -1e39, float("inf"), -1.0], dtype=torch.float64)
    params = [nn.Parameter(torch.zeros(4, dtype=torch.float64)) for _ in range(2)]
    optimizers = [LearnedOptimizer([p], CoordinateWiseLSTM(seed=14, kernel=k)) for p, k in zip(params, ("fused", "reference"))]
    for p, optimizer in zip(params, optimizers):
        p.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-7)
    assert params[0][0] != params[0][1] and params[0][2] == 0
    assert optimizers[0].nonfinite_steps == optimizers[1].nonfinite_steps == 1  # the inf alone

def refused_step_inputs():
    """``(name, call(rule), message)``: fused entry points given inputs that do not fit a 2 x 4 rule.

    Each of these ran before it was checked: on a part of the state, on the wrong elements, or
    through memory past the tensors' ends (where it corrupted the heap instead, not tested here).
    """
    def state(n, hidden=4):
        return torch.zeros(2, hidden, n), torch.zeros(2, hidden, n)

    nan_grad = torch.tensor([0.5, float("nan"), 1.0])
    return [
        ("2-d gradient", lambda rule: fused.forward(rule, torch.randn(2, 5), *state(2)), r"flat gradient of shape \[N\]"),
        ("more state than coordinates", lambda rule: fused.forward(rule, torch.randn(10), *state(12)),
         r"state has shape \(2, 4, 12\), expected \(2, 4, 10\)"),
        ("wider state than the rule", lambda rule: fused.forward(rule, torch.randn(10), *state(10, hidden=5)),
         r"expected \(2, 4, 10\)"),
        ("complex gradient", lambda rule: fused.forward(rule, torch.randn(3, dtype=torch.complex64), *state(3)),
         "real floating-point gradient.*view_as_real"),
        ("in place, more state than coordinates", lambda rule: fused.lstm_step_(rule, torch.randn(10), *state(12)),
         r"expected \(2, 4, 10\)"),
        ("strided parameters", lambda rule: fused.lstm_step_(rule, torch.randn(10), *state(10),
                                                             params=torch.zeros(10, 2)[:, 0]),
         r"params must be a contiguous \[10\] tensor"),
        ("a longer out", lambda rule: fused.lstm_step_(rule, torch.randn(10), *state(10), out=torch.zeros(12)),
         r"out must be a contiguous \[10\] tensor"),
        ("a bool flag", lambda rule: fused.lstm_step_(rule, nan_grad, *state(3), nonfinite_flag=torch.zeros(1, dtype=torch.bool)),
         "nonfinite_flag must be a one-element int32 tensor.*got torch.bool"),
        ("a float flag", lambda rule: fused.lstm_step_(rule, nan_grad, *state(3), nonfinite_flag=torch.zeros(1)),
         "nonfinite_flag must be a one-element int32 tensor.*got torch.float32"),
    ]


@needs_triton
@pytest.mark.parametrize("name, call, message", refused_step_inputs(), ids=[case[0] for case in refused_step_inputs()])
def test_fused_entry_points_refuse_inputs_that_do_not_fit_the_rule(interpreter, name, call, message):
    # The kernels index the tensors unchecked: a mismatch must stop before the launch.
    with pytest.raises(ValueError, match=message):
        call(CoordinateWiseLSTM(hidden_size=4, seed=0))


@needs_triton
def test_second_derivatives_through_the_fused_step_are_refused_not_dropped(interpreter):
    """create_graph=True through the fused backward: the gradients it returns may not be differentiated again.

    Its backward is one kernel, with no graph of its own; taking the penalty's gradient from it
    returned the first-order term only (the penalty's share silently dropped) where the incoming
    gradient did not itself require grad.
    """
    rule = CoordinateWiseLSTM(hidden_size=4, seed=1, kernel="fused").double()
    grad = torch.randn(20, dtype=torch.float64, requires_grad=True)
    h, c = rule.init_state(20)
    update, _ = rule(grad, LSTMState(h, c))
    (d_grad,) = torch.autograd.grad(update.sum(), grad, create_graph=True)  # d_update = ones: needs no grad
    with pytest.raises(RuntimeError, match="no second derivative.*kernel='reference'"):
        torch.autograd.grad(d_grad.square().sum() + update.sum(), rule.weight_out)
    update, _ = rule(grad, LSTMState(h, c))
    (d_grad,) = torch.autograd.grad(update.square().sum(), grad, create_graph=True)  # d_update = 2 update
    with pytest.raises(RuntimeError, match="no second derivative.*kernel='reference'"):
        d_grad.sum().backward()
    # A create_graph=True backward that is not differentiated again still gives the first derivative.
    (first,) = torch.autograd.grad(fused.forward(rule, grad, h, c)[0].sum(), grad, create_graph=True)
    rule.kernel = "reference"
    (reference,) = torch.autograd.grad(rule(grad, LSTMState(h, c))[0].sum(), grad)
    torch.testing.assert_close(first.detach(), reference, **TIGHT[torch.float64])


@needs_triton
def test_higher_unroll_on_the_fused_path_matches_reference(interpreter):
    """higher takes every inner gradient with create_graph=True: the fused step's refusal of second derivatives must not fire there."""
    higher = pytest.importorskip("higher")
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for kernel in ("fused", "reference"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        rule = CoordinateWiseLSTM(hidden_size=5, seed=2, kernel=kernel).double()
        with higher.innerloop_ctx(model, LearnedOptimizer(model.parameters(), rule, lr=0.5),
                                  copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(fmodel(x).square().mean())
            meta_loss = fmodel(x).square().mean()
        results.append(torch.autograd.grad(meta_loss, list(rule.parameters()) + list(model.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TIGHT[torch.float64])


# -- dispatch and the missing-Triton path (CPU) ------------------------------------------------------


def test_auto_picks_the_reference_off_cuda():
    rule = CoordinateWiseLSTM()
    assert dispatch.select_kernel("auto", rule, torch.device("cpu")) == "reference"
    assert dispatch.select_kernel("reference", rule, torch.device("cpu")) == "reference"


def test_fused_on_cpu_raises_naming_why():
    rule = CoordinateWiseLSTM(kernel="fused")
    with pytest.raises(fused.FusedUnavailableError, match="CUDA|Triton"):
        rule(torch.randn(3), rule.init_state(3))


@pytest.mark.parametrize("options, interpreted, message", [
    (dict(), False, "the fused kernel runs on CUDA tensors"),
    (dict(num_layers=3), True, "the fused kernel has 1 or 2 LSTM layers, this rule 3"),  # as on a GPU: the rule refused
])
def test_meta_training_refuses_a_fused_kernel_that_cannot_run_before_drawing_any_instance(monkeypatch, options, interpreted,
                                                                                        message):
    # It was refused at the first LSTM step, inside the first epoch: after the data, the validation
    # instances and the epoch's instances had been drawn, and a progress bar drawn.
    monkeypatch.setattr(QuadraticFamily, "sample", lambda *args, **kwargs: pytest.fail("instances drawn before the refusal"))
    config = TrainConfig(device="cpu", kernel="fused", epochs=1, instances=2, optimizee_steps=4, unroll=2, **options)
    with fused.interpreter(interpreted), pytest.raises(fused.FusedUnavailableError, match=f"kernel='fused' cannot run: {message}"):
        MetaTrainer(config)


def test_unknown_kernel_and_unsupported_configurations():
    with pytest.raises(ValueError, match="unknown kernel"):
        CoordinateWiseLSTM(kernel="fast")
    three = CoordinateWiseLSTM(num_layers=3)
    assert "layers" in fused.unsupported_reason(three)
    assert fused.unsupported_reason(CoordinateWiseLSTM().half()) is not None
    assert fused.unsupported_reason(CoordinateWiseLSTM()) is None


def test_fused_config_rejects_bad_fields_with_exact_messages():
    with pytest.raises(ValueError, match=r"FusedConfig.weight_grads must be one of scratch, registers, got 'shared'"):
        fused.FusedConfig(weight_grads="shared")
    with pytest.raises(ValueError, match=r"FusedConfig.backward_block must be a power of two >= 16, got 24"):
        fused.FusedConfig(backward_block=24)
    with pytest.raises(ValueError, match=r"FusedConfig.warps must be 1, 2, 4, 8 or 16, got 3"):
        fused.FusedConfig(warps=3)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(maxnreg=-3), r"FusedConfig.maxnreg must be None or a positive integer, got -3"),
        (dict(backward_maxnreg=0.5), r"FusedConfig.backward_maxnreg must be None or a positive integer, got 0.5"),
        (dict(maxnreg=True), r"FusedConfig.maxnreg must be None or a positive integer, got True"),
        (dict(interpreter_programs=0), r"FusedConfig.interpreter_programs must be a positive integer, got 0"),
        (dict(programs_per_sm=True), r"FusedConfig.programs_per_sm must be a positive integer, got True"),
        (dict(warps=True), r"FusedConfig.warps must be 1, 2, 4, 8 or 16, got True"),
    ],
)
def test_fused_config_rejects_the_fields_that_reach_only_triton(changes, message):
    # Unchecked, these went through to the launch (a bool passing for 1), or silently to one program.
    with pytest.raises(ValueError, match=message):
        fused.FusedConfig(**changes)


def test_set_kernel_reaches_every_lstm_and_kernel_is_not_config():
    rule = PerGroupRule({"conv": CoordinateWiseLSTM(), "fc": CoordinateWiseLSTM()})
    dispatch.set_kernel(rule, "reference")
    assert all(sub.kernel == "reference" for sub in rule.rules.values())
    assert "kernel" not in CoordinateWiseLSTM(kernel="reference").config()


def test_without_triton_everything_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    fused.triton_version.cache_clear()
    try:
        assert fused.triton_version() is None
        assert not fused.fused_available("cuda")
        assert "Triton is not installed" in fused.unavailable_reason("cuda")
        rule = CoordinateWiseLSTM()
        assert dispatch.select_kernel("auto", rule, torch.device("cuda")) == "reference"
        update, _ = rule(torch.randn(4), rule.init_state(4))
        assert update.shape == (4,)
        rule.kernel = "fused"
        with pytest.raises(fused.FusedUnavailableError, match="Triton is not installed"):
            rule(torch.randn(4), rule.init_state(4))
    finally:
        fused.triton_version.cache_clear()


def test_package_imports_and_trains_without_triton(tmp_path):
    """A fresh interpreter where importing triton fails: l2l imports and runs a training epoch."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import l2l\n"
        "from l2l.kernels import fused\n"
        "assert fused.triton_version() is None\n"
        "r = l2l.meta_train(l2l.TrainConfig(epochs=1, instances=2, optimizee_steps=4, unroll=2, val_every=1,"
        " val_problems=2, device='cpu'), progress=False)\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",  # PYTHONPATH: higher may live there
                                 **{name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ}})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# -- CUDA (the GPU session) ----------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda_and_triton
@pytest.mark.parametrize("weight_grads", fused.WEIGHT_GRADS)
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
@pytest.mark.parametrize("n", [1, 37, 1000, 100_003])
def test_cuda_forward_and_gradients_match_reference(n, precision, weight_grads):
    rule = CoordinateWiseLSTM(seed=21).to(CUDA)
    grad = edge_gradients(n, torch.float32).to(CUDA) if n >= 5 else torch.randn(n).to(CUDA)
    h, c = (t.to(CUDA) for t in random_state(rule, n, torch.float32))
    with fused.configured(precision=precision, weight_grads=weight_grads):
        for ours, reference in zip(*both_paths(rule, grad, h, c)):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        weights = [torch.randn(n, device=CUDA), torch.randn(h.shape, device=CUDA), torch.randn(c.shape, device=CUDA)]
        ours, reference = all_grads(rule, grad, h, c, weights)
    for a, b in zip(ours, reference):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@needs_cuda_and_triton
def test_cuda_tf32_rounds_as_the_cpu_emulation_predicts():
    """precision="tf32" reaches the compiled dots: an error of the emulated size (4e-4 at this input), not float32's."""
    rule = CoordinateWiseLSTM(seed=21).to(CUDA)
    grad = edge_gradients(1000, torch.float32).to(CUDA)
    h, c = (t.to(CUDA) for t in random_state(rule, 1000, torch.float32))
    with fused.configured(precision="tf32"):
        error = forward_error(both_paths(rule, grad, h, c))
    assert 1e-5 < error < 1e-2, f"tf32 forward error {error:.1e}"


@pytest.mark.cuda
@needs_cuda_and_triton
@pytest.mark.parametrize("weight_grads", fused.WEIGHT_GRADS)
def test_cuda_float64_matches_reference_tightly(weight_grads):
    # float64 weights take the FMA path (precision "ieee"); every dot accumulates in float64.
    rule = CoordinateWiseLSTM(seed=23).double().to(CUDA)
    n = 1000
    grad = edge_gradients(n).to(CUDA)
    h, c = (t.to(CUDA) for t in random_state(rule, n))
    weights = [torch.randn(n, device=CUDA, dtype=torch.float64), torch.randn(h.shape, device=CUDA, dtype=torch.float64),
               torch.randn(c.shape, device=CUDA, dtype=torch.float64)]
    with fused.configured(weight_grads=weight_grads):
        for ours, reference in zip(*both_paths(rule, grad, h, c)):
            torch.testing.assert_close(ours, reference, **TIGHT[torch.float64])
        ours, reference = all_grads(rule, grad, h, c, weights)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.cuda
@needs_cuda_and_triton
def test_cuda_nonfinite_and_bfloat16():
    rule = CoordinateWiseLSTM(seed=22).to(CUDA)
    grad = edge_gradients(300, torch.float32)
    grad[[5, 6, 7]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    grad = grad.to(CUDA)
    h, c = (t.to(CUDA) for t in random_state(rule, 300, torch.float32))
    for ours, reference in zip(*both_paths(rule, grad, h, c)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5, equal_nan=True)
    compact = CoordinateWiseLSTM(seed=22, state_dtype=torch.bfloat16).to(CUDA)
    hb, cb = h.bfloat16(), c.bfloat16()
    grad = torch.randn(300, device=CUDA)
    (update, h_new, c_new), (ref_update, ref_h, ref_c) = both_paths(compact, grad, hb, cb)
    assert h_new.dtype == c_new.dtype == torch.bfloat16 and update.dtype == torch.float32
    # The update is float32 (read out before the state is rounded): its last bits differ in most
    # coordinates, so it is compared to float32 tolerance, not counted.
    torch.testing.assert_close(update, ref_update, rtol=1e-5, atol=1e-6)
    for ours, reference in ((h_new, ref_h), (c_new, ref_c)):
        torch.testing.assert_close(ours.float(), reference.float(), rtol=8e-3, atol=1e-5)
        assert (ours != reference).float().mean() < 0.02  # rounded to nearest as torch rounds (truncation: half)


@pytest.mark.cuda
@needs_cuda_and_triton
@pytest.mark.parametrize("second_order", [False, True])
def test_cuda_unroll_meta_gradients_match_reference(second_order):
    task = QuadraticFamily(dim=10).sample(128, torch.Generator().manual_seed(0), CUDA)
    results = []
    for kernel in ("fused", "reference"):
        rule = CoordinateWiseLSTM(seed=23, kernel=kernel).to(CUDA)
        carry = start(rule, task)
        losses, carry = unroll(rule, task, carry, 20, second_order=second_order)
        meta_loss = losses.sum(0).mean()
        results.append((meta_loss.detach(), torch.autograd.grad(meta_loss, list(rule.parameters()))))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        scale = b.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@needs_cuda_and_triton
def test_cuda_memory_per_coordinate_step_under_400_bytes():
    """A 20-step unroll over 2e5 coordinates: the peak memory growth stays under 400 bytes per coordinate-step."""
    n, steps = 200_000, 20
    rule = CoordinateWiseLSTM(seed=24).to(CUDA)
    params = torch.zeros(n, device=CUDA)
    scale = torch.rand(n, device=CUDA) + 0.5
    h, c = rule.init_state(n)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    total = 0.0
    for _ in range(steps):
        grad = (scale * (params.detach() - 1.0))  # a diagonal quadratic's gradient, first order
        update, (h, c) = rule(grad, LSTMState(h, c))
        params = params + update
        total = total + (scale * (params - 1.0) ** 2).sum()
    peak = torch.cuda.max_memory_allocated() - base
    total.backward()
    assert peak / (n * steps) <= 400, f"{peak / (n * steps):.0f} bytes per coordinate-step"


@pytest.mark.cuda
@needs_cuda_and_triton
def test_cuda_drop_in_uses_the_fused_kernel_and_matches_reference():
    torch.manual_seed(0)
    models = [nn.Linear(300, 200).to(CUDA) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [LearnedOptimizer(m.parameters(), CoordinateWiseLSTM(seed=25, kernel=k)) for m, k in
                  zip(models, ("auto", "reference"))]
    assert dispatch.select_kernel("auto", optimizers[0].rule, CUDA) == "fused"
    step_together(models, optimizers, nan_step=2)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    with pytest.warns(RuntimeWarning):
        assert optimizers[0].nonfinite_steps == 1


def test_cached_launch_constants_that_a_cuda_graph_captured_are_never_evicted(monkeypatch):
    # A captured graph replays the addresses of the constants it read; evicting them would let
    # the replay read freed memory once a drop-in's scheduled lr filled the cache.
    rule = CoordinateWiseLSTM(seed=0)
    spec = fused._spec(rule)
    device = torch.device("cpu")
    monkeypatch.setattr(fused, "_constants", {})
    monkeypatch.setattr(fused, "_captured", set())
    monkeypatch.setattr(fused, "_capturing", lambda device: True)
    captured = fused._constants_tensor(spec, 1.0, device)
    monkeypatch.setattr(fused, "_capturing", lambda device: False)
    first_eager = fused._constants_tensor(spec, 0.5, device)
    for step in range(600):  # a per-step lr schedule
        fused._constants_tensor(spec, 0.001 * (step + 1), device)
    assert len(fused._constants) <= 257
    assert fused._constants_tensor(spec, 1.0, device) is captured
    assert fused._constants_tensor(spec, 0.5, device) is not first_eager  # uncaptured entries do go
    torch.testing.assert_close(captured[4], torch.tensor(1.0, dtype=torch.float64))


def test_a_new_learning_rate_costs_no_host_copy_of_the_launch_constants(monkeypatch):
    # torch.tensor(..., device="cuda") copies from pageable host memory, which synchronises with
    # the device: under an lr schedule the drop-in made one such copy (a host sync) every step.
    spec = fused._spec(CoordinateWiseLSTM(seed=0))
    device = torch.device("cpu")
    monkeypatch.setattr(fused, "_constants", {})
    monkeypatch.setattr(fused, "_constant_bases", {})
    base = fused._constants_tensor(spec, 1.0, device)
    made = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: made.append(args) or original(*args, **kwargs))
    scheduled = [fused._constants_tensor(spec, lr, device) for lr in (0.5, 1 / 3, 1e-300)]
    monkeypatch.setattr(torch, "tensor", original)
    assert made == []
    for lr, constants in zip((0.5, 1 / 3, 1e-300), scheduled):
        assert constants.dtype == torch.float64 and constants.data_ptr() != base.data_ptr()
        assert constants.tolist() == [*base.tolist()[:4], lr, 0.0]  # exact in float64
    assert base.tolist()[4] == 1.0


def test_auto_takes_the_fused_path_only_for_the_tile_widths_it_was_built_and_tested_for(monkeypatch):
    monkeypatch.setattr(fused, "unavailable_reason", lambda device, rule=None, dtype=None: None)  # as on a GPU
    cuda = torch.device("cuda")
    assert dispatch.select_kernel("auto", CoordinateWiseLSTM(hidden_size=20), cuda) == "fused"
    assert dispatch.select_kernel("auto", CoordinateWiseLSTM(hidden_size=29), cuda) == "fused"
    wide = CoordinateWiseLSTM(hidden_size=30)  # 30 + 2 inputs + 1 ones column pads to 64
    assert dispatch.select_kernel("auto", wide, cuda) == "reference"
    assert "pads the fused tiles to 64" in fused.auto_problem(wide)
    monkeypatch.setattr(fused, "check_available", lambda device, rule=None: None)
    assert dispatch.select_kernel("fused", wide, cuda) == "fused"
