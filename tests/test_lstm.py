"""The coordinatewise LSTM: shapes, coordinate independence, config round trip, clear errors."""

import pytest
import torch

from l2l.optimizers import CoordinateWiseLSTM


def test_update_and_state_shapes(lstm):
    state = lstm.init_state(7)
    assert state.h.shape == state.c.shape == (2, 20, 7)
    update, new_state = lstm(torch.randn(7), state)
    assert update.shape == (7,)
    assert new_state.h.shape == (2, 20, 7)


def test_coordinates_are_independent(lstm):
    grads = torch.randn(3, 5)
    state = lstm.init_state(15)
    batched, _ = lstm(grads.reshape(-1), state)
    for row in range(3):
        alone, _ = lstm(grads[row], lstm.init_state(5))
        torch.testing.assert_close(batched.view(3, 5)[row], alone)


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
        ({"preprocess": "adam"}, "unknown preprocessing 'adam'"),
        ({"output_scale": 0.0}, "Invalid output_scale"),
        ({"preprocess_p": -1.0}, "Invalid preprocess_p"),
    ],
)
def test_constructor_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoordinateWiseLSTM(**kwargs)
