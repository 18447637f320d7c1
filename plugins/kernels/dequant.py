"""Dequantize an LLM-MQ packed weight (docs/formats.md) to a dense FP16 (N, K) matrix, outliers
included, for prefill: M > 8 activation rows make the GEMM compute-bound, so the weight is expanded
once per call and multiplied by a tensor-core GEMM (torch.matmul here; cuBLASLt in a plugin).

One program writes one (BLOCK_N, BLOCK_K) tile; a row's outliers that fall in the tile are merged in
registers before the single store (the dense code under an outlier dequantizes to exactly 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from shrinkrt.runtime.op_contract import DEQUANT_BLOCK_K as BLOCK_K, DEQUANT_BLOCK_N as BLOCK_N

from .qgemv import _bits_at, _weights


@triton.jit
def dequant_kernel(codes_ptr, scales_ptr, zeros_ptr, rowptr_ptr, cols_ptr, vals_ptr, w_ptr, N, K, G,
                   words_per_row, zwords_per_row, BITS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_OUTLIERS: tl.constexpr, HAS_MINS: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < N
    m2 = rmask[:, None] & (ks < K)[None, :]
    code = _bits_at(codes_ptr, rows[:, None] * words_per_row, ks[None, :] * BITS, m2, BITS)
    g = ks // GROUP
    scale = tl.load(scales_ptr + rows[:, None] * G + g[None, :], mask=m2, other=0.0).to(tl.float32)
    w = _weights(code, zeros_ptr, rows, g, m2, G, zwords_per_row, scale, BITS, HAS_MINS)
    if HAS_OUTLIERS:
        start = tl.load(rowptr_ptr + rows, mask=rmask, other=0)
        count = tl.load(rowptr_ptr + rows + 1, mask=rmask, other=0) - start
        for j in range(0, tl.max(count, axis=0)):
            om = rmask & (j < count)
            col = tl.load(cols_ptr + start + j, mask=om, other=-1)
            val = tl.load(vals_ptr + start + j, mask=om, other=0.0).to(tl.float32)
            hit = om[:, None] & (ks[None, :] == col[:, None])
            w = tl.where(hit, val[:, None], w)
    tl.store(w_ptr + rows[:, None] * K + ks[None, :], w.to(tl.float16), mask=m2)


def dequant(m) -> torch.Tensor:
    """m: runtime.quant_linear.QuantLinear -> its weight (N, K) as float16 on m's device."""
    N, K = m.out_features, m.in_features
    w = torch.empty(N, K, dtype=torch.float16, device=m.codes.device)
    if m.n_outliers:
        c = m.outlier_cols
        rowptr, cols, vals = m.outlier_rowptr, (c.to(torch.int32) & 0xFFFF) if c.dtype == torch.int16 \
            else c.to(torch.int32), m.outlier_vals
    else:
        rowptr = cols = vals = torch.zeros(1, dtype=torch.int32, device=w.device)
    scales, zero_points = m.group_scales(), m.zero_points()  # 8-bit param codes expanded once
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))
    dequant_kernel[grid](m.codes, scales, zero_points, rowptr, cols, vals, w, N, K, scales.shape[1],
                         m.codes.shape[1], zero_points.shape[1], BITS=m.bits, GROUP=m.group_size, BLOCK_N=BLOCK_N,
                         BLOCK_K=BLOCK_K, HAS_OUTLIERS=bool(m.n_outliers), HAS_MINS=m.has_mins)
    return w
