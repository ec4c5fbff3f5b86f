"""The interpreter's tensor-core emulation: tf32 rounding bit for bit, tf32x3 and tf32 error sizes, the patch itself."""

import numpy as np
import pytest
import torch

from l2l.kernels import fused, tensor_cores

needs_triton = pytest.mark.skipif(fused.triton_version() is None, reason="Triton is not installed")

ONE_ULP_TF32 = 2.0**-10  # the spacing of tf32 values in [1, 2)


def f32(*values):
    return np.array(values, dtype=np.float32)


def test_truncation_keeps_ten_mantissa_bits():
    x = f32(1 + ONE_ULP_TF32, 1 + ONE_ULP_TF32 * 0.999, -(1 + ONE_ULP_TF32 * 0.999), 3.0, 0.0, np.inf, -np.inf)
    np.testing.assert_array_equal(tensor_cores.truncate_to_tf32(x),
                                  f32(1 + ONE_ULP_TF32, 1.0, -1.0, 3.0, 0.0, np.inf, -np.inf))
    assert np.isnan(tensor_cores.truncate_to_tf32(f32(np.nan)))[0]


def test_rounding_is_to_nearest_with_ties_away_from_zero():
    half = ONE_ULP_TF32 / 2
    x = f32(1 + half, -(1 + half), 1 + half * 0.99, 1 + 3 * half, 2 - ONE_ULP_TF32 - half / 2, 2 - half)
    np.testing.assert_array_equal(tensor_cores.round_to_tf32(x),
                                  f32(1 + ONE_ULP_TF32, -(1 + ONE_ULP_TF32), 1.0, 1 + 2 * ONE_ULP_TF32, 2 - ONE_ULP_TF32,
                                      2.0))  # the last carries into the exponent
    rounded = tensor_cores.round_to_tf32(f32(np.finfo(np.float32).max, np.inf, -np.inf, np.nan))
    assert rounded[0] == np.inf and rounded[1] == np.inf and rounded[2] == -np.inf and np.isnan(rounded[3])


def test_every_rounded_value_is_a_tf32_and_within_half_a_unit():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 10.0 ** np.random.default_rng(1).integers(
        -20, 20, 10_000)
    for rounded, bound in ((tensor_cores.round_to_tf32(x), 2.0**-11), (tensor_cores.truncate_to_tf32(x), 2.0**-10)):
        assert not (rounded.view(np.uint32) & np.uint32(0x1FFF)).any()
        assert (np.abs(rounded.astype(np.float64) - x) <= bound * np.abs(x.astype(np.float64))).all()


def test_tf32x3_is_float32_accurate_and_tf32_is_not():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((32, 32)).astype(np.float32)
    acc = rng.standard_normal((64, 32)).astype(np.float32)
    exact = acc.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(acc) + np.abs(a) @ np.abs(b)  # the error of a sum is relative to the sum of magnitudes

    def error(result):
        return float(np.max(np.abs(result.astype(np.float64) - exact) / scale))

    float32 = error(acc + np.matmul(a, b, dtype=np.float32))
    tf32x3 = error(tensor_cores.tf32x3_matmul(a, b, acc))
    tf32 = error(acc + tensor_cores.tf32_matmul(a, b))
    assert float32 < 1e-6 and tf32x3 < 3 * max(float32, 2.0**-24)
    assert 1e-4 < tf32 < 2.0**-9


def test_tf32x3_of_an_infinite_operand_is_infinite_as_in_float32():
    # The small parts of an infinity are inf - inf = NaN; the compiled kernels zero them.
    a, b = f32(np.inf, 1.0).reshape(1, 2), f32(0.3, 0.5).reshape(2, 1)
    result = tensor_cores.tf32x3_matmul(a, b, np.zeros((1, 1), np.float32))
    assert result[0, 0] == np.inf
    nan_operand = tensor_cores.tf32x3_matmul(f32(np.nan, 1.0).reshape(1, 2), b, np.zeros((1, 1), np.float32))
    assert np.isnan(nan_operand[0, 0])  # a NaN stays NaN through the big dot


def test_bfloat16_rounding_is_torchs_bit_for_bit():
    x = np.random.default_rng(3).standard_normal(10_000).astype(np.float32) * 10.0 ** np.random.default_rng(4).integers(
        -40, 39, 10_000)
    info = np.finfo(np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF], dtype=np.uint32).view(np.float32)  # even, odd, below
    x = np.concatenate([x, ties, f32(0.0, -0.0, info.max, -info.max, info.tiny, 1e-45, np.inf, -np.inf)])
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(tensor_cores.round_to_bfloat16(x), expected)
    nan = tensor_cores.round_to_bfloat16(np.array([0x7FFFFFFF, 0xFF800001], dtype=np.uint32).view(np.float32))
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().numpy()).all()


@needs_triton
def test_emulation_patches_the_interpreter_inside_the_block_only():
    from triton.runtime import interpreter as triton_interpreter

    original = triton_interpreter.InterpreterBuilder.create_dot
    original_cast = triton_interpreter.InterpreterBuilder.cast_impl
    with tensor_cores.emulated():
        assert triton_interpreter.InterpreterBuilder.create_dot is not original
        assert triton_interpreter.InterpreterBuilder.cast_impl is not original_cast
    assert triton_interpreter.InterpreterBuilder.create_dot is original
    assert triton_interpreter.InterpreterBuilder.cast_impl is original_cast


@needs_triton
def test_an_interpreter_of_unknown_shape_is_refused(monkeypatch):
    from triton.runtime import interpreter as triton_interpreter

    monkeypatch.setattr(triton_interpreter.InterpreterBuilder, "create_dot", lambda self, a, b, c: None)
    with pytest.raises(RuntimeError, match="tensor-core rounding cannot be emulated"):
        with tensor_cores.emulated():
            pass


@needs_triton
def test_precision_benchmark_measures_what_the_emulation_predicts(capsys):
    """benchmarks/precision_error.py on a tiny setting: PyTorch's float32 is float32-accurate, tf32 is not, in all three."""
    import importlib.util
    from pathlib import Path

    problem = fused.interpreter_problem()
    if problem is not None:
        pytest.skip(problem)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_error.py"
    spec = importlib.util.spec_from_file_location("precision_error", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.measure(torch.device("cpu"), coordinates=8, instances=1, paths=("reference float32", "fused tf32"))
    assert all(error < 2e-6 for name, error in rows["reference float32"].items() if name != "seconds")
    assert all(error > 1e-5 for name, error in rows["fused tf32"].items() if name != "seconds")
    assert "fused tf32" in capsys.readouterr().out
