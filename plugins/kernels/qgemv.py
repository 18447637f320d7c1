"""Mixed-precision dequantize + GEMV over the LLM-MQ packed layout (docs/formats.md), outliers fused.

y[m, n] = sum_k x[m, k] * ((code(n, k) - zero(n, k // GROUP)) * scale(n, k // GROUP))
          (or code * scale + min(n, k // GROUP) in a layer with fp16 mins, HAS_MINS)
          + sum over row n's CSR outliers of vals[i] * x[m, cols[i]]
fp32 accumulation, any of 2/3/4/8 bits (a 3-bit code may straddle two words), batch M <= 8.

One program computes BLOCK_N output rows for all M activations: it walks K in BLOCK_K chunks,
reads each code's word(s) from the row's bit stream, and keeps the partial sums in registers.
Decode is memory-bound: the weight stream is read once per launch whatever M is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shrinkrt.runtime.op_contract import QGEMV_BLOCK_K as BLOCK_K, QGEMV_BLOCK_N as BLOCK_N, QGEMV_ROWS


@triton.jit
def _bits_at(base_ptr, row_off, bitpos, mask, BITS: tl.constexpr):
    """`BITS`-bit values starting at bit `bitpos` of each row's little-endian int32 stream."""
    widx = bitpos // 32
    sh = (bitpos % 32).to(tl.uint32)
    w0 = tl.load(base_ptr + row_off + widx, mask=mask, other=0).to(tl.uint32, bitcast=True)
    val = w0 >> sh
    if 32 % BITS != 0:  # a code can straddle into the next word (3 bits)
        spill = mask & (sh + BITS > 32)
        w1 = tl.load(base_ptr + row_off + widx + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
        val = val | tl.where(spill, w1 << ((32 - sh) % 32), 0)
    return (val & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _weights(code, zeros_ptr, rows, g, m2, G, zwords_per_row, scale, BITS: tl.constexpr, HAS_MINS: tl.constexpr):
    """Dequantized (BLOCK_N, BLOCK_K) tile: (code - zero) * scale, or code * scale + min where the
    zero-point slot holds the fp16 mins, (N, G) row-major (docs/formats.md)."""
    # one return after a constexpr if/else: Triton compiles only the taken branch (an early return
    # inside the `if` still compiled the zero-point branch against the fp16 pointer)
    if HAS_MINS:
        mn = tl.load(zeros_ptr + rows[:, None] * G + g[None, :], mask=m2, other=0.0).to(tl.float32)
        w = code.to(tl.float32) * scale + mn
    else:
        zero = _bits_at(zeros_ptr, rows[:, None] * zwords_per_row, g[None, :] * BITS, m2, BITS)
        w = (code - zero).to(tl.float32) * scale
    return w


@triton.jit
def qgemv_kernel(x_ptr, codes_ptr, scales_ptr, zeros_ptr, rowptr_ptr, cols_ptr, vals_ptr, y_ptr,
                 M, N, K, G, words_per_row, zwords_per_row, stride_xm, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_MINS: tl.constexpr = False):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ms = tl.arange(0, M_PAD)
    mmask = ms < M
    acc = tl.zeros((BLOCK_N, M_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        m2 = rmask[:, None] & kmask[None, :]
        code = _bits_at(codes_ptr, rows[:, None] * words_per_row, ks[None, :] * BITS, m2, BITS)
        g = ks // GROUP
        scale = tl.load(scales_ptr + rows[:, None] * G + g[None, :], mask=m2, other=0.0).to(tl.float32)
        w = _weights(code, zeros_ptr, rows, g, m2, G, zwords_per_row, scale, BITS, HAS_MINS)  # (BLOCK_N, BLOCK_K)
        x = tl.load(x_ptr + ms[None, :] * stride_xm + ks[:, None], mask=kmask[:, None] & mmask[None, :],
                    other=0.0).to(tl.float32)  # (BLOCK_K, M_PAD)
        acc += tl.sum(w[:, :, None] * x[None, :, :], axis=1)
    if HAS_OUTLIERS:
        start = tl.load(rowptr_ptr + rows, mask=rmask, other=0)
        count = tl.load(rowptr_ptr + rows + 1, mask=rmask, other=0) - start
        # the loop bound is this block's longest row, read on the device: the launcher (a plugin
        # fed device-resident CSR arrays) never needs the outlier counts on the host
        for j in range(0, tl.max(count, axis=0)):
            om = rmask & (j < count)
            col = tl.load(cols_ptr + start + j, mask=om, other=0)
            val = tl.load(vals_ptr + start + j, mask=om, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + ms[None, :] * stride_xm + col[:, None], mask=om[:, None] & mmask[None, :],
                         other=0.0).to(tl.float32)
            acc += val[:, None] * xo
    tl.store(y_ptr + ms[None, :] * stride_ym + rows[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & mmask[None, :])



def qgemv(x: torch.Tensor, m) -> torch.Tensor:
    """x (M, K) fp16/fp32 with M <= max(QGEMV_ROWS); m: runtime.quant_linear.QuantLinear -> y (M, N) in x's dtype."""
    M, K = x.shape
    if M > max(QGEMV_ROWS) or K != m.in_features:
        raise ValueError(f"qgemv takes (M <= {max(QGEMV_ROWS)}, {m.in_features}) activations, got {tuple(x.shape)}")
    N = m.out_features
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if m.n_outliers:
        rowptr = m.outlier_rowptr
        c = m.outlier_cols
        cols = (c.to(torch.int32) & 0xFFFF) if c.dtype == torch.int16 else c.to(torch.int32)
        vals = m.outlier_vals
    else:
        rowptr = cols = vals = torch.zeros(1, dtype=torch.int32, device=x.device)
    scales, zero_points = m.group_scales(), m.zero_points()  # 8-bit param codes expanded once
    grid = (triton.cdiv(N, BLOCK_N),)
    qgemv_kernel[grid](x, m.codes, scales, zero_points, rowptr, cols, vals, y, M, N, K, scales.shape[1],
                       m.codes.shape[1], zero_points.shape[1], x.stride(0), y.stride(0),
                       BITS=m.bits, GROUP=m.group_size, M_PAD=max(2, triton.next_power_of_2(M)),
                       BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, HAS_OUTLIERS=bool(m.n_outliers), HAS_MINS=m.has_mins)
    return y
