"""The Llama decoder as one ONNX graph: the runtime model (with its CSKV attention and quantized
linears, when a checkpoint was applied) -> ModelProto.

One graph serves prefill and decode: the sequence length T is dynamic and `past_length` says where
this call starts, so one artifact (and in TensorRT one network with a prefill and a decode
optimization profile) carries the weights once.

Caches are explicit state with a fixed capacity S chosen by the caller, never reallocated: the
graph reads the stored tokens and returns only the rows of this call's tokens, which the caller
writes at `past_length` (a TensorRT plugin may write them in place):
  full-precision layer:  past_key.i / past_value.i (B, G, S, D)  ->  key.i / value.i (B, G, T, D)
  CSKV layer:            the BiBranchAttention state of docs/ops.md, suffixed .i
`describe` is the one description of these tensors (runtime/graph_io.py), recorded in export.json.
The output is the logits of the last position, (B, 1, vocab) float32: generation needs no more,
and the LM head over a long prompt would dominate prefill.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from shrinkrt.errors import ShrinkError
from shrinkrt.runtime import kv_quant
from shrinkrt.runtime.cskv import CSKVAttention
from shrinkrt.runtime.graph_io import BATCH, CAPACITY, CacheTensor, GraphIO
from shrinkrt.runtime.quant_linear import QuantLinear

from . import ops

IR_VERSION = 10  # function overloads
ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}
# BiBranchAttention's state ports (docs/ops.md) -> (role in the graph description, output port)
BIBRANCH_STATE = {"win_k": ("window_key", "win_k_out"), "win_v": ("window_value", "win_v_out"),
                  "feat_k": ("features_key", "feat_k_new"), "feat_v": ("features_value", "feat_v_new"),
                  "feat_k_scales": ("scales_key", "feat_k_scales_new"),
                  "feat_v_scales": ("scales_value", "feat_v_scales_new")}


def describe(model, dtype: str) -> GraphIO:
    """The graph's cache tensors, from ModelArgs and each layer's attention (the checkpoint's KV
    section applied): what build() declares and what export.json records for the backends."""
    args = model.args
    G, D = args.n_kv_heads, args.head_dim
    caches = []
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        if not isinstance(attn, CSKVAttention):
            for role, name_in, name_out in (("key", "past_key", "key"), ("value", "past_value", "value")):
                caches.append(CacheTensor(i, role, f"{name_in}.{i}", f"{name_out}.{i}", dtype,
                                          (BATCH, G, CAPACITY, D), 2, "rows"))
            continue
        cfg, rk, rv = attn.cfg, attn.k_down.shape[1], attn.v_down.shape[1]
        feat = "float16" if cfg.bits == 16 else "int8"
        width = lambda r: (r + 1) // 2 if cfg.bits == 4 else r  # noqa: E731  int4: two features per byte
        spec = {"win_k": ("float16", (BATCH, G, cfg.window, D), 2, "ring"),
                "win_v": ("float16", (BATCH, G, cfg.window, D), 2, "ring"),
                "feat_k": (feat, (BATCH, CAPACITY, width(rk)), 1, "rows"),
                "feat_v": (feat, (BATCH, CAPACITY, width(rv)), 1, "rows"),
                "feat_k_scales": ("float16", (BATCH, CAPACITY, kv_quant.n_groups(rk)), 1, "rows"),
                "feat_v_scales": ("float16", (BATCH, CAPACITY, kv_quant.n_groups(rv)), 1, "rows")}
        for port in ops.bi_branch_io(cfg.bits)[0]:
            if port in spec:
                role, out_port = BIBRANCH_STATE[port]
                caches.append(CacheTensor(i, role, f"{port}.{i}", f"{out_port}.{i}", *spec[port]))
    return GraphIO(tuple(caches))


DATA_FILE = "model.onnx.data"  # the weights, as ONNX external data beside model.onnx
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the graph
DATA_ALIGN = 64  # offsets of external tensors (aligned loads when the runtime maps the file)


class Graph:
    """Nodes, initializers and functions of one model, with deterministic names.

    With `data_file` (an open binary file named DATA_FILE) every tensor of at least
    EXTERNAL_MIN_BYTES is written there as it is made and the graph keeps only its location, so the
    graph stays small (no 2 GiB protobuf limit) and peak memory stays near the model's own bytes.
    Identical tensors (same dtype, shape and bytes) are stored once, under the first name."""

    def __init__(self, dtype: str, target: str = "generic", ort_accuracy: int = 0, data_file=None,
                 lm_head_bits: int = 0):
        self.dtype, self.F, self.target, self.ort_accuracy = dtype, ops.ONNX_DTYPE[dtype], target, ort_accuracy
        self.lm_head_bits = lm_head_bits
        self.lm_head_codes = None  # export/ort_cpu.py: the quantized head, shared by a tied embedding
        self.np_float = np.float16 if dtype == "float16" else np.float32
        self.stats = {}
        self.nodes, self.inits, self.functions = [], {}, {}
        self.inputs, self.outputs = [], []
        self.b = None
        self.data, self.data_bytes, self.seen = data_file, 0, {}
        self.consts = {}  # one Constant node per distinct value in the whole graph (ops.Body.const)

    def scope(self, prefix: str) -> ops.Body:
        self.b = ops.Body(prefix)
        self.b.nodes, self.b.consts = self.nodes, self.consts
        return self.b

    def weight(self, name: str, t: torch.Tensor | np.ndarray, dtype=None, share: bool = True) -> str:
        """An initializer; returns the name to use (an identical earlier tensor's, when there is one and
        `share`)."""
        a = t.detach().cpu().numpy() if torch.is_tensor(t) else t
        a = np.ascontiguousarray(a.astype(dtype or a.dtype, copy=False))
        if a.nbytes < EXTERNAL_MIN_BYTES:
            self.inits[name] = numpy_helper.from_array(a, name)
            return name
        key = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + memoryview(a).cast("B")).digest()
        if share and key in self.seen:
            return self.seen[key]
        self.seen.setdefault(key, name)
        if self.data is None:
            self.inits[name] = numpy_helper.from_array(a, name)
            return name
        tp = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
        pad = -self.data_bytes % DATA_ALIGN
        self.data.write(b"\0" * pad)
        offset = self.data_bytes + pad
        self.data.write(memoryview(a).cast("B"))
        self.data_bytes = offset + a.nbytes
        tp.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(a.nbytes))):
            tp.external_data.add(key=k, value=v)
        self.inits[name] = tp
        return name

    def fweight(self, name: str, t: torch.Tensor) -> str:
        """A float weight in the artifact's activation dtype."""
        return self.weight(name, t.float(), np.float16 if self.dtype == "float16" else np.float32)

    def input(self, name: str, elem: int, shape: list):
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int, shape: list):
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def cache_input(self, c: CacheTensor) -> str:
        return self.input(c.input, ELEM[c.dtype], list(c.shape))

    def cache_output(self, c: CacheTensor) -> None:
        self.output(c.output, ELEM[c.dtype], c.output_shape())


