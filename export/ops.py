"""The custom ops of domain `shrinkrt`: their schemas (docs/ops.md) and reference bodies.

Each op is written into the model as a node plus a model-local FunctionProto whose body uses only
standard ONNX ops, so any ONNX Runtime runs the model and a TensorRT plugin of the same name can
replace the body. One body per configuration present in a model (`overload`), since a body cannot
branch on attribute values.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shrinkrt.runtime import kv_quant
from shrinkrt.runtime.op_contract import DOMAIN, KEY_MODE, PLUGIN_VERSION, SCHEMAS  # noqa: F401 (re-exported)
from shrinkrt.runtime.op_contract import (ACT_BLOCK, ACT_CODE_MAX, FEATURE_GROUP, QUERY_BITS, QUERY_BITS_MAX_TOKENS,
                                          QUERY_CODE_MAX)

OPSET = 21
ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}



def node(op: str, inputs: list[str], outputs: list[str], name: str, overload: str = "", **attrs) -> onnx.NodeProto:
    """A node of a custom op with the plugin attributes; integer attributes are checked to fit int32."""
    want = SCHEMAS[op][2]
    if sorted(attrs) != sorted(want):
        raise ValueError(f"{op} takes attributes {want}, got {sorted(attrs)}")
    for k, v in attrs.items():
        if not isinstance(v, int) or not -2**31 <= v < 2**31:
            raise ValueError(f"{op}.{k} must be an int32, got {v!r}")
    n = helper.make_node(op, inputs, outputs, name=name, domain=DOMAIN, plugin_namespace=DOMAIN,
                         plugin_version=PLUGIN_VERSION, **attrs)
    if overload:
        n.overload = overload
    return n


class Body:
    """Builds a node list with readable, deterministic names (prefix/op_index). Identical constants
    (dtype, shape, bytes) are made once per node list: `consts` maps them to the first one's output."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.n, self.consts = prefix, [], 0, {}

    def __call__(self, op: str, *inputs: str, n_out: int = 1, **attrs):
        self.n += 1
        outs = [f"{self.prefix}{op.lower()}{self.n}" + (f"_{i}" if n_out > 1 else "") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=f"{self.prefix}{op}_{self.n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None, name: str = "") -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())  # tobytes: C order (ascontiguousarray would make 0-d 1-d)
        if key in self.consts:
            return self.consts[key]
        self.n += 1
        out = f"{self.prefix}{name or 'const'}{self.n}"
        self.nodes.append(helper.make_node("Constant", [], [out], name=f"{self.prefix}Constant_{self.n}",
                                           value=numpy_helper.from_array(arr, out)))
        self.consts[key] = out
        return out

    def cast(self, x: str, to: int, src: int | None = None) -> str:
        return x if src == to else self("Cast", x, to=to)


def _unpack_stream(b: Body, words: str, rows: int, n: int, bits: int) -> str:
    """int32 (rows, ceil(n*bits/32) or more) little-endian bit streams -> float32 (rows, n) values."""
    n_words = math.ceil(n * bits / 32)
    w = b("Slice", words, b.const([0], np.int64), b.const([n_words], np.int64), b.const([1], np.int64))
    u = b("Unsqueeze", b("Cast", w, to=TensorProto.UINT32), b.const([-1], np.int64))
    if 32 % bits == 0:  # whole codes per word: shift by code, never expand to bits (ORT folds this)
        per = 32 // bits
        vals = b("BitwiseAnd", b("BitShift", u, b.const(np.arange(per, dtype=np.uint32) * bits), direction="RIGHT"),
                 b.const(np.uint32(2 ** bits - 1)))
        flat = b("Reshape", vals, b.const([rows, n_words * per], np.int64))
        head = b("Slice", flat, b.const([0], np.int64), b.const([n], np.int64), b.const([1], np.int64))
        return b("Cast", head, to=TensorProto.FLOAT)
    bit = b("BitwiseAnd", b("BitShift", u, b.const(np.arange(32, dtype=np.uint32)), direction="RIGHT"),
            b.const(np.uint32(1)))
    stream = b("Reshape", b("Cast", bit, to=TensorProto.FLOAT), b.const([rows, n_words * 32], np.int64))
    head = b("Slice", stream, b.const([0], np.int64), b.const([n * bits], np.int64), b.const([1], np.int64))
    per = b("Reshape", head, b.const([rows, n, bits], np.int64))
    return b("Squeeze", b("MatMul", per, b.const((2.0 ** np.arange(bits)).astype(np.float32)[:, None])),
             b.const([-1], np.int64))


def quant_matmul_function(bits: int, group_size: int, in_features: int, out_features: int,
                          dtype: str = "float32", mins: bool = False) -> onnx.FunctionProto:
    """Reference body of QuantMatMul for one (bits, group, K, N, activation dtype, zero-point kind):
    w = (q - z) * s, or q * s + m where `zeros` holds the fp16 mins (has_mins = 1)."""
    K, N, F = in_features, out_features, ONNX_DTYPE[dtype]
    G = math.ceil(K / group_size)
    b = Body("")
    codes = _unpack_stream(b, "codes", N, K, bits)
    group_of = b.const(np.arange(K) // group_size, np.int64, "group_of_col")
    scale = b("Gather", b("Cast", "scales", to=TensorProto.FLOAT), group_of, axis=1)
    if mins:
        w = b("Add", b("Mul", codes, scale), b("Gather", b("Cast", "zeros", to=TensorProto.FLOAT), group_of, axis=1))
    else:
        zeros = _unpack_stream(b, "zeros", N, G, bits)
        w = b("Mul", b("Sub", codes, b("Gather", zeros, group_of, axis=1)), scale)  # (N, K)
    # Outliers: row of entry i = number of rows whose end pointer is <= i; padding entries
    # (i >= rowptr[N]) get value 0 at row N-1 so the scatter stays in range.
    nnz = b("Shape", "outlier_vals")
    i = b("Range", b.const(np.int64(0)), b("Squeeze", nnz, b.const([0], np.int64)), b.const(np.int64(1)))
    ends = b("Cast", b("Slice", "outlier_rowptr", b.const([1], np.int64), b.const([N + 1], np.int64)),
             to=TensorProto.INT64)
    ge = b("Cast", b("GreaterOrEqual", b("Unsqueeze", i, b.const([1], np.int64)),
                     b("Unsqueeze", ends, b.const([0], np.int64))), to=TensorProto.INT64)
    row = b("Min", b("ReduceSum", ge, b.const([1], np.int64), keepdims=0), b.const(np.int64(N - 1)))
    valid = b("Less", i, b("Gather", ends, b.const(np.int64(N - 1)), axis=0))
    vals = b("Where", valid, b("Cast", "outlier_vals", to=TensorProto.FLOAT), b.const(np.float32(0)))
    cols = b("Cast", "outlier_cols", to=TensorProto.INT64)
    pairs = b("Concat", b("Unsqueeze", row, b.const([1], np.int64)), b("Unsqueeze", cols, b.const([1], np.int64)),
              axis=1)
    w = b("ScatterND", w, pairs, vals, reduction="add")
    # the GEMM runs in the activation dtype (TensorRT on Turing has no FP32 GEMM); backends accumulate in fp32
    y = b("MatMul", "X", b("Transpose", b.cast(w, F, TensorProto.FLOAT), perm=[1, 0]))
    b.nodes.append(helper.make_node("Identity", [y], ["Y"], name="output"))
    fn = helper.make_function(DOMAIN, "QuantMatMul", SCHEMAS["QuantMatMul"][0], ["Y"], b.nodes,
                              [helper.make_opsetid("", OPSET)], attributes=SCHEMAS["QuantMatMul"][2])
    fn.overload = quant_matmul_overload(bits, group_size, in_features, out_features, dtype, mins)
    return fn


def quant_matmul_w4a8_function(in_features: int, out_features: int, dtype: str = "float32",
                               gated: bool = False, quantized_sums: bool = True) -> onnx.FunctionProto:
    """Reference body of QuantMatMulW4A8 for one (K, N, activation dtype): the CPU library's arithmetic in
    standard ops, so body and library agree to fp32 rounding. X is quantized per block of ACT_BLOCK
    columns (zero padded to whole blocks): dx = max|x| / 127, xq = Round(x * (127 / max|x|)) (half to
    even; 0 where the block is all zero); Y = (xq * dx) @ (q * s)^T + blocksum @ m^T (the padding codes
    meet zero activations), blocksum the sum of the dequantized block xq * dx (quantized_sums, what new
    exports use: Y is then exactly the dequantized weight times the dequantized activations) or of x
    itself (the form before the attribute). gated: Y = silu(Y[..., :N/2]) * Y[..., N/2:], in fp32 before
    the cast to the activations' type, as the library."""
    K, N, F = in_features, out_features, ONNX_DTYPE[dtype]
    G = math.ceil(K / ACT_BLOCK)
    b = Body("")
    codes = _unpack_stream(b, "codes", N, G * ACT_BLOCK, 4)  # (N, G*32)
    group_of = b.const(np.arange(G * ACT_BLOCK) // ACT_BLOCK, np.int64, "group_of_col")
    w = b("Mul", codes, b("Gather", b("Cast", "scales", to=TensorProto.FLOAT), group_of, axis=1))
    x = b("Pad", b.cast("X", TensorProto.FLOAT, F), b.const([0, 0, 0, 0, 0, G * ACT_BLOCK - K], np.int64))
    xb = b("Reshape", x, b.const([0, 0, G, ACT_BLOCK], np.int64))  # (B, T, G, 32)
    amax = b("ReduceMax", b("Abs", xb), b.const([-1], np.int64), keepdims=1)
    code_max = b.const(np.float32(ACT_CODE_MAX))
    inv = b("Where", b("Greater", amax, b.const(np.float32(0))), b("Div", code_max, amax), b.const(np.float32(0)))
    xd = b("Mul", b("Round", b("Mul", xb, inv)), b("Div", amax, code_max))  # (B, T, G, 32)
    sums = b("ReduceSum", xd if quantized_sums else xb, b.const([-1], np.int64), keepdims=0)  # (B, T, G)
    xd = b("Reshape", xd, b.const([0, 0, G * ACT_BLOCK], np.int64))
    y = b("Add", b("MatMul", xd, b("Transpose", w, perm=[1, 0])),
          b("MatMul", sums, b("Transpose", b("Cast", "mins", to=TensorProto.FLOAT), perm=[1, 0])))
    if gated:
        gate, up = b("Split", y, b.const([N // 2, N // 2], np.int64, "gate_up_sizes"), axis=-1, n_out=2)
        y = b("Mul", b("Mul", gate, b("Sigmoid", gate)), up)
    b.nodes.append(helper.make_node("Identity", [b.cast(y, F, TensorProto.FLOAT)], ["Y"], name="output"))
    fn = helper.make_function(DOMAIN, "QuantMatMulW4A8", SCHEMAS["QuantMatMulW4A8"][0], ["Y"], b.nodes,
                              [helper.make_opsetid("", OPSET)], attributes=SCHEMAS["QuantMatMulW4A8"][2])
    fn.overload = f"k{in_features}_n{out_features}_{dtype}{'_gated' if gated else ''}{'_qsums' if quantized_sums else ''}"
    return fn


def quant_matmul_overload(bits: int, group_size: int, in_features: int, out_features: int, dtype: str,
                          mins: bool = False) -> str:
    return f"b{bits}_g{group_size}{'_min' if mins else ''}_k{in_features}_n{out_features}_{dtype}"


def quant_matmul_inputs(prefix: str, m, b: Body | None = None) -> dict:
    """Initializers feeding one QuantMatMul from a runtime QuantLinear (outlier columns widened to
    int32; a layer without outliers gets zero row pointers and one unused padding entry). A layer with
    8-bit param codes stores the codes and the rows' steps; standard nodes appended to `b` (required
    then) expand them into the op's fp16 scales and mins (code * step, rounded to fp16: the values
    packing.param_values gives), which a runtime folds once at load."""
    N = m.out_features
    if m.n_outliers:
        rowptr = m.outlier_rowptr.numpy().astype(np.int32)
        c = m.outlier_cols
        cols = (c.long() & 0xFFFF if c.dtype.itemsize == 2 else c.long()).numpy().astype(np.int32)
        vals = m.outlier_vals.numpy().astype(np.float16)
    else:
        rowptr, cols, vals = np.zeros(N + 1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float16)
    coded = m.has_mins and m.param_bits == 8
    if coded:
        params = {"scale_codes": m.scales.numpy().astype(np.uint8), "min_codes": m.mins.numpy().astype(np.int8),
                  "param_steps": m.param_steps.numpy().astype(np.float16)}
    else:
        params = {"scales": m.scales.numpy().astype(np.float16),
                  "zeros": m.mins.numpy().astype(np.float16) if m.has_mins else m.zeros.numpy().astype(np.int32)}
    arrays = {"codes": m.codes.numpy().astype(np.int32), **params, "outlier_rowptr": rowptr, "outlier_cols": cols,
              "outlier_vals": vals}
    names = {k: f"{prefix}.{k}" for k in arrays}
    inits = [numpy_helper.from_array(a, names[k]) for k, a in arrays.items()]
    if coded:
        if b is None:
            raise ValueError("a layer with 8-bit param codes needs a node list to expand them")
        steps = b("Cast", names["param_steps"], to=TensorProto.FLOAT)
        expand = [b("Cast", b("Mul", b("Cast", names[k], to=TensorProto.FLOAT),
                              b("Slice", steps, b.const([j], np.int64), b.const([j + 1], np.int64),
                                b.const([1], np.int64))), to=TensorProto.FLOAT16)
                  for j, k in enumerate(("scale_codes", "min_codes"))]
        inputs = [names["codes"], *expand, names["outlier_rowptr"], names["outlier_cols"], names["outlier_vals"]]
    else:
        inputs = list(names.values())
    return {"inputs": inputs, "initializers": inits}


def bi_branch_io(bits: int) -> tuple[list[str], list[str], list[str]]:
    """Inputs, outputs and attributes of a BiBranchAttention node with this feature branch."""
    inputs, outputs, attrs = SCHEMAS["BiBranchAttention"]
    if bits == 16:
        inputs, outputs = [n for n in inputs if "scales" not in n], [n for n in outputs if "scales" not in n]
    return inputs, outputs, attrs


def bi_branch_overload(num_heads, num_kv_heads, head_dim, window, rank_k, rank_v, bits, key_mode, dtype,
                       query_bits: int = 0) -> str:
    return (f"h{num_heads}_g{num_kv_heads}_d{head_dim}_w{window}_rk{rank_k}_rv{rank_v}_b{bits}"
            f"_{'post' if key_mode else 'pre'}_{dtype}{f'_q{query_bits}' if query_bits else ''}")


def _round_queries(b: Body, x: str, r: int) -> str:
    """query_bits = 8: float32 (B, H, T, r) folded queries -> their int8 codes times their scales, symmetric per
    FEATURE_GROUP ranks: round(x * QUERY_CODE_MAX / amax) * (amax / QUERY_CODE_MAX) (op_contract.QUERY_BITS)."""
    ng = -(-r // FEATURE_GROUP)
    pad = ng * FEATURE_GROUP - r
    xp = x if not pad else b("Pad", x, b.const([0, 0, 0, 0, 0, 0, 0, pad], np.int64))
    grouped = b("Reshape", xp, b.const([0, 0, 0, ng, FEATURE_GROUP], np.int64))
    amax = b("ReduceMax", b("Abs", grouped), b.const([-1], np.int64), keepdims=1)
    code_max = b.const(np.float32(QUERY_CODE_MAX))
    inv = b("Where", b("Greater", amax, b.const(np.float32(0))), b("Div", code_max, amax), b.const(np.float32(0)))
    rounded = b("Mul", b("Round", b("Mul", grouped, inv)), b("Div", amax, code_max))
    flat = b("Reshape", rounded, b.const([0, 0, 0, ng * FEATURE_GROUP], np.int64))
    return flat if not pad else b("Slice", flat, b.const([0], np.int64), b.const([r], np.int64), b.const([3], np.int64))


# int4 features: a stored byte is two two's-complement nibbles, low nibble = even feature.
# Packing by a lookup table (one Gather for ~10 integer nodes) on this call's rows only: ONNX
# Runtime's Gather copies element by element, so reading the whole store back stays elementwise
# (a table there made decode at 2k context 1.6x slower). Indexed by (lo + 8) + 16 * (hi + 8), never
# negative (TensorRT's Gather); int32, cast after the Gather (TensorRT takes int8 constants only as
# quantized weights).
_PACK = np.array([(((lo & 0xF) | ((hi & 0xF) << 4)) ^ 0x80) - 0x80
                  for hi in range(-8, 8) for lo in range(-8, 8)], np.int32)  # [(lo+8) + 16 (hi+8)] -> byte


def _first(b: Body, x: str, width: int, n: int) -> str:
    """(B, T, ...) -> (B, T, width) -> its first n columns (no Slice when n == width)."""
    flat = b("Reshape", x, b.const([0, 0, width], np.int64))
    return flat if n == width else b("Slice", flat, b.const([0], np.int64), b.const([n], np.int64),
                                     b.const([2], np.int64))


def _quantize_features(b: Body, c: str, r: int, bits: int):
    """float32 (B, T, r) -> (stored codes, fp16 scales or None, the dequantized float32 features)."""
    if bits == 16:
        stored = b("Cast", c, to=TensorProto.FLOAT16)
        return stored, None, b("Cast", stored, to=TensorProto.FLOAT)
    qmax = 2 ** (bits - 1) - 1
    group = kv_quant.FEATURE_GROUP
    ng = kv_quant.n_groups(r)
    padded = c if ng * group == r else b("Pad", c, b.const([0, 0, 0, 0, 0, ng * group - r], np.int64))
    groups = b("Reshape", padded, b.const([0, 0, ng, group], np.int64))
    amax = b("ReduceMax", b("Abs", groups), b.const([-1], np.int64), keepdims=1)
    scale16 = b("Cast", b("Max", b("Div", amax, b.const(np.float32(qmax))), b.const(np.float32(kv_quant.SCALE_FLOOR))),
                to=TensorProto.FLOAT16)  # (B, T, ng, 1)
    scale = b("Cast", scale16, to=TensorProto.FLOAT)
    q = b("Clip", b("Round", b("Div", groups, scale)), b.const(np.float32(-qmax - 1)), b.const(np.float32(qmax)))
    deq = _first(b, b("Mul", q, scale), ng * group, r)
    scales = b("Squeeze", scale16, b.const([-1], np.int64))
    if bits == 8:
        return b("Cast", _first(b, q, ng * group, r), to=TensorProto.INT8), scales, deq
    pairs = b("Reshape", q, b.const([0, 0, ng * 16, 2], np.int64))
    # (lo + 8) + 16 (hi + 8); a weighted ReduceSum, not a MatMul: no FP32 GEMM on Turing (TensorRT)
    idx = b("ReduceSum", b("Mul", pairs, b.const(np.array([1.0, 16.0], np.float32))), b.const([-1], np.int64),
            keepdims=0)
    idx = b("Cast", b("Add", idx, b.const(np.float32(136))), to=TensorProto.INT32)
    byte = b("Cast", b("Gather", b.const(_PACK), idx, axis=0), to=TensorProto.INT8)  # (B, T, ng * 16)
    return _first(b, byte, ng * 16, (r + 1) // 2), scales, deq


def _dequantize_features(b: Body, codes: str, scales: str | None, r: int, bits: int) -> str:
    """Stored (B, L, C) codes (+ scales) -> float32 (B, L, r)."""
    if bits == 16:
        return b("Cast", codes, to=TensorProto.FLOAT)
    group = kv_quant.FEATURE_GROUP
    ng = kv_quant.n_groups(r)
    if bits == 4:
        # float arithmetic on the signed byte x = 16*hi + lo_u: hi = floor(x/16) is the sign-extended
        # high nibble, lo_u in [0, 16) the low one; cheaper in ONNX Runtime than integer Mod/Where
        x = b("Cast", codes, to=TensorProto.FLOAT)
        sixteen = b.const(np.float32(16))
        hi = b("Floor", b("Div", x, sixteen))
        lo_u = b("Sub", x, b("Mul", hi, sixteen))
        lo = b("Sub", lo_u, b("Mul", b("Floor", b("Div", lo_u, b.const(np.float32(8)))), sixteen))
        pair = b("Concat", b("Unsqueeze", lo, b.const([-1], np.int64)), b("Unsqueeze", hi, b.const([-1], np.int64)),
                 axis=-1)
        nib = b("Reshape", pair, b.const([0, 0, 2 * ((r + 1) // 2)], np.int64))  # no -1: L may be 0
        q = b("Slice", nib, b.const([0], np.int64), b.const([r], np.int64), b.const([2], np.int64))
    else:
        q = codes
    qf = b("Pad", b.cast(q, TensorProto.FLOAT, TensorProto.FLOAT if bits == 4 else None),
           b.const([0, 0, 0, 0, 0, ng * group - r], np.int64))
    groups = b("Reshape", qf, b.const([0, 0, ng, group], np.int64))
    s = b("Unsqueeze", b("Cast", scales, to=TensorProto.FLOAT), b.const([-1], np.int64))
    full = b("Reshape", b("Mul", groups, s), b.const([0, 0, ng * group], np.int64))
    return b("Slice", full, b.const([0], np.int64), b.const([r], np.int64), b.const([2], np.int64))


def _check_query_bits(query_bits: int, key_mode: int) -> None:
    if query_bits not in QUERY_BITS:
        raise ValueError(f"query_bits must be one of {QUERY_BITS}, got {query_bits}")
    if query_bits and key_mode != KEY_MODE["post-rope"]:
        raise ValueError("query_bits 8 rounds the post-RoPE folded queries: key_mode must be post-rope")


def bi_branch_function(num_heads: int, num_kv_heads: int, head_dim: int, window: int, rank_k: int, rank_v: int,
                       bits: int, key_mode: int, dtype: str = "float32", query_bits: int = 0) -> onnx.FunctionProto:
    """Reference body of BiBranchAttention for one configuration (docs/ops.md); query_bits: the self
    form's attribute (BiBranchSelfAttention inlines this body), 0 for BiBranchAttention itself."""
    _check_query_bits(query_bits, key_mode)
    H, G, D, W, F = num_heads, num_kv_heads, head_dim, window, ONNX_DTYPE[dtype]
    rep = H // G
    b = Body("")
    f32 = lambda x: b.cast(x, TensorProto.FLOAT, F)
    i64 = lambda *v: b.const(list(v), np.int64)

    def mm(x, y):  # float32 in and out, the product in the activation dtype (no FP32 GEMM on Turing)
        if F == TensorProto.FLOAT:
            return b("MatMul", x, y)
        return b("Cast", b("MatMul", b("Cast", x, to=F), b("Cast", y, to=F)), to=TensorProto.FLOAT)

    def heads(x, n):  # (B, L, n*D) -> (B, n, L, D)
        return b("Transpose", b("Reshape", x, i64(0, 0, n, D)), perm=[0, 2, 1, 3])

    def to_h(x):  # (B, G, L, D) -> (B, H, L, D): KV head g serves query heads g*rep .. g*rep+rep-1
        if rep == 1:
            return x
        e = b("Expand", b("Unsqueeze", x, i64(2)), b("Concat", b("Shape", x, start=0, end=2), i64(rep),
                                                         b("Shape", x, start=2), axis=0))
        return b("Reshape", e, i64(0, H, -1, D))

    def rope(x, cos, sin):  # x (B, n, L, D), cos/sin (L, D)
        x1, x2 = b("Split", x, i64(D // 2, D // 2), axis=-1, n_out=2)
        rot = b("Concat", b("Neg", x2), x1, axis=-1)
        return b("Add", b("Mul", x, cos), b("Mul", rot, sin))

    P = "past_length"
    T = b("Shape", "q", start=1, end=2)
    E = b("Add", P, T)
    zero, one = i64(0), i64(1)
    qpos = b("Range", b("Squeeze", P, zero), b("Squeeze", E, zero), b.const(np.int64(1)))  # (T,)
    q = b("Mul", heads(f32("q"), H), b.const(np.float32(1 / math.sqrt(D))))  # (B, H, T, D)

    # this call's feature rows, as stored and as a later call reads them back
    ck_new, sk_new, ck_deq = _quantize_features(b, f32("c_k"), rank_k, bits)
    cv_new, sv_new, cv_deq = _quantize_features(b, f32("c_v"), rank_v, bits)
    ck = b("Concat", _dequantize_features(b, b("Slice", "feat_k", zero, P, one), None if bits == 16 else
                                          b("Slice", "feat_k_scales", zero, P, one), rank_k, bits), ck_deq, axis=1)
    cv = b("Concat", _dequantize_features(b, b("Slice", "feat_v", zero, P, one), None if bits == 16 else
                                          b("Slice", "feat_v_scales", zero, P, one), rank_v, bits), cv_deq, axis=1)

    # feature branch scores over positions 0..E-1, (B, H, T, E)
    if key_mode == 0:
        kc = b("Add", mm(ck, f32("k_up")), f32("k_bias"))
        cos = b("Slice", f32("rope_cos"), zero, E, zero)
        sin = b("Slice", f32("rope_sin"), zero, E, zero)
        s_comp = mm(q, b("Transpose", to_h(rope(heads(kc, G), cos, sin)), perm=[0, 1, 3, 2]))
    else:
        up = b("Transpose", b("Reshape", f32("k_up"), i64(rank_k, G, D)), perm=[1, 2, 0])  # (G, D, r)
        up = b("Reshape", b("Expand", b("Unsqueeze", up, i64(1)), i64(G, rep, D, rank_k)), i64(H, D, rank_k))
        qf = mm(q, up)  # (B, H, T, r): the queries folded through their KV head's k_up
        if query_bits:  # a short call dots the features with int8 queries (op_contract.QUERY_BITS)
            short = b("LessOrEqual", T, b.const([QUERY_BITS_MAX_TOKENS], np.int64))
            qf = b("Where", short, _round_queries(b, qf, rank_k), qf)
        s_comp = mm(qf, b("Unsqueeze", b("Transpose", ck, perm=[0, 2, 1]), one))
    jpos = b("Range", b.const(np.int64(0)), b("Squeeze", E, zero), b.const(np.int64(1)))  # (E,)
    limit = b("Sub", b("Unsqueeze", qpos, one), b.const(np.int64(W)))  # (T, 1): p - W
    ok_comp = b("LessOrEqual", b("Unsqueeze", jpos, zero), limit)  # (T, E)

    # window branch: ring slot s holds position P-1-((P-1-s) mod W) when >= 0; then this call's tokens
    slots = b.const(np.arange(W, dtype=np.int64))
    last = b("Sub", P, one)
    ring_pos = b("Sub", last, b("Mod", b("Sub", last, slots), b.const(np.int64(W))))
    k16, v16 = b("Cast", "k", to=TensorProto.FLOAT16), b("Cast", "v", to=TensorProto.FLOAT16)
    kn, vn = heads(k16, G), heads(v16, G)  # (B, G, T, D) float16
    kf = b("Concat", "win_k", kn, axis=2)
    vf = b("Concat", "win_v", vn, axis=2)
    fpos = b("Unsqueeze", b("Concat", ring_pos, qpos, axis=0), zero)  # (1, W+T)
    p_col = b("Unsqueeze", qpos, one)
    ok_full = b("And", b("And", b("GreaterOrEqual", fpos, b.const(np.int64(0))), b("LessOrEqual", fpos, p_col)),
                b("Greater", fpos, limit))
    s_full = mm(q, b("Transpose", to_h(b("Cast", kf, to=TensorProto.FLOAT)), perm=[0, 1, 3, 2]))

    ninf = b.const(np.float32(-np.inf))
    scores = b("Concat", b("Where", ok_comp, s_comp, ninf), b("Where", ok_full, s_full, ninf), axis=-1)
    p = b("Softmax", scores, axis=-1)
    p_comp, p_full = b("Split", p, b("Concat", E, b("Add", T, b.const([W], np.int64)), axis=0), axis=-1, n_out=2)
    y = mm(p_full, to_h(b("Cast", vf, to=TensorProto.FLOAT)))
    up_v = b("Transpose", b("Reshape", f32("v_up"), i64(rank_v, G, D)), perm=[1, 0, 2])  # (G, r, D)
    up_v = b("Reshape", b("Expand", b("Unsqueeze", up_v, i64(1)), i64(G, rep, rank_v, D)), i64(H, rank_v, D))
    y = b("Add", y, mm(mm(p_comp, b("Unsqueeze", cv, one)), up_v))
    vb = b("Reshape", f32("v_bias"), i64(1, G, 1, D))
    y = b("Add", y, b("Mul", b("ReduceSum", p_comp, b.const([-1], np.int64), keepdims=1), to_h(vb)))
    y = b("Reshape", b("Transpose", y, perm=[0, 2, 1, 3]), i64(0, 0, H * D))

    # ring after this call: slot s takes the newest position <= E-1 with pos mod W = s if it is new
    new_pos = b("Sub", b("Sub", E, one), b("Mod", b("Sub", b("Sub", E, one), slots), b.const(np.int64(W))))
    idx = b("Sub", new_pos, P)  # (W,): index into this call's tokens, < 0 = keep the old slot
    take = b("Reshape", b("GreaterOrEqual", idx, zero), i64(1, 1, W, 1))
    gidx = b("Max", idx, b.const(np.int64(0)))
    outs = {"y": y if F == TensorProto.FLOAT else b("Cast", y, to=F),
            "win_k_out": b("Where", take, b("Gather", kn, gidx, axis=2), "win_k"),
            "win_v_out": b("Where", take, b("Gather", vn, gidx, axis=2), "win_v"),
            "feat_k_new": ck_new, "feat_v_new": cv_new}
    if bits < 16:
        outs.update({"feat_k_scales_new": sk_new, "feat_v_scales_new": sv_new})
    inputs, outputs, attrs = bi_branch_io(bits)
    for name in outputs:
        b.nodes.append(helper.make_node("Identity", [outs[name]], [name], name=f"out_{name}"))
    fn = helper.make_function(DOMAIN, "BiBranchAttention", inputs, outputs, b.nodes,
                              [helper.make_opsetid("", OPSET)], attributes=attrs)
    fn.overload = bi_branch_overload(H, G, D, W, rank_k, rank_v, bits, key_mode, dtype, query_bits)
    return fn


def bi_branch_self_io(bits: int) -> tuple[list[str], list[str], list[str]]:
    """Inputs, outputs and attributes of a BiBranchSelfAttention node with this feature branch."""
    inputs, outputs, attrs = SCHEMAS["BiBranchSelfAttention"]
    if bits == 16:
        inputs, outputs = [n for n in inputs if "scales" not in n], [n for n in outputs if "scales" not in n]
    return inputs, outputs, attrs


def bi_branch_self_function(num_heads: int, num_kv_heads: int, head_dim: int, window: int, rank_k: int, rank_v: int,
                            bits: int, key_mode: int, dtype: str = "float32", query_bits: int = 0) -> onnx.FunctionProto:
    """Reference body of BiBranchSelfAttention (docs/ops.md): RoPE on q and k at positions past_length..,
    the new tokens' features (pre-RoPE c_k = x @ k_down; post-RoPE c_k = fp16(RoPE(k)) @ k_down, the key
    as the ring stores it; c_v = x @ v_down), then the BiBranchAttention node of the same configuration
    (its body, inlined; query_bits = 8 with int8 folded queries in calls of <= QUERY_BITS_MAX_TOKENS tokens)."""
    H, G, D, F = num_heads, num_kv_heads, head_dim, ONNX_DTYPE[dtype]
    b = Body("")
    i64 = lambda *v: b.const(list(v), np.int64)
    end = b("Add", "past_length", b("Shape", "q", start=1, end=2))
    table = lambda t: b("Unsqueeze", b("Slice", t, "past_length", end, i64(0)), i64(1))  # (T, 1, D)
    cos, sin = table("rope_cos"), table("rope_sin")

    def rope(x: str, n: int) -> str:  # rotate-half RoPE of (B, T, n*D)
        heads = b("Reshape", x, i64(0, 0, n, D))
        x1, x2 = b("Split", heads, i64(D // 2, D // 2), axis=-1, n_out=2)
        rotated = b("Add", b("Mul", heads, cos), b("Mul", b("Concat", b("Neg", x2), x1, axis=-1), sin))
        return b("Reshape", rotated, i64(0, 0, n * D))

    q, k = rope("q", H), rope("k", G)
    # the factors come in the activations' type or as fp16 (the ort-cpu export's: half the bytes a decode
    # step reads); the arithmetic is the activations' type either way (Cast to the same type is identity)
    factor = {n: b("Cast", n, to=F) for n in ("k_down", "v_down", "k_up", "v_up")}
    if key_mode == KEY_MODE["pre-rope"]:
        c_k = b("MatMul", "x", factor["k_down"])
    else:
        c_k = b("MatMul", b.cast(b("Cast", k, to=TensorProto.FLOAT16), F, TensorProto.FLOAT16), factor["k_down"])
    c_v = b("MatMul", "x", factor["v_down"])
    # then BiBranchAttention's own body on them, its internal names under "attention/" (ONNX Runtime does
    # not resolve a model-local function called from inside another one)
    inner = bi_branch_function(H, G, D, window, rank_k, rank_v, bits, key_mode, dtype, query_bits)
    feeds = {"q": q, "k": k, "c_k": c_k, "c_v": c_v, "k_up": factor["k_up"], "v_up": factor["v_up"]}
    keep = (set(inner.input) | set(inner.output) | {""}) - set(feeds)
    rename = lambda v: v if v in keep else feeds.get(v, f"attention/{v}")  # noqa: E731
    for n in inner.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = f"attention/{n.name}"
        m.input[:] = [rename(v) for v in n.input]
        m.output[:] = [rename(v) for v in n.output]
        b.nodes.append(m)
    inputs, outputs, attrs = bi_branch_self_io(bits)
    fn = helper.make_function(DOMAIN, "BiBranchSelfAttention", inputs, outputs, b.nodes,
                              [helper.make_opsetid("", OPSET)], attributes=attrs)
    fn.overload = bi_branch_overload(H, G, D, window, rank_k, rank_v, bits, key_mode, dtype, query_bits)
    return fn


def bi_branch_model(num_heads: int, num_kv_heads: int, head_dim: int, window: int, rank_k: int, rank_v: int,
                    bits: int, key_mode: int, dtype: str = "float32", hidden: int | None = None,
                    factor_dtype: str | None = None, down_dtype: str | None = None,
                    query_bits: int | None = None) -> onnx.ModelProto:
    """One BiBranchAttention node and its body as a whole model (tests, benchmarks/ort_ops.py):
    batch B, call length T and store rows S symbolic. factor_dtype / down_dtype (the self form only):
    the type of k_up, v_up / of k_down, v_down if not the activations' (down_dtype: factor_dtype's);
    query_bits (the self form only): the node's attribute, None = absent (a node written before it)."""
    H, G, D, W, F = num_heads, num_kv_heads, head_dim, window, ONNX_DTYPE[dtype]
    fn = bi_branch_function(H, G, D, W, rank_k, rank_v, bits, key_mode, dtype)
    functions = [fn]
    op, (ins, outs, _) = "BiBranchAttention", bi_branch_io(bits)
    extra = {}
    if hidden is not None:  # the self-attention form: x of `hidden` features and the down projections
        fn = bi_branch_self_function(H, G, D, W, rank_k, rank_v, bits, key_mode, dtype, query_bits or 0)
        functions.append(fn)
        op, (ins, outs, _) = "BiBranchSelfAttention", bi_branch_self_io(bits)
        extra = {"query_bits": query_bits or 0}
    elif query_bits is not None:
        raise ValueError("query_bits is for the self-attention form (hidden=...)")
    n = node(op, ins, outs, "attn", fn.overload, num_heads=H, num_kv_heads=G, head_dim=D,
             window=W, rank_k=rank_k, rank_v=rank_v, bits=bits, key_mode=key_mode, **extra)
    if hidden is not None and query_bits is None:
        n.attribute.remove(next(a for a in n.attribute if a.name == "query_bits"))
    fdt = TensorProto.FLOAT16 if bits == 16 else TensorProto.INT8
    width = lambda r: r if bits != 4 else (r + 1) // 2
    groups = kv_quant.n_groups
    ring = (TensorProto.FLOAT16, ["B", G, W, D])
    shapes = {"q": (F, ["B", "T", H * D]), "k": (F, ["B", "T", G * D]), "v": (F, ["B", "T", G * D]),
              "c_k": (F, ["B", "T", rank_k]), "c_v": (F, ["B", "T", rank_v]), "win_k": ring, "win_v": ring,
              "feat_k": (fdt, ["B", "S", width(rank_k)]), "feat_v": (fdt, ["B", "S", width(rank_v)]),
              "k_up": (F, [rank_k, G * D]), "v_up": (F, [rank_v, G * D]), "k_bias": (F, [G * D]),
              "v_bias": (F, [G * D]), "rope_cos": (F, ["S", D]), "rope_sin": (F, ["S", D]),
              "past_length": (TensorProto.INT64, [1]),
              "feat_k_scales": (TensorProto.FLOAT16, ["B", "S", groups(rank_k)]),
              "feat_v_scales": (TensorProto.FLOAT16, ["B", "S", groups(rank_v)]),
              "y": (F, ["B", "T", H * D]), "win_k_out": ring, "win_v_out": ring,
              "feat_k_new": (fdt, ["B", "T", width(rank_k)]), "feat_v_new": (fdt, ["B", "T", width(rank_v)]),
              "feat_k_scales_new": (TensorProto.FLOAT16, ["B", "T", groups(rank_k)]),
              "feat_v_scales_new": (TensorProto.FLOAT16, ["B", "T", groups(rank_v)])}
    if hidden is not None:
        FU, FD = ONNX_DTYPE[factor_dtype or dtype], ONNX_DTYPE[down_dtype or factor_dtype or dtype]
        shapes |= {"x": (F, ["B", "T", hidden]), "v_down": (FD, [hidden, rank_v]),
                   "k_down": (FD, [hidden if key_mode == KEY_MODE["pre-rope"] else G * D, rank_k]),
                   "k_up": (FU, [rank_k, G * D]), "v_up": (FU, [rank_v, G * D])}
    elif factor_dtype not in (None, dtype) or down_dtype not in (None, dtype):
        raise ValueError("factor_dtype is for the self-attention form (hidden=...)")
    graph = helper.make_graph([n], "bibranch", [helper.make_tensor_value_info(i, *shapes[i]) for i in ins],
                              [helper.make_tensor_value_info(o, *shapes[o]) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                              functions=functions)
    model.ir_version = 10
    return model
