"""Triton kernels of the fused coordinatewise LSTM step (forward and recomputing backward); imported lazily by fused.py.

This module imports Triton at the top, so only :mod:`l2l.kernels.fused` imports it, and only
when a fused kernel is launched: the package itself never needs Triton.

Layout (feature-major, as :mod:`l2l.kernels.reference`): states ``[L, H, N]`` with unit stride
along N, so a program's tile of ``BLOCK`` coordinates x ``HP`` hidden units is loaded with
coalesced accesses along N. Each of the four gates (input, forget, output, cell) is one
``[BLOCK, HP]`` tile; ``HP`` is a power of two >= ``H + F + 1`` (``tl.dot`` and ``tl.arange``
need powers of two, 32 for the paper's H = 20).

GEMMs: every pre-activation is ``tl.dot`` of a ``[BLOCK, HP]`` input with an ``[HP, HP]``
weight tile (tensor cores in tf32/tf32x3, FMA in ieee). The padding columns carry the rest of
the affine map: layer 0's input is ``[h | x | 1]`` (its h, the F preprocessed features, a ones
column) against ``[W_hh^T; W_ih^T; b]``, layer l > 0's is ``[h_{l-1}' | 1]`` against ``[W_ih^T;
b]`` plus ``h_l`` against ``W_hh^T``. So biases and input weights cost no broadcast vectors (which
would take registers in every thread), and in the backward one accumulator per gate and matrix
collects the weight, input-weight and bias gradients together. The weight tiles are read from
a packed ``[4 L, HP, HP]`` copy that fused.py builds per launch (two small torch ops): one
unmasked load per tile, where gathering them from the module's parameters with three masked
loads kept so many 64-bit addresses live that the sm_90 backward spilled 664 instead of 48
bytes per thread (Triton 3.9, tf32x3, default settings). Weight
gradients are written in the parameters' layout. Columns >= H of the gates see zero weights,
so the padding of h and c stays exactly zero and is never stored.

Backward: only the step's inputs (gradient, h and c of every layer) were saved; the gates are
recomputed. Weight gradients are reduced over the blocks a program visits (persistent grid)
into one row of per-program partial sums, block by block in L2 or in registers until the end
(``DW_SCRATCH``), and the caller adds the rows with ``torch.sum`` (deterministic, no atomics).

The kernels call only Triton builtins and the helpers here, never triton.language's own @jit
functions (``tl.sum``, ``tl.zeros_like``, ...): fused.py runs a second copy of this module
through Triton's interpreter next to the compiled one, and an interpreted kernel cannot call a
compiled-mode @jit function.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Offsets into the float64 constants vector (see fused.py): exact in every compute dtype.
# (Globals read by a compiled kernel must be tl.constexpr.)
C_P = tl.constexpr(0)
C_THRESHOLD = tl.constexpr(1)
C_EXP_P = tl.constexpr(2)
C_OUT_SCALE = tl.constexpr(3)
C_LR_SCALE = tl.constexpr(4)
C_ZERO = tl.constexpr(5)  # 0.0, read with a volatile load (see lstm_backward_kernel)

# The combine functions of tl.sum and tl.max (the interpreter recognises them and uses numpy).
_SUM_COMBINE = tl.standard._sum_combine
_MAX_COMBINE = tl.standard._elementwise_max


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in ``acc``'s dtype (Triton 3.6 defaults to float32 and rejects a float64 acc)."""
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _SUM_COMBINE)