def _rms_norm(g: Graph, b: ops.Body, x: str, norm, path: str) -> str:
    w = g.fweight(f"{path}.weight", norm.weight)
    xf = b.cast(x, TensorProto.FLOAT, g.F)
    ms = b("ReduceMean", b("Mul", xf, xf), b.const([-1], np.int64), keepdims=1)
    y = b("Mul", xf, b("Reciprocal", b("Sqrt", b("Add", ms, b.const(np.float32(norm.eps))))))
    return b("Mul", b.cast(y, g.F, TensorProto.FLOAT), w)


def _linear(g: Graph, b: ops.Body, x: str, m, path: str) -> str:
    if isinstance(m, QuantLinear) and g.target == "ort-cpu":
        from .ort_cpu import library_layer, matmul_nbits, quant_matmul_w4a8

        y = (quant_matmul_w4a8 if library_layer(g, m) else matmul_nbits)(g, b, x, [m], path)
        return y if m.bias is None else b("Add", y, g.fweight(f"{path}.bias", m.bias))
    if isinstance(m, QuantLinear) and g.target == "tensorrt":  # no-plugin build: dequantized at export
        y = b("MatMul", x, g.fweight(f"{path}.weight_t", m.weight().T))
        return y if m.bias is None else b("Add", y, g.fweight(f"{path}.bias", m.bias))
    if isinstance(m, QuantLinear):
        fn = ops.quant_matmul_function(m.bits, m.group_size, m.in_features, m.out_features, g.dtype, m.has_mins)
        g.functions[f"{fn.name}/{fn.overload}"] = fn
        feeds = ops.quant_matmul_inputs(path, m, b)
        for t in feeds["initializers"]:
            g.inits[t.name] = t
        y = f"{path}/y"
        g.nodes.append(ops.node("QuantMatMul", [x, *feeds["inputs"]], [y], f"{path}/QuantMatMul", fn.overload,
                                bits=m.bits, group_size=m.group_size, in_features=m.in_features,
                                out_features=m.out_features, has_mins=int(m.has_mins)))
        bias = m.bias
    else:
        y = b("MatMul", x, g.fweight(f"{path}.weight_t", m.weight.T))
        bias = m.bias
    return y if bias is None else b("Add", y, g.fweight(f"{path}.bias", bias))


