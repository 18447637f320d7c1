"""The custom ops' contract (docs/ops.md) in one place: domain, version, signatures and the numbers
every implementation of them shares (the reference bodies of export/ops.py, the PyTorch runtime, the
Triton kernels, the TensorRT plugins and the ONNX Runtime CPU library).

Python reads these names; the C++ libraries include `shrinkrt_ops.gen.h`, which `cpp_header()` renders
from this module at kernel build time (plugins/kernels/aot.py writes it beside the kernel source), so
no number here is typed twice.
"""
from __future__ import annotations

import math

DOMAIN = "shrinkrt"  # ONNX domain of the ops and TensorRT plugin namespace
PLUGIN_VERSION = "1"

# name -> (inputs, outputs, attributes), in node order; the one place the op signatures live.
SCHEMAS = {
    "QuantMatMul": (
        ["X", "codes", "scales", "zeros", "outlier_rowptr", "outlier_cols", "outlier_vals"],
        ["Y"],
        # has_mins: 1 = `zeros` holds the fp16 min per (row, group) and w = q * s + m (WEIGHT_MIN_FORMATS)
        ["bits", "group_size", "in_features", "out_features", "has_mins"]),
    # The ort-cpu graph's form of QuantMatMul for a 4-bit group-32 min layer (WEIGHT_MIN_FORMATS; the CPU
    # library): X quantized to int8 per block of 32 columns (W4A8), `mins` the fp16 group mins, no outliers
    # gated = 1 (the packed gate/up projection of a SwiGLU MLP): Y = silu(P[..., :N/2]) * P[..., N/2:] of
    # the product P, (..., out_features / 2): one node instead of the product, a Split, a Sigmoid and two Muls.
    # quantized_sums = 1: the min meets the block sum of the int8 activations (dx * sum xq), so P is the
    # dequantized weight times the dequantized activations; 0 (absent: exports before it): the plain sum of x
    "QuantMatMulW4A8": (
        ["X", "codes", "scales", "mins"],
        ["Y"],
        ["in_features", "out_features", "gated", "quantized_sums"]),
    "BiBranchAttention": (
        # the scales come last: a 16-bit feature branch has none, and the node simply ends earlier
        ["q", "k", "v", "c_k", "c_v", "win_k", "win_v", "feat_k", "feat_v", "k_up", "v_up", "k_bias", "v_bias",
         "rope_cos", "rope_sin", "past_length", "feat_k_scales", "feat_v_scales"],
        ["y", "win_k_out", "win_v_out", "feat_k_new", "feat_v_new", "feat_k_scales_new", "feat_v_scales_new"],
        ["num_heads", "num_kv_heads", "head_dim", "window", "rank_k", "rank_v", "bits", "key_mode"]),
    # BiBranchAttention from the layer's own projections (the ort-cpu graph; the CPU library): q and k
    # before RoPE and x, the normed hidden state, instead of rotated q/k and the features c_k/c_v.
    # query_bits (added later: absent = 0): 8 = post-RoPE, a call of at most QUERY_BITS_MAX_TOKENS tokens
    # dots the feature keys with its folded queries rounded to int8 (QUERY_BITS below); 0 = fp32
    "BiBranchSelfAttention": (
        ["q", "k", "v", "x", "k_down", "v_down", "win_k", "win_v", "feat_k", "feat_v", "k_up", "v_up", "k_bias",
         "v_bias", "rope_cos", "rope_sin", "past_length", "feat_k_scales", "feat_v_scales"],
        ["y", "win_k_out", "win_v_out", "feat_k_new", "feat_v_new", "feat_k_scales_new", "feat_v_scales_new"],
        ["num_heads", "num_kv_heads", "head_dim", "window", "rank_k", "rank_v", "bits", "key_mode", "query_bits"]),
}
# inputs / outputs a 16-bit feature branch leaves off the end (the scales)
UNSCALED_DROP = 2
KEY_MODE = {"pre-rope": 0, "post-rope": 1}

