"""Reference coordinatewise LSTM step in plain PyTorch: runs everywhere and defines correctness."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LSTMWeights(NamedTuple):
    """Weights of a stacked LSTM with a linear read-out, shared by every coordinate.

    Gate order in the ``4H`` rows is PyTorch's: input, forget, cell, output.
    """

    w_ih: tuple[Tensor, ...]  # per layer: [4H, F] for the first, [4H, H] after
    w_hh: tuple[Tensor, ...]  # per layer: [4H, H]
    bias: tuple[Tensor, ...]  # per layer: [4H]
    w_out: Tensor  # [H]
    b_out: Tensor  # []


def coordinatewise_lstm(x: Tensor, h: Tensor, c: Tensor, weights: LSTMWeights) -> tuple[Tensor, Tensor, Tensor]:
    """One step of a stacked LSTM applied independently to every coordinate.

    Args:
        x: input features, ``[N, F]``.
        h: hidden states, ``[L, N, H]``.
        c: cell states, ``[L, N, H]``.
        weights: the shared weights, in the dtype of ``x``.

    Returns:
        ``(out, h_new, c_new)``: the read-out ``[N]`` and the new states ``[L, N, H]``.
    """
    layer_input = x
    hs, cs = [], []
    for layer, (w_ih, w_hh, bias) in enumerate(zip(weights.w_ih, weights.w_hh, weights.bias)):
        gates = torch.addmm(torch.addmm(bias, layer_input, w_ih.t()), h[layer], w_hh.t())
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(forget_gate) * c[layer] + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
        h_new = torch.sigmoid(out_gate) * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        layer_input = h_new
    out = torch.mv(layer_input, weights.w_out) + weights.b_out
    return out, torch.stack(hs), torch.stack(cs)
