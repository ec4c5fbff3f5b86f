"""The coordinatewise LSTM: shapes, coordinate independence, config round trip, clear errors."""

import math
import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from l2l.optimizers import CoordinateWiseLSTM
from l2l.optimizers.lstm import LSTMState

from helpers import sensitive_rule


def test_update_and_state_shapes(lstm):
    state = lstm.init_state(7)
    assert state.h.shape == state.c.shape == (2, 20, 7)
    update, new_state = lstm(torch.randn(7), state)
    assert update.shape == (7,)
    assert new_state.h.shape == (2, 20, 7)


def test_coordinates_are_independent():
    # A sensitive float64 rule over several steps: a fresh LSTM writes almost the same update
    # whatever its input, which would hide a coupling between coordinates inside float32 tolerance.
    rule = sensitive_rule(dtype=torch.float64)
    grads = torch.randn(4, 3, 5, dtype=torch.float64)
    batched_state, alone_states = rule.init_state(15), [rule.init_state(5) for _ in range(3)]
    for step in range(4):
        batched, batched_state = rule(grads[step].reshape(-1), batched_state)
        for row in range(3):
            alone, alone_states[row] = rule(grads[step, row], alone_states[row])
            torch.testing.assert_close(batched.view(3, 5)[row], alone, rtol=1e-12, atol=1e-15)
    changed = grads[0].reshape(-1).clone()
    changed[7] *= -100
    before, after = rule(grads[0].reshape(-1), rule.init_state(15))[0], rule(changed, rule.init_state(15))[0]
    assert not torch.isclose(before[7], after[7], rtol=1e-3)
    torch.testing.assert_close(torch.cat([after[:7], after[8:]]), torch.cat([before[:7], before[8:]]), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_equals_two_stacked_lstm_cells_on_the_papers_preprocessing(p):
    """The reference path against an independent implementation: torch's LSTMCell, the formula written out."""
    rule = sensitive_rule(dtype=torch.float64, preprocess_p=p)
    hidden = rule.hidden_size
    cells = [nn.LSTMCell(2, hidden).double(), nn.LSTMCell(hidden, hidden).double()]
    # l2l orders the gates input, forget, output, cell; torch orders them input, forget, cell, output.
    to_torch = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden), torch.arange(2 * hidden, 3 * hidden)])
    with torch.no_grad():
        for layer, cell in enumerate(cells):
            cell.weight_ih.copy_(getattr(rule, f"weight_ih_l{layer}")[to_torch])
            cell.weight_hh.copy_(getattr(rule, f"weight_hh_l{layer}")[to_torch])
            cell.bias_ih.copy_(getattr(rule, f"bias_l{layer}")[to_torch])
            cell.bias_hh.zero_()
    grads = torch.tensor([0.0, 1e-6, -3e-5, 2e-3, -0.5, 7.0, -1e4, 1e30], dtype=torch.float64)
    steps = torch.stack([grads * scale for scale in (1.0, -0.3, 2.0)])
    state = rule.init_state(grads.numel())
    hc = [(torch.zeros(grads.numel(), hidden, dtype=torch.float64),) * 2 for _ in cells]
    for grad in steps:
        large = grad.abs() >= math.exp(-p)
        features = torch.stack([
            torch.where(large, grad.abs().clamp_min(1e-300).log() / p, torch.full_like(grad, -1.0)),
            torch.where(large, grad.sign(), math.exp(p) * grad),
        ], 1)
        layer_input = features
        for layer, cell in enumerate(cells):
            hc[layer] = cell(layer_input, hc[layer])
            layer_input = hc[layer][0]
        expected = rule.output_scale * (layer_input @ rule.weight_out + rule.bias_out)
        update, state = rule(grad, state)
        torch.testing.assert_close(update, expected.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.c[1].t(), hc[1][1].detach(), rtol=1e-12, atol=1e-14)


def test_defaults_are_the_papers():
    assert CoordinateWiseLSTM().config() == {"hidden_size": 20, "num_layers": 2, "preprocess": "log_sign",
                                             "preprocess_p": 10.0, "output_scale": 0.1, "state_dtype": None}


def test_weights_start_uniform_within_one_over_sqrt_hidden():
    """torch.nn.LSTM's initialisation, U(-1/sqrt(H), 1/sqrt(H)), for every weight and bias."""
    for name, weight in CoordinateWiseLSTM(hidden_size=16, seed=0).named_parameters():
        assert weight.abs().max() <= 0.25, name
        if weight.numel() > 1:
            assert weight.min() < -0.2 and weight.max() > 0.2, name


