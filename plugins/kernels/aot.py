"""Ahead-of-time build of every kernel specialization for sm_75 on a machine without a GPU.

`triton.compile` on an `ASTSource` needs no driver (Triton's own AOT CLI does). For each
specialization we keep the cubin (sm_75 SASS) and the PTX (.target sm_75, JIT-compiled by the
driver on newer GPUs) and write one generated C++ source that embeds them with each kernel's
entry name, warps, shared memory and grid rule, plus a JSON manifest. Generated files are build
outputs (never committed); the same Triton version gives the same bytes.

    python -m shrinkrt.plugins.kernels.aot --out build/kernels [--arch 75]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from shrinkrt.runtime import op_contract
from shrinkrt.runtime.op_contract import (QGEMV_ROWS, RANK_PAD as R_PAD, SPLITS_PAD as NS_PAD, WEIGHT_BITS,
                                          WEIGHT_GROUP_SIZES, WEIGHT_MIN_FORMATS)

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # pin the default Triton 3.10 will change

QGEMV_SIGNATURE = {
    "x_ptr": "*fp16", "codes_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*i32", "rowptr_ptr": "*i32",
    "cols_ptr": "*i32", "vals_ptr": "*fp16", "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "G": "i32",
    "words_per_row": "i32", "zwords_per_row": "i32", "stride_xm": "i32", "stride_ym": "i32",
    "BITS": "constexpr", "GROUP": "constexpr", "M_PAD": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
    "HAS_OUTLIERS": "constexpr", "HAS_MINS": "constexpr"}


DEQUANT_SIGNATURE = {
    "codes_ptr": "*i32", "scales_ptr": "*fp16", "zeros_ptr": "*i32", "rowptr_ptr": "*i32", "cols_ptr": "*i32",
    "vals_ptr": "*fp16", "w_ptr": "*fp16", "N": "i32", "K": "i32", "G": "i32", "words_per_row": "i32",
    "zwords_per_row": "i32", "BITS": "constexpr", "GROUP": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
    "HAS_OUTLIERS": "constexpr", "HAS_MINS": "constexpr"}


def _with_mins(signature: dict, mins: bool) -> dict:
    """A weight kernel's signature; in a layer with fp16 mins the zero-point slot holds fp16 values."""
    return {**signature, "zeros_ptr": "*fp16"} if mins else signature


