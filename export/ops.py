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

DOMAIN = "shrinkrt"
OPSET = 21
PLUGIN_VERSION = "1"
ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}

# name -> (inputs, outputs, attributes); the one place the op signatures live.
SCHEMAS = {
    "QuantMatMul": (
        ["X", "codes", "scales", "zeros", "outlier_rowptr", "outlier_cols", "outlier_vals"],
        ["Y"],
        ["bits", "group_size", "in_features", "out_features"]),
    "BiBranchAttention": (
        ["q", "k", "v", "c_k", "c_v", "win_k", "win_v", "feat_k", "feat_k_scales", "feat_v", "feat_v_scales",
         "k_up", "v_up", "k_bias", "v_bias", "rope_cos", "rope_sin", "past_length"],
        ["y", "win_k_out", "win_v_out", "feat_k_new", "feat_k_scales_new", "feat_v_new", "feat_v_scales_new"],
        ["num_heads", "num_kv_heads", "head_dim", "window", "rank_k", "rank_v", "bits", "key_mode"]),
}
KEY_MODE = {"pre-rope": 0, "post-rope": 1}


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
    """Builds a node list with readable, deterministic names (prefix/op_index)."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.n = prefix, [], 0

    def __call__(self, op: str, *inputs: str, n_out: int = 1, **attrs):
        self.n += 1
        outs = [f"{self.prefix}{op.lower()}{self.n}" + (f"_{i}" if n_out > 1 else "") for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=f"{self.prefix}{op}_{self.n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None, name: str = "") -> str:
        arr = np.asarray(value, dtype=dtype)
        self.n += 1
        out = f"{self.prefix}{name or 'const'}{self.n}"
        self.nodes.append(helper.make_node("Constant", [], [out], name=f"{self.prefix}Constant_{self.n}",
                                           value=numpy_helper.from_array(arr, out)))
        return out

    def cast(self, x: str, to: int, src: int | None = None) -> str:
        return x if src == to else self("Cast", x, to=to)


def _unpack_stream(b: Body, words: str, rows: int, n: int, bits: int) -> str:
    """int32 (rows, ceil(n*bits/32) or more) little-endian bit streams -> float32 (rows, n) values."""
    n_words = math.ceil(n * bits / 32)
    w = b("Slice", words, b.const([0], np.int64), b.const([n_words], np.int64), b.const([1], np.int64))
    u = b("Unsqueeze", b("Cast", w, to=TensorProto.UINT32), b.const([-1], np.int64))
    bit = b("BitwiseAnd", b("BitShift", u, b.const(np.arange(32, dtype=np.uint32)), direction="RIGHT"),
            b.const(np.uint32(1)))
    stream = b("Reshape", b("Cast", bit, to=TensorProto.FLOAT), b.const([rows, n_words * 32], np.int64))
    head = b("Slice", stream, b.const([0], np.int64), b.const([n * bits], np.int64), b.const([1], np.int64))
    per = b("Reshape", head, b.const([rows, n, bits], np.int64))
    return b("Squeeze", b("MatMul", per, b.const((2.0 ** np.arange(bits)).astype(np.float32)[:, None])),
             b.const([-1], np.int64))


def quant_matmul_function(bits: int, group_size: int, in_features: int, out_features: int,
                          dtype: str = "float32") -> onnx.FunctionProto:
    """Reference body of QuantMatMul for one (bits, group, K, N, activation dtype)."""
    K, N, F = in_features, out_features, ONNX_DTYPE[dtype]
    G = math.ceil(K / group_size)
    b = Body("")
    codes = _unpack_stream(b, "codes", N, K, bits)
    zeros = _unpack_stream(b, "zeros", N, G, bits)
    group_of = b.const(np.arange(K) // group_size, np.int64, "group_of_col")
    scale = b("Gather", b("Cast", "scales", to=TensorProto.FLOAT), group_of, axis=1)
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
    x = b.cast("X", TensorProto.FLOAT, F)
    y = b("MatMul", x, b("Transpose", w, perm=[1, 0]))
    b.nodes.append(helper.make_node("Identity" if F == TensorProto.FLOAT else "Cast", [y], ["Y"],
                                    name="output", **({} if F == TensorProto.FLOAT else {"to": F})))
    fn = helper.make_function(DOMAIN, "QuantMatMul", SCHEMAS["QuantMatMul"][0], ["Y"], b.nodes,
                              [helper.make_opsetid("", OPSET)], attributes=SCHEMAS["QuantMatMul"][2])
    fn.overload = quant_matmul_overload(bits, group_size, in_features, out_features, dtype)
    return fn


def quant_matmul_overload(bits: int, group_size: int, in_features: int, out_features: int, dtype: str) -> str:
    return f"b{bits}_g{group_size}_k{in_features}_n{out_features}_{dtype}"


def quant_matmul_inputs(prefix: str, m) -> dict:
    """Initializers feeding one QuantMatMul from a runtime QuantLinear (outlier columns widened to
    int32; a layer without outliers gets zero row pointers and one unused padding entry)."""
    N = m.out_features
    if m.n_outliers:
        rowptr = m.outlier_rowptr.numpy().astype(np.int32)
        c = m.outlier_cols
        cols = (c.long() & 0xFFFF if c.dtype.itemsize == 2 else c.long()).numpy().astype(np.int32)
        vals = m.outlier_vals.numpy().astype(np.float16)
    else:
        rowptr, cols, vals = np.zeros(N + 1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float16)
    arrays = {"codes": m.codes.numpy().astype(np.int32), "scales": m.scales.numpy().astype(np.float16),
              "zeros": m.zeros.numpy().astype(np.int32), "outlier_rowptr": rowptr, "outlier_cols": cols,
              "outlier_vals": vals}
    names = [f"{prefix}.{k}" for k in arrays]
    return {"inputs": names, "initializers": [numpy_helper.from_array(a, n) for n, a in zip(names, arrays.values())]}