def test_the_state_keeps_its_dtype_and_the_update_the_gradients():
    rule = CoordinateWiseLSTM(seed=0, state_dtype=torch.bfloat16)
    state = rule.init_state(5, dtype=torch.float64)
    assert state.h.dtype == state.c.dtype == torch.bfloat16  # state_dtype before dtype
    assert CoordinateWiseLSTM().init_state(5, dtype=torch.float64).h.dtype == torch.float64
    grad = torch.randn(5, dtype=torch.float64)
    update, state = rule(grad, state)
    assert update.dtype == torch.float64 and state.h.dtype == state.c.dtype == torch.bfloat16
    torch.testing.assert_close(update, rule(grad.float(), rule.init_state(5))[0].double(), rtol=0, atol=0)


def test_output_scale_multiplies_the_update():
    small = CoordinateWiseLSTM(output_scale=0.1, seed=3)
    large = CoordinateWiseLSTM(output_scale=1.0, seed=3)
    grad = torch.randn(4)
    torch.testing.assert_close(large(grad, large.init_state(4))[0], 10 * small(grad, small.init_state(4))[0])


def test_same_seed_same_weights_and_global_rng_untouched():
    before = torch.random.get_rng_state()
    a, b = CoordinateWiseLSTM(seed=5), CoordinateWiseLSTM(seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.weight_out, CoordinateWiseLSTM(seed=6).weight_out)


def test_config_round_trip():
    lstm = CoordinateWiseLSTM(hidden_size=8, num_layers=3, preprocess="none", output_scale=0.5, state_dtype=torch.bfloat16)
    rebuilt = CoordinateWiseLSTM.from_config(lstm.config())
    assert rebuilt.config() == lstm.config()
    rebuilt.load_state_dict(lstm.state_dict())


def test_bfloat16_state_halves_memory_and_stays_close(lstm):
    compact = CoordinateWiseLSTM(seed=0, state_dtype=torch.bfloat16)
    state32, state16 = lstm.init_state(100), compact.init_state(100)
    assert state16.h.dtype == torch.bfloat16
    assert state16.h.element_size() * 2 == state32.h.element_size()
    grad = torch.randn(100)
    for _ in range(3):
        u32, state32 = lstm(grad, state32)
        u16, state16 = compact(grad, state16)
    assert u16.dtype == torch.float32
    torch.testing.assert_close(u16, u32, rtol=0.05, atol=2e-3)


def test_wrong_shapes_raise_clear_errors(lstm):
    with pytest.raises(ValueError, match=r"flat gradient of shape \[N\], got \(2, 3\)"):
        lstm(torch.randn(2, 3), lstm.init_state(6))
    with pytest.raises(ValueError, match=r"build it with init_state\(4\)"):
        lstm(torch.randn(4), lstm.init_state(5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": 0}, "Invalid hidden_size: 0"),
        ({"num_layers": -1}, "Invalid num_layers"),
        # A bool is an int to Python: True was taken as 1 unit, then failed inside torch.rand (a checkpoint's config too).
        ({"hidden_size": True}, "Invalid hidden_size: True"),
        ({"num_layers": True}, "Invalid num_layers: True"),
        ({"preprocess": "adam"}, "unknown preprocessing 'adam'"),
        ({"output_scale": 0.0}, "Invalid output_scale"),
        ({"preprocess_p": -1.0}, "Invalid preprocess_p"),
        ({"preprocess_p": 100.0}, r"Invalid preprocess_p: 100.0 \(must be a number in \(0, 80\]"),
        ({"preprocess_p": float("nan")}, "Invalid preprocess_p: nan"),
        ({"state_dtype": torch.int64}, "Invalid state_dtype: torch.int64"),
        ({"state_dtype": "bfloat16"}, "Invalid state_dtype: 'bfloat16'"),
    ],
)
def test_constructor_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoordinateWiseLSTM(**kwargs)


def test_the_largest_p_allowed_stays_finite_at_zero_and_tiny_gradients():
    rule = CoordinateWiseLSTM(preprocess_p=80.0)
    update, _ = rule(torch.tensor([0.0, 1e-36, -1e-3]), rule.init_state(3))
    assert torch.isfinite(update).all()


def test_zero_coordinates_give_an_empty_update():
    rule = CoordinateWiseLSTM()
    update, state = rule(torch.zeros(0), rule.init_state(0))
    assert update.shape == (0,) and state.h.shape == (2, 20, 0)


