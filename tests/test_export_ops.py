"""Reference bodies of the custom ops, run by ONNX Runtime, against the PyTorch reference."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shrinkrt.calib import quantize as qz
from shrinkrt.calib.mq import select_outliers, to_csr
from shrinkrt.export import ops
from shrinkrt.runtime.quant_linear import QuantLinear

ort = pytest.importorskip("onnxruntime")


def quant_layer(N, K, bits, group, n_out, seed=0, mins=False, param_bits=16):
    """A QuantLinear of random weights (RTN); `mins`: stored with mins (no outliers then), fp16 or, with
    param_bits 8, 8-bit codes on per-row steps."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    keep = select_outliers(w, torch.ones(K), n_out) if n_out else None
    steps = qz.row_param_steps(w, bits, group) if param_bits == 8 else None
    q, s, z, _ = qz.quantize_rtn(w, bits, group, keep=keep, mins=mins, steps=steps)
    p = qz.pack(q, s, z, bits, group, mins=mins, steps=steps)
    outl = to_csr(keep, w) if n_out else None
    return QuantLinear(K, N, bits, group, p.codes, p.scales, p.zeros, outl, mins=p.mins, param_steps=p.param_steps)


def quant_matmul_model(layers, dtype="float32"):
    """One graph with one QuantMatMul node per layer, all reading X; outputs Y0, Y1, ..."""
    nodes, inits, fns, outs = [], [], {}, []
    F = ops.ONNX_DTYPE[dtype]
    K = layers[0].in_features
    b = ops.Body("expand/")
    for i, m in enumerate(layers):
        names = ops.quant_matmul_inputs(f"l{i}", m, b)
        nodes += b.nodes
        b.nodes = []
        inits += names["initializers"]
        fn = ops.quant_matmul_function(m.bits, m.group_size, m.in_features, m.out_features, dtype, m.has_mins)
        fns[fn.overload] = fn
        nodes.append(ops.node("QuantMatMul", ["X", *names["inputs"]], [f"Y{i}"], f"qmm{i}", fn.overload,
                              bits=m.bits, group_size=m.group_size, in_features=m.in_features,
                              out_features=m.out_features, has_mins=int(m.has_mins)))
        outs.append(helper.make_tensor_value_info(f"Y{i}", F, ["B", "T", m.out_features]))
    graph = helper.make_graph(nodes, "qmm", [helper.make_tensor_value_info("X", F, ["B", "T", K])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ops.OPSET),
                                                    helper.make_opsetid(ops.DOMAIN, 1)], functions=list(fns.values()))
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_matmul_body_matches_reference(bits):
    # odd shapes: K not a multiple of the group or of 32; N odd; with and without outliers
    layers = [quant_layer(37, 200, bits, 64, 0, seed=1), quant_layer(19, 200, bits, 128, 9, seed=2)]
    x = torch.randn(2, 3, 200, generator=torch.Generator().manual_seed(3))
    got = run(quant_matmul_model(layers), {"X": x.numpy()})
    for m, y in zip(layers, got):
        ref = m(x).numpy()
        # fp32 both sides, same dequantized weight; only the matmul's summation order differs
        assert np.abs(y - ref).max() < 1e-4 * np.abs(ref).max()


def test_quant_matmul_body_with_mins_matches_reference():
    """A 4-bit group-32 layer with fp16 mins (w = q * s + m) beside one with zero points, in one graph:
    each body gives its QuantLinear's product, on a K that is not a multiple of the group."""
    layers = [quant_layer(37, 200, 4, 32, 0, seed=4, mins=True), quant_layer(19, 200, 4, 32, 0, seed=5)]
    assert layers[0].has_mins and layers[0].mins.dtype == torch.float16 and not layers[1].has_mins
    x = torch.randn(2, 3, 200, generator=torch.Generator().manual_seed(6))
    got = run(quant_matmul_model(layers), {"X": x.numpy()})
    for m, y in zip(layers, got):
        ref = m(x).numpy()
        assert np.abs(y - ref).max() < 1e-4 * np.abs(ref).max()


def test_quant_matmul_with_8bit_params_matches_reference():
    """A min layer stored with 8-bit param codes: the artifact holds the uint8 / int8 codes and the rows'
    fp16 steps, standard nodes expand them into the op's fp16 scales and mins, and the product is the
    QuantLinear's (whose weight() reads the codes); beside an fp16-param min layer in one graph."""
    layers = [quant_layer(37, 200, 4, 32, 0, seed=4, mins=True, param_bits=8),
              quant_layer(19, 200, 4, 32, 0, seed=5, mins=True)]
    assert layers[0].param_bits == 8 and layers[0].scales.dtype == torch.uint8 and layers[1].param_bits == 16
    model = quant_matmul_model(layers)
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["l0.scale_codes"].data_type == onnx.TensorProto.UINT8 and "l0.scales" not in inits
    assert inits["l0.min_codes"].data_type == onnx.TensorProto.INT8 and list(inits["l0.param_steps"].dims) == [37, 2]
    x = torch.randn(2, 3, 200, generator=torch.Generator().manual_seed(6))
    got = run(model, {"X": x.numpy()})
    for m, y in zip(layers, got):
        ref = m(x).numpy()
        assert np.abs(y - ref).max() < 1e-4 * np.abs(ref).max()
    with pytest.raises(ValueError, match="needs a node list"):
        ops.quant_matmul_inputs("l0", layers[0])