def _linears(g: Graph, b: ops.Body, x: str, mods: list, path: str, names: list[str]) -> list[str]:
    """Several linears of one input. ort-cpu packs quantized ones of equal lowering (node type and
    container bits) and group size into one node and splits its output (one GEMM instead of several: a decode step pays
    ~10 us per node); where only some match (the allocation picks each layer's format per linear, e.g.
    k and v alike, q not), those are packed and the rest stay alone. Outputs in the order of `mods`."""
    from .ort_cpu import packable

    base = path.rsplit(".", 1)[0]
    if g.target != "ort-cpu" or not all(isinstance(m, QuantLinear) for m in mods):
        return [_linear(g, b, x, m, f"{base}.{n}") for m, n in zip(mods, names)]
    groups: list[list[int]] = []  # indices of mutually packable linears, in first-seen order
    for i, m in enumerate(mods):
        home = next((grp for grp in groups if packable(g, [mods[grp[0]], m])), None)
        home.append(i) if home is not None else groups.append([i])
    out: list[str] = [""] * len(mods)
    for grp in groups:
        if len(grp) == 1:
            out[grp[0]] = _linear(g, b, x, mods[grp[0]], f"{base}.{names[grp[0]]}")
            continue
        sub_path = path if len(grp) == len(mods) else \
            f"{base}." + "_".join(names[i].removesuffix("_proj") for i in grp) + "_proj"
        for i, y in zip(grp, _packed_linears(g, b, x, [mods[i] for i in grp], sub_path,
                                             [f"{base}.{names[i]}" for i in grp])):
            out[i] = y
    return out


def _packed_linears(g: Graph, b: ops.Body, x: str, mods: list, path: str, module_names: list[str]) -> list[str]:
    """One node (MatMulNBits, or QuantMatMulW4A8 for library layers) over packable `mods` side by side along N,
    its output split back per linear."""
    from .ort_cpu import library_layer, matmul_nbits, quant_matmul_w4a8

    y = (quant_matmul_w4a8 if library_layer(g, mods[0]) else matmul_nbits)(g, b, x, mods, path, module_names)
    if any(m.bias is not None for m in mods):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods])
        y = b("Add", y, g.fweight(f"{path}.bias", bias))
    sizes = b.const([m.out_features for m in mods], np.int64)
    return b("Split", y, sizes, axis=-1, n_out=len(mods))


def _gated_mlp(g: Graph, b: ops.Body, x: str, mlp, path: str) -> str:
    """silu(gate(x)) * up(x): one QuantMatMulW4A8 node with gated = 1 where both are library layers that
    pack together (the activation fused into the op: 4 nodes fewer per layer), else the projections
    (packed where they can be) and the activation in standard ops."""
    from .ort_cpu import library_layer, packable, quant_matmul_w4a8

    mods = [mlp.gate_proj, mlp.up_proj]
    if (g.target == "ort-cpu" and all(isinstance(m, QuantLinear) and m.bias is None for m in mods)
            and packable(g, mods) and library_layer(g, mods[0]) and mods[0].out_features == mods[1].out_features):
        return quant_matmul_w4a8(g, b, x, mods, f"{path}.gate_up_proj", [f"{path}.gate_proj", f"{path}.up_proj"],
                                 gated=True)
    gate, up = _linears(g, b, x, mods, f"{path}.gate_up_proj", ["gate_proj", "up_proj"])
    return b("Mul", b("Mul", gate, b("Sigmoid", gate)), up)