# BiBranchSelfAttention's query_bits: 0, or 8 = post-RoPE, the queries folded through k_up (one row of
# rank_k per query head) rounded symmetrically per FEATURE_GROUP ranks, q = round(x * QUERY_CODE_MAX / amax)
# with the scale amax / QUERY_CODE_MAX (what llama.cpp does to the query before its dot with a quantized
# key: one int8 byte product per rank instead of an fp32 one), in calls of at most QUERY_BITS_MAX_TOKENS
# tokens (decode steps, short chunks); longer calls (prefill) keep fp32 queries.
QUERY_BITS = (0, 8)
QUERY_CODE_MAX = 127
QUERY_BITS_MAX_TOKENS = 16

# Feature store (BiBranchAttention at 8/4 bits): symmetric per token, one FP16 scale per FEATURE_GROUP
# consecutive features; int4 codes two per byte, low nibble = even feature.
FEATURE_GROUP = 32
# Least scale of a feature group: the smallest normal FP16 (2^-14). A floor below FP16's range (1e-8
# rounds to 0 in FP16) gave an all-zero group the scale 0 and NaN codes (0 / 0).
SCALE_FLOOR = 2.0 ** -14

# Packed weights (QuantMatMul): codes as a little-endian bit stream in int32 words per output row.
WORD_BITS = 32
WEIGHT_BITS = (2, 3, 4, 8)
# Columns per (row, group) scale and zero point; the calibration may choose one per layer. 32 is the
# source GGUF's own block (Q4_1); MatMulNBits takes each as its block_size.
WEIGHT_GROUP_SIZES = (32, 64, 128)
# (bits, group) a layer may store with an fp16 min per group instead of an integer zero point
# (w = q * s + m: Q4_1's own form, 5.0 bits per weight at group 32). The source GGUF is Q4_1, so this
# format holds its linears exactly, where an integer zero point shifts the grid by up to half a step.
WEIGHT_MIN_FORMATS = ((4, 32),)
# QuantMatMulW4A8: the activations' int8 block (the min format's group) and their code limit
ACT_BLOCK = 32
ACT_CODE_MAX = 127

# Limits of the ahead-of-time attention kernels, which the plugins size their workspace by.
RANK_PAD = 256  # feature ranks the kernels take at most (>= n_kv * head_dim of the default model)
SPLITS_PAD = 64  # splits the reduce kernel merges at most; the window takes the last slot
MIN_SPLIT = 256  # feature rows per split at least

# Tiles of the weight kernels, which the plugins compute launch grids from.
QGEMV_BLOCK_N, QGEMV_BLOCK_K = 32, 64
QGEMV_ROWS = (2, 4, 8)  # activation rows of the GEMV specializations (M_PAD); more rows go to the GEMM path
DEQUANT_BLOCK_N, DEQUANT_BLOCK_K = 32, 64


def split_plan(capacity: int, window: int) -> tuple[int, int]:
    """(n_splits, split_len) covering every feature row a capacity-`capacity` cache can attend, at most
    SPLITS_PAD - 1 splits."""
    rows = max(1, capacity - window + 1)
    split_len = max(MIN_SPLIT, math.ceil(rows / (SPLITS_PAD - 1)))
    return math.ceil(rows / split_len), split_len


def _enum(name: str, members: list[str]) -> str:
    """enum Input { kQ = 0, kCK = 3, ..., kNbInputs }: C++ positions named after the ONNX names."""
    camel = ["k" + "".join(p[:1].upper() + p[1:] for p in m.split("_")) for m in members]
    return f"enum {name}\n{{\n" + "".join(f"    {c} = {i},\n" for i, c in enumerate(camel)) + \
        f"    kNb{name}s = {len(members)}\n}};"


