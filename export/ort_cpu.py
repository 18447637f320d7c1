"""`--target ort-cpu`: quantized linears lowered to com.microsoft::MatMulNBits (ONNX Runtime's fused
dequantize + GEMM on CPU), outliers added by a sparse gather/scatter correction.

MatMulNBits takes the same quantization as our packed layout (w = (q - zero) * scale per row and
block of `group_size` columns), in its own packing: B uint8 (N, blocks, group_size * bits / 8) with
code j of a byte at bits [j*bits, (j+1)*bits), zero points packed the same way per row, fp32 scales.
It runs 2, 4 and 8 bits on CPU; a 3-bit layer goes into the 4-bit container (exact: codes and zero
points < 8), which costs one extra bit per weight: `container_bytes` reports it. A layer with fp16 mins
(w = q * s + m) becomes float zero points z = -m / s, which MatMulNBits also takes (w = (q - z) * s).
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


def _nbits_parts(m):
    """One QuantLinear in MatMulNBits' packing: B (N, blocks, bytes), fp32 scales (N*blocks,), zero
    points (N, bytes), and its outliers as (rows, cols, values)."""
    N, K, gs = m.out_features, m.in_features, m.group_size
    bits = CONTAINER[m.bits]
    G = n_groups(K, gs)
    codes = unpack_bits(m.codes, m.bits, K).numpy()
    codes = np.pad(codes, ((0, 0), (0, G * gs - K)))
    B = _pack_rows(codes, bits).reshape(N, G, gs * bits // 8)
    scales = m.scales.float().numpy()
    if m.has_mins:  # float zero points, computed in fp32 as MatMulNBits dequantizes (q - z) * s
        zp = (-m.mins.float().numpy() / scales).reshape(-1)
    else:
        zp = _pack_rows(unpack_bits(m.zeros, m.bits, G).numpy(), bits)
    rows, cols, vals = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    if m.n_outliers:
        rows = np.repeat(np.arange(N), np.diff(m.outlier_rowptr.numpy()))
        c = m.outlier_cols
        cols = (c.long() & 0xFFFF if c.dtype.itemsize == 2 else c.long()).numpy()
        vals = m.outlier_vals.float().numpy()
    return B, scales.reshape(-1), zp, (rows, cols, vals)


def packable(mods) -> bool:
    """Linears one MatMulNBits can carry side by side: same input, container bits, group size and
    zero-point kind (uint8 codes or floats from fp16 mins)."""
    return all(m.in_features == mods[0].in_features and CONTAINER[m.bits] == CONTAINER[mods[0].bits]
               and m.group_size == mods[0].group_size and m.has_mins == mods[0].has_mins for m in mods)


def matmul_nbits(g, b, x: str, mods, path: str, module_names: list[str] | None = None) -> str:
    """One MatMulNBits node for `mods` (one QuantLinear, or several packed along N: q/k/v, gate/up),
    plus the outliers as one dense correction over the columns they occupy:
    y += Gather(x, cols) @ dense(cols, N) (3 nodes, whatever their number). Records bytes in g.stats."""
    assert packable(mods)
    K, gs = mods[0].in_features, mods[0].group_size
    bits = CONTAINER[mods[0].bits]
    parts = [_nbits_parts(m) for m in mods]
    B = np.concatenate([p[0] for p in parts])
    scales = np.concatenate([p[1] for p in parts])
    zp = np.concatenate([p[2] for p in parts])
    N = B.shape[0]
    names = [g.weight(f"{path}.nbits_B", B), g.weight(f"{path}.nbits_scales", scales.astype(g.np_float)),
             g.weight(f"{path}.nbits_zero_points", zp.reshape(-1).astype(g.np_float) if mods[0].has_mins
                      else zp.reshape(-1))]
    y = f"{path}/y"
    g.nodes.append(helper.make_node("MatMulNBits", [x, *names], [y], name=f"{path}/MatMulNBits",
                                    domain="com.microsoft", K=K, N=N, bits=bits, block_size=gs,
                                    accuracy_level=g.ort_accuracy))
    nbytes = B.nbytes + scales.nbytes + zp.nbytes
    offsets = np.cumsum([0] + [m.out_features for m in mods])
    rows = np.concatenate([p[3][0] + off for p, off in zip(parts, offsets)])
    cols = np.concatenate([p[3][1] for p in parts])
    vals = np.concatenate([p[3][2] for p in parts])
    if len(rows):
        used, col_at = np.unique(cols, return_inverse=True)
        dense = np.zeros((len(used), N), np.float32)
        np.add.at(dense, (col_at, rows), vals)
        xs = b("Gather", x, g.weight(f"{path}.outlier_cols", used.astype(np.int64)), axis=-1)  # (B, T, |cols|)
        y = b("Add", y, b("MatMul", xs, g.weight(f"{path}.outlier_dense", dense.astype(g.np_float))))
        nbytes += 8 * len(used) + dense.astype(g.np_float).nbytes
    for m, name in zip(mods, module_names or [path]):
        g.stats.setdefault("matmul_nbits", []).append({"name": name, "bits": m.bits, "container_bits": bits,
                                                        "mins": m.has_mins,
                                                        "bytes": int(nbytes * m.out_features / N),
                                                        "packed_with": len(mods)})
    return y


LM_HEAD_BLOCK = 32  # llama.cpp's Q4_1 / Q8_0 block: the peers' heads are quantized this finely


def _lm_head_codes(g, weight: np.ndarray, bits: int) -> dict:
    """The LM head (vocab, dim) quantized once per export by ONNX Runtime's own block quantizer
    (asymmetric, LM_HEAD_BLOCK columns per block): its initializers' names and sizes."""
    if g.lm_head_codes is not None:
        return g.lm_head_codes
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    N, K = weight.shape
    blocks, per = -(-K // LM_HEAD_BLOCK), 8 // bits
    wt = np.zeros((blocks * LM_HEAD_BLOCK, N), np.float32)
    wt[:K] = weight.T
    packed = np.zeros((N, blocks, LM_HEAD_BLOCK * bits // 8), np.uint8)
    zp = np.zeros((N, -(-blocks // per)), np.uint8)
    scales = np.zeros((N, blocks), np.float32)
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, wt, scales, zp, LM_HEAD_BLOCK, N,
                                                                     blocks * LM_HEAD_BLOCK, False)
    g.lm_head_codes = {"N": N, "K": K, "bits": bits, "blocks": blocks, "scales": scales, "zero_points": zp,
                       "B": g.weight("lm_head.nbits_B", packed),
                       "names": [g.weight("lm_head.nbits_scales", scales.reshape(-1).astype(g.np_float)),
                                 g.weight("lm_head.nbits_zero_points", zp.reshape(-1))]}
    g.stats["lm_head"] = {"bits": bits, "block": LM_HEAD_BLOCK, "bytes": int(packed.nbytes + scales.nbytes + zp.nbytes)}
    return g.lm_head_codes


def lm_head_nbits(g, b, x: str, weight: np.ndarray, bits: int) -> str:
    """The LM head as one MatMulNBits: the largest single weight of a small model, read whole on every
    decode step."""
    q = _lm_head_codes(g, weight, bits)
    y = "head/lm_head_y"
    g.nodes.append(helper.make_node("MatMulNBits", [x, q["B"], *q["names"]], [y], name="head/lm_head/MatMulNBits",
                                    domain="com.microsoft", K=q["K"], N=q["N"], bits=bits, block_size=LM_HEAD_BLOCK,
                                    accuracy_level=g.ort_accuracy))
    return y


def embedding_from_head(g, b, ids: str, weight: np.ndarray, bits: int) -> str:
    """Tied embeddings over the quantized head's own codes: one com.microsoft::GatherBlockQuantized reads
    the rows of the head's MatMulNBits B (vocab, blocks, bytes) with its scales and zero points viewed
    as (vocab, blocks, 1), so the model holds the table once, in `bits` bits, instead of also in fp32
    (SmolLM2: 113 MB of 236). Rows come out (B, T, blocks, LM_HEAD_BLOCK), reshaped to (B, T, dim)."""
    q = _lm_head_codes(g, weight, bits)
    N, blocks = q["N"], q["blocks"]
    zp = q["zero_points"]
    if bits == 4:  # (vocab, ceil(blocks/2)) nibble pairs -> one zero point per block
        zp = np.stack([zp & 15, zp >> 4], -1).reshape(N, -1)[:, :blocks]
    rows = b("GatherBlockQuantized", q["B"], ids,
             g.weight("embed_tokens.from_head_scales", q["scales"].reshape(N, blocks, 1).astype(g.np_float)),
             g.weight("embed_tokens.from_head_zero_points", zp.astype(np.uint8).reshape(N, blocks, 1)),  # 4-bit: low nibble
             domain="com.microsoft", bits=bits, block_size=LM_HEAD_BLOCK, gather_axis=0, quantize_axis=2)
    h = b("Reshape", rows, b.const([0, 0, blocks * LM_HEAD_BLOCK], np.int64))
    if blocks * LM_HEAD_BLOCK != q["K"]:  # the last block's padding columns
        h = b("Slice", h, b.const([0], np.int64), b.const([q["K"]], np.int64), b.const([-1], np.int64))
    g.stats["embed_tokens"] = {"from_lm_head": True, "bits": bits}
    return h
