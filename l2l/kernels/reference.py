"""Reference coordinatewise LSTM step in plain PyTorch: runs everywhere and defines correctness.

Tensors are feature-major (``[features, N]``): each gate of all N coordinates is one
contiguous block, so every elementwise op streams through memory once instead of through a
strided slice of coordinate-major ``[N, 4H]`` gates; on a GPU it makes neighbouring threads
read neighbouring addresses (see benchmarks/lstm_layout.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad


class LSTMWeights(NamedTuple):
    """Weights of a stacked LSTM with a linear read-out, shared by every coordinate.

    Gate order in the ``4H`` rows is input, forget, output, cell (not PyTorch's i, f, g, o):
    the three sigmoid gates then form one contiguous block.
    """

    w_ih: tuple[Tensor, ...]  # per layer: [4H, F] for the first, [4H, H] after
    w_hh: tuple[Tensor, ...]  # per layer: [4H, H]
    bias: tuple[Tensor, ...]  # per layer: [4H]
    w_out: Tensor  # [H]
    b_out: Tensor  # []


def check_step_inputs(grad: Tensor, h: Tensor, c: Tensor, layers: int, hidden: int, name: str = "CoordinateWiseLSTM") -> None:
    """Raises a ValueError unless ``grad [N]`` and ``h, c [layers, hidden, N]`` are real floating-point tensors on one device.

    Shared by both paths: the fused kernels index these tensors unchecked, and the reference
    would cast an integer or complex input silently. ``name`` is who reports the problem.
    """
    if grad.dim() != 1:
        raise ValueError(f"{name} expects a flat gradient of shape [N], got {tuple(grad.shape)}")
    if not grad.is_floating_point():
        raise ValueError(f"{name} takes a real floating-point gradient, got {grad.dtype}"
                         + ("; view complex gradients as real pairs with torch.view_as_real" if grad.is_complex() else ""))
    expected = (layers, hidden, grad.shape[0])
    if tuple(h.shape) != expected or tuple(c.shape) != expected:
        raise ValueError(
            f"{name} state has shape {tuple(h.shape)}, expected {expected} for {grad.shape[0]} coordinates; "
            f"build it with init_state({grad.shape[0]})"
        )
    for state in (h, c):
        if not state.is_floating_point():
            raise ValueError(f"{name} takes a floating-point state, got {state.dtype}")
        if state.device != grad.device:
            raise ValueError(f"{name} state is on {state.device}, the gradient on {grad.device}: put both on one device")


def coordinatewise_lstm(x: Tensor, h: Tensor, c: Tensor, weights: LSTMWeights) -> tuple[Tensor, Tensor, Tensor]:
    """One step of a stacked LSTM applied independently to every coordinate.

    Args:
        x: input features, ``[F, N]``.
        h: hidden states, ``[L, H, N]``.
        c: cell states, ``[L, H, N]``.
        weights: the shared weights, in the dtype of ``x``.

    Returns:
        ``(out, h_new, c_new)``: the read-out ``[N]`` and the new states ``[L, H, N]``.
    """
    if _untracked(x, h, c, weights):
        return _step_untracked(x, h, c, weights)
    hidden = h.shape[1]
    layer_input = x
    hs, cs = [], []
    # unbind, not h[layer]: the backward of an unbind is one stack, while each indexing's backward
    # zero-fills a tensor of the whole state's size and the layers' gradients are then added.
    for w_ih, w_hh, bias, h_prev, c_prev in zip(weights.w_ih, weights.w_hh, weights.bias, h.unbind(), c.unbind(), strict=True):
        # One matmul over [input; h] beats two (the input alone has only F = 2 rows).
        gates = torch.addmm(bias.unsqueeze(1), torch.cat((w_ih, w_hh), 1), torch.cat((layer_input, h_prev), 0))
        # split, not slicing: the backward of a split is one cat, while each slice's backward
        # zero-fills a tensor of the whole input's size (measured: ~15% of a CPU meta-training epoch).
        # split_with_sizes and chunk are Tensor.split without its Python wrapper (~10 us a call on the CPU).
        sigmoid_part, cell_part = gates.split_with_sizes((3 * hidden, hidden))
        in_gate, forget_gate, out_gate = torch.sigmoid(sigmoid_part).chunk(3)
        cell_gate = torch.tanh(cell_part)
        c_new = torch.addcmul(forget_gate * c_prev, in_gate, cell_gate)
        h_new = out_gate * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        layer_input = h_new
    if layer_input.shape[1] == 0:  # addmv would broadcast the 0-d bias to a scalar, not to [0]
        # Still computed from the weights: an empty update stays in the graph (zero gradients), as the fused path's.
        return torch.mv(layer_input.t(), weights.w_out) + weights.b_out, torch.stack(hs), torch.stack(cs)
    out = torch.addmv(weights.b_out, layer_input.t(), weights.w_out)
    return out, torch.stack(hs), torch.stack(cs)


def _untracked(x: Tensor, h: Tensor, c: Tensor, weights: LSTMWeights) -> bool:
    """Whether no derivative of this step can be asked for (grad mode off, no forward AD, no torch.func transform) and all dtypes agree."""
    return (
        not torch.is_grad_enabled()
        and forward_ad._current_level < 0  # dual tensors: out= variants refuse forward AD
        and not torch._C._are_functorch_transforms_active()
        and x.dtype == h.dtype == c.dtype == weights.w_out.dtype  # out= would not promote as the tracked path does
    )


def _step_untracked(x: Tensor, h: Tensor, c: Tensor, weights: LSTMWeights) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`coordinatewise_lstm` with nothing to differentiate (evaluation, the drop-in step): the same kernels, bit for bit.

    The activations are taken in place and the new states written straight into their
    ``[L, H, N]`` outputs: no per-layer stack and fewer temporaries (about 1.1x an evaluation
    on the CPU, benchmarks/RESULTS.md). Shapes as :func:`coordinatewise_lstm`'s.
    """
    hidden = h.shape[1]
    h_out = torch.empty(h.shape, dtype=x.dtype, device=x.device)
    c_out = torch.empty(c.shape, dtype=x.dtype, device=x.device)
    layer_input = x
    for layer, (w_ih, w_hh, bias) in enumerate(zip(weights.w_ih, weights.w_hh, weights.bias, strict=True)):
        gates = torch.addmm(bias.unsqueeze(1), torch.cat((w_ih, w_hh), 1), torch.cat((layer_input, h[layer]), 0))
        sigmoid_part, cell_part = gates.split_with_sizes((3 * hidden, hidden))
        in_gate, forget_gate, out_gate = sigmoid_part.sigmoid_().chunk(3)
        cell_gate = cell_part.tanh_()
        c_new = torch.mul(forget_gate, c[layer], out=c_out[layer]).addcmul_(in_gate, cell_gate)
        # tanh(c) * o, not o * tanh(c): multiplication commutes exactly, and the product lands in h_out.
        layer_input = torch.tanh(c_new, out=h_out[layer]).mul_(out_gate)
    if layer_input.shape[1] == 0:  # as in coordinatewise_lstm
        return torch.mv(layer_input.t(), weights.w_out) + weights.b_out, h_out, c_out
    return torch.addmv(weights.b_out, layer_input.t(), weights.w_out), h_out, c_out