def test_zero_coordinates_keep_the_update_in_the_graph():
    # As the fused path: an empty update still depends on every weight (with zero gradients), so
    # differentiating a meta-loss through an empty parameter group does not fail.
    rule = CoordinateWiseLSTM()
    update, _ = rule(torch.zeros(0), rule.init_state(0))
    grads = torch.autograd.grad(update.sum(), list(rule.parameters()))
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


@pytest.mark.parametrize(
    "grad_dtype, state_dtype, message",
    [
        (torch.complex64, torch.float32, r"real floating-point gradient, got torch.complex64.*view_as_real"),
        (torch.int64, torch.float32, "real floating-point gradient, got torch.int64"),
        (torch.float32, torch.int32, "floating-point state, got torch.int32"),
        (torch.float32, torch.complex64, "floating-point state, got torch.complex64"),
    ],
)
def test_non_floating_inputs_are_refused(lstm, grad_dtype, state_dtype, message):
    # Not cast silently: an integer state would be truncated at every step, a complex gradient lose its imaginary part.
    state = lstm.init_state(3, dtype=state_dtype)
    with pytest.raises(ValueError, match=message):
        lstm(torch.ones(3, dtype=grad_dtype), state)


def test_from_config_refuses_an_unknown_state_dtype():
    config = {**CoordinateWiseLSTM().config(), "state_dtype": "int64"}
    with pytest.raises(ValueError, match="Invalid state_dtype: torch.int64"):
        CoordinateWiseLSTM.from_config(config)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_backward_of_a_step_never_zero_fills_a_whole_state():
    # On the CPU a step is bound by its op count. Indexing a layer of the [L, H, N] state (or
    # slicing the gates) has a backward that zero-fills a tensor of the whole state's size for
    # every index, whose gradients are then added; unbind's and split's backward are one stack / cat.
    rule = CoordinateWiseLSTM()
    state = rule.init_state(6)
    state = type(state)(*(t.requires_grad_() for t in state))
    update, new_state = rule(torch.randn(6), state)
    for _ in range(2):
        update, new_state = rule(torch.randn(6), new_state)
    with _RecordOps() as recorded:
        (update.sum() + new_state.h.sum() + new_state.c.sum()).backward()
    assert state.h.grad is not None and state.c.grad is not None
    assert not {"select_backward.default", "slice_backward.default"} & set(recorded.ops), sorted(set(recorded.ops))


@pytest.mark.parametrize("name, value, message", [
    ("preprocess_p", 100.0, "Invalid preprocess_p: 100.0"),
    ("preprocess_p", float("inf"), "Invalid preprocess_p: inf"),
    ("output_scale", 0.0, "Invalid output_scale: 0.0"),
    ("output_scale", float("nan"), "Invalid output_scale: nan"),
])
def test_settings_changed_after_construction_are_checked_too(name, value, message):
    # Both kernels read these at every step; the fused one unchecked (an out-of-range p gave NaN there).
    rule = CoordinateWiseLSTM(seed=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        setattr(rule, name, value)
    assert getattr(rule, name) == {"preprocess_p": 10.0, "output_scale": 0.1}[name]  # unchanged
    setattr(rule, name, 2)
    assert getattr(rule, name) == 2.0 and isinstance(getattr(rule, name), float)
    assert rule.config()[name] == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers, coords", [(1, 1), (2, 17), (2, 1000), (3, 333), (2, 0)])
def test_a_step_without_autograd_computes_the_tracked_step_bit_for_bit(monkeypatch, dtype, layers, coords):
    """Evaluation and the drop-in step take the in-place path: it must give the meta-trained path's bits."""
    from l2l.kernels import reference

    lstm = CoordinateWiseLSTM(hidden_size=7, num_layers=layers, seed=3).to(dtype)
    generator = torch.Generator().manual_seed(coords)
    grad = torch.randn(coords, generator=generator, dtype=dtype) * 10.0 ** torch.randint(-8, 3, (coords,), generator=generator)
    # Non-contiguous state, as the drop-in optimizer's chunks of its flat state are.
    wide = torch.randn(2, layers, 7, 2 * coords + 1, generator=generator, dtype=dtype)
    state = LSTMState(wide[0, :, :, 1::2], wide[1, :, :, :coords])
    tracked = lstm(grad, state)  # grad mode on: the autograd path
    untracked_calls, original = [], reference._step_untracked
    monkeypatch.setattr(reference, "_step_untracked", lambda *args: untracked_calls.append(1) or original(*args))
    with torch.no_grad():
        untracked = lstm(grad, state)
    assert untracked_calls == [1]
    for got, want in zip((untracked[0], *untracked[1]), (tracked[0], *tracked[1])):
        assert got.dtype == want.dtype and torch.equal(got, want.detach())