def _lean_rope(g: Graph, b: ops.Body, x: str, n: int) -> str:
    """RoPE of (B, T, n*D) in one com.microsoft RotaryEmbedding node: half-split rotation, positions
    past_length + t (position_ids of shape (1,) is that offset), the tables' first halves."""
    return b("RotaryEmbedding", x, "past_length", "rope_cos_half", "rope_sin_half", domain="com.microsoft",
             interleaved=0, num_heads=n)


def _skip_norm(g: Graph, b: ops.Body, x: str, skip: str, norm, path: str) -> tuple[str, str]:
    """(RMSNorm(x + skip), x + skip) in one com.microsoft SkipSimplifiedLayerNormalization node."""
    w = g.fweight(f"{path}.weight", norm.weight)
    b.n += 1
    y, total = f"{b.prefix}skipnorm{b.n}", f"{b.prefix}residual{b.n}"
    b.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [x, skip, w], [y, "", "", total],
                                    name=f"{b.prefix}SkipSimplifiedLayerNormalization_{b.n}", domain="com.microsoft",
                                    epsilon=norm.eps))
    return y, total


def _heads(b, x, n, D):  # (B, T, n*D) -> (B, n, T, D)
    return b("Transpose", b("Reshape", x, b.const([0, 0, n, D], np.int64)), perm=[0, 2, 1, 3])


def _merge(b, x, n, D):  # (B, n, T, D) -> (B, T, n*D)
    return b("Reshape", b("Transpose", x, perm=[0, 2, 1, 3]), b.const([0, 0, n * D], np.int64))


