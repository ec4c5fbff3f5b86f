"""The paper's learned optimizer: a coordinatewise two-layer LSTM with shared weights."""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from l2l.kernels import dispatch, fused
from l2l.kernels.reference import LSTMWeights, check_step_inputs, coordinatewise_lstm
from l2l.optimizers import preprocess as preprocessing


class LSTMState(NamedTuple):
    """Per-coordinate recurrent state: hidden and cell states, each ``[layers, hidden, N]``.

    Feature-major, like the kernels: coordinate ``j``'s state is ``h[:, :, j]``.
    """

    h: Tensor
    c: Tensor


# The recurrent state's dtypes: 8-bit floats cannot hold an LSTM cell's range and precision.
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_state_dtype(state_dtype: torch.dtype | None) -> None:
    """Raises a ValueError unless ``state_dtype`` is None (the weights' dtype) or one of STATE_DTYPES."""
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (expected None or one of {', '.join(map(str, STATE_DTYPES))})")


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, without the call where it is a no-op (six a step, ~3 us each on the CPU)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def clamp_to_range(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad`` (any shape) with finite values beyond ``dtype``'s range clamped to its largest, sign kept.

    Infinities and NaNs are kept (the callers mask them as non-finite). A no-op, returning
    ``grad`` itself, unless ``grad``'s dtype has the wider range (float64 gradients, float32 rule).
    """
    limit = torch.finfo(dtype).max
    if not grad.is_floating_point() or torch.finfo(grad.dtype).max <= limit:  # (others: refused by the callers)
        return grad
    # Cast to the narrower dtype, 1e39 would become inf: the log/sign encoding saturates and the
    # update no longer depends on the gradient's sign.
    return torch.where(grad.isinf(), grad, grad.clamp(-limit, limit))


class CoordinateWiseLSTM(nn.Module):
    """A stacked LSTM that reads one gradient coordinate and writes that coordinate's update.

    Andrychowicz et al. (2016): the same small LSTM runs on every coordinate of every
    optimizee, with one recurrent state per coordinate, so it applies to any number of
    parameters. Inputs are the preprocessed gradient; the output is multiplied by
    ``output_scale`` and added to the parameter.

    Args:
        hidden_size: units per layer (paper: 20).
        num_layers: stacked LSTM layers (paper: 2).
        preprocess: ``"log_sign"`` (paper's appendix A) or ``"none"`` (raw gradient).
        preprocess_p: the exponent ``p`` of the log/sign encoding (paper: 10).
        output_scale: factor on the LSTM's read-out (paper: 0.1).
        state_dtype: dtype the recurrent state is stored in (``torch.bfloat16`` halves its
            memory); ``None`` keeps the weights' dtype.
        seed: seeds the weight initialisation (a private generator; the global RNG is untouched).
        kernel: ``"auto"`` (fused Triton kernel for CUDA tensors where available, else the
            reference), ``"reference"`` or ``"fused"`` (see :mod:`l2l.kernels.dispatch`). A
            runtime setting, changeable through the ``kernel`` attribute; not part of
            :meth:`config`, since it does not change what the weights mean.
    """

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        *,
        preprocess: str = "log_sign",
        preprocess_p: float = 10.0,
        output_scale: float = 0.1,
        state_dtype: torch.dtype | None = None,
        seed: int = 0,
        kernel: str = "auto",
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not (isinstance(hidden_size, int) and hidden_size > 0):
            raise ValueError(f"Invalid hidden_size: {hidden_size} (must be a positive integer)")
        if isinstance(num_layers, bool) or not (isinstance(num_layers, int) and num_layers > 0):
            raise ValueError(f"Invalid num_layers: {num_layers} (must be a positive integer)")
        check_state_dtype(state_dtype)
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocess = preprocessing.check_name(preprocess)
        self.preprocess_p = preprocess_p  # checked by the properties below, here and when set later
        self.output_scale = output_scale
        self.state_dtype = state_dtype
        self.seed = seed
        self.kernel = dispatch.check_kernel(kernel)

        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(hidden_size)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)

        in_features = preprocessing.input_size(preprocess)
        for layer in range(num_layers):
            fan_in = in_features if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", uniform(4 * hidden_size, fan_in))
            self.register_parameter(f"weight_hh_l{layer}", uniform(4 * hidden_size, hidden_size))
            self.register_parameter(f"bias_l{layer}", uniform(4 * hidden_size))
        self.weight_out = uniform(hidden_size)
        self.bias_out = uniform()

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as JSON-serialisable values (stored in checkpoints)."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess": self.preprocess,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
            "state_dtype": None if self.state_dtype is None else str(self.state_dtype).removeprefix("torch."),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CoordinateWiseLSTM":
        """Rebuilds an (untrained) optimizer from :meth:`config`'s output."""
        config = dict(config)
        state_dtype = config.pop("state_dtype", None)
        if state_dtype is not None:
            if not isinstance(state_dtype, str) or not isinstance(getattr(torch, state_dtype, None), torch.dtype):
                raise ValueError(f"unknown state_dtype {state_dtype!r}")
            state_dtype = getattr(torch, state_dtype)
        return cls(**config, state_dtype=state_dtype)

    def weights(self) -> LSTMWeights:
        """The weights grouped for the kernels."""
        layers = range(self.num_layers)
        return LSTMWeights(
            w_ih=tuple(getattr(self, f"weight_ih_l{k}") for k in layers),
            w_hh=tuple(getattr(self, f"weight_hh_l{k}") for k in layers),
            bias=tuple(getattr(self, f"bias_l{k}") for k in layers),
            w_out=self.weight_out,
            b_out=self.bias_out,
        )

    @property
    def preprocess_p(self) -> float:
        """The exponent ``p`` of the log/sign encoding, in (0, 80]; checked when set."""
        return self._preprocess_p

    @preprocess_p.setter
    def preprocess_p(self, value: float) -> None:
        # A property rather than a checked constructor argument: the fused kernel reads it at each
        # step unchecked, and an out-of-range p set later would make it return NaN silently.
        self._preprocess_p = float(preprocessing.check_p(value))

    @property
    def output_scale(self) -> float:
        """The factor on the LSTM's read-out, positive and finite; checked when set."""
        return self._output_scale

    @output_scale.setter
    def output_scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"Invalid output_scale: {value!r} (must be a positive finite number)")
        self._output_scale = float(value)

    def init_state(self, num_coords: int, *, device=None, dtype: torch.dtype | None = None) -> LSTMState:
        """Zero recurrent state for ``num_coords`` coordinates, ``[layers, hidden, N]`` each.

        The dtype is ``state_dtype`` if set, else ``dtype``, else the weights' dtype.
        """
        if num_coords < 0:
            raise ValueError(f"num_coords must be >= 0, got {num_coords}")
        dtype = self.state_dtype or dtype or self.weight_out.dtype
        device = self.weight_out.device if device is None else device
        shape = (self.num_layers, self.hidden_size, num_coords)
        return LSTMState(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, grad: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """One optimizer step for every coordinate.

        Args:
            grad: gradient coordinates, ``[N]``.
            state: recurrent state from :meth:`init_state` or the previous step.

        Returns:
            ``(update, state)``: the update ``[N]`` in ``grad``'s dtype and the new state.

        Raises:
            ValueError: ``grad`` is not a real floating-point ``[N]`` tensor, or the state is not
                floating-point ``[layers, hidden, N]`` on ``grad``'s device.
        """
        grad = clamp_to_range(grad, self.weight_out.dtype)
        if dispatch.select_kernel(self.kernel, self, grad.device) == "fused":
            update, h, c = fused.forward(self, grad, state.h, state.c)  # checks the same, and the weights' device
            return update, LSTMState(h, c)
        check_step_inputs(grad, state.h, state.c, self.num_layers, self.hidden_size)
        compute_dtype = self.weight_out.dtype
        x = preprocessing.preprocess(_cast(grad, compute_dtype), self.preprocess, self.preprocess_p)
        out, h, c = coordinatewise_lstm(x, _cast(state.h, compute_dtype), _cast(state.c, compute_dtype), self.weights())
        update = _cast(out * self.output_scale, grad.dtype)
        return update, LSTMState(_cast(h, state.h.dtype), _cast(c, state.c.dtype))

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.config().items())