# The default attention specializations: the embedded SmolLM2's shape (window 64) with every feature
# branch and key mode. `--export DIR` compiles what that export's BiBranchAttention nodes need instead.
SMOLLM2_ATTN = {"H": 9, "G": 3, "D": 64, "W": 64}
DEFAULT_ATTENTION = [{"num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "window": 64, "bits": b, "key_mode": m}
                     for b in (16, 8, 4) for m in (0, 1)]


# Kernel names: the plugins look each specialization up by the name their fields give
# (plugins/tensorrt/*_plugin.cpp build the same strings).
def split_name(H, G, D, W, bits, post) -> str:
    return f"bibranch_split_b{bits}_{'post' if post else 'pre'}_h{H}g{G}d{D}w{W}"


def reduce_name(H, G, D) -> str:
    return f"bibranch_reduce_h{H}g{G}d{D}"


def append_name(G, D, W) -> str:
    return f"bibranch_append_g{G}d{D}w{W}"


def feature_quant_name(bits) -> str:
    return f"feature_quant_b{bits}"


def qgemv_name(bits, group, m_pad, outliers, mins=False) -> str:
    return f"qgemv_b{bits}_g{group}{'_min' if mins else ''}_m{m_pad}_o{int(outliers)}"


def dequant_name(bits, group, mins=False) -> str:
    return f"dequant_b{bits}_g{group}{'_min' if mins else ''}"


def check_attention(cfg: dict) -> None:
    """A BiBranchAttention configuration the kernels can be specialised for, or one line saying why not."""
    from shrinkrt.errors import ShrinkError


    H, G, D, W = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["window"]
    shape = f"heads {H}, KV heads {G}, head_dim {D}, window {W}, {cfg['bits']}-bit features"
    if D < 16 or D & (D - 1):
        raise ShrinkError(f"the attention kernels need a power-of-two head_dim >= 16 ({shape})")
    if W < 1:
        raise ShrinkError(f"the attention kernels need a window of at least 1 token ({shape})")
    if H % G:
        raise ShrinkError(f"heads must be a multiple of KV heads ({shape})")
    for r in ("rank_k", "rank_v"):
        if cfg.get(r, 0) > R_PAD:
            raise ShrinkError(f"{r} {cfg[r]} exceeds the {R_PAD} features the attention kernels take ({shape})")


def attention_specs(configs: list[dict]) -> list[dict]:
    """Split kernels per (shape, bits, key mode), reduce per (H, G, D), append per (G, D, W), feature
    quantization per bits: each once, in a fixed order."""

    for c in configs:
        check_attention(c)
    keys = sorted({(c["num_heads"], c["num_kv_heads"], c["head_dim"], c["window"], c["bits"], c["key_mode"])
                   for c in configs}, key=lambda k: (k[:4], -k[4], k[5]))
    out, seen = [], set()

    def add(spec):
        if spec["name"] not in seen:
            seen.add(spec["name"])
            out.append(spec)

    for H, G, D, W, bits, post in keys:
        const = {"H": H, "G": G, "D": D, "W": W, "RK_PAD": R_PAD, "RV_PAD": R_PAD, "BITS": bits,
                 "POST_ROPE": bool(post), "W_PAD": 1 << (W - 1).bit_length(), "BLOCK_J": 16}
        add({"kernel": "bibranch_split", "name": split_name(H, G, D, W, bits, post), "const": const,
             "grid": "B*H x n_splits+1 x 1", "signature": _split_signature(bits)})
    for H, G, D, W, bits, post in keys:
        add({"kernel": "bibranch_reduce", "name": reduce_name(H, G, D),
             "const": {"H": H, "G": G, "D": D, "RV_PAD": R_PAD, "NS_PAD": NS_PAD}, "grid": "B*H x 1 x 1",
             "signature": REDUCE_SIGNATURE})
    for H, G, D, W, bits, post in keys:
        add({"kernel": "bibranch_append", "name": append_name(G, D, W), "const": {"G": G, "D": D, "W": W},
             "grid": "B*G x 1 x 1", "signature": APPEND_SIGNATURE})
    for bits in sorted({k[4] for k in keys}, reverse=True):
        add({"kernel": "feature_quant", "name": feature_quant_name(bits), "const": {"BITS": bits, "R_PAD": R_PAD},
             "grid": "B*T x 1 x 1", "signature": _quant_signature(bits)})
    return out


def needed_kernels(op_attributes: dict) -> dict[str, str]:
    """Kernel name -> the configuration that needs it, for an export's custom-op attributes
    (export.json "custom_op_attributes"): what a plugin library must hold to run that export."""
    need = {}
    for c in op_attributes.get("BiBranchAttention", []):
        H, G, D, W, bits, post = (c["num_heads"], c["num_kv_heads"], c["head_dim"], c["window"], c["bits"],
                                  c["key_mode"])
        shape = (f"BiBranchAttention heads {H}, KV heads {G}, head_dim {D}, window {W}, {bits}-bit features, "
                 f"{'post' if post else 'pre'}-RoPE")
        for n in (split_name(H, G, D, W, bits, post), reduce_name(H, G, D), append_name(G, D, W),
                  feature_quant_name(bits)):
            need.setdefault(n, shape)
    for c in op_attributes.get("QuantMatMul", []):
        mins = bool(c.get("has_mins", 0))
        shape = f"QuantMatMul {c['bits']} bits, group {c['group_size']}{', fp16 mins' if mins else ''}"
        for n in [qgemv_name(c["bits"], c["group_size"], m, True, mins) for m in QGEMV_ROWS] + \
                [dequant_name(c["bits"], c["group_size"], mins)]:
            need.setdefault(n, shape)
    return need


def _split_signature(bits: int) -> dict:
    feat = "*fp16" if bits == 16 else "*i8"
    sig = {n: "*fp16" for n in ("q_ptr", "win_k_ptr", "win_v_ptr")}
    for new in ("", "n"):
        sig.update({f"fk{new}_ptr": feat, f"fks{new}_ptr": "*fp16", f"fv{new}_ptr": feat, f"fvs{new}_ptr": "*fp16"})
    sig.update({"k_up_ptr": "*fp16", "k_bias_ptr": "*fp16", "cos_ptr": "*fp16", "sin_ptr": "*fp16",
                "part_ml_ptr": "*fp32", "part_w_ptr": "*fp32", "part_c_ptr": "*fp32", "past_ptr": "*i64"})
    sig.update({n: "i32" for n in ("t", "T", "S", "n_splits", "split_len", "RK", "RV", "CK", "CV")})
    sig.update({n: "constexpr" for n in ("H", "G", "D", "W", "RK_PAD", "RV_PAD", "BITS", "POST_ROPE", "W_PAD",
                                         "BLOCK_J")})
    return sig


REDUCE_SIGNATURE = {"part_ml_ptr": "*fp32", "part_w_ptr": "*fp32", "part_c_ptr": "*fp32", "v_up_ptr": "*fp16",
                    "v_bias_ptr": "*fp16", "y_ptr": "*fp16", "t": "i32", "T": "i32", "n_splits": "i32", "RV": "i32",
                    "H": "constexpr", "G": "constexpr", "D": "constexpr", "RV_PAD": "constexpr", "NS_PAD": "constexpr"}
APPEND_SIGNATURE = {"k_ptr": "*fp16", "v_ptr": "*fp16", "win_k_ptr": "*fp16", "win_v_ptr": "*fp16", "past_ptr": "*i64",
                    "t": "i32", "T": "i32", "G": "constexpr", "D": "constexpr", "W": "constexpr"}


def _quant_signature(bits: int) -> dict:
    return {"c_ptr": "*fp16", "out_ptr": "*fp16" if bits == 16 else "*i8", "scales_ptr": "*fp16", "R": "i32",
            "C": "i32", "BITS": "constexpr", "R_PAD": "constexpr"}


def specializations(attention: list[dict] | None = None) -> list[dict]:
    """Every (kernel, constexprs) the plugins launch, in a fixed order: the weight kernels for every bit
    width and group size, the attention kernels for `attention` (BiBranchAttention attributes; default:
    the embedded model's shape; ranks are runtime values up to R_PAD)."""
    from shrinkrt.runtime.op_contract import (DEQUANT_BLOCK_K as DQ_BLOCK_K, DEQUANT_BLOCK_N as DQ_BLOCK_N,
                                              QGEMV_BLOCK_K as BLOCK_K, QGEMV_BLOCK_N as BLOCK_N)

    out = []
    formats = [(b, g, False) for b in WEIGHT_BITS for g in WEIGHT_GROUP_SIZES] + \
        [(b, g, True) for b, g in WEIGHT_MIN_FORMATS]
    for bits, group, mins in formats:
        for m_pad in QGEMV_ROWS:
            # a min layer has no outliers, but the plugin launches the o1 GEMV for every layer (the CSR
            # counts read on the device, zero rows here), so that is the only min variant built
            for outliers in ((True,) if mins else (False, True)):
                const = {"BITS": bits, "GROUP": group, "M_PAD": m_pad, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K,
                         "HAS_OUTLIERS": outliers, "HAS_MINS": mins}
                out.append({"kernel": "qgemv", "name": qgemv_name(bits, group, m_pad, outliers, mins),
                            "const": const, "grid": f"ceil(N / {BLOCK_N}) x 1 x 1",
                            "signature": _with_mins(QGEMV_SIGNATURE, mins)})
    for bits, group, mins in formats:  # prefill: packed -> dense FP16 tiles, then cuBLASLt (outliers read on the device)
        out.append({"kernel": "dequant", "name": dequant_name(bits, group, mins),
                    "const": {"BITS": bits, "GROUP": group, "BLOCK_N": DQ_BLOCK_N, "BLOCK_K": DQ_BLOCK_K,
                              "HAS_OUTLIERS": True, "HAS_MINS": mins},
                    "grid": f"ceil(N / {DQ_BLOCK_N}) x ceil(K / {DQ_BLOCK_K}) x 1",
                    "signature": _with_mins(DEQUANT_SIGNATURE, mins)})
    return out + attention_specs(attention or DEFAULT_ATTENTION)


def compile_one(spec: dict, arch: int = 75):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile

    from .bibranch_attn import (bibranch_append_kernel, bibranch_reduce_kernel, bibranch_split_kernel,
                                feature_quant_kernel)
    from .dequant import dequant_kernel
    from .qgemv import qgemv_kernel

    fn = {"qgemv": qgemv_kernel, "dequant": dequant_kernel, "bibranch_split": bibranch_split_kernel, "bibranch_reduce": bibranch_reduce_kernel,
          "bibranch_append": bibranch_append_kernel, "feature_quant": feature_quant_kernel}[spec["kernel"]]
    sig = spec.get("signature", QGEMV_SIGNATURE)
    k = tcompile(ASTSource(fn, sig, spec["const"]), target=GPUTarget("cuda", arch, 32))
    return k.asm["cubin"], k.asm["ptx"], k.metadata


def n_params(ptx: str) -> int:
    """Parameters of the PTX entry (the kernel's non-constexpr arguments plus Triton's scratch pointers)."""
    entry = re.search(r"\.entry\s+\w+\s*\(([^)]*)\)", ptx, re.S)
    return len(re.findall(r"\.param\b", entry.group(1))) if entry else 0


def _c_bytes(data: bytes) -> str:
    return ",".join(str(b) for b in data)


MANIFEST = "kernels.json"
CONTRACT_HEADER = "shrinkrt_ops.gen.h"  # op_contract.cpp_header(), included by the C++ libraries


def is_kernels_dir(path: Path) -> bool:
    """A directory this tool wrote as kernels (kernels.json lists them): the only kind `build` replaces."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and isinstance(m.get("kernels"), list) and "arch" in m


def export_attention(export_dir: Path) -> list[dict]:
    """The BiBranchAttention configurations of an export (export.json "custom_op_attributes"; read
    as plain JSON: the kernels sit below the export stage, docs/ARCHITECTURE.md)."""
    from shrinkrt.errors import ShrinkError

    f = Path(export_dir) / "export.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ShrinkError(f"{f} is missing or not JSON ({e})") from None
    ops = meta.get("custom_op_attributes") if isinstance(meta, dict) else None
    if not isinstance(ops, dict):
        raise ShrinkError(f"{f} has no custom_op_attributes: export it again with this ShrinkRT")
    return ops.get("BiBranchAttention", [])


def build(out: Path, arch: int = 75, limit: int = 0, attention: list[dict] | None = None) -> dict:
    """Every specialization into `out` (missing or an earlier kernels directory), written whole."""
    from shrinkrt.atomic import write_dir

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 turns kernels into interpreted functions: unset it to compile")
    result = {}
    write_dir(Path(out), lambda tmp: result.update(_build_into(tmp, arch, limit, attention)), is_kernels_dir, "--out")
    return result


def _build_into(out: Path, arch: int, limit: int, attention: list[dict] | None) -> dict:
    rows, parts = [], []
    for i, spec in enumerate(specializations(attention)[:limit or None]):
        cubin, ptx, meta = compile_one(spec, arch)
        sig = spec.get("signature", QGEMV_SIGNATURE)
        parts.append(f"static const unsigned char kCubin{i}[] = {{{_c_bytes(cubin)}}};\n"
                     f"static const char kPtx{i}[] = {json.dumps(ptx)};\n")
        rows.append({"name": spec["name"], "entry": meta.name, "num_warps": meta.num_warps, "shared": meta.shared,
                     "num_params": n_params(ptx), "global_scratch_size": getattr(meta, "global_scratch_size", 0),
                     "grid": spec["grid"], "const": {k: v for k, v in spec["const"].items()}, "cubin_bytes": len(cubin),
                     "cubin_sha256": hashlib.sha256(cubin).hexdigest(), "arch": f"sm_{arch}",
                     # what a test's driver stand-in needs to run a launch of this image under the interpreter
                     # (tests/stand_in.py): the kernel, its parameters in order, the PTX image's identity
                     "kernel": spec["kernel"], "params": [[n, t] for n, t in sig.items() if t != "constexpr"],
                     "ptx_bytes": len(ptx.encode()), "ptx_sha256": hashlib.sha256(ptx.encode()).hexdigest()})
        (out / f"{spec['name']}.sm_{arch}.cubin").write_bytes(cubin)
    table = ",\n".join(f'  {{"{r["name"]}", "{r["entry"]}", kCubin{i}, sizeof(kCubin{i}), kPtx{i}, {r["num_warps"]}, '
                       f'{r["shared"]}, {r["num_params"]}}}' for i, r in enumerate(rows))
    # the struct is declared once, in plugins/tensorrt/kernel_images.h (the plugins' side of the contract)
    src = ("// Generated by plugins/kernels/aot.py: do not edit, do not commit.\n#include \"kernel_images.h\"\n\n"
           "namespace shrinkrt {\n" + "".join(parts)
           + f"\nextern const KernelImage kKernels[] = {{\n{table}\n}};\n"
           f"extern const int kNumKernels = {len(rows)};\n}}  // namespace shrinkrt\n")
    import triton

    manifest = {"triton": triton.__version__, "arch": f"sm_{arch}", "ptx_target": f"sm_{arch}", "kernels": rows}
    (out / "shrinkrt_kernels.gen.cpp").write_text(src)
    (out / CONTRACT_HEADER).write_text(op_contract.cpp_header())
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile every kernel specialization ahead of time")
    ap.add_argument("--out", default="build/kernels")
    ap.add_argument("--arch", type=int, default=75)
    ap.add_argument("--limit", type=int, default=0, help="only the first N specializations (tests)")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="compile the attention kernels this export needs (default: the embedded model's shape)")
    a = ap.parse_args(argv)
    m = build(Path(a.out), a.arch, a.limit, export_attention(Path(a.export)) if a.export else None)
    print(f"[shrinkrt] {len(m['kernels'])} kernels for {m['arch']} (Triton {m['triton']}) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
