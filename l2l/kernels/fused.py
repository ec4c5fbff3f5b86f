"""Fused coordinatewise LSTM step on CUDA (Triton): one kernel per step forward, a recomputing backward, an autograd Function.

:func:`forward` is a drop-in for the reference step inside ``CoordinateWiseLSTM.forward``
(preprocessing, every layer, read-out and output scale in one kernel; differentiable with
respect to the gradient input, the states and every weight, to first order: its gradients refuse to be
differentiated again). :func:`lstm_step_` is the
in-place, no-grad variant behind the ``torch.optim`` drop-in and inference (state updated in
place, optional parameter update, non-finite masking).

Memory: the autograd Function saves only the step's inputs (the gradient, h and c), so a
meta-training unroll keeps ``4 + 2 * L * H * 4`` bytes per coordinate-step (324 for the paper's
2 x 20 LSTM in float32, 164 with a bfloat16 state); the backward kernel recomputes the gates.

Triton is optional: this module imports it only when a fused kernel is launched, so the
package and the reference path work without it. :func:`unavailable_reason` says why the fused
path cannot run (no Triton, no CUDA tensor, an unsupported configuration).
:func:`interpreter` lets the kernels run on CPU tensors through Triton's interpreter (tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from l2l.kernels.reference import check_step_inputs

PRECISIONS = ("tf32x3", "tf32", "ieee")
WEIGHT_GRADS = ("scratch", "registers")
MAX_LAYERS = 2
MAX_HIDDEN = 128
# kernel="auto" takes the fused path up to this padded width (tiles of HP x HP): the width of the
# paper's 20-unit LSTM, which the ahead-of-time build compiles for sm_90 and the CUDA tests cover.
# Wider tiles (hidden > 29 with log/sign inputs) are checked only in the interpreter and may
# exceed a program's registers and shared memory; kernel="fused" still runs them where they compile.
AUTO_MAX_PADDED = 32
COMPUTE_DTYPES = (torch.float32, torch.float64)


class FusedUnavailableError(RuntimeError):
    """The fused kernel was asked for where it cannot run; the message says why."""


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """Launch settings of the fused kernels (tuned on the GPU; see benchmarks/GPU_NOTES.md).

    Attributes:
        block: coordinates per program in the forward kernel (a power of two >= 16).
        warps: warps per program in the forward kernel.
        backward_block: coordinates per loop iteration in the backward kernel.
        backward_warps: warps per program in the backward kernel.
        maxnreg: register cap per thread of the forward kernel (None: the compiler's choice).
        backward_maxnreg: the same for the backward kernel.
        programs_per_sm: backward programs per streaming multiprocessor (persistent grid; each
            program loops over blocks and writes one row of weight-gradient partial sums).
        weight_grads: where the backward kernel reduces the weight gradients over the blocks a
            program visits: ``"scratch"`` (each block's tiles added to the program's row of
            partial sums at once; the rows stay in L2, no accumulator lives across the loop) or
            ``"registers"`` (twelve tile accumulators across the loop; ptxas spills them on sm_90).
        precision: ``tl.dot`` input precision for float32: ``"tf32x3"`` (float32-accurate on
            tensor cores), ``"tf32"`` (fastest, ~1e-3 relative error) or ``"ieee"`` (FMA).
        interpreter_programs: backward programs under the interpreter (several, so the
            per-program accumulation and the final sum are exercised).
    """

    block: int = 64
    warps: int = 4
    backward_block: int = 16
    backward_warps: int = 4
    maxnreg: int | None = None
    backward_maxnreg: int | None = None
    programs_per_sm: int = 2
    weight_grads: str = "scratch"
    precision: str = "tf32x3"
    interpreter_programs: int = 3

    def __post_init__(self):
        for name in ("block", "backward_block"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 16 and value & (value - 1) == 0):
                raise ValueError(f"FusedConfig.{name} must be a power of two >= 16, got {value!r}")
        for name in ("warps", "backward_warps"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in (1, 2, 4, 8, 16):  # True == 1 would pass the test alone
                raise ValueError(f"FusedConfig.{name} must be 1, 2, 4, 8 or 16, got {value!r}")
        for name in ("programs_per_sm", "interpreter_programs"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"FusedConfig.{name} must be a positive integer, got {value!r}")
        for name in ("maxnreg", "backward_maxnreg"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ValueError(f"FusedConfig.{name} must be None or a positive integer, got {value!r}")
        if self.weight_grads not in WEIGHT_GRADS:
            raise ValueError(f"FusedConfig.weight_grads must be one of {', '.join(WEIGHT_GRADS)}, "
                             f"got {self.weight_grads!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"FusedConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


_config = FusedConfig()
_interpreter_enabled = os.environ.get("L2L_TRITON_INTERPRET", "") == "1"
_lock = threading.Lock()
_modules: dict[bool, ModuleType] = {}
_constants: dict[tuple, Tensor] = {}
_constant_bases: dict[tuple, Tensor] = {}  # each spec's constants with lr_scale 1, copied from the host once
C_LR_SCALE = 4  # lr_scale's index in the constants (triton_lstm.C_LR_SCALE)
_pack_indices: dict[tuple, Tensor] = {}  # gather indices of the packed weight tiles
_pack_zeros: dict[tuple, Tensor] = {}  # the zero the padding of the packed tiles gathers
# Keys read while a CUDA graph was being captured: the graph replays their tensors' addresses,
# so those entries are never evicted.
_captured: set[tuple] = set()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _cached(cache: dict[tuple, Tensor], key: tuple, limit: int, device: torch.device, make) -> Tensor:
    """``cache[key]``, made by ``make()`` if missing; over ``limit`` entries, those no graph captured are dropped."""
    tensor = cache.get(key)
    if tensor is None:
        tensor = make()
        if len(cache) >= limit:
            for old in [old for old in cache if old not in _captured]:
                del cache[old]
        cache[key] = tensor
    if _capturing(device):
        _captured.add(key)
    return tensor


def get_config() -> FusedConfig:
    """The launch settings in force."""
    return _config


def set_config(config: FusedConfig | None = None, **changes: Any) -> FusedConfig:
    """Replaces the launch settings (``set_config(block=128)``); returns the previous ones."""
    global _config
    previous = _config
    _config = dataclasses.replace(config or _config, **changes)
    return previous


@contextlib.contextmanager
def configured(**changes: Any) -> Iterator[FusedConfig]:
    """Context manager: launch settings changed inside the block only (benchmark sweeps)."""
    previous = set_config(**changes)
    try:
        yield _config
    finally:
        set_config(previous)


@contextlib.contextmanager
def interpreter(enabled: bool = True) -> Iterator[None]:
    """Lets the fused kernels run on CPU tensors through Triton's interpreter inside the block.

    For tests of the kernels' logic without a GPU (slow: numpy per program). The environment
    variable ``L2L_TRITON_INTERPRET=1`` enables it for the whole process.
    """
    global _interpreter_enabled
    previous = _interpreter_enabled
    _interpreter_enabled = enabled
    try:
        yield
    finally:
        _interpreter_enabled = previous


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels, or None where it can.

    Some combinations (Triton 3.6 with NumPy 2.x) cannot run a loop whose bound is a kernel
    argument, which the backward kernel's persistent loop is; compiled kernels are unaffected.
    """
    if triton_version() is None:
        return "Triton is not installed"
    out = torch.zeros(3, dtype=torch.int32)
    try:
        kernels(interpreted=True).loop_probe_kernel[(1,)](out, 3)
    except Exception as error:  # the interpreter's own failure, whatever its type
        import numpy

        return (f"Triton {triton_version()}'s interpreter cannot run a runtime-bounded loop with NumPy "
                f"{numpy.__version__} ({type(error).__name__}); compiled kernels are unaffected")
    if out.tolist() != [0, 1, 2]:
        return f"Triton {triton_version()}'s interpreter ran a probe loop wrongly ({out.tolist()})"
    return None


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    """The installed Triton's version, or None where it cannot be imported."""
    try:
        import triton
    except Exception:  # ImportError, or a broken install raising something else on import
        return None
    return str(getattr(triton, "__version__", "unknown"))


def unavailable_reason(device: torch.device | str | None = None, rule: Any = None, dtype: torch.dtype | None = None) -> str | None:
    """Why the fused kernel cannot run here, or None if it can.

    Args:
        device: where the coordinates live (None: the default CUDA device).
        rule: a ``CoordinateWiseLSTM`` whose configuration to check (None: not checked).
        dtype: the rule's weight dtype, if not given by ``rule``.
    """
    if triton_version() is None:
        return "Triton is not installed (pip install triton; it comes with the CUDA builds of torch)"
    device = torch.device("cuda" if device is None else device)
    if device.type == "cpu":
        if not _interpreter_enabled:
            return "the fused kernel runs on CUDA tensors (these are on the CPU)"
    elif device.type != "cuda":
        return f"the fused kernel runs on CUDA tensors (these are on {device.type})"
    elif not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if rule is not None:
        return unsupported_reason(rule, dtype)
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        return f"the fused kernel computes in float32 or float64, not {dtype}"
    return None


def unsupported_reason(rule: Any, dtype: torch.dtype | None = None) -> str | None:
    """Why the fused kernel does not cover ``rule``'s configuration, or None if it does."""
    if not 1 <= rule.num_layers <= MAX_LAYERS:
        return f"the fused kernel has 1 or {MAX_LAYERS} LSTM layers, this rule {rule.num_layers}"
    if rule.hidden_size > MAX_HIDDEN:
        return f"the fused kernel has at most {MAX_HIDDEN} hidden units, this rule {rule.hidden_size}"
    if rule.preprocess not in ("log_sign", "none"):
        return f"the fused kernel has no preprocessing {rule.preprocess!r}"
    dtype = dtype or rule.weight_out.dtype
    if dtype not in COMPUTE_DTYPES:
        return f"the fused kernel computes in float32 or float64, this rule's weights are {dtype}"
    return None


def fused_available(device: torch.device | str | None = None) -> bool:
    """Whether the fused kernel can run on ``device`` (default: CUDA): Triton importable and a CUDA device."""
    return unavailable_reason(device) is None


def check_available(device: torch.device | str | None, rule: Any = None) -> None:
    """Raises :class:`FusedUnavailableError` naming why, unless the fused kernel can run."""
    reason = unavailable_reason(device, rule)
    if reason is not None:
        raise FusedUnavailableError(f"kernel='fused' cannot run: {reason}; use kernel='reference' or 'auto'")


def kernels(interpreted: bool = False) -> ModuleType:
    """The Triton kernel module: compiled for the GPU, or a separate copy run by Triton's interpreter."""
    module = _modules.get(interpreted)
    if module is not None:
        return module
    with _lock:
        if interpreted not in _modules:
            if interpreted:
                # Triton itself must be imported normally first (its own library stays compiled-mode).
                import triton.language  # noqa: F401

                # triton.jit picks the interpreter at decoration time from TRITON_INTERPRET: load a
                # second copy of the module under that setting, leaving the compiled one alone.
                path = Path(__file__).with_name("triton_lstm.py")
                spec = importlib.util.spec_from_file_location("l2l.kernels._triton_lstm_interpreted", path)
                module = importlib.util.module_from_spec(spec)
                previous = os.environ.get("TRITON_INTERPRET")
                os.environ["TRITON_INTERPRET"] = "1"
                try:
                    spec.loader.exec_module(module)
                finally:
                    if previous is None:
                        del os.environ["TRITON_INTERPRET"]
                    else:
                        os.environ["TRITON_INTERPRET"] = previous
            else:
                module = importlib.import_module("l2l.kernels.triton_lstm")
            _modules[interpreted] = module
    return _modules[interpreted]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static shape of one rule's kernels."""

    features: int  # F: 2 (log/sign) or 1 (raw gradient)
    log_sign: bool
    hidden: int  # H
    padded: int  # HP: a power of two >= 16 and >= H + F + 1 (room for the features and a ones column)
    layers: int  # L
    dtype: torch.dtype  # compute dtype (the weights')
    p: float
    output_scale: float

    @property
    def weight_sizes(self) -> tuple[int, ...]:
        """Element counts of the weights in parameter order (the backward's partial-sum row)."""
        four_h, h = 4 * self.hidden, self.hidden
        sizes = [four_h * self.features, four_h * h, four_h]
        for _ in range(1, self.layers):
            sizes += [four_h * h, four_h * h, four_h]
        return (*sizes, h, 1)


def _next_power_of_two(value: int) -> int:
    return 1 << (value - 1).bit_length()


def _spec(rule: Any) -> _Spec:
    hidden = rule.hidden_size
    return _Spec(
        features=2 if rule.preprocess == "log_sign" else 1,
        log_sign=rule.preprocess == "log_sign",
        hidden=hidden,
        padded=_next_power_of_two(max(16, hidden + (2 if rule.preprocess == "log_sign" else 1) + 1)),
        layers=rule.num_layers,
        dtype=rule.weight_out.dtype,
        p=float(rule.preprocess_p),
        output_scale=float(rule.output_scale),
    )


def auto_problem(rule: Any) -> str | None:
    """Why ``kernel="auto"`` leaves ``rule`` to the reference path although the fused one covers it, or None."""
    padded = _spec(rule).padded
    if padded > AUTO_MAX_PADDED:
        return (f"hidden size {rule.hidden_size} pads the fused tiles to {padded} (auto uses the fused path up to "
                f"{AUTO_MAX_PADDED}); pass kernel='fused' to try it")
    return None


def _constants_tensor(spec: _Spec, lr_scale: float, device: torch.device) -> Tensor:
    """``[p, exp(-p), exp(p), output_scale, lr_scale, 0]`` in float64 on ``device``, cached.

    Passed as a tensor, not as scalar arguments (which Triton makes float32), so float64 runs
    see exact constants; cached so that a CUDA-graph capture never copies from the host. Only
    the first of a spec's vectors on a device is copied from the host (a copy from pageable
    memory synchronises with the device); one for another ``lr_scale`` (a drop-in under an lr
    schedule: a new one every step) is that one's copy with the factor filled in on the device.
    """
    p = spec.p
    lr_scale = float(lr_scale)

    def host_copy(factor: float) -> Tensor:
        exp_p = math.exp(p) if p < 709 else math.inf
        values = [p, math.exp(-p), exp_p, spec.output_scale, factor, 0.0]
        return torch.tensor(values, dtype=torch.float64, device=device)

    def make() -> Tensor:
        if _capturing(device):  # a clone and fill would only be recorded: an eager launch could read it unfilled
            return host_copy(lr_scale)
        first = _cached(_constant_bases, ("constants", device, p, spec.output_scale), 64, device, lambda: host_copy(1.0))
        if lr_scale == 1.0:
            return first
        constants = first.clone()
        constants[C_LR_SCALE].fill_(lr_scale)
        return constants

    return _cached(_constants, ("constants", device, p, spec.output_scale, lr_scale), 256, device, make)


def _weights(rule: Any, spec: _Spec) -> list[Tensor]:
    """The weights in parameter order (``W_ih, W_hh, b`` per layer, ``w_out, b_out``), contiguous."""
    weights = rule.weights()
    tensors: list[Tensor] = []
    for layer in range(spec.layers):
        tensors += [weights.w_ih[layer], weights.w_hh[layer], weights.bias[layer]]
    tensors += [weights.w_out, weights.b_out]
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _pack_index(spec: _Spec, device: torch.device) -> Tensor:
    """Gather index ``[4 L * HP * HP]`` from the weights (parameter order, then one zero) to the packed tiles, cached.

    Tile ``q`` (gate q of layer 0) holds ``[W_hh0^T; W_ih0^T; b0]``, element ``(k, j)`` for unit
    ``j``: rows ``k < H`` from ``W_hh0[qH + j, k]``, ``H <= k < H + F`` from ``W_ih0[qH + j, k -
    H]``, row ``H + F`` from ``b0[qH + j]``. Tiles ``4 + q`` hold ``[W_ih1^T; b1]`` (rows ``< H``,
    row ``H``), tiles ``8 + q`` hold ``W_hh1^T``. Everything else points at the zero.
    """
    return _cached(_pack_indices, ("pack", spec, device), 64, device, lambda: _build_pack_index(spec).to(device))


def _build_pack_index(spec: _Spec) -> Tensor:
    """:func:`_pack_index`'s index, built on the CPU."""
    H, F, HP = spec.hidden, spec.features, spec.padded
    sizes = spec.weight_sizes
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    zero = sum(sizes[:-2])  # the zero appended after the LSTM weights (w_out, b_out are not packed)
    k = torch.arange(HP).view(HP, 1)
    j = torch.arange(HP).view(1, HP)
    tiles = []
    for q in range(4):
        unit = q * H + j
        tile = torch.full((HP, HP), zero)
        tile = torch.where(k < H, starts[1] + unit * H + k, tile)  # W_hh0
        tile = torch.where((k >= H) & (k < H + F), starts[0] + unit * F + (k - H), tile)  # W_ih0
        tile = torch.where(k == H + F, starts[2] + unit + 0 * k, tile)  # b0
        tiles.append(torch.where(j < H, tile, zero))
    if spec.layers == 2:
        for matrix in (3, 4):  # W_ih1 with b1 in row H, then W_hh1
            for q in range(4):
                unit = q * H + j
                tile = torch.where(k < H, starts[matrix] + unit * H + k, torch.full((HP, HP), zero))
                if matrix == 3:
                    tile = torch.where(k == H, starts[5] + unit + 0 * k, tile)
                tiles.append(torch.where(j < H, tile, zero))
    return torch.stack(tiles).reshape(-1)


def _kernel_weights(weights: Sequence[Tensor], spec: _Spec) -> list[Tensor]:
    """The kernels' weight arguments: the packed LSTM tiles ``[4 L, HP, HP]`` (see :func:`_pack_index`), ``w_out``, ``b_out``."""
    lstm = list(weights[:-2])
    # Packed at every launch (a cat and a gather, ~25 KB for the 2 x 20 LSTM), never cached: a
    # cache keyed on the weights' versions would go stale under CUDA-graph replay and behind
    # writes through ``.data``.
    key = (lstm[0].device, lstm[0].dtype)
    zero = _pack_zeros.get(key)
    if zero is None:  # cached: created by the eager warm-up, never inside a CUDA-graph capture
        zero = _pack_zeros[key] = lstm[0].new_zeros(1)
    flat = torch.cat([w.detach().reshape(-1) for w in lstm] + [zero])
    return [flat[_pack_index(spec, flat.device)], weights[-2], weights[-1]]


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


def _precision(spec: _Spec) -> str:
    return _config.precision if spec.dtype == torch.float32 else "ieee"


def _state_layout(h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``h, c`` with unit stride along N and equal strides (copied if not)."""
    if h.stride(-1) != 1 or c.stride(-1) != 1 or h.stride() != c.stride():
        return h.contiguous(), c.contiguous()
    return h, c


def _launch_forward(
    spec: _Spec,
    weights: Sequence[Tensor],
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    h_out: Tensor,
    c_out: Tensor,
    update: Tensor,
    *,
    params: Tensor | None = None,
    lr_scale: float = 1.0,
    flag: Tensor | None = None,
) -> None:
    n = grad.shape[0]
    if n == 0:
        return
    module = kernels(_interpreted(grad.device))
    config = _config
    grid = (triton_cdiv(n, config.block),)
    module.lstm_forward_kernel[grid](
        grad, h, c, h_out, c_out, update,
        params if params is not None else update,
        flag if flag is not None else update,
        _constants_tensor(spec, lr_scale, grad.device),
        *_kernel_weights(weights, spec),
        n, h.stride(0), h.stride(1), h_out.stride(0), h_out.stride(1),
        F=spec.features, LOG_SIGN=spec.log_sign, H=spec.hidden, HP=spec.padded, L=spec.layers,
        BLOCK=config.block, PRECISION=_precision(spec),
        HAS_PARAMS=params is not None, MASK_NONFINITE=flag is not None,
        num_warps=config.warps, **_maxnreg(config.maxnreg),
    )


def _maxnreg(value: int | None) -> dict[str, int]:
    # Only passed when set: Triton versions without the option then still work.
    return {} if value is None else {"maxnreg": value}


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division (Triton's ``cdiv`` without importing Triton)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def backward_programs(num_coords: int, device: torch.device) -> int:
    """Programs of the backward kernel's persistent grid for ``num_coords`` coordinates on ``device``."""
    blocks = triton_cdiv(num_coords, _config.backward_block)
    if _interpreted(device):
        cap = _config.interpreter_programs
    else:
        cap = _config.programs_per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(blocks, cap))


def _check_inputs(rule: Any, spec: _Spec, grad: Tensor, h: Tensor, c: Tensor, name: str) -> None:
    """Raises a ValueError unless the step's tensors fit ``rule`` and lie with its weights (the kernels index them unchecked)."""
    check_step_inputs(grad, h, c, spec.layers, spec.hidden, name)
    if rule.weight_out.device != grad.device:
        raise ValueError(f"{name}: the rule's weights are on {rule.weight_out.device}, the gradient on {grad.device}; "
                         f"move the rule there (rule.to({str(grad.device)!r}))")


def forward(rule: Any, grad: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One fused step, out of place: ``(update [N], h_new, c_new [L, H, N])``; differentiable.

    Same contract as the reference path of ``CoordinateWiseLSTM.forward``: the update is in
    ``grad``'s dtype, the new states in the states' dtype (for example bfloat16).

    Raises:
        ValueError: the tensors do not fit the rule (see :func:`~l2l.kernels.reference.check_step_inputs`)
            or are not on its weights' device.
    """
    spec = _spec(rule)
    _check_inputs(rule, spec, grad, h, c, "fused.forward")
    # Laid out here rather than inside the Function: a copy is then part of the graph, and what the
    # Function saves stays connected to the caller's tensors (see _refuse_second_derivatives).
    h, c = _state_layout(h, c)
    return FusedLSTMFunction.apply(grad.contiguous(), h, c, spec, *_weights(rule, spec))


def lstm_step_(
    rule: Any,
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    *,
    out: Tensor | None = None,
    params: Tensor | None = None,
    lr_scale: float = 1.0,
    nonfinite_flag: Tensor | None = None,
) -> Tensor:
    """One fused step in place, without autograd: the states ``h, c [L, H, N]`` are overwritten.

    Args:
        rule: the ``CoordinateWiseLSTM``.
        grad: gradient coordinates ``[N]`` (contiguous).
        h, c: states, updated in place (unit stride along N, equal strides).
        out: where the update ``[N]`` goes (may be ``grad`` itself); default a new tensor.
        params: flat parameters ``[N]``, if given updated in place (``params += update``).
        lr_scale: factor on the update (after rounding to ``out``'s dtype, as ``learned_step``).
        nonfinite_flag: an int32 tensor ``[]`` or ``[1]``: if given, coordinates whose gradient
            is NaN or infinite get a zero update and keep their state, and the flag is set to 1
            when there is any (it is never reset here).

    Returns:
        The update ``[N]`` (``out``).

    Raises:
        ValueError: the tensors do not fit the rule, lie elsewhere than its weights, or have
            another layout or dtype than the above.
    """
    spec = _spec(rule)
    _check_inputs(rule, spec, grad, h, c, "lstm_step_")
    if h.stride(-1) != 1 or c.stride(-1) != 1 or h.stride() != c.stride() or not grad.is_contiguous():
        raise ValueError("lstm_step_ needs a contiguous gradient and states with unit stride along N and equal strides")
    for label, tensor in (("out", out), ("params", params)):
        # Written by linear index: a strided or longer tensor would get the update in the wrong elements.
        if tensor is not None and not (tensor.shape == grad.shape and tensor.is_contiguous()
                                       and tensor.is_floating_point() and tensor.device == grad.device):
            raise ValueError(f"lstm_step_: {label} must be a contiguous [{grad.shape[0]}] tensor of a floating dtype on "
                             f"{grad.device}, like the gradient; got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
                             f"{'' if tensor.is_contiguous() else ', strided'}")
    flag = nonfinite_flag
    if flag is not None and not (flag.dtype == torch.int32 and flag.numel() == 1 and flag.device == grad.device):
        raise ValueError(f"lstm_step_: nonfinite_flag must be a one-element int32 tensor on {grad.device}, got {flag.dtype} "
                         f"of shape {tuple(flag.shape)} on {flag.device}")
    out = torch.empty_like(grad) if out is None else out
    with torch.no_grad():
        _launch_forward(spec, _weights(rule, spec), grad, h, c, h, c, out,
                        params=params, lr_scale=lr_scale, flag=nonfinite_flag)
    return out


SECOND_DERIVATIVE_ERROR = (
    "the fused LSTM step has no second derivative (its backward is one Triton kernel): differentiating its "
    "gradients again (a double backward, through create_graph=True) needs kernel='reference'"
)


class _NoSecondDerivative(torch.autograd.Function):
    """Copies of its first ``count`` inputs, computed from all of them; its backward raises :data:`SECOND_DERIVATIVE_ERROR`."""

    @staticmethod
    def forward(ctx, count: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(tensor.clone() for tensor in tensors[:count])

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)


def _refuse_second_derivatives(grads: tuple, anchors: list[Tensor]) -> tuple:
    """``grads`` (tensors or None) as tensors whose derivative with respect to any of ``anchors`` raises.

    ``anchors`` are what the gradients truly depend on (the saved inputs and weights, incoming
    gradients that require grad): a node between them and the gradients makes every later
    derivative through the gradients reach it, even one taken with respect to a weight only.
    """
    present = [k for k, grad in enumerate(grads) if grad is not None]
    wrapped = _NoSecondDerivative.apply(len(present), *(grads[k] for k in present), *anchors)
    out = list(grads)
    for k, grad in zip(present, wrapped):
        out[k] = grad
    return tuple(out)


class FusedLSTMFunction(torch.autograd.Function):
    """Autograd Function of the fused step: saves the inputs only, recomputes the gates in backward."""

    @staticmethod
    def forward(ctx, grad: Tensor, h: Tensor, c: Tensor, spec: _Spec, *weights: Tensor):
        # Laid out by forward() (the module function): grad contiguous, h and c as _state_layout leaves them.
        shape = h.shape
        update = torch.empty_like(grad)
        h_new = torch.empty(shape, dtype=h.dtype, device=h.device)
        c_new = torch.empty(shape, dtype=c.dtype, device=c.device)
        _launch_forward(spec, weights, grad, h, c, h_new, c_new, update)
        ctx.save_for_backward(grad, h, c, *weights)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        return update, h_new, c_new

    @staticmethod
    def backward(ctx, d_update: Tensor | None, d_h: Tensor | None, d_c: Tensor | None):
        with torch.no_grad():
            grads = FusedLSTMFunction._gradients(ctx, d_update, d_h, d_c)
        # Under create_graph=True the kernel's gradients have no graph of their own, yet they depend
        # on the saved inputs and weights; left as plain tensors, a later derivative through them
        # would silently miss that share (once_differentiable refuses it only when an incoming
        # gradient requires grad). So they come back requiring grad, and differentiating them raises.
        if not torch.is_grad_enabled():
            return grads
        anchors = [t for t in (*ctx.saved_tensors, d_update, d_h, d_c) if t is not None and t.requires_grad]
        return _refuse_second_derivatives(grads, anchors)

    @staticmethod
    def _gradients(ctx, d_update: Tensor | None, d_h: Tensor | None, d_c: Tensor | None) -> tuple:
        """:meth:`backward`'s gradients, one per input of :meth:`forward`, from the backward kernel."""
        spec: _Spec = ctx.spec
        grad, h, c, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_dg, need_dstate, need_dw = needs[0], needs[1] or needs[2], any(needs[4:])
        n = grad.shape[0]
        nothing_flows = d_update is None and d_h is None and d_c is None
        # The kernel writes every element of the input gradients, so they start uninitialised.
        new = torch.zeros if n == 0 or nothing_flows else torch.empty
        d_grad = new(grad.shape, dtype=grad.dtype, device=grad.device) if need_dg else None
        d_h0 = new(h.shape, dtype=h.dtype, device=h.device) if need_dstate else None
        d_c0 = new(c.shape, dtype=c.dtype, device=c.device) if need_dstate else None
        weight_grads: list[Tensor | None] = [None] * len(weights)
        if n == 0 or nothing_flows or not (need_dg or need_dstate or need_dw):
            weight_grads = [torch.zeros_like(w) if needs[4 + k] else None for k, w in enumerate(weights)]
            return (d_grad, d_h0, d_c0, None, *_read_out_unused(weight_grads, d_update))
        d_update = None if d_update is None else d_update.contiguous()
        d_h = None if d_h is None else d_h.contiguous()
        d_c = None if d_c is None else d_c.contiguous()
        device = grad.device
        programs = backward_programs(n, device)
        sizes = spec.weight_sizes
        config = _config
        # Both reductions add into the rows (scratch per block, registers once at the end).
        partials = torch.zeros((programs, sum(sizes)), dtype=spec.dtype, device=device) if need_dw else grad
        placeholder = grad
        module = kernels(_interpreted(device))
        # num_stages=1: software pipelining of the block loop would multi-buffer every load in
        # shared memory (266 KB measured for sm_90, over the 227 KB limit) for no gain here.
        module.lstm_backward_kernel[(programs,)](
            grad, h, c,
            placeholder if d_update is None else d_update,
            placeholder if d_h is None else d_h,
            placeholder if d_c is None else d_c,
            placeholder if d_grad is None else d_grad,
            placeholder if d_h0 is None else d_h0,
            placeholder if d_c0 is None else d_c0,
            partials,
            _constants_tensor(spec, 1.0, device),
            *_kernel_weights(weights, spec),
            n, h.stride(0), h.stride(1), spec.hidden * n, n, triton_cdiv(n, config.backward_block), programs,
            F=spec.features, LOG_SIGN=spec.log_sign, H=spec.hidden, HP=spec.padded, L=spec.layers,
            BLOCK=config.backward_block, PRECISION=_precision(spec),
            HAS_DU=d_update is not None, HAS_DH=d_h is not None, HAS_DC=d_c is not None,
            NEED_DG=need_dg, NEED_DSTATE=need_dstate, NEED_DW=need_dw,
            DW_SCRATCH=config.weight_grads == "scratch",
            num_warps=config.backward_warps, num_stages=1, **_maxnreg(config.backward_maxnreg),
        )
        if need_dw:
            summed = partials.sum(0).split(sizes)
            weight_grads = [
                part.view(w.shape) if needs[4 + k] else None for k, (part, w) in enumerate(zip(summed, weights))
            ]
        return (d_grad, d_h0, d_c0, None, *_read_out_unused(weight_grads, d_update))


def _read_out_unused(weight_grads: list[Tensor | None], d_update: Tensor | None) -> list[Tensor | None]:
    """``weight_grads`` with None for ``w_out, b_out`` (the last two) where the update was not used.

    Only the update reads them, so the reference path leaves them out of the graph of a loss of
    the new state alone: their gradients are None there, and must be here too, not zeros (Adam
    steps a parameter with a zero gradient and skips one with None).
    """
    return weight_grads if d_update is not None else [*weight_grads[:-2], None, None]
