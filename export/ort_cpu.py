"""`--target ort-cpu`: quantized linears lowered to com.microsoft::MatMulNBits (ONNX Runtime's fused
dequantize + GEMM on CPU), outliers added by a sparse gather/scatter correction.

MatMulNBits takes the same quantization as our packed layout (w = (q - zero) * scale per row and
block of `group_size` columns), in its own packing: B uint8 (N, blocks, group_size * bits / 8) with
code j of a byte at bits [j*bits, (j+1)*bits), zero points packed the same way per row, fp32 scales.
It runs 2, 4 and 8 bits on CPU; a 3-bit layer goes into the 4-bit container (exact: codes and zero
points < 8), which costs one extra bit per weight: `container_bytes` reports it.

A layer with fp16 mins (w = q * s + m) goes into the 8-bit container on a finer grid (min_layer_codes):
MatMulNBits also takes float zero points, but that is its slow path (a 1536x576 product, one row, 2
threads: 772 us vs 19 us with uint8 zero points; 8-bit codes run as fast as 4-bit: 19 us, and faster
at 64 rows: 463 vs 647 us), and integer zero points on the 4-bit grid shift the min by up to half a step.
"""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from shrinkrt.runtime.op_contract import WEIGHT_MIN_FORMATS
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


def min_layer_codes(q: np.ndarray, scales: np.ndarray, mins: np.ndarray, group_size: int):
    """4-bit codes with fp16 mins -> the 8-bit container, per block: w = (Q - Z) * S with Q = k*q + c,
    S = s / k, Z = c - d, d = round(k * m / s), so w = s * q + s * d / k: the min to within s / (2k).
    k is the finest integer step that keeps Q and Z in [0, 255]: 17 for the usual block (m in [-15s, 0],
    as an RTN min/max block always has while it holds a weight <= 0), coarser for a positive min or one
    below -15s (k >= 1 while |m| <= 240s), and a block of s = 0 (all weights equal) stores its min alone. q (N, G*gs) ints, scales and mins (N, G)
    float -> (Q (N, G*gs) uint8, S (N, G) float32, Z (N, G) uint8, the largest |m - S*(c - Z)|)."""
    s, m = scales.astype(np.float64), mins.astype(np.float64)
    flat = s == 0
    t = np.where(flat, 0.0, m / np.where(flat, 1.0, s))
    # d in [-255, 255 - 15k]: Z = c - d <= 255 with c = max(d, 0), and Q = k*q + c <= 255
    k_pos = np.floor(255.0 / (np.maximum(t, 0) + 15.0))
    k_neg = np.floor(255.0 / np.maximum(-t, 1e-9))
    k = np.clip(np.minimum(np.where(t >= 0, k_pos, np.minimum(k_neg, 17)), 17), 1, 17)
    d = np.clip(np.rint(k * t), -255, 255 - 15 * k)
    S = s / k
    # a flat block: Q = c, one step of |m| / 240 (d = +-240 fits k = 1)
    S = np.where(flat, np.abs(m) / 240.0, S)
    d = np.where(flat, np.sign(m) * 240.0, d)
    k = np.where(flat, 0.0, k)
    c = np.maximum(d, 0)
    Z = c - d
    rep = lambda a: np.repeat(a, group_size, axis=1)  # noqa: E731  per block -> per column
    Q = rep(k) * q + rep(c)
    err = float(np.abs(m - S * d).max()) if m.size else 0.0
    return Q.astype(np.uint8), S.astype(np.float32), Z.astype(np.uint8), err