def _rope(b, x, cos, sin, D):
    x1, x2 = b("Split", x, b.const([D // 2, D // 2], np.int64), axis=-1, n_out=2)
    return b("Add", b("Mul", x, cos), b("Mul", b("Concat", b("Neg", x2), x1, axis=-1), sin))


def _full_attention(g: Graph, b: ops.Body, i: int, q, k, v, args, qpos, E, T, state: dict) -> str:
    """Standard ops over the full-precision cache; returns y (B, T, H*D) and declares the state."""
    H, G, D = args.n_heads, args.n_kv_heads, args.head_dim
    past_k, past_v = g.cache_input(state["key"]), g.cache_input(state["value"])
    zero, P = b.const([0], np.int64), "past_length"
    for c, t in ((state["key"], k), (state["value"], v)):
        g.nodes.append(helper.make_node("Identity", [t], [c.output], name=f"layers.{i}/out_{c.output}"))
        g.cache_output(c)
    two = b.const([2], np.int64)
    ka = b("Concat", b("Slice", past_k, zero, P, two), k, axis=2)
    va = b("Concat", b("Slice", past_v, zero, P, two), v, axis=2)
    rep = H // G
    # GQA without copying K/V per query head: the rep query heads of KV head g become rows of one
    # (rep*T, D) block, which is exactly how heads are numbered (h = g*rep + i).
    # products in the activation dtype (no FP32 GEMM on Turing), mask and softmax in fp32
    qg = b("Reshape", b("Mul", q, b.const(np.asarray(D ** -0.5, g.np_float))), b.const([0, G, -1, D], np.int64))
    s4 = b("MatMul", qg, b("Transpose", ka, perm=[0, 1, 3, 2]))  # (B, G, rep*T, E)
    s = b("Reshape", b.cast(s4, TensorProto.FLOAT, g.F), b("Concat", b.const([0, G, rep], np.int64), T, b.const([-1], np.int64), axis=0))
    jpos = b("Range", b.const(np.int64(0)), b("Squeeze", E, zero), b.const(np.int64(1)))
    ok = b("LessOrEqual", b("Unsqueeze", jpos, zero), b("Unsqueeze", qpos, b.const([1], np.int64)))
    p = b("Softmax", b("Where", ok, s, b.const(np.float32(-np.inf))), axis=-1)
    y = b("MatMul", b.cast(b("Reshape", p, b("Shape", s4)), g.F, TensorProto.FLOAT), va)  # (B, G, rep*T, D)
    y = b("Reshape", y, b.const([0, H, -1, D], np.int64))
    return _merge(b, y, H, D)


def _cskv_attention(g: Graph, b: ops.Body, i: int, attn: CSKVAttention, x, q_flat, k_flat, v_flat, args,
                    state: dict, self_form: bool = False) -> str:
    """q/k/v (B, T, n*D), RoPE applied -> y (B, T, H*D) of the layer's BiBranchAttention node.
    self_form (the lean ort-cpu graph): q/k before RoPE, and one BiBranchSelfAttention node takes x and
    the down projections, so RoPE, the casts and the feature MatMuls are inside it."""
    H, G, D, cfg = args.n_heads, args.n_kv_heads, args.head_dim, attn.cfg
    if cfg.sinks:
        raise ShrinkError("export: BiBranchAttention v1 has no attention sinks; calibrate with sinks = 0")
    rk, rv = attn.k_down.shape[1], attn.v_down.shape[1]
    path = f"layers.{i}.self_attn"
    mode = ops.KEY_MODE[cfg.key_mode]
    # At accuracy level 4 (the fast ort-cpu default) the post-RoPE self form's four factors are fp16 (its
    # body and the CPU library convert them as they load): a decode step reads every factor of every layer
    # (fp32: ~0.7 MB a layer at the main job's ranks, the down projections 0.6 of it). fp16 rounding of
    # the down projections flips some int4 feature codes (tests/test_ort_ops.py), which moves the output
    # like any other rounding in the level-4 graph, whose int8 activations amplify a 1e-6 change to a
    # mean KL of ~0.03: judged by perplexity over 8000 tokens (docs/ops.md). Level 0 keeps all fp32, the
    # path that matches the reference.
    fp16_factors = self_form and mode == ops.KEY_MODE["post-rope"] and g.ort_accuracy == 4
    up = (lambda name, t: g.weight(name, t.float(), np.float16)) if fp16_factors else g.fweight
    k_down, v_down = up(f"{path}.k_down", attn.k_down), up(f"{path}.v_down", attn.v_down)
    if self_form:
        feeds = {"x": x, "k_down": k_down, "v_down": v_down}
    elif mode == 0:
        feeds = {"c_k": b("MatMul", x, k_down), "c_v": b("MatMul", x, v_down)}
    else:  # features of the rotated keys as the window stores them (FP16), as the runtime does
        k16 = b.cast(b("Cast", k_flat, to=TensorProto.FLOAT16), g.F, TensorProto.FLOAT16)
        feeds = {"c_k": b("MatMul", k16, k_down), "c_v": b("MatMul", x, v_down)}
    kb = attn.k_proj.bias if attn.k_proj.bias is not None else torch.zeros(G * D)
    vb = attn.v_proj.bias if attn.v_proj.bias is not None else torch.zeros(G * D)
    feeds |= {"q": q_flat, "k": k_flat, "v": v_flat,
              "k_up": up(f"{path}.k_up", attn.k_up), "v_up": up(f"{path}.v_up", attn.v_up),
              "k_bias": g.fweight(f"{path}.k_bias", kb), "v_bias": g.fweight(f"{path}.v_bias", vb),
              "rope_cos": "rope_cos", "rope_sin": "rope_sin", "past_length": "past_length"}
    op = "BiBranchSelfAttention" if self_form else "BiBranchAttention"
    ins, outs, _ = (ops.bi_branch_self_io if self_form else ops.bi_branch_io)(cfg.bits)
    by_port = {port: state[role] for port, (role, _) in BIBRANCH_STATE.items() if role in state}
    by_out_port = {out_port: state[role] for _, (role, out_port) in BIBRANCH_STATE.items() if role in state}
    for name in ins:
        if name in by_port:
            feeds[name] = g.cache_input(by_port[name])
    out_names = []
    for name in outs:
        if name == "y":
            out_names.append(f"layers.{i}/y")
            continue
        out_names.append(by_out_port[name].output)
        g.cache_output(by_out_port[name])
    # At accuracy level 4 the post-RoPE self form also rounds a decode step's folded queries to int8 (its
    # query_bits, what llama.cpp does to the query before a quantized key): one byte product per rank
    # instead of three in the CPU library's key scores (+17% decode at 7700 tokens; docs/ops.md)
    extra = {}
    if self_form:
        extra["query_bits"] = 8 if fp16_factors else 0
        fn = ops.bi_branch_self_function(H, G, D, cfg.window, rk, rv, cfg.bits, mode, g.dtype, extra["query_bits"])
    else:
        fn = ops.bi_branch_function(H, G, D, cfg.window, rk, rv, cfg.bits, mode, g.dtype)
    g.functions[f"{fn.name}/{fn.overload}"] = fn
    g.nodes.append(ops.node(op, [feeds[n] for n in ins], out_names, f"{path}/{op}",
                            fn.overload, num_heads=H, num_kv_heads=G, head_dim=D, window=cfg.window, rank_k=rk,
                            rank_v=rv, bits=cfg.bits, key_mode=mode, **extra))
    return out_names[0]


def build(model, dtype: str = "float32", target: str = "generic", name: str = "shrinkrt",
          stats: dict | None = None, ort_accuracy: int = 0, data_file=None, lm_head_bits: int = 0) -> onnx.ModelProto:
    """The runtime Transformer (compressions applied) -> ONNX ModelProto. Deterministic.
    target "ort-cpu" lowers quantized linears to MatMulNBits; `stats` receives what that costs.
    `data_file`: stream the weights there as external data (Graph); None keeps them in the proto."""
    args = model.args
    if args.sliding_window is not None:
        raise ShrinkError("export: sliding-window models are not supported")
    if dtype not in ops.ONNX_DTYPE:
        raise ShrinkError(f"export: unsupported dtype '{dtype}' (use float32 or float16)")
    H, G, D = args.n_heads, args.n_kv_heads, args.head_dim
    io = describe(model, dtype)
    layer_state = [{c.role: c for c in io.caches if c.layer == i} for i in range(args.n_layers)]
    if lm_head_bits and target != "ort-cpu":
        raise ShrinkError("export: --lm-head-bits is for --target ort-cpu (MatMulNBits)")
    g = Graph(dtype, target, ort_accuracy, data_file, lm_head_bits)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    g.input("past_length", TensorProto.INT64, [1])
    b = g.scope("rope/")
    g.fweight("rope_cos", model.rope_cos)
    g.fweight("rope_sin", model.rope_sin)
    P = "past_length"
    T = b("Shape", ids, start=1, end=2)
    E = b("Add", P, T)
    zero = b.const([0], np.int64)
    qpos = b("Range", b("Squeeze", P, zero), b("Squeeze", E, zero), b.const(np.int64(1)))
    # ort-cpu: the lean graph (docs/formats.md "Export"): residual + RMSNorm fused, packed projections,
    # RoPE in one node per q/k reading the tables' halves (Llama's tables repeat them)
    half = D // 2
    lean = target == "ort-cpu" and torch.equal(model.rope_cos[:, :half], model.rope_cos[:, half:])
    if lean and not all(isinstance(layer.self_attn, CSKVAttention) for layer in model.layers):  # RotaryEmbedding's
        g.fweight("rope_cos_half", model.rope_cos[:, :half])  # (CSKV layers' BiBranchSelfAttention rotates itself)
        g.fweight("rope_sin_half", model.rope_sin[:, :half])
    else:
        cos, sin = b("Slice", "rope_cos", P, E, zero), b("Slice", "rope_sin", P, E, zero)
    b = g.scope("embed/")
    if g.lm_head_bits and args.tie_embeddings:  # the table once: the quantized head's codes serve both
        from .ort_cpu import embedding_from_head

        h = embedding_from_head(g, b, ids, model.lm_head.weight.detach().float().numpy(), g.lm_head_bits)
    else:
        h = b("Gather", g.fweight("embed_tokens.weight", model.embed_tokens.weight), ids, axis=0)
    if lean:  # the first norm in standard ops (ORT's SimplifiedLayerNormalization is no ONNX op); the rest fused
        x = _rms_norm(g, b, h, model.layers[0].input_layernorm, "layers.0.input_layernorm")
    for i, layer in enumerate(model.layers):
        b = g.scope(f"layers.{i}/")
        attn = layer.self_attn
        if not lean:
            x = _rms_norm(g, b, h, layer.input_layernorm, f"layers.{i}.input_layernorm")
        path = f"layers.{i}.self_attn"
        qf, kf, vf = _linears(g, b, x, [attn.q_proj, attn.k_proj, attn.v_proj], f"{path}.qkv_proj",
                              ["q_proj", "k_proj", "v_proj"])
        cskv = isinstance(attn, CSKVAttention)
        if lean and not cskv:  # RoPE on (B, T, n*D), then heads for full attention (BiBranchSelfAttention,
            qf, kf = _lean_rope(g, b, qf, H), _lean_rope(g, b, kf, G)  # the lean CSKV node, rotates itself)
            q, k, v = _heads(b, qf, H, D), _heads(b, kf, G, D), _heads(b, vf, G, D)
        elif not lean:  # RoPE on heads, (B, n, T, D); BiBranchAttention gets them merged back
            q = _rope(b, _heads(b, qf, H, D), cos, sin, D)
            k = _rope(b, _heads(b, kf, G, D), cos, sin, D)
            v = _heads(b, vf, G, D)
            if cskv:
                qf, kf, vf = _merge(b, q, H, D), _merge(b, k, G, D), _merge(b, v, G, D)
        if cskv:
            y = _cskv_attention(g, b, i, attn, x, qf, kf, vf, args, layer_state[i], self_form=lean)
        else:
            y = _full_attention(g, b, i, q, k, v, args, qpos, E, T, layer_state[i])
        o = _linear(g, b, y, attn.o_proj, f"{path}.o_proj")
        if lean:
            x, h = _skip_norm(g, b, o, h, layer.post_attention_layernorm, f"layers.{i}.post_attention_layernorm")
        else:
            h = b("Add", h, o)
            x = _rms_norm(g, b, h, layer.post_attention_layernorm, f"layers.{i}.post_attention_layernorm")
        mlp, mp = layer.mlp, f"layers.{i}.mlp"
        act = _gated_mlp(g, b, x, mlp, mp)
        d = _linear(g, b, act, mlp.down_proj, f"{mp}.down_proj")
        if lean:  # the next RMSNorm (the next layer's input norm, or the final one) with this residual
            last_layer = i + 1 == len(model.layers)
            norm = model.norm if last_layer else model.layers[i + 1].input_layernorm
            x, h = _skip_norm(g, b, d, h, norm, "norm" if last_layer else f"layers.{i + 1}.input_layernorm")
        else:
            h = b("Add", h, d)
    b = g.scope("head/")
    if lean:  # x holds every position normed already
        x = b("Gather", x, b("Sub", T, b.const([1], np.int64)), axis=1)  # (B, 1, dim)
    else:
        last = b("Gather", h, b("Sub", T, b.const([1], np.int64)), axis=1)  # (B, 1, dim)
        x = _rms_norm(g, b, last, model.norm, "norm")
    if g.lm_head_bits:
        from .ort_cpu import lm_head_nbits

        logits = lm_head_nbits(g, b, x, model.lm_head.weight.detach().float().numpy(), g.lm_head_bits)
    elif args.tie_embeddings:
        w = "embed_tokens.weight"
        logits = b("MatMul", x, b("Transpose", w, perm=[1, 0]))
    else:
        logits = b("MatMul", x, g.fweight("lm_head.weight_t", model.lm_head.weight.T))
    g.nodes.append(helper.make_node("Cast", [logits], ["logits"], name="head/logits", to=TensorProto.FLOAT)
                   if g.F != TensorProto.FLOAT else helper.make_node("Identity", [logits], ["logits"], name="head/logits"))
    g.output("logits", TensorProto.FLOAT, ["batch", 1, args.vocab_size])
    # outputs in a fixed order: logits, then each layer's state in layer order (as declared)
    g.outputs = [g.outputs[-1]] + g.outputs[:-1]
    graph = helper.make_graph(g.nodes, name, g.inputs, g.outputs, list(g.inits.values()))
    opsets = [helper.make_opsetid("", ops.OPSET), helper.make_opsetid(ops.DOMAIN, 1)]
    if any(n.domain == "com.microsoft" for n in g.nodes):  # MatMulNBits, the lean graph's fused ops
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    m = helper.make_model(graph, opset_imports=opsets,
                          functions=[g.functions[k] for k in sorted(g.functions)], producer_name="shrinkrt",
                          producer_version="0.1.0")
    m.ir_version = IR_VERSION
    if stats is not None:
        stats.update(g.stats)
    return m