def test_quant_matmul_attributes_are_int32_and_plugin_tagged():
    with pytest.raises(ValueError, match="int32"):
        ops.node("QuantMatMul", ["X"], ["Y"], "n", bits=4, group_size=64, in_features=2**31, out_features=8,
                 has_mins=0)
    with pytest.raises(ValueError, match="takes attributes"):
        ops.node("QuantMatMul", ["X"], ["Y"], "n", bits=4)
    n = ops.node("QuantMatMul", ["X"], ["Y"], "n", bits=4, group_size=64, in_features=8, out_features=8,
                 has_mins=1)
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    assert attrs["plugin_namespace"] == b"shrinkrt" and attrs["plugin_version"] == b"1"
    assert attrs["has_mins"] == 1 and n.domain == "shrinkrt" and n.op_type == "QuantMatMul"


def bi_branch_model(attn, cfg, dtype="float32", hidden=None, factor_dtype=None, down_dtype=None, query_bits=None):
    model = ops.bi_branch_model(attn.n_heads, attn.n_kv_heads, attn.head_dim, cfg.window, attn.k_down.shape[1],
                                attn.v_down.shape[1], cfg.bits, ops.KEY_MODE[cfg.key_mode], dtype, hidden,
                                factor_dtype, down_dtype, query_bits)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("ranks", [(5, 37), (32, 64)])  # odd / padded groups, and whole groups (no Pad, no Slice)
def test_bi_branch_body_matches_runtime(key_mode, bits, ranks):
    """The body, fed the layer's q/k/v/features and the cache state it returns, reproduces
    CSKVAttention call by call (prefill, decode, chunk), including the stored feature rows."""
    from shrinkrt.runtime.cskv import CSKVAttention, CSKVConfig
    from tests.conftest import bibranch_call_inputs, tiny_hf_model
    from tests.test_model import ours_from

    model = ours_from(tiny_hf_model("qwen2"))  # q/k/v biases, GQA
    a = model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    cfg = CSKVConfig(key_mode, 6, bits)
    in_k = a.n_kv_heads * a.head_dim if key_mode == "post-rope" else a.q_proj.weight.shape[1]
    rk, rv = ranks
    layer = CSKVAttention(a, cfg, torch.randn(in_k, rk, generator=gen), torch.randn(rk, 32, generator=gen) * 0.3,
                          torch.randn(64, rv, generator=gen), torch.randn(rv, 32, generator=gen) * 0.3,
                          model.rope_cos, model.rope_sin)
    S = 40
    layer.setup_cache(1, S, torch.float32, "cpu")
    sess = ort.InferenceSession(bi_branch_model(layer, cfg).SerializeToString(), providers=["CPUExecutionProvider"])
    H, G, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    zeros_bias = np.zeros(G * D, np.float32)
    state = {"win_k": np.zeros((1, G, 6, D), np.float16), "win_v": np.zeros((1, G, 6, D), np.float16)}
    cache = layer.cache
    store = {f"feat_{kv}": np.zeros(tuple(getattr(cache, f"feat_{kv}").codes.shape), np.int8 if bits < 16 else np.float16)
             for kv in "kv"}
    store.update({f"feat_{kv}_scales": np.zeros(tuple(getattr(cache, f"feat_{kv}").scales.shape), np.float16)
                  for kv in "kv"} if bits < 16 else {})
    x_all = torch.randn(1, S, 64, generator=gen)
    start = 0
    for T in (13, 1, 1, 9, 1, 7):
        inputs, ref = bibranch_call_inputs(model, a, layer, x_all[:, start:start + T], start)
        feeds = {**{n: t.numpy() for n, t in inputs.items()}, **state, **store,
                 "k_up": layer.k_up.numpy(), "v_up": layer.v_up.numpy(),
                 "k_bias": a.k_proj.bias.detach().numpy(), "v_bias": a.v_proj.bias.detach().numpy(),
                 "rope_cos": model.rope_cos.numpy(), "rope_sin": model.rope_sin.numpy(),
                 "past_length": np.array([start], np.int64)}
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        with torch.no_grad():
            y = a.o_proj(torch.from_numpy(got["y"])).numpy()
        assert np.abs(y - ref.numpy()).max() < 1e-4, (T, start, np.abs(y - ref.numpy()).max())
        state = {"win_k": got["win_k_out"], "win_v": got["win_v_out"]}
        for name in store:  # the caller's in-place write of the new rows
            store[name][:, start:start + T] = got[name + "_new"]
        start += T
    # the rows the op returned are the rows the runtime cache stores, byte for byte
    for kv in "kv":
        fs = getattr(cache, f"feat_{kv}")
        assert np.array_equal(store[f"feat_{kv}"][:, :start].view(np.uint8 if bits == 4 else store[f"feat_{kv}"].dtype),
                              fs.codes[:, :start].numpy())
        if bits < 16:
            assert np.array_equal(store[f"feat_{kv}_scales"][:, :start], fs.scales[:, :start].numpy())