def _nbits_parts(m):
    """One QuantLinear in MatMulNBits' packing: B (N, blocks, bytes), fp32 scales (N*blocks,), zero
    points (N, bytes), and its outliers as (rows, cols, values)."""
    N, K, gs = m.out_features, m.in_features, m.group_size
    bits = container_bits(m)
    G = n_groups(K, gs)
    codes = unpack_bits(m.codes, m.bits, K).numpy()
    codes = np.pad(codes, ((0, 0), (0, G * gs - K)))
    scales = m.group_scales().float().numpy()
    if m.has_mins:
        codes, scales, zp, _ = min_layer_codes(codes, scales, m.group_mins().float().numpy(), gs)
    else:
        zp = _pack_rows(unpack_bits(m.zeros, m.bits, G).numpy(), bits)
    B = _pack_rows(codes, bits).reshape(N, G, gs * bits // 8)
    rows, cols, vals = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    if m.n_outliers:
        rows = np.repeat(np.arange(N), np.diff(m.outlier_rowptr.numpy()))
        c = m.outlier_cols
        cols = (c.long() & 0xFFFF if c.dtype.itemsize == 2 else c.long()).numpy()
        vals = m.outlier_vals.float().numpy()
    return B, scales.reshape(-1), zp, (rows, cols, vals)


def container_bits(m) -> int:
    """The MatMulNBits bit width a QuantLinear is stored at: CONTAINER, or 8 for a layer with mins."""
    return 8 if m.has_mins else CONTAINER[m.bits]


def library_layer(g, m) -> bool:
    """A linear lowered to shrinkrt::QuantMatMulW4A8 instead of MatMulNBits: a min layer (4-bit codes with
    a min per group of 32, the source GGUF's Q4_1) at accuracy level 4, which the CPU ops library runs on
    its own codes with int8 activations per 32 columns (as MatMulNBits does at level 4): 5.0 bits per
    weight read per step instead of the 8-bit container's 9.25 (docs/results/quant_matmul_cpu.md). At
    level 0 (fp32 activations) min layers stay in the container. Without the library the node's
    reference body runs: the same int8 arithmetic in standard ops (fp32 weights after folding)."""
    return g.ort_accuracy == 4 and m.has_mins and (m.bits, m.group_size) in WEIGHT_MIN_FORMATS


def lowering(g, m) -> tuple[str, int]:
    """(node type, bits per code it reads) of one quantized linear in the ort-cpu graph."""
    return ("QuantMatMulW4A8", m.bits) if library_layer(g, m) else ("MatMulNBits", container_bits(m))


def packable(g, mods) -> bool:
    """Linears one node can carry side by side: same input, lowering and group size (a min layer and
    an 8-bit one share MatMulNBits' 8-bit container at level 0: both have uint8 zero points)."""
    return all(m.in_features == mods[0].in_features and lowering(g, m) == lowering(g, mods[0])
               and m.group_size == mods[0].group_size for m in mods)


def quant_matmul_w4a8(g, b, x: str, mods, path: str, module_names: list[str] | None = None,
                      gated: bool = False) -> str:
    """One shrinkrt::QuantMatMulW4A8 node for library_layer `mods` (packed along N where several), with
    its reference body as a model-local function. Its scales and mins are stored as the fp16 values the
    op reads (a layer's 8-bit param codes expanded at export: packing.param_values, exact). gated: mods
    are (gate, up) of equal width and the node gives silu(gate) * up. The min meets the int8 block's own
    sum (quantized_sums = 1: the dequantized weight times the dequantized activations; the plain sum of x
    moved the main job's perplexity over 2048 tokens ~1.4% from level 0, docs/ops.md). Records bytes."""
    from . import ops

    assert packable(g, mods) and library_layer(g, mods[0])
    K, N = mods[0].in_features, sum(m.out_features for m in mods)
    codes = np.concatenate([m.codes.numpy().astype(np.int32) for m in mods])
    scales = np.concatenate([m.group_scales().float().numpy() for m in mods]).astype(np.float16)
    mins = np.concatenate([m.group_mins().float().numpy() for m in mods]).astype(np.float16)
    assert not gated or (len(mods) == 2 and mods[0].out_features == mods[1].out_features)
    quantized_sums = True
    fn = ops.quant_matmul_w4a8_function(K, N, g.dtype, gated, quantized_sums)
    g.functions[f"{fn.name}/{fn.overload}"] = fn
    inputs = [g.weight(f"{path}.codes", codes), g.weight(f"{path}.scales", scales), g.weight(f"{path}.mins", mins)]
    y = f"{path}/y"
    g.nodes.append(ops.node("QuantMatMulW4A8", [x, *inputs], [y], f"{path}/QuantMatMulW4A8", fn.overload,
                            in_features=K, out_features=N, gated=int(gated),
                            quantized_sums=int(quantized_sums)))
    nbytes = codes.nbytes + scales.nbytes + mins.nbytes
    for m, name in zip(mods, module_names or [path]):
        g.stats.setdefault("matmul_nbits", []).append({"name": name, "op": "QuantMatMulW4A8", "bits": m.bits,
                                                        "container_bits": m.bits, "mins": True,
                                                        "bytes": int(nbytes * m.out_features / N),
                                                        "packed_with": len(mods)})
    return y


def matmul_nbits(g, b, x: str, mods, path: str, module_names: list[str] | None = None) -> str:
    """One MatMulNBits node for `mods` (one QuantLinear, or several packed along N: q/k/v, gate/up),
    plus the outliers as one dense correction over the columns they occupy:
    y += Gather(x, cols) @ dense(cols, N) (3 nodes, whatever their number). Records bytes in g.stats."""
    assert packable(g, mods) and not library_layer(g, mods[0])
    K, gs = mods[0].in_features, mods[0].group_size
    bits = container_bits(mods[0])
    parts = [_nbits_parts(m) for m in mods]
    B = np.concatenate([p[0] for p in parts])
    scales = np.concatenate([p[1] for p in parts])
    zp = np.concatenate([p[2] for p in parts])
    N = B.shape[0]
    names = [g.weight(f"{path}.nbits_B", B), g.weight(f"{path}.nbits_scales", scales.astype(g.np_float)),
             g.weight(f"{path}.nbits_zero_points", zp.reshape(-1))]
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
        g.stats.setdefault("matmul_nbits", []).append({"name": name, "op": "MatMulNBits", "bits": m.bits,
                                                        "container_bits": bits,
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
    g.lm_head_codes = {"N": N, "K": K, "bits": bits, "blocks": blocks, "scales": scales, "zero_points": zp, "packed": packed,
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
    """Tied embeddings as the quantized head's own codes: one com.microsoft::GatherBlockQuantized reads
    rows of a copy of the head's MatMulNBits B (vocab, blocks, bytes) with its scales and zero points
    viewed as (vocab, blocks, 1), so the table is in `bits` bits, not also in fp32 (SmolLM2: 113 MB of
    236). A copy, not the head's initializer itself: ONNX Runtime drops an initializer's pages once
    MatMulNBits has prepacked it, unless another node reads it, so a shared one stays resident whole
    (the main job's model after a 512-token prefill: 252 -> 229 MB peak RSS; the copy's pages are
    touched only at the rows looked up; 27 MB more on disk). Rows come out (B, T, blocks,
    LM_HEAD_BLOCK), reshaped to (B, T, dim)."""
    q = _lm_head_codes(g, weight, bits)
    N, blocks = q["N"], q["blocks"]
    zp = q["zero_points"]
    if bits == 4:  # (vocab, ceil(blocks/2)) nibble pairs -> one zero point per block
        zp = np.stack([zp & 15, zp >> 4], -1).reshape(N, -1)[:, :blocks]
    table = g.weight("embed_tokens.from_head_B", q["packed"], share=False)
    rows = b("GatherBlockQuantized", table, ids,
             g.weight("embed_tokens.from_head_scales", q["scales"].reshape(N, blocks, 1).astype(g.np_float)),
             g.weight("embed_tokens.from_head_zero_points", zp.astype(np.uint8).reshape(N, blocks, 1)),  # 4-bit: low nibble
             domain="com.microsoft", bits=bits, block_size=LM_HEAD_BLOCK, gather_axis=0, quantize_axis=2)
    h = b("Reshape", rows, b.const([0, 0, blocks * LM_HEAD_BLOCK], np.int64))
    if blocks * LM_HEAD_BLOCK != q["K"]:  # the last block's padding columns
        h = b("Slice", h, b.const([0], np.int64), b.const([q["K"]], np.int64), b.const([-1], np.int64))
    g.stats["embed_tokens"] = {"from_lm_head": True, "bits": bits}
    return h
