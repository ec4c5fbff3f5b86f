"""The log/sign preprocessing matches the paper's formula on both branches."""

import math

import pytest
import torch

from l2l.optimizers.preprocess import input_size, log_and_sign, preprocess


def formula(g: float, p: float = 10.0) -> tuple[float, float]:
    if abs(g) >= math.exp(-p):
        return math.log(abs(g)) / p, math.copysign(1.0, g) if g != 0 else 0.0
    return -1.0, math.exp(p) * g


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_matches_formula_on_both_branches(p):
    values = [0.0, 1e-30, -1e-30, 1e-6, -3e-5, math.exp(-p) * 0.999, math.exp(-p), math.exp(-p) * 1.001,
              0.5, -2.0, 1e10, -1e30]
    out = log_and_sign(torch.tensor(values, dtype=torch.float64), p)
    assert out.shape == (2, len(values))
    for row, g in zip(out.t().tolist(), values):
        assert row == pytest.approx(formula(g, p), rel=1e-12, abs=1e-12), g


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("p", [10.0, 5.0, 80.0])
def test_threshold_subnormal_and_extreme_gradients_follow_the_formula_in_each_dtype(dtype, p, rel):
    info = torch.finfo(dtype)
    threshold = torch.tensor(math.exp(-p), dtype=dtype)  # rounded: the formula is continuous there
    below = threshold.nextafter(torch.zeros((), dtype=dtype))
    values = torch.stack([threshold, -threshold, below, -below, threshold.nextafter(threshold + 1),
                          torch.tensor(info.smallest_normal, dtype=dtype), torch.tensor(-info.tiny / 8, dtype=dtype),
                          torch.tensor(info.max, dtype=dtype), torch.tensor(-info.max, dtype=dtype)])
    out = log_and_sign(values, p)
    assert out.dtype == dtype
    for row, g in zip(out.t().tolist(), values.tolist()):
        assert row == pytest.approx(formula(g, p), rel=rel, abs=1e-300), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_and_nan_gradients_are_not_hidden(dtype):
    out = log_and_sign(torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype))
    assert out[:, :2].t().tolist() == [[math.inf, 1.0], [math.inf, -1.0]]  # the formula: (log|g| / p, sign g)
    assert math.isnan(out[1, 2])  # NaN reaches the rule as NaN (the drop-in skips such steps), not as a plausible number


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [10.0, 12.0, 20.0, 80.0])
def test_16_bit_gradients_are_encoded_as_their_float32_values_rounded_once(dtype, p):
    # In float16, exp(-p) rounds to 0 above p = 16.6 (so g = 0 gave log 0 = -inf) and exp(p)
    # overflows above p = 11.1 (the small branch gave inf).
    info = torch.finfo(dtype)
    values = torch.tensor([0.0, -0.0, info.tiny / 4, -info.tiny, 1e-3, -0.5, info.max, -info.max], dtype=dtype)
    out = log_and_sign(values, p)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, log_and_sign(values.float(), p).to(dtype))


def test_zero_gradient_is_minus_one_zero():
    assert log_and_sign(torch.zeros(3)).t().tolist() == [[-1.0, 0.0]] * 3


def test_huge_gradients_stay_finite_and_signed():
    out = log_and_sign(torch.tensor([1e38, -1e38]))
    assert torch.isfinite(out).all()
    assert out[0].tolist() == pytest.approx([math.log(1e38) / 10] * 2, rel=1e-6)
    assert out[1].tolist() == [1.0, -1.0]


def test_second_derivative_is_finite_at_zero():
    g = torch.tensor([0.0, 1e-8, 0.3], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_and_sign(g).sum(), g)
    assert torch.isfinite(grad).all()
    assert grad[0].item() == pytest.approx(math.exp(10.0))  # d/dg of e^p g on the small branch


def test_identity_and_names():
    g = torch.randn(5)
    assert torch.equal(preprocess(g, "none"), g[None, :])
    assert torch.equal(preprocess(g * 1e-5, "log_sign"), log_and_sign(g * 1e-5, 10.0))  # the paper's p = 10 by default
    assert input_size("log_sign") == 2 and input_size("none") == 1
    with pytest.raises(ValueError, match="unknown preprocessing 'log'"):
        preprocess(g, "log")
    with pytest.raises(ValueError, match=r"Invalid preprocess_p: 0.0 \(must be a number in \(0, 80\]"):
        log_and_sign(g, 0.0)
    with pytest.raises(ValueError, match="Invalid preprocess_p: True"):
        log_and_sign(g, True)
