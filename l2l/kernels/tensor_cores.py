"""Rounding of Triton's CPU interpreter as in the compiled kernels: float32 ``tl.dot`` in tf32 and tf32x3, float32 to bfloat16.

Triton's interpreter computes every ``tl.dot`` with numpy in full float32 whatever its
``input_precision``, so on the CPU the kernels' precision setting would go untested. Inside
:func:`emulated`, float32 dots round their operands the way the compiled kernels do on sm_80
and later:

- ``tf32``: the tensor cores read the top 19 bits of each float32 operand (1 sign, 8 exponent,
  10 mantissa bits), dropping the low 13 (truncation); products are exact in float32 and are
  summed in float32.
- ``tf32x3``: Triton's F32DotTC pass splits each operand into ``big = cvt.rna.tf32(x)`` (round
  to nearest, ties away) and ``small = x - big``, sums ``small_a @ big_b + big_a @ small_b``,
  zeroes its NaNs (so an infinite operand gives the infinity of a plain float32 dot, not NaN),
  adds ``big_a @ big_b`` (three tf32 dots) and then the accumulator; ``small_a @ small_b`` is
  dropped.
- ``ieee`` and float64 dots are left to numpy.

And it rounds float32 to bfloat16 to nearest, ties to even, as the compiled kernels
(``cvt.rn.bf16.f32``) and torch do; the interpreter itself truncates, so a bfloat16 state
would differ from the reference's in the last bit of every other number.

What is not modelled: the order in which the tensor cores add products within a dot (numpy's
float32 matmul adds in its own order); the difference is at float32 rounding, far below the
tf32 and tf32x3 errors this exists to show.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import numpy as np

_LOW_BITS = np.uint32(0x1FFF)  # the 13 mantissa bits a tf32 operand drops
_HALF = np.uint32(0x1000)


def truncate_to_tf32(x: np.ndarray) -> np.ndarray:
    """float32 values with their low 13 mantissa bits cleared (what a tf32 tensor-core operand keeps)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return (bits & ~_LOW_BITS).view(np.float32)


def round_to_tf32(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to tf32, to nearest with ties away from zero (PTX ``cvt.rna.tf32.f32``).

    Adding half a tf32 unit to the magnitude bits carries into the exponent where it should;
    infinities and NaNs stay what they are.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    finite = np.isfinite(x)
    return np.where(finite, (bits + _HALF) & ~_LOW_BITS, bits).view(np.float32)


def tf32_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float32 with tf32 operands (``[M, K] @ [K, N] -> [M, N]``)."""
    return np.matmul(truncate_to_tf32(a), truncate_to_tf32(b), dtype=np.float32)


def tf32x3_matmul(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """``acc + a @ b`` the way Triton's tf32x3 computes it (three tf32 dots, smallest terms first).

    As Triton's F32DotTC pass: ``small = a_small @ b_big + a_big @ b_small`` from zero, NaNs in
    ``small`` replaced by 0 (an infinite operand makes its small part ``inf - inf``), then
    ``a_big @ b_big + small``, then the accumulator.
    """
    a_big, b_big = round_to_tf32(a), round_to_tf32(b)
    with np.errstate(invalid="ignore", over="ignore"):
        a_small = (a.astype(np.float32) - a_big).astype(np.float32)
        b_small = (b.astype(np.float32) - b_big).astype(np.float32)
        small = tf32_matmul(a_small, b_big) + tf32_matmul(a_big, b_small)
        small = np.where(np.isnan(small), np.float32(0), small).astype(np.float32)
        out = (tf32_matmul(a_big, b_big) + small).astype(np.float32)
        return (out + acc.astype(np.float32)).astype(np.float32)


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16, to nearest with ties to even, as bit patterns (``uint16``; NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    quiet = ((bits >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)  # a NaN's carry would reach the sign bit
    return np.where(np.isnan(x), quiet, rounded)


def _precision_name(input_precision: Any) -> str:
    name = getattr(input_precision, "name", None) or str(input_precision).rsplit(".", 1)[-1]
    return name.lower()


@contextlib.contextmanager
def emulated() -> Iterator[None]:
    """Inside the block, Triton's interpreter computes float32 tf32 and tf32x3 dots, and rounds float32 to bfloat16, as the GPU does.

    Raises:
        RuntimeError: this Triton's interpreter has no ``create_dot`` or ``cast_impl`` of the
            known signature (the emulation would silently not apply).
    """
    from triton.runtime import interpreter as triton_interpreter
    import triton.language as tl

    builder = getattr(triton_interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    expected = ["self", "a", "b", "d", "input_precision", "max_num_imprecise_acc"]
    if original is None or list(inspect.signature(original).parameters) != expected:
        raise RuntimeError("this Triton's interpreter has no InterpreterBuilder.create_dot(a, b, d, input_precision, "
                           "max_num_imprecise_acc): tensor-core rounding cannot be emulated with it")
    original_cast = getattr(builder, "cast_impl", None)
    if original_cast is None or list(inspect.signature(original_cast).parameters) != ["self", "src", "dst_type"]:
        raise RuntimeError("this Triton's interpreter has no InterpreterBuilder.cast_impl(src, dst_type): "
                           "bfloat16 rounding cannot be emulated with it")

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        precision = _precision_name(input_precision)
        if precision not in ("tf32", "tf32x3") or not all(t.data.dtype == np.float32 for t in (a, b, d)):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        if precision == "tf32":
            with np.errstate(invalid="ignore", over="ignore"):
                data = (tf32_matmul(a.data, b.data) + d.data).astype(np.float32)
        else:
            data = tf32x3_matmul(a.data, b.data, d.data)
        return triton_interpreter.TensorHandle(data, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return triton_interpreter.TensorHandle(round_to_bfloat16(src.data), dst_type.scalar)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    try:
        yield
    finally:
        builder.create_dot, builder.cast_impl = original, original_cast
