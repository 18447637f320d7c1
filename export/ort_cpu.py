"""`--target ort-cpu`: quantized linears lowered to com.microsoft::MatMulNBits (ONNX Runtime's fused
dequantize + GEMM on CPU), outliers added by a sparse gather/scatter correction.

MatMulNBits takes the same quantization as our packed layout (w = (q - zero) * scale per row and
block of `group_size` columns), in its own packing: B uint8 (N, blocks, group_size * bits / 8) with
code j of a byte at bits [j*bits, (j+1)*bits), zero points packed the same way per row, fp32 scales.
It runs 2, 4 and 8 bits on CPU; a 3-bit layer goes into the 4-bit container (exact: codes and zero
points < 8), which costs one extra bit per weight: `container_bytes` reports it.
"""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from shrinkrt.runtime.packing import n_groups, unpack_bits

CONTAINER = {2: 2, 3: 4, 4: 4, 8: 8}
# MatMulNBits accuracy_level: 4 quantizes the activations to int8 per block inside the kernel (int8
# dot products, as llama.cpp's q8 activations do); 0 dequantizes to fp32 (slower, matches the
# reference to summation order).
ACCURACY_LEVELS = (0, 4)


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) ints < 2^bits -> (rows, ceil(n*bits/8)) uint8, value j at bits [j*bits % 8, ...) of byte j*bits//8."""
    per = 8 // bits
    rows, n = values.shape
    pad = (-n) % per
    v = np.pad(values.astype(np.uint8), ((0, 0), (0, pad))).reshape(rows, -1, per)
    out = np.zeros(v.shape[:2], np.uint8)
    for j in range(per):
        out |= (v[:, :, j] << (j * bits)).astype(np.uint8)
    return out


def matmul_nbits(g, b, x: str, m, path: str) -> str:
    """MatMulNBits node (+ outlier correction) for one QuantLinear; records its bytes in g.stats."""
    N, K, gs = m.out_features, m.in_features, m.group_size
    bits = CONTAINER[m.bits]
    G = n_groups(K, gs)
    codes = unpack_bits(m.codes, m.bits, K).numpy()
    codes = np.pad(codes, ((0, 0), (0, G * gs - K)))
    zeros = unpack_bits(m.zeros, m.bits, G).numpy()
    B = _pack_rows(codes, bits).reshape(N, G, gs * bits // 8)
    zp = _pack_rows(zeros, bits)
    scales = m.scales.float().numpy().reshape(-1)
    names = [g.weight(f"{path}.nbits_B", B), g.weight(f"{path}.nbits_scales", scales.astype(g.np_float)),
             g.weight(f"{path}.nbits_zero_points", zp.reshape(-1))]
    y = f"{path}/y"
    g.nodes.append(helper.make_node("MatMulNBits", [x, *names], [y], name=f"{path}/MatMulNBits",
                                    domain="com.microsoft", K=K, N=N, bits=bits, block_size=gs,
                                    accuracy_level=g.ort_accuracy))
    nbytes = B.nbytes + scales.nbytes + zp.nbytes
    if m.n_outliers:
        rows = np.repeat(np.arange(N), np.diff(m.outlier_rowptr.numpy()))
        c = m.outlier_cols
        cols = (c.long() & 0xFFFF if c.dtype.itemsize == 2 else c.long()).numpy()
        xs = b("Gather", x, g.weight(f"{path}.outlier_cols", cols.astype(np.int64)), axis=-1)  # (B, T, nnz)
        upd = b("Mul", xs, g.weight(f"{path}.outlier_vals", m.outlier_vals.float().numpy().astype(g.np_float)))
        idx = b("Expand", g.weight(f"{path}.outlier_rows", rows.astype(np.int64)), b("Shape", upd))
        zero = b("ConstantOfShape", b("Shape", y), value=numpy_helper.from_array(np.zeros(1, g.np_float)))
        y = b("Add", y, b("ScatterElements", zero, idx, upd, axis=-1, reduction="add"))
        nbytes += 16 * len(rows)  # int64 column + int64 row + fp32 value per outlier
    g.stats.setdefault("matmul_nbits", []).append({"name": path, "bits": m.bits, "container_bits": bits,
                                                    "bytes": int(nbytes)})
    return y