@triton.jit
def _zeros_like(x):
    return tl.full(x.shape, 0, x.dtype)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # 2 sigmoid(2z) - 1: one exp and one reciprocal, saturates to +-1 without inf/inf.
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@triton.jit
def _weight_tile(pack_ptr, t: tl.constexpr, HP: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Tile ``t`` of the packed weights (see fused.py), ``[HP, HP]``: element ``(k, j)`` if ``TRANSPOSED``, else ``(j, k)``.

    Tile ``t`` is ``[W^T; X^T; b]`` of one gate: rows ``k`` the augmented input's columns, columns
    ``j`` the gate's units, zero in the padding (inputs @ tile = pre-activations; pre-activation
    gradients @ the untransposed tile = input gradients). Every tile shares one address pattern
    plus a constant, so, unlike the state tiles, the loads need no opaque zero against hoisting
    (with one, Triton 3.6's sm_90 backward spilled 904 bytes per thread instead of 256).
    """
    if TRANSPOSED:
        k = tl.arange(0, HP)[:, None]
        j = tl.arange(0, HP)[None, :]
    else:
        j = tl.arange(0, HP)[:, None]
        k = tl.arange(0, HP)[None, :]
    return tl.load(pack_ptr + t * HP * HP + k * HP + j)


@triton.jit
def _add_gate_grad(row_ptr, value, q: tl.constexpr, F: tl.constexpr, HAS_BIAS: tl.constexpr, OFF_H: tl.constexpr,
                   OFF_X: tl.constexpr, OFF_B: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, zero):
    """Adds an augmented ``[HP, HP]`` weight-gradient tile (``[k, j]`` as :func:`_weight_tile`) to a partial-sum row.

    Rows ``k < H`` go to the ``[4H, H]`` matrix at ``OFF_H``, rows ``H <= k < H + F`` to the ``[4H,
    F]`` matrix at ``OFF_X``, row ``H + F`` (if ``HAS_BIAS``) to the ``[4H]`` bias at ``OFF_B``;
    columns ``j`` are gate ``q``'s units. One masked gather and scatter: the row stays in L2.
    """
    k = tl.arange(0, HP)[:, None]
    unit = q * H + tl.arange(0, HP)[None, :] + zero
    offset = tl.where(k < H, OFF_H + unit * H + k, OFF_X + unit * F + (k - H))
    if HAS_BIAS:
        offset = tl.where(k == H + F, OFF_B + unit, offset)
        mask = (unit < q * H + H) & (k <= H + F)
    else:
        mask = (unit < q * H + H) & (k < H + F)
    tl.store(row_ptr + offset, tl.load(row_ptr + offset, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _add_first_grad(row_ptr, value, q: tl.constexpr, F: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, zero):
    """Adds layer 0's gate-``q`` tile ``[W_hh0^T; W_ih0^T; b0]`` to the row (``W_ih0, W_hh0, b0`` lead the row)."""
    _add_gate_grad(row_ptr, value, q, F, True, 4 * H * F, 0, 4 * H * F + 4 * H * H, H, HP, zero)


@triton.jit
def _add_next_grads(row_ptr, value_u, value_h, q: tl.constexpr, OFF: tl.constexpr, H: tl.constexpr,
                    HP: tl.constexpr, zero):
    """Adds layer 1's gate-``q`` tiles ``[W_ih1^T; b1]`` and ``W_hh1^T`` to the row (its layer starts at ``OFF``)."""
    _add_gate_grad(row_ptr, value_u, q, 0, True, OFF, 0, OFF + 8 * H * H, H, HP, zero)
    _add_gate_grad(row_ptr, value_h, q, 0, False, OFF + 4 * H * H, 0, 0, H, HP, zero)


@triton.jit
def _preprocess(g, p, threshold, exp_p, LOG_SIGN: tl.constexpr):
    """The features of :func:`l2l.optimizers.preprocess.preprocess`, branch for branch."""
    if LOG_SIGN:
        a = tl.abs(g)
        large = a >= threshold  # False for NaN, as in torch
        x0 = tl.where(large, tl.log(tl.maximum(a, threshold)) / p, -1.0)
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        x1 = tl.where(large, sign, g * exp_p)
    else:
        x0 = g
        x1 = g
    return x0, x1


@triton.jit
def _preprocess_backward(g, dx0, dx1, p, threshold, exp_p, LOG_SIGN: tl.constexpr):
    """d loss / d g from the features' gradients, as autograd differentiates :func:`log_and_sign`."""
    if LOG_SIGN:
        a = tl.abs(g)
        large = a >= threshold
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        # log(clamp_min(|g|, t)) / p: (dx0 / p) / clamp, times d|g|/dg = sign(g); sign() has zero gradient.
        dg = tl.where(large, dx0 / p / tl.maximum(a, threshold) * sign, dx1 * exp_p)
    else:
        dg = dx0
    return dg


@triton.jit
def _first_input(h, x0, x1, col, F: tl.constexpr, H: tl.constexpr):
    """Layer 0's augmented input ``[h | x0 (| x1) | 1]``: ``h`` with the features and a ones column in its padding."""
    a = h + tl.where(col == H, x0[:, None], 0.0) + tl.where(col == H + F, 1.0, 0.0)
    if F == 2:
        a += tl.where(col == H + 1, x1[:, None], 0.0)
    return a


@triton.jit
def _preact_first(a, pack_ptr, q: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, PRECISION: tl.constexpr):
    """Layer 0, gate ``q``: ``[h | x | 1] @ [W_hh^T; W_ih^T; b]`` = ``b_q + x W_ih_q^T + h W_hh_q^T``."""
    tile = _weight_tile(pack_ptr, q, HP, True)
    z = _dot(a, tile, _zeros_like(a), PRECISION)
    # Padding units: an infinite feature times their zero weights is NaN; keep them exactly 0.
    return tl.where(tl.arange(0, HP)[None, :] < H, z, 0.0)


@triton.jit
def _preact_next(u, h, pack_ptr, q: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, PRECISION: tl.constexpr):
    """Layer l > 0, gate ``q``: ``[u | 1] @ [W_ih^T; b] + h @ W_hh^T``, ``u`` the layer below's new h (augmented)."""
    z = _dot(u, _weight_tile(pack_ptr, 4 + q, HP, True), _zeros_like(u), PRECISION)
    z = _dot(h, _weight_tile(pack_ptr, 8 + q, HP, True), z, PRECISION)
    return tl.where(tl.arange(0, HP)[None, :] < H, z, 0.0)


@triton.jit
def _gate_backward_next(dz, u_t, h_t, acc_u, acc_h, d_u, d_h, pack_ptr, row_ptr, q: tl.constexpr,
                        H: tl.constexpr, HP: tl.constexpr, OFF: tl.constexpr, PRECISION: tl.constexpr,
                        NEED_DW: tl.constexpr, NEED_DSTATE: tl.constexpr, DW_SCRATCH: tl.constexpr, zero):
    """Layer l > 0, gate ``q``: consumes ``dz`` at once (one live gradient tile, not four).

    Accumulates the weight gradients ``[u | 1]^T dz`` (``[W_ih^T; b]``) and ``h^T dz`` into
    ``acc_u, acc_h`` (or, with ``DW_SCRATCH``, into the partial-sum row at ``row_ptr``, whose layer
    starts at ``OFF``), and the input gradients ``d_u += dz W_ih`` and ``d_h += dz W_hh``.
    """
    if NEED_DW:
        if DW_SCRATCH:
            _add_next_grads(row_ptr, _dot(u_t, dz, _zeros_like(acc_u), PRECISION),
                            _dot(h_t, dz, _zeros_like(acc_h), PRECISION), q, OFF, H, HP, zero)
        else:
            acc_u = _dot(u_t, dz, acc_u, PRECISION)
            acc_h = _dot(h_t, dz, acc_h, PRECISION)
    d_u = _dot(dz, _weight_tile(pack_ptr, 4 + q, HP, False), d_u, PRECISION)
    if NEED_DSTATE:
        d_h = _dot(dz, _weight_tile(pack_ptr, 8 + q, HP, False), d_h, PRECISION)
    return acc_u, acc_h, d_u, d_h


@triton.jit
def _gate_backward_first(dz, a_t, acc, d_a, pack_ptr, row_ptr, q: tl.constexpr, F: tl.constexpr,
                         H: tl.constexpr, HP: tl.constexpr, PRECISION: tl.constexpr, NEED_DW: tl.constexpr,
                         NEED_DA: tl.constexpr, DW_SCRATCH: tl.constexpr, zero):
    """Layer 0, gate ``q``: ``acc += [h | x | 1]^T dz`` (``[W_hh^T; W_ih^T; b]``; or into the row), ``d_a += dz [W_hh | W_ih | b]``."""
    if NEED_DW:
        if DW_SCRATCH:
            _add_first_grad(row_ptr, _dot(a_t, dz, _zeros_like(acc), PRECISION), q, F, H, HP, zero)
        else:
            acc = _dot(a_t, dz, acc, PRECISION)
    if NEED_DA:
        d_a = _dot(dz, _weight_tile(pack_ptr, q, HP, False), d_a, PRECISION)
    return acc, d_a


@triton.jit
def _first_layer(a, c, pack_ptr, H: tl.constexpr, HP: tl.constexpr, PRECISION: tl.constexpr):
    """Layer 0's ``(c_new, h_new)``, one gate at a time folded into the cell at once (few live tiles: registers)."""
    ig = _tanh(_preact_first(a, pack_ptr, 3, H, HP, PRECISION))
    ig *= _sigmoid(_preact_first(a, pack_ptr, 0, H, HP, PRECISION))
    c_new = _sigmoid(_preact_first(a, pack_ptr, 1, H, HP, PRECISION)) * c + ig
    return c_new, _sigmoid(_preact_first(a, pack_ptr, 2, H, HP, PRECISION)) * _tanh(c_new)


@triton.jit
def _load_tile(ptr, rows, cols, stride_col, mask, CT: tl.constexpr):
    """``[BLOCK, HP]`` tile ``ptr[cols * stride_col + rows]`` (coordinates along rows, contiguous in memory)."""
    return tl.load(ptr + cols[None, :] * stride_col + rows[:, None], mask=mask, other=0.0).to(CT)


@triton.jit
def _narrow(x, ET: tl.constexpr):
    """``x`` in the storage dtype ``ET``; a 16-bit float through float32, as torch rounds float64 to one.

    Also, Triton's interpreter casts float64 straight to bfloat16 as an integer (zeros).
    """
    if ET == tl.bfloat16 or ET == tl.float16:
        x = x.to(tl.float32)
    return x.to(ET)


@triton.jit
def _store_tile(ptr, value, rows, cols, stride_col, mask):
    tl.store(ptr + cols[None, :] * stride_col + rows[:, None], _narrow(value, ptr.dtype.element_ty), mask=mask)


@triton.jit
def lstm_forward_kernel(
    g_ptr, h_ptr, c_ptr, h_out_ptr, c_out_ptr, upd_ptr, p_ptr, flag_ptr, const_ptr,
    pack_ptr, wout_ptr, bout_ptr,
    N, s_l, s_h, so_l, so_h,
    F: tl.constexpr, LOG_SIGN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, L: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
    HAS_PARAMS: tl.constexpr, MASK_NONFINITE: tl.constexpr,
):
    """One optimizer step for ``BLOCK`` coordinates: preprocessing, L <= 2 LSTM layers, read-out.

    Writes the update ``[N]`` (``out * output_scale``, rounded to the update's dtype, times
    ``lr_scale``) and the new states (strides ``so_l, so_h, 1``); with ``HAS_PARAMS`` also
    ``params += update`` in place. Outputs may alias inputs (in-place state): every store follows
    a CTA barrier placed after all loads of the same addresses, and programs own disjoint
    coordinates. With ``MASK_NONFINITE`` a coordinate whose gradient is NaN or infinite gets a
    zero update and keeps its state, and ``flag`` is set to 1.
    """
    CT: tl.constexpr = wout_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < N
    j = tl.arange(0, HP).to(tl.int64)
    col = tl.arange(0, HP)[None, :]
    tile_ok = n_ok[:, None] & (j < H)[None, :]

    p = tl.load(const_ptr + C_P).to(CT)
    threshold = tl.load(const_ptr + C_THRESHOLD).to(CT)
    exp_p = tl.load(const_ptr + C_EXP_P).to(CT)
    out_scale = tl.load(const_ptr + C_OUT_SCALE).to(CT)
    lr_scale = tl.load(const_ptr + C_LR_SCALE).to(CT)

    g = tl.load(g_ptr + n, mask=n_ok, other=0.0).to(CT)
    if MASK_NONFINITE:
        finite = tl.abs(g) < float("inf")  # False for NaN and +-inf
        g = tl.where(finite, g, 0.0)
        tl.atomic_max(flag_ptr, tl.reduce((n_ok & (finite == 0)).to(tl.int32), 0, _MAX_COMBINE))
    x0, x1 = _preprocess(g, p, threshold, exp_p, LOG_SIGN)

    # Layer 0.
    h0 = _load_tile(h_ptr, n, j, s_h, tile_ok, CT)
    c0 = _load_tile(c_ptr, n, j, s_h, tile_ok, CT)
    a0 = _first_input(h0, x0, x1, col, F, H)
    c0n, h0n = _first_layer(a0, c0, pack_ptr, H, HP, PRECISION)
    if MASK_NONFINITE:
        h0s = tl.where(finite[:, None], h0n, h0)
        c0s = tl.where(finite[:, None], c0n, c0)
    else:
        h0s = h0n
        c0s = c0n
    tl.debug_barrier()  # in-place outputs: every load of this layer's state is done
    _store_tile(h_out_ptr, h0s, n, j, so_h, tile_ok)
    _store_tile(c_out_ptr, c0s, n, j, so_h, tile_ok)
    top = h0n

    if L == 2:
        h1 = _load_tile(h_ptr + s_l, n, j, s_h, tile_ok, CT)
        c1 = _load_tile(c_ptr + s_l, n, j, s_h, tile_ok, CT)
        u = h0n + tl.where(col == H, 1.0, 0.0)
        ig = _tanh(_preact_next(u, h1, pack_ptr, 3, H, HP, PRECISION))
        ig *= _sigmoid(_preact_next(u, h1, pack_ptr, 0, H, HP, PRECISION))
        c1n = _sigmoid(_preact_next(u, h1, pack_ptr, 1, H, HP, PRECISION)) * c1 + ig
        h1n = _sigmoid(_preact_next(u, h1, pack_ptr, 2, H, HP, PRECISION)) * _tanh(c1n)
        if MASK_NONFINITE:
            h1s = tl.where(finite[:, None], h1n, h1)
            c1s = tl.where(finite[:, None], c1n, c1)
        else:
            h1s = h1n
            c1s = c1n
        tl.debug_barrier()
        _store_tile(h_out_ptr + so_l, h1s, n, j, so_h, tile_ok)
        _store_tile(c_out_ptr + so_l, c1s, n, j, so_h, tile_ok)
        top = h1n

    wout = tl.load(wout_ptr + j, mask=j < H, other=0.0)
    out = _sum(top * wout[None, :], 1) + tl.load(bout_ptr).to(CT)
    UT: tl.constexpr = upd_ptr.dtype.element_ty
    # Rounded to the update's dtype before lr_scale, as CoordinateWiseLSTM then learned_step do.
    update = _narrow(out * out_scale, UT).to(CT) * lr_scale
    if MASK_NONFINITE:
        update = tl.where(finite, update, 0.0)
    if HAS_PARAMS:
        params = tl.load(p_ptr + n, mask=n_ok, other=0.0)
        tl.store(p_ptr + n, _narrow(params.to(CT) + _narrow(update, UT).to(CT), p_ptr.dtype.element_ty), mask=n_ok)
    tl.debug_barrier()  # the update may overwrite the gradient in place
    tl.store(upd_ptr + n, _narrow(update, UT), mask=n_ok)


# The loop bounds are not specialised on (divisibility by 16, equality to 1): they carry no
# alignment, and each specialisation is another compile when the coordinate count changes.
@triton.jit(do_not_specialize=["num_blocks", "num_programs"])
def lstm_backward_kernel(
    g_ptr, h_ptr, c_ptr, du_ptr, dhn_ptr, dcn_ptr, dg_ptr, dh_ptr, dc_ptr, part_ptr, const_ptr,
    pack_ptr, wout_ptr, bout_ptr,
    N, s_l, s_h, gs_l, gs_h, num_blocks, num_programs,
    F: tl.constexpr, LOG_SIGN: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, L: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
    HAS_DU: tl.constexpr, HAS_DH: tl.constexpr, HAS_DC: tl.constexpr,
    NEED_DG: tl.constexpr, NEED_DSTATE: tl.constexpr, NEED_DW: tl.constexpr, DW_SCRATCH: tl.constexpr,
):
    """Backward of :func:`lstm_forward_kernel` (no parameters, no masking) from its saved inputs.

    Recomputes the forward from ``g, h, c`` (saved ``[N]``, ``[L, H, N]`` with strides ``s_l, s_h,
    1``), then backpropagates ``d update [N]``, ``d h_new``, ``d c_new`` (``[L, H, N]`` with
    strides ``gs_l, gs_h, 1``; each optional). Writes ``d g [N]``, ``d h``, ``d c`` (strides
    ``gs_l, gs_h, 1``) and, per program, one row of ``part`` with the weight gradients of the
    coordinates it visited, in parameter order: ``W_ih0 [4H, F], W_hh0 [4H, H], b0 [4H], (W_ih1
    [4H, H], W_hh1 [4H, H], b1 [4H],) w_out [H], b_out``.

    ``DW_SCRATCH`` chooses where the weight gradients are reduced over the blocks a program
    visits: False keeps twelve ``[HP, HP]`` accumulators in registers across the loop (ptxas
    spills them on sm_90); True adds each block's tiles to the program's row at once (``part``
    zero-initialised; the rows of all programs, ~20 KB each, stay in L2), so no accumulator
    lives across the loop.

    Registers are the constraint: each gate's pre-activation gradient is consumed as soon as it
    is formed (its weight-gradient dots and input-gradient dots), and layer 0's gates are
    recomputed for its backward instead of being kept live through layer 1's.
    """
    CT: tl.constexpr = wout_ptr.dtype.element_ty
    pid = tl.program_id(0)
    j = tl.arange(0, HP).to(tl.int64)
    j_ok = j < H
    col = tl.arange(0, HP)[None, :]
    p = tl.load(const_ptr + C_P).to(CT)
    threshold = tl.load(const_ptr + C_THRESHOLD).to(CT)
    exp_p = tl.load(const_ptr + C_EXP_P).to(CT)
    out_scale = tl.load(const_ptr + C_OUT_SCALE).to(CT)

    # Weight gradients of the coordinates this program visits, [HP, HP] per gate ([k, j] of the
    # augmented tiles of _weight_tile): layer 0 [W_hh0^T; W_ih0^T; b0]; layer 1 [W_ih1^T; b1] and W_hh1^T.
    w0_i = tl.full((HP, HP), 0, CT)
    w0_f = tl.full((HP, HP), 0, CT)
    w0_o = tl.full((HP, HP), 0, CT)
    w0_g = tl.full((HP, HP), 0, CT)
    u1_i = tl.full((HP, HP), 0, CT)
    u1_f = tl.full((HP, HP), 0, CT)
    u1_o = tl.full((HP, HP), 0, CT)
    u1_g = tl.full((HP, HP), 0, CT)
    w1_i = tl.full((HP, HP), 0, CT)
    w1_f = tl.full((HP, HP), 0, CT)
    w1_o = tl.full((HP, HP), 0, CT)
    w1_g = tl.full((HP, HP), 0, CT)
    a_wout = tl.full((HP,), 0, CT)
    a_bout = _sum(a_wout, 0)
    # This program's row of partial sums, in parameter order (see the docstring); layer 1 from OFF1.
    OFF1: tl.constexpr = 4 * H * F + 4 * H * H + 4 * H
    row = part_ptr + pid.to(tl.int64) * (OFF1 + (L - 1) * (8 * H * H + 4 * H) + H + 1)

    for block in range(pid, num_blocks, num_programs):
        # A zero the compiler cannot see through: without it LLVM hoists the loop-invariant
        # addresses (the state tiles' and the partial-sum row's 64-bit pointers) out of the
        # loop, and the sm_90 backward spills more (248 against 48 bytes per thread, Triton 3.9).
        zero = tl.load(const_ptr + C_ZERO, volatile=True).to(tl.int32)
        jv = j + zero
        n = (block * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        n_ok = n < N
        tile_ok = n_ok[:, None] & j_ok[None, :]

        # Forward as far as the top layer's gates; layer 0's new h only (one gate at a time).
        g = tl.load(g_ptr + n, mask=n_ok, other=0.0).to(CT)
        x0, x1 = _preprocess(g, p, threshold, exp_p, LOG_SIGN)
        h0 = _load_tile(h_ptr, n, jv, s_h, tile_ok, CT)
        c0 = _load_tile(c_ptr, n, jv, s_h, tile_ok, CT)
        a0 = _first_input(h0, x0, x1, col, F, H)
        c0n, h0n = _first_layer(a0, c0, pack_ptr, H, HP, PRECISION)
        top = h0n
        if L == 2:
            h1 = _load_tile(h_ptr + s_l, n, jv, s_h, tile_ok, CT)
            c1 = _load_tile(c_ptr + s_l, n, jv, s_h, tile_ok, CT)
            u = h0n + tl.where(col == H, 1.0, 0.0)
            i1 = _sigmoid(_preact_next(u, h1, pack_ptr, 0, H, HP, PRECISION))
            f1 = _sigmoid(_preact_next(u, h1, pack_ptr, 1, H, HP, PRECISION))
            o1 = _sigmoid(_preact_next(u, h1, pack_ptr, 2, H, HP, PRECISION))
            g1 = _tanh(_preact_next(u, h1, pack_ptr, 3, H, HP, PRECISION))
            tc1 = _tanh(f1 * c1 + i1 * g1)
            top = o1 * tc1

        # Read-out: update = (w_out . top + b_out) * output_scale.
        if HAS_DU:
            d_out = tl.load(du_ptr + n, mask=n_ok, other=0.0).to(CT) * out_scale
        else:
            d_out = _zeros_like(g)
        if NEED_DW:
            a_wout += _sum(top * d_out[:, None], 0)
            a_bout += _sum(d_out, 0)
        # (masked: a non-finite d_out times the zero padding of w_out would put NaN in the padding)
        dh = tl.where(col < H, d_out[:, None] * tl.load(wout_ptr + j, mask=j_ok, other=0.0)[None, :], 0.0)

        if L == 2:
            if HAS_DH:
                dh += _load_tile(dhn_ptr + gs_l, n, jv, gs_h, tile_ok, CT)
            if HAS_DC:
                dct = _load_tile(dcn_ptr + gs_l, n, jv, gs_h, tile_ok, CT)
            else:
                dct = _zeros_like(dh)
            dct += dh * o1 * (1.0 - tc1 * tc1)
            u_t = tl.trans(u)
            h_t = tl.trans(h1)
            d_u = _zeros_like(dh)
            d_h = _zeros_like(dh)
            # Gate by gate: o, i, g, f.
            u1_o, w1_o, d_u, d_h = _gate_backward_next(dh * tc1 * (o1 * (1.0 - o1)), u_t, h_t, u1_o, w1_o, d_u, d_h,
                                                       pack_ptr, row, 2, H, HP, OFF1, PRECISION,
                                                       NEED_DW, NEED_DSTATE, DW_SCRATCH, zero)
            u1_i, w1_i, d_u, d_h = _gate_backward_next(dct * g1 * (i1 * (1.0 - i1)), u_t, h_t, u1_i, w1_i, d_u, d_h,
                                                       pack_ptr, row, 0, H, HP, OFF1, PRECISION,
                                                       NEED_DW, NEED_DSTATE, DW_SCRATCH, zero)
            u1_g, w1_g, d_u, d_h = _gate_backward_next(dct * i1 * (1.0 - g1 * g1), u_t, h_t, u1_g, w1_g, d_u, d_h,
                                                       pack_ptr, row, 3, H, HP, OFF1, PRECISION,
                                                       NEED_DW, NEED_DSTATE, DW_SCRATCH, zero)
            u1_f, w1_f, d_u, d_h = _gate_backward_next(dct * c1 * (f1 * (1.0 - f1)), u_t, h_t, u1_f, w1_f, d_u, d_h,
                                                       pack_ptr, row, 1, H, HP, OFF1, PRECISION,
                                                       NEED_DW, NEED_DSTATE, DW_SCRATCH, zero)
            if NEED_DSTATE:
                _store_tile(dh_ptr + gs_l, d_h, n, jv, gs_h, tile_ok)
                _store_tile(dc_ptr + gs_l, dct * f1, n, jv, gs_h, tile_ok)
            dh = tl.where(col < H, d_u, 0.0)  # column H is the bias row's (not an input)

        # Layer 0: its gates again, from reloaded inputs (cache hits) rather than live registers.
        if L == 2:
            g = tl.load(g_ptr + n, mask=n_ok, other=0.0).to(CT)
            x0, x1 = _preprocess(g, p, threshold, exp_p, LOG_SIGN)
            h0 = _load_tile(h_ptr, n, jv, s_h, tile_ok, CT)
            c0 = _load_tile(c_ptr, n, jv, s_h, tile_ok, CT)
            a0 = _first_input(h0, x0, x1, col, F, H)
        if HAS_DH:
            dh += _load_tile(dhn_ptr, n, jv, gs_h, tile_ok, CT)
        if HAS_DC:
            dct = _load_tile(dcn_ptr, n, jv, gs_h, tile_ok, CT)
        else:
            dct = _zeros_like(dh)
        i0 = _sigmoid(_preact_first(a0, pack_ptr, 0, H, HP, PRECISION))
        f0 = _sigmoid(_preact_first(a0, pack_ptr, 1, H, HP, PRECISION))
        o0 = _sigmoid(_preact_first(a0, pack_ptr, 2, H, HP, PRECISION))
        g0 = _tanh(_preact_first(a0, pack_ptr, 3, H, HP, PRECISION))
        tc0 = _tanh(f0 * c0 + i0 * g0)
        dct += dh * o0 * (1.0 - tc0 * tc0)
        a_t = tl.trans(a0)
        d_a = _zeros_like(dh)  # gradient of [h | x | 1]: columns < H for h, H.. for the features
        NEED_DA: tl.constexpr = NEED_DSTATE | NEED_DG
        w0_o, d_a = _gate_backward_first(dh * tc0 * (o0 * (1.0 - o0)), a_t, w0_o, d_a, pack_ptr,
                                         row, 2, F, H, HP, PRECISION, NEED_DW, NEED_DA, DW_SCRATCH, zero)
        w0_i, d_a = _gate_backward_first(dct * g0 * (i0 * (1.0 - i0)), a_t, w0_i, d_a, pack_ptr,
                                         row, 0, F, H, HP, PRECISION, NEED_DW, NEED_DA, DW_SCRATCH, zero)
        w0_g, d_a = _gate_backward_first(dct * i0 * (1.0 - g0 * g0), a_t, w0_g, d_a, pack_ptr,
                                         row, 3, F, H, HP, PRECISION, NEED_DW, NEED_DA, DW_SCRATCH, zero)
        w0_f, d_a = _gate_backward_first(dct * c0 * (f0 * (1.0 - f0)), a_t, w0_f, d_a, pack_ptr,
                                         row, 1, F, H, HP, PRECISION, NEED_DW, NEED_DA, DW_SCRATCH, zero)
        if NEED_DSTATE:
            _store_tile(dh_ptr, d_a, n, jv, gs_h, tile_ok)
            _store_tile(dc_ptr, dct * f0, n, jv, gs_h, tile_ok)
        if NEED_DG:
            dx0 = _sum(tl.where(col == H, d_a, 0.0), 1)
            if F == 2:
                dx1 = _sum(tl.where(col == H + 1, d_a, 0.0), 1)
            else:
                dx1 = dx0
            dg = _preprocess_backward(g, dx0, dx1, p, threshold, exp_p, LOG_SIGN)
            tl.store(dg_ptr + n, _narrow(dg, dg_ptr.dtype.element_ty), mask=n_ok)
        if DW_SCRATCH:
            tl.debug_barrier()  # the next block's read-add-write of the row sees this one's in every thread

    if NEED_DW and not DW_SCRATCH:
        # The accumulators into the (zero-initialised) row, through the scratch mode's scatter.
        _add_first_grad(row, w0_i, 0, F, H, HP, 0)
        _add_first_grad(row, w0_f, 1, F, H, HP, 0)
        _add_first_grad(row, w0_o, 2, F, H, HP, 0)
        _add_first_grad(row, w0_g, 3, F, H, HP, 0)
        if L == 2:
            _add_next_grads(row, u1_i, w1_i, 0, OFF1, H, HP, 0)
            _add_next_grads(row, u1_f, w1_f, 1, OFF1, H, HP, 0)
            _add_next_grads(row, u1_o, w1_o, 2, OFF1, H, HP, 0)
            _add_next_grads(row, u1_g, w1_g, 3, OFF1, H, HP, 0)
    row += OFF1 + (L - 1) * (8 * H * H + 4 * H)  # w_out, b_out
    if NEED_DW:
        tl.store(row + j, a_wout, mask=j_ok)
        tl.store(row + H, a_bout)


@triton.jit
def loop_probe_kernel(out_ptr, n):
    """Stores ``0 .. n - 1``: whether this Triton's interpreter runs a loop with a runtime bound (see fused.py)."""
    for i in range(0, n):
        tl.store(out_ptr + i, i)