def cpp_header() -> str:
    """shrinkrt_ops.gen.h: the contract above as C++ constants, enums of input/output positions and the
    attribute names (the plugins' field order)."""
    out = ["// Generated from shrinkrt/runtime/op_contract.py by plugins/kernels/aot.py: do not edit.",
           "#pragma once", "", "#include <cstdint>", "", "namespace shrinkrt", "{", "namespace contract", "{",
           f'constexpr char const* kDomain = "{DOMAIN}";',
           f'constexpr char const* kVersion = "{PLUGIN_VERSION}";',
           f"constexpr int32_t kFeatureGroup = {FEATURE_GROUP};",
           f"constexpr float kScaleFloor = {SCALE_FLOOR!r}f;",
           f"constexpr int32_t kWordBits = {WORD_BITS};",
           "constexpr int32_t kWeightBits[] = {" + ", ".join(map(str, WEIGHT_BITS)) + "};",
           "constexpr int32_t kWeightGroupSizes[] = {" + ", ".join(map(str, WEIGHT_GROUP_SIZES)) + "};",
           "constexpr int32_t kWeightMinFormats[][2] = {" + ", ".join(f"{{{b}, {g}}}" for b, g in WEIGHT_MIN_FORMATS)
           + "};",
           f"constexpr int32_t kActBlock = {ACT_BLOCK};",
           f"constexpr int32_t kActCodeMax = {ACT_CODE_MAX};",
           f"constexpr int32_t kQueryCodeMax = {QUERY_CODE_MAX};",
           f"constexpr int64_t kQueryBitsMaxTokens = {QUERY_BITS_MAX_TOKENS};",
           f"constexpr int64_t kRankPad = {RANK_PAD};",
           f"constexpr int64_t kSplitsPad = {SPLITS_PAD};",
           f"constexpr int64_t kMinSplit = {MIN_SPLIT};",
           f"constexpr int32_t kQgemvBlockN = {QGEMV_BLOCK_N};",
           f"constexpr int64_t kQgemvMaxRows = {max(QGEMV_ROWS)};",
           f"constexpr int32_t kDequantBlockN = {DEQUANT_BLOCK_N};",
           f"constexpr int32_t kDequantBlockK = {DEQUANT_BLOCK_K};",
           f"constexpr int32_t kUnscaledDrop = {UNSCALED_DROP};",
           ""]
    for mode, v in KEY_MODE.items():
        out.append(f"constexpr int32_t kKeyMode{''.join(p.capitalize() for p in mode.split('-'))} = {v};")
    out.append("")
    for op, (inputs, outputs, attrs) in SCHEMAS.items():
        out += [f"namespace {op}", "{", _enum("Input", inputs), _enum("Output", outputs),
                "constexpr char const* kAttributes[] = {" + ", ".join(f'"{a}"' for a in attrs) + "};",
                f"constexpr int kNbAttributes = {len(attrs)};", f"}} // namespace {op}", ""]
    out += ["// split_plan(): splits covering every attendable feature row of a capacity-S store",
            "inline void splitPlan(int64_t S, int64_t W, int32_t& nSplits, int32_t& splitLen)", "{",
            "    int64_t const rows = S - W + 1 > 1 ? S - W + 1 : 1;",
            "    int64_t const perSplit = (rows + kSplitsPad - 2) / (kSplitsPad - 1);",
            "    int64_t const len = perSplit > kMinSplit ? perSplit : kMinSplit;",
            "    splitLen = static_cast<int32_t>(len);",
            "    nSplits = static_cast<int32_t>((rows + len - 1) / len);", "}",
            "} // namespace contract", "} // namespace shrinkrt", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    """python -m shrinkrt.runtime.op_contract OUT.h: the header alone (the CPU library needs no kernels)."""
    import argparse
    from pathlib import Path

    from shrinkrt.atomic import write_file

    ap = argparse.ArgumentParser(description="write shrinkrt_ops.gen.h, the ops' contract for C++")
    ap.add_argument("out")
    out = Path(ap.parse_args(argv).out)
    write_file(out, cpp_header(), lambda p: p.name.endswith(".gen.h"), "out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
