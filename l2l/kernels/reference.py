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
    hidden = h.shape[1]
    layer_input = x
    hs, cs = [], []
    for layer, (w_ih, w_hh, bias) in enumerate(zip(weights.w_ih, weights.w_hh, weights.bias)):
        # One matmul over [input; h] beats two (the input alone has only F = 2 rows).
        gates = torch.addmm(bias.unsqueeze(1), torch.cat((w_ih, w_hh), 1), torch.cat((layer_input, h[layer]), 0))
        # split, not slicing: the backward of a split is one cat, while each slice's backward
        # zero-fills a tensor of the whole input's size (measured: ~15% of a CPU meta-training epoch).
        sigmoid_part, cell_part = gates.split((3 * hidden, hidden))
        in_gate, forget_gate, out_gate = torch.sigmoid(sigmoid_part).split(hidden)
        cell_gate = torch.tanh(cell_part)
        c_new = torch.addcmul(forget_gate * c[layer], in_gate, cell_gate)
        h_new = out_gate * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        layer_input = h_new
    if layer_input.shape[1] == 0:  # addmv would broadcast the 0-d bias to a scalar, not to [0]
        return layer_input.new_zeros(0), torch.stack(hs), torch.stack(cs)
    out = torch.addmv(weights.b_out, layer_input.t(), weights.w_out)
    return out, torch.stack(hs), torch.stack(cs)
