"""Kernel benchmarks on a CUDA GPU -> docs/results/kernels.{json,md,png} (run by scripts/gpu.sh).

GEMV: Llama-7B shapes at batch 1 for each bit width, achieved DRAM bandwidth (bytes of the packed
weight + activations / time) as a ratio of measured copy bandwidth, next to torch FP16 matmul.
Attention decode at 1k/4k/16k/32k tokens: ours over a 20%-bytes CSKV cache (int4 features) next to
torch SDPA over an FP16 full cache, same heads (32 query heads, 8 KV heads, head_dim 128).
Prefill: chunked GEMV vs dequantize + tensor-core matmul at M = 16..2048.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from shrinkrt.atomic import save_figure, write_atomic


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100) * 1000  # microseconds


def copy_bandwidth() -> float:
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))
    return 2 * a.numel() / (us * 1e-6) / 1e9


def gemv_rows(copy_gbs: float) -> list[dict]:
    from shrinkrt.plugins.kernels.qgemv import qgemv
    from tests.gpu.test_kernels_gpu import to
    from tests.test_export_ops import quant_layer

    rows = []
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        t16 = bench(lambda: torch.matmul(x, w16.T))
        for bits in (2, 3, 4, 8):
            m = to(quant_layer(n, k, bits, 128, 0, seed=bits), "cuda")
            us = bench(lambda: qgemv(x, m))
            nbytes = m.nbytes() + x.numel() * 2 + n * 2
            rows.append({"bits": bits, "n": n, "k": k, "batch": 1, "ours_us": us, "torch_fp16_us": t16,
                         "achieved_gbs": nbytes / (us * 1e-6) / 1e9,
                         "fraction_of_copy": nbytes / (us * 1e-6) / 1e9 / copy_gbs, "speedup_vs_fp16": t16 / us})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def prefill_rows() -> list[dict]:
    """Prefill GEMM (M activation rows, 4-bit 4096x4096): the GEMV kernel in chunks of 8 rows (what
    the QuantMatMul plugin launches) vs the dequantize kernel + torch FP16 matmul (what the runtime
    runs for M > 8), next to torch FP16 on a dense weight."""
    from shrinkrt.plugins.kernels.dequant import dequant
    from shrinkrt.plugins.kernels.qgemv import qgemv
    from tests.gpu.test_kernels_gpu import to
    from tests.test_export_ops import quant_layer

    n = k = 4096
    m = to(quant_layer(n, k, 4, 128, 0, seed=4), "cuda")
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
    rows = []
    for M in (16, 128, 512, 2048):
        x = torch.randn(M, k, device="cuda", dtype=torch.float16)
        chunked = bench(lambda: [qgemv(x[i:i + 8], m) for i in range(0, M, 8)])
        deq = bench(lambda: x @ dequant(m).T)
        t16 = bench(lambda: x @ w16.T)
        rows.append({"bits": 4, "n": n, "k": k, "m": M, "gemv_chunked_us": chunked, "dequant_matmul_us": deq,
                     "torch_fp16_us": t16, "winner": "gemv" if chunked < deq else "dequant+matmul"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_rows() -> list[dict]:
    import torch.nn.functional as F

    from shrinkrt.plugins.kernels.bibranch_attn import bibranch_decode
    from shrinkrt.runtime import kv_quant

    H, G, D, W = 32, 8, 128, 64
    rows = []
    for ctx in (1024, 4096, 16384, 32768):
        # 20% of FP16 bytes: window 64 + int4 features with ranks r per K and V: (r/2 + 2*ceil(r/32)) * 2
        r = 192
        q = torch.randn(1, H, D, device="cuda", dtype=torch.float16)
        win = torch.randn(1, G, W, D, device="cuda", dtype=torch.float16)
        codes, scales = kv_quant.quantize(torch.randn(1, ctx, r, device="cuda"), 4)
        codes = codes.view(torch.int8)
        up = torch.randn(r, G * D, device="cuda", dtype=torch.float16) * 0.05
        bias = torch.zeros(G * D, device="cuda", dtype=torch.float16)
        cos = torch.ones(ctx, D, device="cuda", dtype=torch.float16)
        sin = torch.zeros(ctx, D, device="cuda", dtype=torch.float16)
        ours = bench(lambda: bibranch_decode(q, win, win, codes, scales, codes, scales, up, up, bias, bias, cos, sin,
                                             ctx - 1, 4, True, split_len=512, block_j=32))
        kf = torch.randn(1, H, ctx, D, device="cuda", dtype=torch.float16)
        sdpa = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], kf, kf))
        frac = (2 * ctx * kv_quant.row_bytes(r, 4) + 2 * W * G * D * 2) / (2 * ctx * G * D * 2)
        rows.append({"context": ctx, "kv_bytes_fraction": frac, "ours_us": ours, "sdpa_us": sdpa,
                     "speedup_vs_sdpa": sdpa / ours})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/kernels")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py: no CUDA device (run on a lent GPU machine)", file=sys.stderr)
        return 2
    copy = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": copy, "gemv": gemv_rows(copy),
              "attention": attention_rows(), "prefill": prefill_rows()}
    out = Path(a.out)
    write_atomic(json.dumps(result, indent=2) + "\n", out.with_suffix(".json"))
    md = [f"# Kernels on {result['device']}", "", f"Copy bandwidth {copy:.0f} GB/s.", "",
          "| bits | n x k | ours us | torch fp16 us | GB/s | of copy | vs fp16 |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['bits']} | {r['n']}x{r['k']} | {r['ours_us']:.1f} | {r['torch_fp16_us']:.1f} | "
           f"{r['achieved_gbs']:.0f} | {r['fraction_of_copy']:.2f} | {r['speedup_vs_fp16']:.2f} |" for r in result["gemv"]]
    md += ["", "| context | KV bytes | ours us | SDPA fp16 us | vs SDPA |", "|---|---|---|---|---|"]
    md += [f"| {r['context']} | {r['kv_bytes_fraction']:.2f} | {r['ours_us']:.1f} | {r['sdpa_us']:.1f} | "
           f"{r['speedup_vs_sdpa']:.2f} |" for r in result["attention"]]
    md += ["", "| prefill M (4-bit 4096x4096) | GEMV x M/8 us | dequant + matmul us | torch fp16 us | winner |",
           "|---|---|---|---|---|"]
    md += [f"| {r['m']} | {r['gemv_chunked_us']:.1f} | {r['dequant_matmul_us']:.1f} | {r['torch_fp16_us']:.1f} | "
           f"{r['winner']} |" for r in result["prefill"]]
    write_atomic("\n".join(md) + "\n", out.with_suffix(".md"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for bits in (2, 3, 4, 8):
        rs = [r for r in result["gemv"] if r["bits"] == bits]
        ax[0].bar([f"{r['n']}x{r['k']}\n{bits}b" for r in rs], [r["fraction_of_copy"] for r in rs])
    ax[0].set_ylabel("fraction of copy bandwidth")
    ax[1].plot([r["context"] for r in result["attention"]], [r["speedup_vs_sdpa"] for r in result["attention"]], "o-")
    ax[1].set_xscale("log", base=2)
    ax[1].set_ylabel("speedup vs SDPA fp16")
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
