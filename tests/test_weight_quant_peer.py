"""The llama.cpp peer's bits per weight (benchmarks/weight_quant.py): read from a GGUF's tensor table,
over the attention and MLP linears only, on a tiny file written with the gguf package."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "weight_quant.py"


def bench():
    spec = importlib.util.spec_from_file_location("weight_quant_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_linear_bits_per_weight_counts_only_the_linears(tmp_path):
    rng = np.random.default_rng(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    # Linears: Q8_0 (34 bytes per 32 weights = 8.5 bpw) and F16 (16 bpw), as a k-quant file mixes types.
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(rng.standard_normal((64, 64), dtype=np.float32), q8),
                 raw_dtype=q8)
    w.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((32, 64)).astype(np.float16))
    # Not ours to count: the embedding (tied head), norms, a bias, a name that only looks like a linear.
    w.add_tensor("token_embd.weight", rng.standard_normal((100, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.bias", np.zeros(64, dtype=np.float32))
    w.add_tensor("blk.0.attn_q_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    got = bench().linear_bits_per_weight(path)
    n_q, n_d = 64 * 64, 32 * 64
    assert got["weights"] == n_q + n_d
    assert got["bytes"] == n_q // 32 * 34 + n_d * 2
    assert got["bits_per_weight"] == pytest.approx((8.5 * n_q + 16 * n_d) / (n_q + n_d))
    assert got["linear_types"] == {"Q8_0": 1, "F16": 1}


def test_linear_bits_per_weight_refuses_a_file_without_linears(tmp_path):
    path = tmp_path / "empty.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="no blk"):
        bench().linear_bits_per_weight(path)
