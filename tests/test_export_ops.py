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


def quant_layer(N, K, bits, group, n_out, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    keep = select_outliers(w, torch.ones(K), n_out) if n_out else None
    q, s, z, _ = qz.quantize_rtn(w, bits, group, keep=keep)
    p = qz.pack(q, s, z, bits, group)
    outl = to_csr(keep, w) if n_out else None
    return QuantLinear(K, N, bits, group, p.codes, p.scales, p.zeros, outl)


def quant_matmul_model(layers, dtype="float32"):
    """One graph with one QuantMatMul node per layer, all reading X; outputs Y0, Y1, ..."""
    nodes, inits, fns, outs = [], [], {}, []
    F = ops.ONNX_DTYPE[dtype]
    K = layers[0].in_features
    for i, m in enumerate(layers):
        names = ops.quant_matmul_inputs(f"l{i}", m)
        inits += names["initializers"]
        fn = ops.quant_matmul_function(m.bits, m.group_size, m.in_features, m.out_features, dtype)
        fns[fn.overload] = fn
        nodes.append(ops.node("QuantMatMul", ["X", *names["inputs"]], [f"Y{i}"], f"qmm{i}", fn.overload,
                              bits=m.bits, group_size=m.group_size, in_features=m.in_features,
                              out_features=m.out_features))
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


def test_quant_matmul_attributes_are_int32_and_plugin_tagged():
    with pytest.raises(ValueError, match="int32"):
        ops.node("QuantMatMul", ["X"], ["Y"], "n", bits=4, group_size=64, in_features=2**31, out_features=8)
    with pytest.raises(ValueError, match="takes attributes"):
        ops.node("QuantMatMul", ["X"], ["Y"], "n", bits=4)
    n = ops.node("QuantMatMul", ["X"], ["Y"], "n", bits=4, group_size=64, in_features=8, out_features=8)
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    assert attrs["plugin_namespace"] == b"shrinkrt" and attrs["plugin_version"] == b"1"
    assert n.domain == "shrinkrt" and n.op_type == "QuantMatMul"
